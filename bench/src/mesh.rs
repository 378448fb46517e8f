//! `isomesh bench mesh`: what the mesh delivers end to end, through a real broker, and what a
//! node costs in memory.
//!
//! For each broker (`isomesh-broker`, Mosquitto when installed, and three isomesh-brokers as one
//! cluster) and each node count (1, 2, 4 by default): that many edge nodes share the edge tier's
//! queue (`$share/edge/...`), and the benchmark, an ordinary MQTT client, publishes protobuf jobs
//! of real photos there at QoS 1:
//!
//! - latency: one job at a time, so the round trip is the mesh's own (publish, broker, node,
//!   result, broker, back), not a queue's;
//! - throughput: twice as many jobs in flight as nodes, so no node waits for work, until every
//!   node has done `--jobs-per-node`; photos/s and scaling efficiency (throughput with N nodes
//!   over N times that with one).
//!
//! Each node is held to `--node-cores` of CPU time (a cgroup quota, 10 ms periods) so that four nodes fit this
//! machine's cores beside the broker and the sender, as four separate boxes would: the scaling
//! measured is the mesh's, not the number of cores'. Memory: every node's resident set when
//! idle and after the load, and one node with 1, 2 and 4 workers (each worker owns a sandbox
//! instance), whose slope is the cost of one more instance. Every job must come back exactly
//! once, classified; the report counts any that did not. Writes JSON.
//!
//! On the cluster (`isomesh-cluster`) the benchmark's client is on member 1 and node `i` on
//! member `(i + 1) % 3 + 1`: the first node is on member 2, so every job crosses the cluster
//! twice (the job to the node's member, the answer back) and the figures are the cluster's cost
//! over one broker.

use crate::common::{listen, machine, ms, precompile_into, read_files, stats, tempdir, Listener};
use anyhow::Context;
use isomesh_protos::{Job, JobResult, NodeStatus, Tier};
use isomesh_testkit::harness::{
    start_broker, start_broker_cluster, start_node, BenchKey, CpuQuota, NodeSetup, Proc,
};
use prost::Message;
use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct MeshArgs {
    /// The classifier module every node serves.
    #[arg(long)]
    pub module: PathBuf,
    /// Compile the module through this compile cache (e.g. `bench infer`'s `--cache-dir`), so
    /// a module compiled before takes seconds instead of a full compile (default: none).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Photos sent as jobs (cycled); ~100 KB JPEGs are the yardstick.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Node counts measured.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub nodes: Vec<usize>,
    /// Brokers measured: `isomesh` (isomesh-broker), `mosquitto`, `isomesh-cluster` (three
    /// isomesh-brokers as one cluster).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "isomesh,mosquitto,isomesh-cluster"
    )]
    pub brokers: Vec<BrokerKind>,
    /// Jobs each node answers in the throughput phase.
    #[arg(long, default_value_t = 30)]
    pub jobs_per_node: usize,
    /// Jobs sent one at a time in the latency phase.
    #[arg(long, default_value_t = 30)]
    pub latency_jobs: usize,
    /// CPU quota of each node, in cores.
    #[arg(long, default_value_t = 0.4)]
    pub node_cores: f64,
    /// Run every node at full speed (no cgroups, no root needed).
    #[arg(long)]
    pub no_cpu_quota: bool,
    /// Worker counts of the memory phase (one node, `isomesh-broker`).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub workers: Vec<usize>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-out/mesh.json")]
    pub out: PathBuf,
    /// Keep the working directory (node logs) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerKind {
    Isomesh,
    Mosquitto,
    IsomeshCluster,
}

/// The members of the cluster that `isomesh-cluster` measures.
const CLUSTER_MEMBERS: usize = 3;

/// A running broker: its processes, and the MQTT port of each member (one unless clustered).
struct Broker {
    _procs: Vec<Proc>,
    ports: Vec<u16>,
}

impl Broker {
    /// The port node `i` connects to: on a cluster, not the benchmark client's member (the
    /// first) for the first node, and the members in turn after it.
    fn port_of_node(&self, i: usize) -> u16 {
        self.ports[(i + 1) % self.ports.len()]
    }
}

impl BrokerKind {
    fn name(self) -> &'static str {
        match self {
            BrokerKind::Isomesh => "isomesh-broker",
            BrokerKind::Mosquitto => "mosquitto",
            BrokerKind::IsomeshCluster => "isomesh-broker x3",
        }
    }

    /// Starts this broker (every member of it) with its first member on loopback `port`.
    fn start_all(self, port: u16, work: &Path) -> anyhow::Result<Broker> {
        if self != BrokerKind::IsomeshCluster {
            return Ok(Broker {
                _procs: vec![self.start(port, work)?],
                ports: vec![port],
            });
        }
        let mut ports = vec![port];
        for _ in 1..CLUSTER_MEMBERS {
            ports.push(isomesh_testkit::try_free_port()?);
        }
        Ok(Broker {
            _procs: start_broker_cluster(&ports)?,
            ports,
        })
    }

    /// Starts this broker on loopback `port`, anonymous (a benchmark's broker lives for
    /// seconds and listens on 127.0.0.1 only).
    fn start(self, port: u16, work: &Path) -> anyhow::Result<Proc> {
        let child = match self {
            BrokerKind::Isomesh | BrokerKind::IsomeshCluster => return start_broker(port),
            BrokerKind::Mosquitto => {
                let conf = work.join(format!("mosquitto-{port}.conf"));
                // As close to isomesh-broker as it gets: no persistence, no payload limit,
                // queues deep enough for any burst here.
                std::fs::write(
                    &conf,
                    format!(
                        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                         message_size_limit 0\nmax_queued_messages 10000\n\
                         max_inflight_messages 128\nmax_keepalive 65535\n"
                    ),
                )?;
                let exe = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
                    .into_iter()
                    .map(PathBuf::from)
                    .find(|p| p.is_file())
                    .unwrap_or_else(|| PathBuf::from("mosquitto"));
                Command::new(&exe)
                    .arg("-c")
                    .arg(&conf)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .with_context(|| {
                        format!(
                            "cannot start {}: install it (`apt-get install mosquitto`) or pass \
                             --brokers isomesh",
                            exe.display()
                        )
                    })?
            }
        };
        Ok(Proc(child))
    }
}

/// The benchmark's client: publishes jobs to the edge tier, takes results and statuses.
struct Sender {
    listener: Listener,
    images: Vec<Vec<u8>>,
}

/// One job's fate.
struct Sent {
    at: Instant,
    latency_ms: Option<f64>,
    node: String,
    answers: usize,
    ok: bool,
}

pub async fn mesh(args: MeshArgs) -> anyhow::Result<()> {
    let images = read_files(&args.images)?;
    let module = std::fs::read(&args.module)
        .with_context(|| format!("reading {}", args.module.display()))?;
    let work = tempdir()?;
    let cache = work.join("cache");
    let info = precompile_into(&cache, args.cache_dir.as_deref(), &module)?;
    let key = BenchKey::new(&work)?;
    let max_nodes = args.nodes.iter().copied().max().unwrap_or(1);
    let setups = (0..max_nodes)
        .map(|i| {
            let id = format!("bm-e{}", i + 1);
            let dir = work.join(&id);
            let setup = NodeSetup {
                id,
                tier: Tier::Edge,
                modules: dir.join("modules"),
                cache: cache.clone(),
                log: dir.join("node.log"),
            };
            std::fs::create_dir_all(&setup.modules)?;
            key.place(&setup.modules, "module.wasm", &module, &info)?;
            Ok(setup)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let quota = |name: &str| -> anyhow::Result<Option<CpuQuota>> {
        if args.no_cpu_quota {
            return Ok(None);
        }
        // 10 ms periods, as in `bench infer`: every job runs slower, as on a slower CPU. With
        // 100 ms periods a node idle between jobs banked its allowance and ran the next job at
        // full speed, so one job at a time looked faster with more nodes.
        CpuQuota::with_period(name, args.node_cores, Duration::from_millis(10)).map(Some)
    };

    let mut runs = Vec::new();
    for &broker_kind in &args.brokers {
        let port = isomesh_testkit::try_free_port()?;
        let broker = broker_kind.start_all(port, &work)?;
        let mut sender = Sender {
            listener: wait_for_broker(port).await?,
            images: images.clone(),
        };
        for &count in &args.nodes {
            eprintln!("{}: {count} node(s)", broker_kind.name());
            let groups = (0..count)
                .map(|i| quota(&format!("mesh-{i}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut procs = Vec::new();
            for (i, (setup, group)) in setups.iter().take(count).zip(&groups).enumerate() {
                let proc = start_node(setup, broker.port_of_node(i), &node_flags(&key, 1))?;
                if let Some(group) = group {
                    group.add(proc.pid())?;
                }
                procs.push(proc);
            }
            let ids: Vec<&str> = setups.iter().take(count).map(|s| s.id.as_str()).collect();
            sender.wait_online(&ids).await?;
            let idle: Vec<Option<u64>> = procs.iter().map(|p| rss_kib(p.pid())).collect();

            let tag = format!("{}-{count}", broker_kind.name());
            let latency = sender
                .run(&format!("{tag}-lat-"), args.latency_jobs, 1)
                .await?;
            let started = Instant::now();
            let total = args.jobs_per_node * count;
            let load = sender.run(&format!("{tag}-thr-"), total, 2 * count).await?;
            let elapsed = started.elapsed();
            let loaded: Vec<Option<u64>> = procs.iter().map(|p| rss_kib(p.pid())).collect();
            let peak: Vec<Option<u64>> = procs.iter().map(|p| hwm_kib(p.pid())).collect();
            for proc in procs.iter_mut() {
                proc.stop();
            }
            drop(procs);
            drop(groups);
            runs.push(json!({
                "broker": broker_kind.name(),
                "broker_members": broker.ports.len(),
                "nodes": count,
                "latency": summary(&latency),
                "throughput": {
                    "jobs": total,
                    "in_flight": 2 * count,
                    "seconds": elapsed.as_secs_f64(),
                    "photos_per_s": answered(&load) as f64 / elapsed.as_secs_f64(),
                    "loaded": summary(&load),
                },
                "rss_kib": {"idle": idle, "after_load": loaded, "peak": peak},
            }));
        }
    }
    // Efficiency against the same broker's one-node run.
    let single: HashMap<String, f64> = runs
        .iter()
        .filter(|r| r["nodes"] == 1)
        .filter_map(|r| {
            Some((
                r["broker"].as_str()?.to_string(),
                r["throughput"]["photos_per_s"].as_f64()?,
            ))
        })
        .collect();
    for run in runs.iter_mut() {
        let (Some(broker), Some(nodes), Some(rate)) = (
            run["broker"].as_str().map(str::to_string),
            run["nodes"].as_f64(),
            run["throughput"]["photos_per_s"].as_f64(),
        ) else {
            continue;
        };
        if let Some(one) = single.get(&broker) {
            run["scaling_efficiency"] = json!(rate / (nodes * one));
        }
    }

    let memory = memory_phase(
        &args,
        &work,
        &images,
        &setups[0],
        &key,
        quota("mesh-memory")?,
    )
    .await?;

    let report = json!({
        "machine": machine(),
        "setup": {
            "node_cores": (!args.no_cpu_quota).then_some(args.node_cores),
            "tier": "edge (shared subscription)",
            "qos": 1,
            "images": args.images.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "mean_photo_bytes": images.iter().map(Vec::len).sum::<usize>() / images.len().max(1),
            "latency_jobs": args.latency_jobs,
            "jobs_per_node": args.jobs_per_node,
        },
        "runs": runs,
        "memory": memory,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    print_table(&report);
    eprintln!("report written to {}", args.out.display());
    if args.keep {
        eprintln!("node logs kept in {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    let lost: u64 = report["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| [&r["latency"], &r["throughput"]["loaded"]])
        .map(|s| s["lost"].as_u64().unwrap_or(0) + s["failed"].as_u64().unwrap_or(0))
        .sum();
    anyhow::ensure!(lost == 0, "{lost} jobs were lost or failed: see the report");
    Ok(())
}

/// One node with 1, 2, 4... workers on isomesh-broker: resident memory idle and after a burst
/// that keeps every worker busy.
async fn memory_phase(
    args: &MeshArgs,
    work: &Path,
    images: &[Vec<u8>],
    setup: &NodeSetup,
    key: &BenchKey,
    group: Option<CpuQuota>,
) -> anyhow::Result<serde_json::Value> {
    let port = isomesh_testkit::try_free_port()?;
    let _broker = BrokerKind::Isomesh.start(port, work)?;
    let mut sender = Sender {
        listener: wait_for_broker(port).await?,
        images: images.to_vec(),
    };
    let mut rows = Vec::new();
    for &workers in &args.workers {
        eprintln!("memory: one node, {workers} worker(s)");
        let mut proc = start_node(setup, port, &node_flags(key, workers))?;
        if let Some(group) = &group {
            group.add(proc.pid())?;
        }
        sender.wait_online(&[setup.id.as_str()]).await?;
        let idle = rss_kib(proc.pid());
        let sent = sender
            .run(&format!("mem-{workers}-"), 4 * workers, 2 * workers)
            .await?;
        let after = rss_kib(proc.pid());
        let peak = hwm_kib(proc.pid());
        proc.stop();
        rows.push(
            json!({"workers": workers, "idle_kib": idle, "after_load_kib": after,
                         "peak_kib": peak, "jobs": sent.len(), "answered": answered(&sent)}),
        );
    }
    // Least-squares slope of idle and after-load memory over the worker count.
    let slope = |field: &str| {
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|r| Some((r["workers"].as_f64()?, r[field].as_f64()?)))
            .collect();
        let n = points.len() as f64;
        if n < 2.0 {
            return None;
        }
        let (mx, my) = (
            points.iter().map(|p| p.0).sum::<f64>() / n,
            points.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        (sxx > 0.0).then(|| sxy / sxx)
    };
    Ok(json!({
        "by_workers": rows,
        "per_extra_instance_kib": {"idle": slope("idle_kib"), "after_load": slope("after_load_kib")},
    }))
}

fn node_flags(key: &BenchKey, workers: usize) -> Vec<String> {
    let mut flags = ["--offload", "local-only", "--workers"]
        .map(String::from)
        .to_vec();
    flags.push(workers.to_string());
    flags.extend(key.node_flags());
    flags
}

/// Connects the benchmark's client, retrying while the broker starts.
async fn wait_for_broker(port: u16) -> anyhow::Result<Listener> {
    let by = Instant::now() + Duration::from_secs(15);
    loop {
        match listen(port, "bench-mesh").await {
            Ok(listener) => return Ok(listener),
            Err(e) if Instant::now() > by => {
                return Err(e.context(format!("no broker on port {port} within 15 s")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

impl Sender {
    /// Waits until every node in `ids` reports itself online with a module.
    async fn wait_online(&mut self, ids: &[&str]) -> anyhow::Result<()> {
        let mut ready: HashMap<String, bool> = HashMap::new();
        let by = Instant::now() + Duration::from_secs(300);
        while !ids
            .iter()
            .all(|id| ready.get(*id).copied().unwrap_or(false))
        {
            anyhow::ensure!(Instant::now() < by, "nodes {ids:?} not ready within 300 s");
            if let Ok(Some(p)) =
                tokio::time::timeout(Duration::from_secs(1), self.listener.events.recv()).await
            {
                if let Some(id) = self.listener.topics.status_of(topic(&p)) {
                    if let Ok(status) = NodeStatus::decode(p.payload.as_ref()) {
                        ready.insert(id.to_string(), status.online && status.module.is_some());
                    }
                }
            }
        }
        // The shared subscriptions of nodes that just came up are in place by now; a second
        // lets the broker settle before anything is timed.
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(())
    }

    /// Sends `total` jobs to the edge tier, keeping `window` in flight, and waits for every
    /// answer (60 s after the last one arrived at most: what is missing then counts as lost).
    async fn run(
        &mut self,
        prefix: &str,
        total: usize,
        window: usize,
    ) -> anyhow::Result<Vec<Sent>> {
        let topic = self.listener.topics.tier_jobs(Tier::Edge);
        let mut sent: Vec<Sent> = Vec::with_capacity(total);
        let mut in_flight = 0usize;
        let mut last_progress = Instant::now();
        loop {
            while in_flight < window.max(1) && sent.len() < total {
                let n = sent.len();
                let job = Job {
                    job_id: format!("{prefix}{n}"),
                    image: self.images[n % self.images.len()].clone(),
                    reply_to: self.listener.replies.clone(),
                    ..Default::default()
                };
                sent.push(Sent {
                    at: Instant::now(),
                    latency_ms: None,
                    node: String::new(),
                    answers: 0,
                    ok: false,
                });
                self.listener
                    .client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, job.encode_to_vec())
                    .await?;
                in_flight += 1;
            }
            if in_flight == 0 || last_progress.elapsed() > Duration::from_secs(60) {
                break;
            }
            let Ok(Some(p)) =
                tokio::time::timeout(Duration::from_secs(1), self.listener.events.recv()).await
            else {
                continue;
            };
            let Ok(result) = JobResult::decode(p.payload.as_ref()) else {
                continue;
            };
            let Some(index) = result
                .job_id
                .strip_prefix(prefix)
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            if let Some(job) = sent.get_mut(index) {
                job.answers += 1;
                if job.answers == 1 {
                    job.latency_ms = Some(ms(job.at.elapsed()));
                    job.node = result.node;
                    job.ok = result.error.is_empty() && !result.top.is_empty();
                    in_flight -= 1;
                    last_progress = Instant::now();
                }
            }
        }
        // Duplicates would arrive right after: give them a moment to show.
        let settle = Instant::now() + Duration::from_millis(300);
        while let Ok(Some(p)) = tokio::time::timeout(
            settle.saturating_duration_since(Instant::now()),
            self.listener.events.recv(),
        )
        .await
        {
            if let Ok(result) = JobResult::decode(p.payload.as_ref()) {
                if let Some(job) = result
                    .job_id
                    .strip_prefix(prefix)
                    .and_then(|n| n.parse::<usize>().ok())
                    .and_then(|i| sent.get_mut(i))
                {
                    job.answers += 1;
                }
            }
        }
        Ok(sent)
    }
}

fn topic(p: &Publish) -> &str {
    std::str::from_utf8(&p.topic).unwrap_or("")
}

fn answered(sent: &[Sent]) -> usize {
    sent.iter().filter(|s| s.latency_ms.is_some()).count()
}

fn summary(sent: &[Sent]) -> serde_json::Value {
    let mut latencies: Vec<f64> = sent.iter().filter_map(|s| s.latency_ms).collect();
    let mut by_node: HashMap<&str, usize> = HashMap::new();
    for s in sent.iter().filter(|s| s.latency_ms.is_some()) {
        *by_node.entry(s.node.as_str()).or_default() += 1;
    }
    json!({
        "sent": sent.len(),
        "answered": answered(sent),
        "lost": sent.len() - answered(sent),
        "failed": sent.iter().filter(|s| s.latency_ms.is_some() && !s.ok).count(),
        "duplicates": sent.iter().map(|s| s.answers.saturating_sub(1)).sum::<usize>(),
        "by_node": by_node,
        "latency_ms": stats(&mut latencies).to_json(),
    })
}

fn print_table(report: &serde_json::Value) {
    println!("broker             nodes  p50 ms  p99 ms  photos/s  efficiency  lost");
    for run in report["runs"].as_array().into_iter().flatten() {
        let lost = run["latency"]["lost"].as_u64().unwrap_or(0)
            + run["throughput"]["loaded"]["lost"].as_u64().unwrap_or(0);
        println!(
            "{:<18} {:>5}  {:>6.1}  {:>6.1}  {:>8.2}  {:>10}  {lost}",
            run["broker"].as_str().unwrap_or("?"),
            run["nodes"],
            run["latency"]["latency_ms"]["median"]
                .as_f64()
                .unwrap_or(f64::NAN),
            run["latency"]["latency_ms"]["p99"]
                .as_f64()
                .unwrap_or(f64::NAN),
            run["throughput"]["photos_per_s"]
                .as_f64()
                .unwrap_or(f64::NAN),
            run["scaling_efficiency"]
                .as_f64()
                .map_or("-".to_string(), |e| format!("{:.0}%", 100.0 * e)),
        );
    }
    let memory = &report["memory"];
    for row in memory["by_workers"].as_array().into_iter().flatten() {
        println!(
            "one node, {} worker(s): RSS idle {} MiB, after load {} MiB",
            row["workers"],
            row["idle_kib"].as_u64().unwrap_or(0) / 1024,
            row["after_load_kib"].as_u64().unwrap_or(0) / 1024
        );
    }
    if let Some(kib) = memory["per_extra_instance_kib"]["after_load"].as_f64() {
        println!("each extra instance: {:.0} MiB after load", kib / 1024.0);
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    crate::common::status_kib(Some(pid), "VmRSS:")
}

fn hwm_kib(pid: u32) -> Option<u64> {
    crate::common::status_kib(Some(pid), "VmHWM:")
}
