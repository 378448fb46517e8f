//! A broker for one test: `isomesh-broker` or Mosquitto, as a real child process on a free port.
//!
//! `ISOMESH_TEST_BROKER` picks which (`isomesh`, the default, or `mosquitto`), so the same suite
//! proves that the mesh works on our broker and on a standard one. The broker is killed when the
//! [`TestBroker`] is dropped; its log stays in a temp dir until then and is printed if it fails
//! to start.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a broker may take to accept connections on a loaded 2-core machine.
const START_WITHIN: Duration = Duration::from_secs(30);

/// Which broker the suite runs against (`ISOMESH_TEST_BROKER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// `isomesh-broker` from `target/<profile>/` (or `ISOMESH_BIN_DIR`).
    Isomesh,
    /// Mosquitto 2 (Debian package `mosquitto`), with a generated config.
    Mosquitto,
}

impl BrokerKind {
    /// The broker named by `ISOMESH_TEST_BROKER`; `isomesh` when unset.
    pub fn from_env() -> BrokerKind {
        match std::env::var("ISOMESH_TEST_BROKER").as_deref() {
            Ok("mosquitto") => BrokerKind::Mosquitto,
            Ok("isomesh") | Ok("") | Err(_) => BrokerKind::Isomesh,
            Ok(other) => panic!("ISOMESH_TEST_BROKER={other:?}: use isomesh or mosquitto"),
        }
    }
}

/// A running broker on `127.0.0.1`, killed on drop.
pub struct TestBroker {
    /// Which broker this is, for tests that only make sense on one of them.
    pub kind: BrokerKind,
    /// The port it listens on, found by binding `127.0.0.1:0`.
    port: u16,
    /// The broker process.
    child: Child,
    /// Holds Mosquitto's config and the broker's log; removed on drop.
    dir: tempfile::TempDir,
    /// Password and ACL files, when logins are required.
    access: Option<Access>,
    /// The TLS listener's files and port, when there is one.
    tls: Option<(Tls, u16)>,
    /// The address the plain listener binds: loopback, or every interface for containers.
    bind: &'static str,
    /// The port of isomesh-broker's `--metrics-listen`, when it serves one.
    metrics_port: Option<u16>,
    /// More flags of isomesh-broker (a cluster member's), kept for restarts.
    extra_args: Vec<String>,
}

/// A TLS listener beside the plain one (files in PEM, from `scripts/test_certs.py`).
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signed the client certificates the listener accepts.
    pub ca: PathBuf,
    /// Whether clients must present a certificate signed by `ca`.
    pub require_client_certificate: bool,
}

/// Logins and roles for a broker: files in Mosquitto's formats, which both brokers read.
#[derive(Debug, Clone)]
pub struct Access {
    pub password_file: PathBuf,
    pub acl_file: PathBuf,
}

impl TestBroker {
    /// Starts the broker chosen by `ISOMESH_TEST_BROKER` and waits until it accepts connections.
    pub async fn start() -> TestBroker {
        TestBroker::start_kind(BrokerKind::from_env()).await
    }

    /// Starts a broker of the given kind and waits until it accepts connections.
    pub async fn start_kind(kind: BrokerKind) -> TestBroker {
        TestBroker::start_with(kind, None, None).await
    }

    /// Starts the broker chosen by `ISOMESH_TEST_BROKER` with a TLS listener on a second port
    /// (anonymous access, as the plain one).
    pub async fn start_tls(tls: Tls) -> TestBroker {
        TestBroker::start_with(BrokerKind::from_env(), None, Some(tls)).await
    }

    /// Starts the broker chosen by `ISOMESH_TEST_BROKER` with logins required: no anonymous
    /// access, accounts from `access.password_file`, roles from `access.acl_file`.
    pub async fn start_secured(access: Access) -> TestBroker {
        TestBroker::start_with(BrokerKind::from_env(), Some(access), None).await
    }

    /// Starts an isomesh-broker (anonymous access) that also serves its Prometheus metrics
    /// (`--metrics-listen`, at [`TestBroker::metrics_addr`]).
    pub async fn start_with_metrics() -> TestBroker {
        TestBroker::start_bound(BrokerKind::Isomesh, "127.0.0.1", None, None, true, vec![]).await
    }

    /// Starts a broker of the given kind (anonymous access) listening on every interface, so
    /// containers reach it through their network's gateway (the compose tests' other broker).
    pub async fn start_for_containers(kind: BrokerKind) -> TestBroker {
        TestBroker::start_bound(kind, "0.0.0.0", None, None, false, vec![]).await
    }

    async fn start_with(kind: BrokerKind, access: Option<Access>, tls: Option<Tls>) -> TestBroker {
        TestBroker::start_bound(kind, "127.0.0.1", access, tls, false, vec![]).await
    }

    /// Starts `members` isomesh-brokers as one cluster (`--cluster-*`, members talking over
    /// 127.0.0.1), all at once as compose starts them, and waits until each accepts
    /// connections. Member `i` of the result has cluster id `i + 1`.
    pub async fn start_cluster(members: usize) -> Vec<TestBroker> {
        TestBroker::start_cluster_staggered(members, Duration::ZERO).await
    }

    /// [`TestBroker::start_cluster`] with member `i` started `i * gap` after the first, as
    /// members on machines that boot at different times are. A member serves clients only once
    /// the others listen on their cluster ports (or after isomesh-broker's join wait).
    pub async fn start_cluster_staggered(members: usize, gap: Duration) -> Vec<TestBroker> {
        let grpc_ports: Vec<u16> = (0..members).map(|_| crate::free_port()).collect();
        let list = grpc_ports
            .iter()
            .enumerate()
            .map(|(i, port)| format!("{}@127.0.0.1:{port}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        // Concurrently: a member waits for the others' cluster ports before it serves MQTT,
        // so members started one after another would each wait out the join wait.
        let starting = grpc_ports.iter().enumerate().map(|(i, port)| {
            let args = vec![
                "--cluster-id".to_string(),
                (i + 1).to_string(),
                "--cluster-listen".to_string(),
                format!("127.0.0.1:{port}"),
                "--cluster-members".to_string(),
                list.clone(),
            ];
            tokio::spawn(async move {
                tokio::time::sleep(gap * i as u32).await;
                TestBroker::start_bound(BrokerKind::Isomesh, "127.0.0.1", None, None, false, args)
                    .await
            })
        });
        let starting: Vec<_> = starting.collect();
        let mut brokers = Vec::new();
        for member in starting {
            brokers.push(member.await.expect("a cluster member started"));
        }
        brokers
    }

    async fn start_bound(
        kind: BrokerKind,
        bind: &'static str,
        access: Option<Access>,
        tls: Option<Tls>,
        metrics: bool,
        extra_args: Vec<String>,
    ) -> TestBroker {
        let dir = tempfile::tempdir().expect("a temp dir for the broker");
        // A free port is free only until someone else binds it: a broker that finds its port
        // taken exits, and is started again on another one.
        let mut attempts = 0;
        let (child, port, tls, metrics_port) = loop {
            attempts += 1;
            let port = crate::free_port();
            let tls_port = tls.as_ref().map(|_| crate::free_port());
            let metrics_port = metrics.then(crate::free_port);
            let started = spawn_listening(
                kind,
                (bind, port),
                dir.path(),
                access.as_ref(),
                tls.as_ref().zip(tls_port),
                metrics_port,
                &extra_args,
            )
            .await;
            match started {
                Ok(child) => {
                    break (
                        child,
                        port,
                        tls.map(|tls| (tls, tls_port.unwrap_or_default())),
                        metrics_port,
                    )
                }
                Err(NotListening::PortTaken(_)) if attempts < 5 => continue,
                Err(NotListening::PortTaken(why) | NotListening::Failed(why)) => panic!("{why}"),
            }
        };
        TestBroker {
            kind,
            port,
            child,
            dir,
            access,
            tls,
            bind,
            metrics_port,
            extra_args,
        }
    }

    /// `127.0.0.1:PORT` of the broker's metrics page (panics without one).
    pub fn metrics_addr(&self) -> String {
        let port = self
            .metrics_port
            .expect("a broker started with start_with_metrics");
        format!("127.0.0.1:{port}")
    }

    /// `mqtts://127.0.0.1:PORT` of the TLS listener (panics without one).
    pub fn tls_url(&self) -> String {
        let (_, port) = self.tls.as_ref().expect("a broker started with start_tls");
        format!("mqtts://127.0.0.1:{port}")
    }

    /// The TLS listener's port (panics without one).
    pub fn tls_port(&self) -> u16 {
        self.tls
            .as_ref()
            .expect("a broker started with start_tls")
            .1
    }

    /// Kills the broker and starts a new one on the same port: a crash and restart that loses
    /// everything the broker held in memory (sessions, retained messages).
    pub async fn restart(&mut self) {
        self.kill();
        self.start_again().await;
    }

    /// Kills the broker (SIGKILL): its clients lose the connection. [`TestBroker::start_again`]
    /// brings it back.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the broker again after [`TestBroker::kill`], on the same port and files, with
    /// nothing of what it held in memory.
    pub async fn start_again(&mut self) {
        // The same port: the nodes are configured with it.
        self.child = spawn_listening(
            self.kind,
            (self.bind, self.port),
            self.dir.path(),
            self.access.as_ref(),
            self.tls.as_ref().map(|(t, p)| (t, *p)),
            self.metrics_port,
            &self.extra_args,
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's process id (to send it a signal, e.g. SIGHUP to reload its files).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// `mqtt://127.0.0.1:PORT`, the form `--broker` flags take.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// What the broker has logged so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The file the broker logs to, kept across [`TestBroker::restart`]s.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why a broker did not come up.
#[derive(Debug)]
enum NotListening {
    /// Another process had its port: start it again on another one.
    PortTaken(String),
    Failed(String),
}

/// The line each broker logs once every listener is open (Mosquitto's at `log_type
/// information`).
fn ready_line(kind: BrokerKind) -> &'static str {
    match kind {
        BrokerKind::Isomesh => "isomesh-broker serving MQTT",
        BrokerKind::Mosquitto => " running",
    }
}

/// Starts a broker on `(bind, port)`, logging into `dir/broker.log`, and waits until it says
/// it listens (its own log line, not just an open port, which another process may hold).
async fn spawn_listening(
    kind: BrokerKind,
    (bind, port): (&str, u16),
    dir: &std::path::Path,
    access: Option<&Access>,
    tls: Option<(&Tls, u16)>,
    metrics_port: Option<u16>,
    extra_args: &[String],
) -> Result<Child, NotListening> {
    let log_path = dir.join("broker.log");
    // The log is appended to across restarts: count the ready lines already in it.
    let ready_before = std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .matches(ready_line(kind))
        .count();
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("the broker log file");
    let mut command = match kind {
        BrokerKind::Isomesh => {
            let mut command = Command::new(crate::bin_path("isomesh-broker"));
            command.args(["--listen", &format!("{bind}:{port}")]);
            match access {
                Some(access) => {
                    command.arg("--password-file").arg(&access.password_file);
                    command.arg("--acl-file").arg(&access.acl_file);
                }
                None => {
                    command.arg("--allow-anonymous");
                }
            }
            if let Some((tls, tls_port)) = tls {
                command.args(["--tls-listen", &format!("127.0.0.1:{tls_port}")]);
                command.arg("--tls-cert").arg(&tls.cert);
                command.arg("--tls-key").arg(&tls.key);
                if tls.require_client_certificate {
                    command.arg("--tls-client-ca").arg(&tls.ca);
                }
            }
            if let Some(port) = metrics_port {
                command.args(["--metrics-listen", &format!("127.0.0.1:{port}")]);
            }
            command.args(extra_args);
            command
        }
        BrokerKind::Mosquitto => {
            let conf = dir.join("mosquitto.conf");
            let mut config = mosquitto_config(bind, port);
            match access {
                Some(access) => config.push_str(&format!(
                    "allow_anonymous false\npassword_file {}\nacl_file {}\n",
                    access.password_file.display(),
                    access.acl_file.display()
                )),
                None => config.push_str("allow_anonymous true\n"),
            }
            if let Some((tls, tls_port)) = tls {
                config.push_str(&format!(
                    "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {}\n",
                    tls.ca.display(),
                    tls.cert.display(),
                    tls.key.display(),
                    tls.require_client_certificate
                ));
            }
            std::fs::write(&conf, config).expect("write mosquitto.conf");
            let mut command = Command::new(mosquitto_path());
            command.arg("-c").arg(&conf);
            command
        }
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| NotListening::Failed(format!("cannot start the {kind:?} broker: {e}")))?;
    let deadline = Instant::now() + START_WITHIN;
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let listening = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    loop {
        let ready = log().matches(ready_line(kind)).count() > ready_before;
        if ready
            && listening(port)
            && tls.is_none_or(|(_, tls_port)| listening(tls_port))
            && metrics_port.is_none_or(listening)
        {
            return Ok(child);
        }
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let log = log();
            let why = format!(
                "the {kind:?} broker did not listen on 127.0.0.1:{port} within \
                 {START_WITHIN:?} (exit: {exited:?}); its log:\n{log}"
            );
            let taken = log.to_lowercase().contains("address already in use")
                || log.to_lowercase().contains("addrinuse");
            return Err(if exited.is_some() && taken {
                NotListening::PortTaken(why)
            } else {
                NotListening::Failed(why)
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Mosquitto's executable: Debian installs it in /usr/sbin, often not on a user's PATH.
fn mosquitto_path() -> PathBuf {
    let sbin = Path::new("/usr/sbin/mosquitto");
    if sbin.is_file() {
        return sbin.to_path_buf();
    }
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("mosquitto"))
        .find(|path| path.is_file());
    found.unwrap_or_else(|| {
        panic!("mosquitto is not installed: `apt-get install mosquitto mosquitto-clients`")
    })
}

/// A Mosquitto 2 config as close as it gets to isomesh-broker's behaviour (anonymous access is
/// added by the caller): no persistence, no payload limit (`message_size_limit 0` = every valid MQTT message; its
/// `max_packet_size` is unlimited by default and refuses 0), keepalive 0 allowed, and queues
/// deep enough for 150 retained chunks. Shared subscriptions are on by default in Mosquitto 2.
fn mosquitto_config(bind: &str, port: u16) -> String {
    format!(
        "listener {port} {bind}\n\
         persistence false\n\
         message_size_limit 0\n\
         max_queued_messages 10000\n\
         max_inflight_messages 128\n\
         max_keepalive 65535\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         log_type notice\n\
         log_type information\n"
    )
}
