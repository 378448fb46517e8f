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
    /// The command line, to start the node again on the same directory.
    args: Vec<std::ffi::OsString>,
}

/// How to start a node.
pub struct NodeSpec<'a> {
    pub id: &'a str,
    pub tier: &'a str,
    pub broker_port: u16,
    /// Files to put into the module directory, in this order (later ones are newer).
    pub modules: Vec<(String, Vec<u8>)>,
    pub extra_args: Vec<String>,
}

impl<'a> NodeSpec<'a> {
    /// A node serving the real classifier module.
    pub fn with_guest(id: &'a str, tier: &'a str, broker_port: u16) -> NodeSpec<'a> {
        let module = std::fs::read(crate::guest_module()).expect("guest module");
        NodeSpec {
            id,
            tier,
            broker_port,
            modules: vec![("mobilenet_v2.wasm".into(), module)],
            extra_args: Vec::new(),
        }
    }
}

impl TestNode {
    /// Starts the node and waits until its retained status says it is online with a module.
    pub async fn start(spec: NodeSpec<'_>) -> TestNode {
        let node = TestNode::spawn(&spec);
        node.wait_ready(spec.broker_port).await;
        node
    }

    /// Starts the node without waiting.
    pub fn spawn(spec: &NodeSpec<'_>) -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let modules = dir.path().join("modules");
        std::fs::create_dir_all(&modules).expect("modules dir");
        for (n, (name, bytes)) in spec.modules.iter().enumerate() {
            let path = modules.join(name);
            std::fs::write(&path, bytes).expect("write module");
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
        args.push("--broker".into());
        args.push(format!("mqtt://127.0.0.1:{}", spec.broker_port).into());
        args.push("--modules".into());
        args.push(modules.into());
        args.push("--cache-dir".into());
        args.push(crate::shared_cache_dir().into());
        args.push("--status-interval-s".into());
        args.push("1".into());
        args.extend(spec.extra_args.iter().map(Into::into));
        let child = start_process(dir.path(), &args);
        TestNode {
            id: spec.id.to_string(),
            child,
            dir,
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
        self.child = start_process(self.dir.path(), &self.args);
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

/// Starts `isomesh-node` with `args`, appending its log to `dir/node.log`.
fn start_process(dir: &Path, args: &[std::ffi::OsString]) -> Child {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join("node.log"))
        .expect("log file");
    Command::new(crate::bin_path("isomesh-node"))
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
