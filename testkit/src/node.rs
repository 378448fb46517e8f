//! `isomesh-node` as a child process with its own module directory and log file.

use crate::mqtt::Client;
use isomesh_protos::NodeStatus;
use prost::Message;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running node; stopped with SIGTERM (then killed) when dropped.
pub struct TestNode {
    pub id: String,
    child: Child,
    dir: tempfile::TempDir,
    /// The program (and, for an aarch64 node, qemu before it) and the node's flags, to start
    /// the node again on the same directory.
    program: Vec<std::ffi::OsString>,
    args: Vec<std::ffi::OsString>,
}

/// Which build of `isomesh-node` runs a test node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// The x86_64 build the tests were built with.
    Native,
    /// The aarch64 build under qemu ([`crate::arm64`]), on a cache of its own seeded with module
    /// 0.1.0's aarch64 code (unless its flags name a `--cache-dir`).
    Arm64,
}

/// How to start a node. Every node trusts the test process's [`crate::rollout::test_key`].
pub struct NodeSpec<'a> {
    pub id: &'a str,
    pub tier: &'a str,
    pub broker_port: u16,
    /// Files to put into the module directory, in this order (later ones are newer).
    pub modules: Vec<ModuleFile>,
    pub extra_args: Vec<String>,
}

/// A module file to put into a node's module directory.
pub struct ModuleFile {
    pub file: String,
    pub bytes: Vec<u8>,
    /// `(name, version)` its manifest, signed by the test key, says; `None`: no manifest.
    pub signed_as: Option<(String, String)>,
}

impl ModuleFile {
    /// A file with a manifest signed by the test key, as `isomesh sign` writes it.
    pub fn signed(file: &str, bytes: Vec<u8>, name: &str, version: &str) -> ModuleFile {
        ModuleFile {
            file: file.into(),
            bytes,
            signed_as: Some((name.into(), version.into())),
        }
    }

    /// A file nobody signed.
    pub fn unsigned(file: &str, bytes: Vec<u8>) -> ModuleFile {
        ModuleFile {
            file: file.into(),
            bytes,
            signed_as: None,
        }
    }

    /// The real classifier at version 0.1.0, signed.
    pub fn guest() -> ModuleFile {
        let bytes = std::fs::read(crate::guest_module()).expect("guest module");
        ModuleFile::signed(
            "mobilenet_v2.wasm",
            bytes,
            crate::rollout::MODULE_NAME,
            crate::rollout::VERSION_1,
        )
    }

    /// The real classifier at version 0.2.0, signed.
    pub fn guest_v2() -> ModuleFile {
        let bytes = std::fs::read(crate::rollout::guest_module_v2()).expect("module 0.2.0");
        ModuleFile::signed(
            "mobilenet_v2-0.2.0.wasm",
            bytes,
            crate::rollout::MODULE_NAME,
            crate::rollout::VERSION_2,
        )
    }
}

impl<'a> NodeSpec<'a> {
    /// A node serving the real classifier module.
    pub fn with_guest(id: &'a str, tier: &'a str, broker_port: u16) -> NodeSpec<'a> {
        NodeSpec {
            id,
            tier,
            broker_port,
            modules: vec![ModuleFile::guest()],
            extra_args: Vec::new(),
        }
    }

    /// [`NodeSpec::with_guest`] with these extra flags.
    pub fn with_guest_and_args(
        id: &'a str,
        tier: &'a str,
        broker_port: u16,
        args: &[&str],
    ) -> NodeSpec<'a> {
        NodeSpec {
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            ..NodeSpec::with_guest(id, tier, broker_port)
        }
    }
}

/// Starts the nodes together (they share one compile cache) and waits until each is ready and
/// the others have been sent its status.
pub async fn start_all(port: u16, specs: Vec<NodeSpec<'_>>) -> Vec<TestNode> {
    let nodes: Vec<TestNode> = specs.iter().map(TestNode::spawn).collect();
    for node in &nodes {
        node.wait_ready(port).await;
    }
    let ids: Vec<&str> = specs.iter().map(|s| s.id).collect();
    wait_statuses_published(port, &ids, Duration::from_secs(30)).await;
    nodes
}

impl TestNode {
    /// Starts the node and waits until its retained status says it is online with a module.
    pub async fn start(spec: NodeSpec<'_>) -> TestNode {
        let node = TestNode::spawn(&spec);
        node.wait_ready(spec.broker_port).await;
        node
    }

    /// [`TestNode::start`] of the aarch64 build under qemu.
    pub async fn start_arm64(spec: NodeSpec<'_>) -> TestNode {
        let node = TestNode::spawn_on(&spec, Isa::Arm64);
        node.wait_ready(spec.broker_port).await;
        node
    }

    /// Starts the node without waiting.
    pub fn spawn(spec: &NodeSpec<'_>) -> TestNode {
        TestNode::spawn_on(spec, Isa::Native)
    }

    /// Starts the node of that build without waiting.
    pub fn spawn_on(spec: &NodeSpec<'_>, isa: Isa) -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let modules = dir.path().join("modules");
        std::fs::create_dir_all(&modules).expect("modules dir");
        for (n, module) in spec.modules.iter().enumerate() {
            let path = modules.join(&module.file);
            if let Some((name, version)) = &module.signed_as {
                crate::rollout::sign_file(&path, &module.bytes, name, version);
            }
            std::fs::write(&path, &module.bytes).expect("write module");
            // Distinct modification times, in list order.
            let when = std::time::SystemTime::now() - Duration::from_secs(100 - n as u64);
            let file = std::fs::File::options()
                .write(true)
                .open(&path)
                .expect("open module");
            file.set_modified(when).expect("set mtime");
        }
        let mut args: Vec<std::ffi::OsString> = ["--id", spec.id, "--tier", spec.tier]
            .iter()
            .map(Into::into)
            .collect();
        // A test may name another broker URL (mqtts://...) in its extra flags.
        if !spec.extra_args.iter().any(|a| a == "--broker") {
            args.push("--broker".into());
            args.push(format!("mqtt://127.0.0.1:{}", spec.broker_port).into());
        }
        args.push("--modules".into());
        args.push(modules.into());
        // A test may give the node a compiled-module cache of its own in its extra flags.
        if !spec.extra_args.iter().any(|a| a == "--cache-dir") {
            let cache = match isa {
                Isa::Native => crate::shared_cache_dir(),
                Isa::Arm64 => {
                    let cache = dir.path().join("cache");
                    crate::arm64::seed_cache(&cache);
                    cache
                }
            };
            args.push("--cache-dir".into());
            args.push(cache.into());
        }
        args.push("--status-interval-s".into());
        args.push("1".into());
        args.push("--trusted-key".into());
        args.push(crate::rollout::test_key().public_path.clone().into());
        args.extend(spec.extra_args.iter().map(Into::into));
        let program = match isa {
            Isa::Native => vec![crate::bin_path("isomesh-node").into()],
            Isa::Arm64 => crate::arm64::node_command(),
        };
        let child = start_process(dir.path(), &program, &args);
        TestNode {
            id: spec.id.to_string(),
            child,
            dir,
            program,
            args,
        }
    }

    /// Stops the node (SIGTERM) and starts it again on the same module directory.
    pub fn restart(&mut self) {
        self.terminate();
        self.start_again();
    }

    /// Starts the (stopped) node again with the same command line and module directory.
    pub fn start_again(&mut self) {
        self.child = start_process(self.dir.path(), &self.program, &self.args);
    }

    /// Freezes the node (SIGSTOP): its connection and retained status stay, so the mesh still
    /// counts it online, but it answers nothing until [`TestNode::resume`]: a node that hangs.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused node go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill {signal} {} failed", self.id);
    }

    /// Waits until the node's log contains `needle`; panics with the log after `within`.
    pub async fn wait_for_log(&self, needle: &str, within: Duration) {
        self.wait_for_log_times(needle, 1, within).await;
    }

    /// Waits until the node's log contains `needle` at least `times` times (the log spans
    /// restarts); panics with the log after `within`.
    /// A node that exits without logging it fails the wait at once, not at the deadline.
    pub async fn wait_for_log_times(&self, needle: &str, times: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Looked at before the log: once exited, the log read next is all there will be.
            let exited = self.has_exited();
            let log = self.log();
            if log.matches(needle).count() >= times {
                return;
            }
            assert!(
                !exited,
                "the node exited before {needle:?} was {times} time(s) in its log:\n{log}"
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "{needle:?} not {times} time(s) in the log within {within:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether the node's process has ended (a zombie not yet reaped counts), read from
    /// `/proc` so that a shared borrow of the node will do.
    fn has_exited(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()));
        // The state is the first field after the command name in parentheses.
        stat.map_or(true, |stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
    }

    /// Waits for a retained status with `online` and a module.
    pub async fn wait_ready(&self, broker_port: u16) {
        let mut watcher = Client::connect(
            broker_port,
            &format!("ready-{}-{}", self.id, std::process::id()),
        )
        .await;
        watcher
            .subscribe(&format!("isomesh/status/{}", self.id))
            .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(publish) = watcher.next(left).await else {
                panic!(
                    "node {} not ready within 300 s; its log:\n{}",
                    self.id,
                    self.log()
                );
            };
            if let Ok(status) = NodeStatus::decode(publish.payload.as_ref()) {
                if status.online && status.module.is_some() {
                    return;
                }
            }
        }
    }

    /// Everything the node logged so far.
    /// The address its `--metrics-listen` endpoint is bound to, as the node logged it (with
    /// port 0 the node picks the port). Call once the node is ready.
    pub fn metrics_addr(&self) -> String {
        let log = self.log();
        log.lines()
            .find(|l| l.contains("serving Prometheus metrics"))
            .and_then(|l| l.split("listen=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("the node logged no metrics address; its log:\n{log}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// The node's module directory.
    pub fn modules_dir(&self) -> PathBuf {
        self.dir.path().join("modules")
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    /// SIGKILL: the node gets no chance to say goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Starts `program` (`isomesh-node`, or qemu and the aarch64 one) with `args`, appending its log
/// to `dir/node.log`.
fn start_process(dir: &Path, program: &[std::ffi::OsString], args: &[std::ffi::OsString]) -> Child {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join("node.log"))
        .expect("log file");
    Command::new(&program[0])
        .args(&program[1..])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn isomesh-node")
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// Waits for a status of `node` that satisfies `done`; panics with the last one seen after `within`.
pub async fn wait_status(
    port: u16,
    node: &str,
    within: Duration,
    done: impl Fn(&NodeStatus) -> bool,
) -> NodeStatus {
    wait_status_as(port, None, node, within, done).await
}

/// [`wait_status`], reading the status with a `(user, password)` login when one is given.
pub async fn wait_status_as(
    port: u16,
    login: Option<(&str, &str)>,
    node: &str,
    within: Duration,
    done: impl Fn(&NodeStatus) -> bool,
) -> NodeStatus {
    // A logged-in watcher uses a client id its account owns (`{user}:...`), as isomesh-broker
    // requires.
    let id = match login {
        Some((user, _)) => format!("{user}:wait-{node}-{}", unique()),
        None => format!("wait-{node}-{}", unique()),
    };
    let mut watcher = match login {
        Some((user, password)) => Client::connect_as(port, &id, user, password).await,
        None => Client::connect(port, &id).await,
    };
    watcher.subscribe(&format!("isomesh/status/{node}")).await;
    match next_status_where(&mut watcher, within, done).await {
        Ok(status) => status,
        Err(last) => {
            panic!("node {node}: condition not met within {within:?}; last status: {last:?}")
        }
    }
}

/// [`wait_status`] for a test that explains a timeout itself (with logs): the last status
/// seen, if any, when `done` was not met within `within`.
pub async fn try_wait_status(
    port: u16,
    node: &str,
    within: Duration,
    done: impl Fn(&NodeStatus) -> bool,
) -> Result<NodeStatus, Option<NodeStatus>> {
    let mut watcher = Client::connect(port, &format!("wait-{node}-{}", unique())).await;
    watcher.subscribe(&format!("isomesh/status/{node}")).await;
    next_status_where(&mut watcher, within, done).await
}

async fn next_status_where(
    watcher: &mut Client,
    within: Duration,
    done: impl Fn(&NodeStatus) -> bool,
) -> Result<NodeStatus, Option<NodeStatus>> {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = None;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(publish) = watcher.next(left).await else {
            return Err(last);
        };
        let status = NodeStatus::decode(publish.payload.as_ref()).expect("NodeStatus");
        if done(&status) {
            return Ok(status);
        }
        last = Some(status);
    }
}

/// Whether `status` says the node is online serving `version`.
pub fn serves(status: &NodeStatus, version: &str) -> bool {
    status.online && status.module.as_ref().is_some_and(|m| m.version == version)
}

/// Why the node's latest rollout was rejected, if it was.
pub fn rejected(status: &NodeStatus) -> Option<String> {
    rejection(status).map(|r| r.reason.clone())
}

/// The node's latest rollout, if it was rejected: its `code` (stable: `signature`, `untrusted`,
/// `load`, ...) and its `reason` (a sentence for people).
pub fn rejection(status: &NodeStatus) -> Option<&isomesh_protos::RolloutState> {
    status
        .rollout
        .as_ref()
        .filter(|r| r.phase == isomesh_protos::rollout_state::Phase::Rejected as i32)
}

/// Whether the node's latest rollout was rejected with `code`.
pub fn rejected_with(status: &NodeStatus, code: &str) -> bool {
    rejection(status).is_some_and(|r| r.code == code)
}

/// Whether the node's latest rollout is `version`, swapped in and serving.
pub fn swapped_in(status: &NodeStatus, version: &str) -> bool {
    status.rollout.as_ref().is_some_and(|r| {
        r.phase == isomesh_protos::rollout_state::Phase::Serving as i32
            && r.module.as_ref().is_some_and(|m| m.version == version)
    })
}

/// Waits until each of `nodes` has published a status after this call (two statuses each since
/// subscribing: the first may be the retained one). Every node subscribes to the statuses before
/// it reports itself ready, and a broker delivers one subscriber's messages in order: so once
/// this returns, each ready node has been sent every status the others published when ready,
/// ahead of anything a test publishes next.
pub async fn wait_statuses_published(port: u16, nodes: &[&str], within: Duration) {
    let mut watcher = Client::connect(port, &format!("statuses-{}", unique())).await;
    watcher.subscribe("isomesh/status/+").await;
    let deadline = tokio::time::Instant::now() + within;
    let mut heard: std::collections::HashMap<String, usize> = Default::default();
    while nodes
        .iter()
        .any(|n| heard.get(*n).copied().unwrap_or(0) < 2)
    {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(publish) = watcher.next(left).await else {
            panic!("not every one of {nodes:?} published a status within {within:?}: {heard:?}");
        };
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        if let Some(node) = topic.strip_prefix("isomesh/status/") {
            *heard.entry(node.to_string()).or_default() += 1;
        }
    }
}

/// Sends the first shared photo to `node` (MQTT 5, with a response topic) and returns the JSON
/// answer; panics if none comes within `within`.
pub async fn classify_photo(port: u16, node: &str, within: Duration) -> serde_json::Value {
    let tag = unique();
    let reply_to = format!("test/classify/{node}/{tag}");
    let mut client = Client::connect(port, &format!("classify-{node}-{tag}")).await;
    client.subscribe(&reply_to).await;
    client
        .publish_with_response_topic(
            &format!("isomesh/images/{node}"),
            crate::photos()[0].bytes(),
            &reply_to,
            b"c",
        )
        .await;
    let reply = client
        .next(within)
        .await
        .unwrap_or_else(|| panic!("{node} did not answer"));
    serde_json::from_slice(&reply.payload).expect("JSON result")
}

/// A suffix that keeps test client ids apart.
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + u64::from(std::process::id()) * 1_000_000
}
