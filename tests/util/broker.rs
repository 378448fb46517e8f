//! A broker for one test: `isomesh-broker` or Mosquitto, as a child process on a free port.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Which broker the suite runs against (`ISOMESH_TEST_BROKER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Isomesh,
    Mosquitto,
}

impl BrokerKind {
    pub fn from_env() -> BrokerKind {
        match std::env::var("ISOMESH_TEST_BROKER").as_deref() {
            Ok("mosquitto") => BrokerKind::Mosquitto,
            Ok("isomesh") | Err(_) => BrokerKind::Isomesh,
            Ok(other) => panic!("ISOMESH_TEST_BROKER={other:?}: use isomesh or mosquitto"),
        }
    }
}

/// A running broker, killed on drop.
pub struct TestBroker {
    pub kind: BrokerKind,
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    /// Starts the broker chosen by `ISOMESH_TEST_BROKER` and waits until it accepts connections.
    pub async fn start() -> TestBroker {
        TestBroker::start_kind(BrokerKind::from_env()).await
    }

    pub async fn start_kind(kind: BrokerKind) -> TestBroker {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = crate::free_port();
        let log = std::fs::File::create(dir.path().join("broker.log")).expect("log");
        let child = match kind {
            BrokerKind::Isomesh => Command::new(crate::bin_path("isomesh-broker"))
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn isomesh-broker"),
            BrokerKind::Mosquitto => {
                let conf = dir.path().join("mosquitto.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                         max_keepalive 65535\nlog_dest stderr\n"
                    ),
                )
                .expect("mosquitto.conf");
                let exe = ["/usr/sbin/mosquitto", "mosquitto"]
                    .into_iter()
                    .find(|p| Command::new(p).arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok())
                    .expect("mosquitto is installed (Debian package mosquitto; `make test` installs it)");
                Command::new(exe)
                    .arg("-c")
                    .arg(&conf)
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("spawn mosquitto")
            }
        };
        let mut child = child;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || std::time::Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default();
                panic!("{kind:?} broker did not listen on {port} ({exited:?}); its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        TestBroker {
            kind,
            port,
            child,
            _dir: dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
