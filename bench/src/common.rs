//! What the benchmarks share besides the process harness ([`isomesh_testkit::harness`]): their
//! photos, one compile for every node, and the benchmark's own MQTT client.

use anyhow::Context;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Reads every file of `paths` (a benchmark's photos), saying which one failed.
pub fn read_files(paths: &[PathBuf]) -> anyhow::Result<Vec<Vec<u8>>> {
    paths
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect()
}

/// Compiles `module` once into the compiled-code cache `cache`, which every node of a benchmark
/// then loads in milliseconds; returns what the module says about itself. With `compile_cache`
/// (`--cache-dir`), the compile goes through that cache first: Cranelift's per-function cache
/// there makes a module compiled by an earlier run (`bench infer` with the same `--cache-dir`)
/// a matter of seconds.
pub fn precompile_into(
    cache: &Path,
    compile_cache: Option<&Path>,
    module: &[u8],
) -> anyhow::Result<isomesh_protos::GuestInfo> {
    let config = |dir: &Path| isomesh_sandbox::SandboxConfig {
        cache_dir: Some(dir.to_path_buf()),
        ..isomesh_sandbox::SandboxConfig::default()
    };
    eprintln!("compiling the module once for all nodes...");
    let compiler = isomesh_sandbox::Sandbox::new(config(compile_cache.unwrap_or(cache)))?;
    let (info, code) = compiler.precompile(module)?;
    // The nodes' cache has a key of its own: the entry is stored (and MAC-ed) there.
    let store = isomesh_sandbox::Sandbox::new(config(cache))?;
    store.store_precompiled(&isomesh_module::digest::sha256_hex(module), &code)?;
    Ok(info)
}

/// The benchmark's own MQTT client, `name`, on the broker at `port`: subscribed to its replies
/// topic and to every node's status, with every publish it receives handed to the channel.
pub struct Listener {
    pub client: rumqttc::v5::AsyncClient,
    /// The broker's URL, for the benchmark's commands.
    pub broker_url: String,
    pub topics: isomesh_mesh::topics::Topics,
    /// Where nodes answer this client.
    pub replies: String,
    pub events: tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
}

pub async fn listen(port: u16, name: &str) -> anyhow::Result<Listener> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::Event;
    let topics = isomesh_mesh::topics::Topics::new("isomesh");
    let broker_url = format!("mqtt://127.0.0.1:{port}");
    let (client, mut eventloop) = isomesh_mqtt::connect::connect(
        &broker_url,
        &isomesh_mqtt::connect::client_id_at(&broker_url, name),
    )
    .await?;
    let replies = topics.replies(name);
    client.subscribe(replies.clone(), QoS::AtLeastOnce).await?;
    client
        .subscribe(topics.all_status(), QoS::AtLeastOnce)
        .await?;
    let (event_tx, events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                if event_tx.send(p).is_err() {
                    return;
                }
            }
        }
    });
    Ok(Listener {
        client,
        broker_url,
        topics,
        replies,
        events,
    })
}

pub struct Stats {
    pub median: f64,
    pub p95: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub n: usize,
}

impl Stats {
    pub fn to_json(&self) -> serde_json::Value {
        json!({"median": self.median, "p95": self.p95, "p99": self.p99, "min": self.min,
               "max": self.max, "mean": self.mean, "n": self.n})
    }
}

/// Order statistics of `samples` (all NaN when there are none).
pub fn stats(samples: &mut [f64]) -> Stats {
    samples.sort_by(f64::total_cmp);
    if samples.is_empty() {
        return Stats {
            median: f64::NAN,
            p95: f64::NAN,
            p99: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            mean: f64::NAN,
            n: 0,
        };
    }
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Stats {
        median: at(0.5),
        p95: at(0.95),
        p99: at(0.99),
        min: samples[0],
        max: samples[samples.len() - 1],
        mean: samples.iter().sum::<f64>() / samples.len() as f64,
        n: samples.len(),
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A `kB` field of `/proc/{pid}/status` (`VmRSS:`, `VmHWM:`), `pid` `None` for this process.
pub fn status_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A `kB` field of this process's `/proc/self/status`.
pub fn own_status_kib(field: &str) -> Option<u64> {
    status_kib(None, field)
}

pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    json!({"cpu": model, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)})
}

pub fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(isomesh_mqtt::connect::client_id("bench"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
