//! A throwaway mesh of real processes for the benchmarks: the broker and nodes started from the
//! project's binaries, CPU quotas that make one machine's nodes as unequal as real tiers, and
//! delayed TCP links that stand in for the network between tiers. Errors are returned, not
//! panics: a benchmark reports what failed and exits 2.

use anyhow::Context;
use isomesh_protos::Tier;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// SIGTERM, then wait for the exit.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// Starts `isomesh-broker` on `port`.
pub fn start_broker(port: u16) -> anyhow::Result<Proc> {
    start_broker_with(port, &[])
}

/// Starts `isomesh-broker` on `port` with `extra` flags.
fn start_broker_with(port: u16, extra: &[String]) -> anyhow::Result<Proc> {
    let child = Command::new(crate::binary("isomesh-broker")?)
        // Loopback only, for the length of a benchmark: no logins.
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--allow-anonymous",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Proc(child))
}

/// Starts `ports.len()` isomesh-brokers as one cluster on loopback (`--cluster-*`), member
/// `i + 1` serving MQTT on `ports[i]`; their cluster ports are picked free here.
pub fn start_broker_cluster(ports: &[u16]) -> anyhow::Result<Vec<Proc>> {
    let grpc = ports
        .iter()
        .map(|_| crate::try_free_port().context("a free port for a cluster member"))
        .collect::<anyhow::Result<Vec<u16>>>()?;
    let members = grpc
        .iter()
        .enumerate()
        .map(|(i, port)| format!("{}@127.0.0.1:{port}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    ports
        .iter()
        .zip(&grpc)
        .enumerate()
        .map(|(i, (&port, grpc_port))| {
            let flags = [
                "--cluster-id".to_string(),
                (i + 1).to_string(),
                "--cluster-listen".to_string(),
                format!("127.0.0.1:{grpc_port}"),
                "--cluster-members".to_string(),
                members.clone(),
            ];
            start_broker_with(port, &flags)
        })
        .collect()
}

/// The rollout key of a benchmark mesh: its nodes trust it, and the modules they start with
/// are signed by it, as an operator's would be.
pub struct BenchKey {
    pub secret: isomesh_module::signing::SecretKey,
    pub secret_path: PathBuf,
    pub public_path: PathBuf,
}

impl BenchKey {
    pub fn new(work: &Path) -> anyhow::Result<BenchKey> {
        let secret = isomesh_module::signing::SecretKey::generate()?;
        let (secret_path, public_path) = (work.join("rollout.key"), work.join("rollout.key.pub"));
        secret.write(&secret_path)?;
        secret.public().write(&public_path)?;
        Ok(BenchKey {
            secret,
            secret_path,
            public_path,
        })
    }

    /// The node flags that make it trust this key.
    pub fn node_flags(&self) -> Vec<String> {
        vec![
            "--trusted-key".into(),
            self.public_path.display().to_string(),
        ]
    }

    /// Writes `module` into `dir` as `file`, with its signed manifest beside it.
    pub fn place(
        &self,
        dir: &Path,
        file: &str,
        module: &[u8],
        info: &isomesh_protos::GuestInfo,
    ) -> anyhow::Result<()> {
        let path = dir.join(file);
        std::fs::write(&path, module)?;
        isomesh_module::trust::write_signed_manifest(
            &path,
            module,
            &info.name,
            &info.version,
            &self.secret,
        )?;
        Ok(())
    }
}

/// Where one benchmark node keeps its things.
pub struct NodeSetup {
    pub id: String,
    pub tier: Tier,
    pub modules: PathBuf,
    pub cache: PathBuf,
    pub log: PathBuf,
}

/// Starts `isomesh-node` for `node`, reaching the broker on `port`, with `extra` flags.
pub fn start_node(node: &NodeSetup, port: u16, extra: &[String]) -> anyhow::Result<Proc> {
    start_node_as(&[crate::binary("isomesh-node")?.into()], node, port, extra)
}

/// As [`start_node`], the node being `command`: a program and its first arguments, e.g.
/// `qemu-aarch64-static` and the aarch64 `isomesh-node` ([`qemu_aarch64`]); the node's flags
/// follow them.
pub fn start_node_as(
    command: &[OsString],
    node: &NodeSetup,
    port: u16,
    extra: &[String],
) -> anyhow::Result<Proc> {
    let (program, leading) = command
        .split_first()
        .context("start_node_as: an empty command")?;
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&node.log)?;
    let child = Command::new(program)
        .args(leading)
        .args(["--id", &node.id, "--tier", node.tier.name()])
        .arg("--broker")
        .arg(format!("mqtt://127.0.0.1:{port}"))
        .arg("--modules")
        .arg(&node.modules)
        .arg("--cache-dir")
        .arg(&node.cache)
        .args(["--status-interval-s", "1"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", Path::new(program).display()))?;
    Ok(Proc(child))
}

/// `qemu-aarch64-static` from `PATH` (Debian's `qemu-user-static`), which runs the aarch64
/// `isomesh-node` on this machine: user-mode emulation, the node's own syscalls and sockets on an
/// emulated CPU, so everything it does is slower than on a board.
pub fn qemu_aarch64() -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("qemu-aarch64-static"))
        .find(|path| path.is_file())
        .context(
            "qemu-aarch64-static is not on PATH: an aarch64 node needs it to run here \
             (scripts/setup.sh installs Debian's qemu-user-static)",
        )
}

/// A CPU quota for a group of processes (Linux cgroups, v2 or v1): `cores` of CPU time per
/// second whatever the machine has, so a "device" node is slower than a "cloud" one.
pub struct CpuQuota {
    dir: PathBuf,
}

impl CpuQuota {
    /// Creates the group `name` limited to `cores` (0.25 = a quarter of one core) per 100 ms,
    /// Docker's period (`--cpus`), as the compose mesh's containers are.
    pub fn new(name: &str, cores: f64) -> anyhow::Result<CpuQuota> {
        CpuQuota::with_period(name, cores, Duration::from_millis(100))
    }

    /// As [`CpuQuota::new`], per `period`. A job shorter than the period's allowance runs at
    /// full speed and the next one waits: a short period makes every job slower instead, as a
    /// slower CPU would.
    pub fn with_period(name: &str, cores: f64, period: Duration) -> anyhow::Result<CpuQuota> {
        let period_us = (period.as_micros() as u64).clamp(1000, 1_000_000);
        let quota_us = ((cores * period_us as f64) as u64).max(1000);
        let root = Path::new("/sys/fs/cgroup");
        let explain = || {
            format!(
                "cannot create a CPU-limited cgroup for {name}: the benchmark needs root and a \
                 writable cgroup cpu controller (/sys/fs/cgroup); run it as root, or pass \
                 --no-cpu-quota to run every node at full speed"
            )
        };
        let v2 = root.join("cgroup.controllers");
        let dir = if v2.is_file() {
            let dir = root.join(format!("isomesh-bench-{name}"));
            std::fs::create_dir_all(&dir).with_context(explain)?;
            std::fs::write(dir.join("cpu.max"), format!("{quota_us} {period_us}"))
                .with_context(explain)?;
            // A quota is a ceiling, not a reservation: the highest weight keeps other work on
            // the machine (a build, say) from eating into it. Best effort.
            let _ = std::fs::write(dir.join("cpu.weight"), "10000");
            dir
        } else {
            let dir = root.join("cpu").join(format!("isomesh-bench-{name}"));
            std::fs::create_dir_all(&dir).with_context(explain)?;
            std::fs::write(dir.join("cpu.cfs_period_us"), period_us.to_string())
                .with_context(explain)?;
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota_us.to_string())
                .with_context(explain)?;
            let _ = std::fs::write(dir.join("cpu.shares"), "262144");
            dir
        };
        Ok(CpuQuota { dir })
    }

    /// Moves process `pid` (all its threads) into the group.
    pub fn add(&self, pid: u32) -> anyhow::Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("cannot move process {pid} into {}", self.dir.display()))
    }

    /// Moves process `pid` out of the group, into the hierarchy's root (best effort).
    pub fn release(&self, pid: u32) {
        if let Some(root) = self.dir.parent() {
            let _ = std::fs::write(root.join("cgroup.procs"), pid.to_string());
        }
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // Succeeds once the group's processes have exited.
        for _ in 0..20 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A TCP link to `127.0.0.1:to` that delays every byte by `delay` each way, as a network
/// between tiers would; returns the port to connect to. Runs on the current tokio runtime.
pub async fn delayed_link(to: u16, delay: Duration) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", to)).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                tokio::spawn(delay_pipe(in_read, out_write, delay));
                tokio::spawn(delay_pipe(out_read, in_write, delay));
            });
        }
    });
    Ok(port)
}

/// Copies `from` to `to`, each read arriving `delay` after it was read, in order.
async fn delay_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (queue, mut due) =
        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let at = tokio::time::Instant::now() + delay;
                if queue.send((at, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(queue);
    let _ = writer.await;
}
