//! The compose mesh (`compose.yaml`) as a test fixture: real containers from the images of
//! `make images`, driven through `docker-compose` and `docker`, with faults a test can inject:
//! `kill -9` a service, stop or restart it, cut it off the network and put it back.
//!
//! Each [`Mesh`] is a compose project of its own (`-p isomesh-test-...`), with the broker on a
//! free port of the host's loopback and every node's metrics on another; dropping it runs
//! `docker-compose down -v`, and if the test is failing it first prints every service's log.
//! Tests need Docker: without it they fail with a message saying so, never skip. The mesh has
//! an ARM device, d4 (linux/arm64, `isomesh:arm64`), which an x86 host runs under qemu: where
//! Docker cannot run arm64 containers, they fail saying so too. [`Mesh::up_clustered`] runs the
//! same mesh on three clustered brokers (`compose.cluster.yaml`).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The x86_64 node services of compose.yaml.
pub const NODES: [&str; 6] = ["c1", "e1", "e2", "d1", "d2", "d3"];

/// The ARM device node of compose.yaml (image `isomesh:arm64`, platform linux/arm64). Only the
/// test about it starts it: emulated, it would add minutes to every other one.
pub const ARM_NODE: &str = "d4";

/// The target triple the ARM device's node is built for (its status's `target`).
pub const ARM_TARGET: &str = "aarch64-unknown-linux-musl";

/// The broker services of the clustered mesh (`compose.cluster.yaml`): members 1, 2 and 3.
pub const MEMBERS: [&str; 3] = ["broker", "broker2", "broker3"];

/// A compose project started from the repository's compose.yaml.
pub struct Mesh {
    project: String,
    /// The broker's port on the host's loopback.
    port: u16,
    /// The broker the containers use, when it is not compose's own (`ISOMESH_BROKER_URL`).
    outside_broker: Option<String>,
    /// Three clustered brokers (`compose.cluster.yaml` over compose.yaml) instead of one.
    clustered: bool,
}

/// Panics unless Docker, docker-compose and the isomesh images are all there, and Docker runs
/// linux/arm64 containers.
pub fn require_docker() {
    let ok = |mut command: Command| {
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut docker = Command::new("docker");
    docker.arg("info");
    assert!(
        ok(docker),
        "these tests run real containers: `docker info` failed (is Docker Engine installed and running?)"
    );
    let mut compose = Command::new("docker-compose");
    compose.arg("version");
    assert!(
        ok(compose),
        "these tests need docker-compose (Debian package docker-compose)"
    );
    for image in ["isomesh:latest", "isomesh-rollout:latest", "isomesh:arm64"] {
        let mut inspect = Command::new("docker");
        inspect.args(["image", "inspect", image]);
        assert!(ok(inspect), "image {image} is missing: run `make images`");
    }
    require_arm64_containers();
}

/// Panics unless Docker runs a linux/arm64 container: the ARM device's own image, asked for its
/// version (once per test process). On an x86 host that takes qemu-aarch64 registered with the
/// kernel's binfmt_misc with the F flag (scripts/setup.sh does it where it can).
fn require_arm64_containers() {
    static CHECKED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let checked = CHECKED.get_or_init(|| {
        let out = Command::new("docker")
            .args(["run", "--rm", "--platform", "linux/arm64", "isomesh:arm64"])
            .args(["/usr/bin/isomesh-node", "--version"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run docker: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let binfmt = std::fs::read_to_string("/proc/sys/fs/binfmt_misc/qemu-aarch64")
            .unwrap_or_else(|e| format!("not registered ({e})"));
        Err(format!(
            "Docker cannot run linux/arm64 containers here, so the mesh's ARM device {ARM_NODE} \
             cannot start: `docker run --platform linux/arm64 isomesh:arm64 isomesh-node \
             --version` exited {:?}: {}{}\nqemu-aarch64 in binfmt_misc: {binfmt}\nRun \
             scripts/setup.sh, which registers /usr/bin/qemu-aarch64-static with the F flag \
             (root or sudo needed).",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    });
    if let Err(message) = checked {
        panic!("{message}");
    }
}

impl Mesh {
    /// Starts `services` (all of compose.yaml's default services when empty) in a new project
    /// named after `name`, and returns once the broker is healthy.
    pub fn up(name: &str, services: &[&str]) -> Mesh {
        Mesh::start(name, crate::free_port(), None, false, services)
    }

    /// Like [`Mesh::up`] with compose.cluster.yaml over compose.yaml: the brokers are the three
    /// members of one cluster ([`MEMBERS`]; `services` should name them) and the nodes spread
    /// over them.
    pub fn up_clustered(name: &str, services: &[&str]) -> Mesh {
        Mesh::start(name, crate::free_port(), None, true, services)
    }

    /// Starts `services` (nodes, the camera) without compose's broker, pointed at a broker that
    /// runs on the host on every interface at `port` (`TestBroker::start_for_containers`):
    /// docs/operations.md's recipe for another broker, `ISOMESH_BROKER_URL=... docker-compose up -d
    /// --no-deps ...`. The containers reach the host at their network's gateway, which Docker
    /// puts at the subnet's first address.
    pub fn up_on_host_broker(name: &str, services: &[&str], port: u16) -> Mesh {
        let url = format!("mqtt://{}.1:{port}", subnet_prefix());
        Mesh::start(name, port, Some(url), false, services)
    }

    /// `docker-compose up -d` of `services` in project `name`; with an outside broker, without
    /// compose's own (`--no-deps`).
    fn start(
        name: &str,
        port: u16,
        outside_broker: Option<String>,
        clustered: bool,
        services: &[&str],
    ) -> Mesh {
        require_docker();
        let mut args = vec!["up", "-d", "--no-color", "--quiet-pull"];
        if outside_broker.is_some() {
            args.push("--no-deps");
        }
        args.extend_from_slice(services);
        let mesh = Mesh {
            project: format!("isomesh-test-{name}-{}", std::process::id()),
            port,
            outside_broker,
            clustered,
        };
        mesh.compose_ok(&args);
        mesh
    }

    /// The broker's URL as seen from the host.
    pub fn broker_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn broker_port(&self) -> u16 {
        self.port
    }

    /// The host's loopback port of a cluster member's MQTT listener (`broker` is the one
    /// [`Mesh::broker_port`] gives; the others are published on free ports).
    pub fn member_port(&self, member: &str) -> u16 {
        if member == "broker" {
            return self.port;
        }
        let published = self.compose_ok(&["port", member, "1883"]);
        published
            .trim()
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or_else(|| panic!("{member}'s MQTT port is not published: {published:?}"))
    }

    /// A cluster member's URL as seen from the host.
    pub fn member_url(&self, member: &str) -> String {
        format!("mqtt://127.0.0.1:{}", self.member_port(member))
    }

    /// A `docker-compose` command on this project.
    pub fn compose(&self, args: &[&str]) -> Output {
        let root = crate::workspace_root();
        let mut command = Command::new("docker-compose");
        command
            .current_dir(&root)
            .args(["-p", &self.project, "-f", "compose.yaml"]);
        if self.clustered {
            command.args(["-f", "compose.cluster.yaml"]).env(
                "ISOMESH_CLUSTER_SUBNET",
                format!("{}.0/24", cluster_subnet_prefix()),
            );
        }
        command
            .args(args)
            .env("ISOMESH_MQTT_PORT", self.port.to_string())
            .env("ISOMESH_IMAGES", photos_dir())
            .env("ISOMESH_SUBNET", format!("{}.0/24", subnet_prefix()));
        if let Some(url) = &self.outside_broker {
            command.env("ISOMESH_BROKER_URL", url);
        }
        command
            .stdin(Stdio::null())
            .output()
            .expect("run docker-compose")
    }

    /// Like [`Mesh::compose`], panicking with its output when it fails.
    pub fn compose_ok(&self, args: &[&str]) -> String {
        let out = self.compose(args);
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The container id of `service`.
    pub fn container(&self, service: &str) -> String {
        let id = self.compose_ok(&["ps", "-q", service]).trim().to_string();
        assert!(!id.is_empty(), "service {service} has no container");
        id
    }

    /// `docker kill -s KILL`: the process gets no chance to say goodbye.
    pub fn kill9(&self, service: &str) {
        docker_ok(&["kill", "-s", "KILL", &self.container(service)]);
    }

    /// `docker-compose stop`: SIGTERM, then the container stops.
    pub fn stop(&self, service: &str) {
        self.compose_ok(&["stop", "-t", "30", service]);
    }

    /// `docker restart`: the same container (same address, same volumes) started again.
    pub fn restart(&self, service: &str) {
        docker_ok(&["restart", "-t", "10", &self.container(service)]);
    }

    /// The name Docker gives compose's network `network` (`mesh`, or `cluster` in a clustered
    /// mesh).
    fn network(&self, network: &str) -> String {
        // docker-compose 1.x lower-cases the project name and drops characters other than
        // letters, digits, '-' and '_'.
        format!("{}_{network}", self.project.to_lowercase())
    }

    /// Cuts `service` off the mesh's network; returns its address there, for
    /// [`Mesh::reconnect`].
    pub fn disconnect(&self, service: &str) -> String {
        self.disconnect_from(service, "mesh")
    }

    /// Cuts `service` off compose's network `network` (a cluster member off `cluster`: a
    /// partition of the cluster that leaves its clients connected); returns its address there.
    pub fn disconnect_from(&self, service: &str, network: &str) -> String {
        let container = self.container(service);
        let network = self.network(network);
        let format = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
        let ip = docker_ok(&["inspect", "-f", &format, &container])
            .trim()
            .to_string();
        assert!(!ip.is_empty(), "no address of {service} on {network}");
        docker_ok(&["network", "disconnect", &network, &container]);
        ip
    }

    /// Puts `service` back on the mesh's network at its old address (so its TCP connections may
    /// live).
    pub fn reconnect(&self, service: &str, ip: &str) {
        self.reconnect_to(service, "mesh", ip, service);
    }

    /// Puts `service` back on `network` at its old address, under `alias` (a member's name on
    /// `cluster`, e.g. member3).
    pub fn reconnect_to(&self, service: &str, network: &str, ip: &str, alias: &str) {
        let container = self.container(service);
        docker_ok(&[
            "network",
            "connect",
            "--ip",
            ip,
            "--alias",
            alias,
            &self.network(network),
            &container,
        ]);
    }

    /// Everything `service` logged so far.
    pub fn logs(&self, service: &str) -> String {
        let out = self.compose(&["logs", "--no-color", service]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Where the host reaches `service`'s metrics endpoint (`127.0.0.1:PORT`).
    pub fn metrics_addr(&self, service: &str) -> String {
        self.compose_ok(&["port", service, "9100"])
            .trim()
            .to_string()
    }

    /// `service`'s Prometheus metrics, scraped from the host.
    pub fn metrics(&self, service: &str) -> String {
        let addr = self.metrics_addr(service);
        crate::metrics::scrape(&addr)
            .unwrap_or_else(|e| panic!("scraping {service} at {addr}: {e}"))
    }

    /// Waits until each of `nodes` has a retained status online with a module version
    /// (`version`, or any when empty).
    pub async fn wait_serving(&self, nodes: &[&str], version: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let statuses = crate::compose::statuses(self.port).await;
            let waiting: Vec<&&str> = nodes
                .iter()
                .filter(|n| {
                    !statuses.get(**n).is_some_and(|s| {
                        s.online
                            && s.module
                                .as_ref()
                                .is_some_and(|m| version.is_empty() || m.version == version)
                    })
                })
                .collect();
            if waiting.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nodes {waiting:?} not online serving {version:?} within {within:?}; statuses: {statuses:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let brokers: &[&str] = if self.clustered {
                &MEMBERS
            } else {
                &["broker"]
            };
            for service in brokers.iter().chain(NODES.iter()) {
                eprintln!("----- {service} -----\n{}", tail(&self.logs(service), 60));
            }
        }
        let _ = self.compose(&["down", "-v", "--remove-orphans", "-t", "5"]);
    }
}

/// The first three octets of the compose network's subnet: one per test process, out of
/// Docker's default pools, so two test runs on one machine (a CI clone beside a work tree) do
/// not claim the same one.
fn subnet_prefix() -> String {
    format!("10.213.{}", std::process::id() % 250)
}

/// The same for the cluster members' own network (`compose.cluster.yaml`).
fn cluster_subnet_prefix() -> String {
    format!("10.214.{}", std::process::id() % 250)
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Every node's retained status on the broker at `port`, by node id.
pub async fn statuses(port: u16) -> std::collections::BTreeMap<String, isomesh_protos::NodeStatus> {
    use prost::Message;
    static CLIENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CLIENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("statuses-{}-{n}", std::process::id());
    let mut client = crate::mqtt::Client::connect(port, &id).await;
    client.subscribe("isomesh/status/+").await;
    let mut out = std::collections::BTreeMap::new();
    // Retained statuses come at once; live ones keep coming while jobs flow, so stop at the
    // first quiet moment or after 2 s.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Some(publish) = client.next(Duration::from_millis(500)).await {
        if let Ok(status) = isomesh_protos::NodeStatus::decode(publish.payload.as_ref()) {
            out.insert(status.node_id.clone(), status);
        }
        if tokio::time::Instant::now() >= until {
            break;
        }
    }
    out
}

/// The photo folder the compose camera and the tests use (`$ISOMESH_IMAGES`, else `photos/`).
pub fn photos_dir() -> PathBuf {
    std::env::var_os("ISOMESH_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("photos"))
        .canonicalize()
        .expect("the photo folder (set ISOMESH_IMAGES)")
}

/// Runs `docker ARGS`, panicking with its output when it fails; returns stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
