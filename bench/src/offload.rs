//! `isomesh bench offload`: deadline hits and latency of the offload policies under load.
//!
//! One run on this machine: an `isomesh-broker`, a device, two edge nodes and a cloud node, each
//! held to a CPU quota (cgroups) so the tiers differ as real ones do, the edge and cloud nodes
//! reaching the broker through TCP links that delay every byte as a LAN and a WAN would. The
//! device's capacity is measured first (its median service time, jobs one at a time); then, for
//! each policy (every node runs the same one), Poisson arrivals at multiples of that capacity go
//! to the device, each job with the same budget. The arrival times come from a seeded generator,
//! so every policy sees the same sequence. Measured per policy and load: share of jobs answered
//! within the budget (as the sender sees it), latency percentiles, where jobs ran, jobs lost.
//! Every run (a policy at a load) starts on a freshly started mesh. Writes JSON, with every
//! latency, for `scripts/plot_offload.py` and `scripts/bench_report.py`.
//!
//! A second scenario asks whether the policy is stable rather than how good it is once: with
//! `--no-cpu-quota --arrivals steady --repeat N`, every node shares the machine's cores (as
//! several nodes on one edge box do), jobs arrive at a constant rate, and each run starts a
//! fresh mesh. The same stream then gives one in-budget share per run, and the report gives their
//! distribution per policy (a policy that tips into a state where every queue grows shows up as
//! a low tail, not as a lower average). Each run also counts where jobs went (their paths), the
//! jobs a node ran after giving up waiting on the tier above (fallbacks), the runs whose
//! answer nobody took (the same job run twice: work the machine spent for nothing), and the CPU
//! time each node and the broker used (from `/proc`): per job, and in all per second of the
//! stream as a share of the machine's cores, which tells a stream the machine can serve from
//! one it cannot, whatever the policy.

use crate::common::{listen, machine, ms, precompile_into, read_files, stats, tempdir, Listener};
use anyhow::Context;
use isomesh_mesh::offload::Policy;
use isomesh_mesh::topics::Topics;
use isomesh_protos::{Job, JobResult, NodeStatus, Tier};
use isomesh_testkit::harness::{
    delayed_link, start_broker, start_node, BenchKey, CpuQuota, NodeSetup, Proc,
};
use prost::Message;
use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Debug, clap::Args)]
pub struct OffloadArgs {
    /// The classifier module every node serves.
    #[arg(long)]
    pub module: PathBuf,
    /// Compile the module through this compile cache (e.g. `bench infer`'s `--cache-dir`), so
    /// a module compiled before takes seconds instead of a full compile (default: none).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Photos sent as jobs (cycled).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Offered loads, as multiples of the device's measured capacity.
    #[arg(long, value_delimiter = ',', default_value = "0.5,1,2,4")]
    pub loads: Vec<f64>,
    /// Take the device's service time as this many ms instead of measuring it, so two builds
    /// are compared at the same rates (on a shared machine the measurement moves with the
    /// neighbours: 48-72 ms within one afternoon here).
    #[arg(long, value_name = "MS")]
    pub device_ms: Option<f64>,
    /// Policies compared (every node runs the one under test).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "budget,local-only,always-up"
    )]
    pub policies: Vec<Policy>,
    /// How jobs arrive: `poisson` (random gaps averaging 1/rate) or `steady` (one every 1/rate).
    #[arg(long, value_enum, default_value_t = Arrivals::Poisson)]
    pub arrivals: Arrivals,
    /// Runs of every policy and load, each on a freshly started mesh: the report then gives the
    /// distribution of their in-budget shares.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Seconds of arrivals per policy and load.
    #[arg(long, default_value_t = 20)]
    pub duration_s: u64,
    /// Budget of every job, ms.
    #[arg(long, default_value_t = 500)]
    pub budget_ms: u32,
    /// CPU quota of the device node, in cores.
    #[arg(long, default_value_t = 0.25)]
    pub device_cores: f64,
    /// CPU quota of each of the two edge nodes, in cores.
    #[arg(long, default_value_t = 0.5)]
    pub edge_cores: f64,
    /// CPU quota of the cloud node, in cores.
    #[arg(long, default_value_t = 1.0)]
    pub cloud_cores: f64,
    /// Delay each way between the edge nodes and the broker, ms.
    #[arg(long, default_value_t = 5)]
    pub edge_link_ms: u64,
    /// Delay each way between the cloud node and the broker, ms.
    #[arg(long, default_value_t = 40)]
    pub cloud_link_ms: u64,
    /// Run every node at full speed (no cgroups, no root needed); the tiers then differ only
    /// by their links.
    #[arg(long)]
    pub no_cpu_quota: bool,
    /// Seed of the arrival times.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-out/offload.json")]
    pub out: PathBuf,
    /// Keep the working directory (node logs) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
}

/// How the jobs of a run are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arrivals {
    /// Exponential gaps: a Poisson process, as many independent senders make.
    Poisson,
    /// Equal gaps: one camera at a fixed frame rate.
    Steady,
}

impl Arrivals {
    fn name(self) -> &'static str {
        match self {
            Arrivals::Poisson => "poisson",
            Arrivals::Steady => "steady",
        }
    }
}

/// One benchmark node: where it lives, how it reaches the broker, its CPU quota.
struct BenchNode {
    setup: NodeSetup,
    port: u16,
    cores: f64,
}

/// The client side of the run: publishes jobs, receives results and statuses.
struct Sender {
    client: AsyncClient,
    events: UnboundedReceiver<Publish>,
    topics: Topics,
    replies: String,
    images: Vec<Vec<u8>>,
    /// The last status heard from each node, by node id.
    statuses: HashMap<String, NodeStatus>,
}

/// One job of a run and its answer.
struct Sent {
    at: Instant,
    answer: Option<Answer>,
}

struct Answer {
    latency_ms: f64,
    tier: Tier,
    ok: bool,
    /// The nodes the job went through, the sender's first (`d1>e2>c1`).
    path: String,
    /// A node on the way ran the job itself after waiting in vain for the tier above.
    fallback: bool,
}

pub async fn offload(args: OffloadArgs) -> anyhow::Result<()> {
    let images = read_files(&args.images)?;
    let module = std::fs::read(&args.module)
        .with_context(|| format!("reading {}", args.module.display()))?;
    let work = tempdir()?;
    let port = isomesh_testkit::try_free_port()?;
    let broker = start_broker(port)?;
    let edge_port = delayed_link(port, Duration::from_millis(args.edge_link_ms)).await?;
    let cloud_port = delayed_link(port, Duration::from_millis(args.cloud_link_ms)).await?;

    // One compiled-code cache for every node: compiled once here, loaded in milliseconds there.
    let cache = work.join("cache");
    let info = precompile_into(&cache, args.cache_dir.as_deref(), &module)?;
    let key = BenchKey::new(&work)?;
    let plan = [
        ("bo-d1", Tier::Device, port, args.device_cores),
        ("bo-e1", Tier::Edge, edge_port, args.edge_cores),
        ("bo-e2", Tier::Edge, edge_port, args.edge_cores),
        ("bo-c1", Tier::Cloud, cloud_port, args.cloud_cores),
    ];
    let mut nodes = Vec::new();
    for (id, tier, port, cores) in plan {
        let dir = work.join(id);
        let setup = NodeSetup {
            id: id.into(),
            tier,
            modules: dir.join("modules"),
            cache: cache.clone(),
            log: dir.join("node.log"),
        };
        std::fs::create_dir_all(&setup.modules)?;
        key.place(&setup.modules, "module.wasm", &module, &info)?;
        nodes.push(BenchNode { setup, port, cores });
    }
    let quotas = if args.no_cpu_quota {
        None
    } else {
        Some(
            nodes
                .iter()
                .map(|n| CpuQuota::new(&n.setup.id, n.cores))
                .collect::<anyhow::Result<Vec<_>>>()?,
        )
    };
    // The broker is not limited (a group as wide as the machine), only given the same weight
    // as the nodes, so that other work on the machine does not slow it either.
    let broker_group = match quotas {
        Some(_) => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let group = CpuQuota::new("broker", cores as f64)?;
            group.add(broker.pid())?;
            Some(group)
        }
        None => None,
    };

    let Listener {
        client,
        topics,
        replies,
        events,
        ..
    } = listen(port, "bench-offload").await?;
    let mut sender = Sender {
        client,
        events,
        topics,
        replies,
        images,
        statuses: HashMap::new(),
    };

    let device_service_ms = match args.device_ms {
        Some(ms) => ms,
        None => measure_device(&nodes, &key, quotas.as_deref(), &mut sender).await?,
    };
    let capacity = 1000.0 / device_service_ms;
    eprintln!("device: {device_service_ms:.1} ms a job, capacity {capacity:.2} jobs/s");

    let mut runs = Vec::new();
    for &policy in &args.policies {
        for (load_index, &load) in args.loads.iter().enumerate() {
            for repeat in 0..args.repeat {
                // A fresh mesh for every run: no run inherits another's queues or estimates.
                let mut procs =
                    start_mesh(&nodes, &key, quotas.as_deref(), policy, &mut sender).await?;
                let rate = load * capacity;
                eprint!(
                    "{}: {load}x = {rate:.1} jobs/s for {} s ({}{})",
                    policy.name(),
                    args.duration_s,
                    args.arrivals.name(),
                    if args.repeat > 1 {
                        format!(", run {} of {}", repeat + 1, args.repeat)
                    } else {
                        String::new()
                    }
                );
                // The same arrivals in every run and for every policy.
                let seed = args.seed.wrapping_add(load_index as u64);
                // Statuses queued since the mesh started (a stopped node's last one included)
                // come before the fresh ones, which then count from here.
                while let Ok(p) = sender.events.try_recv() {
                    sender.heard(&p);
                }
                let before = sender.jobs_done();
                let work_before = mesh_work(&nodes, &procs, broker.pid(), &sender);
                let prefix = format!("{}-{load}-{repeat}-", policy.name());
                let sent = sender.stream(&prefix, rate, seed, &args).await?;
                let ran = sender.jobs_done().saturating_sub(before);
                let mut run = summary(policy, load, rate, &sent, args.budget_ms, ran);
                run["repeat"] = json!(repeat);
                run["cpu"] = cpu_per_job(
                    &work_before,
                    &mesh_work(&nodes, &procs, broker.pid(), &sender),
                    args.duration_s,
                );
                eprintln!(
                    ": {:.1}% in budget, {} fallbacks, {} jobs run twice, {:.1} ms CPU a job, \
                     {:.0}% of the cores' time",
                    run["hit_rate"].as_f64().unwrap_or(f64::NAN) * 100.0,
                    run["fallbacks"],
                    run["wasted_runs"],
                    run["cpu"]["cpu_ms_per_job"].as_f64().unwrap_or(f64::NAN),
                    run["cpu"]["cpu_demand_share"].as_f64().unwrap_or(f64::NAN) * 100.0
                );
                runs.push(run);
                stop_mesh(&mut procs);
            }
        }
    }
    drop(quotas);
    // A group is removed once empty.
    drop(broker);
    drop(broker_group);

    let find = |policy: Policy, load: f64| {
        runs.iter()
            .find(|r| r["policy"] == policy.name() && r["load"].as_f64() == Some(load))
    };
    let (low, high) = (
        args.loads.iter().cloned().fold(f64::INFINITY, f64::min),
        args.loads.iter().cloned().fold(0.0, f64::max),
    );
    let ratio = |a: Option<&serde_json::Value>, b: Option<&serde_json::Value>, key: &str| {
        let get = |v: Option<&serde_json::Value>| {
            v.and_then(|v| v["latency_ms"][key].as_f64())
                .unwrap_or(f64::NAN)
        };
        get(a) / get(b)
    };
    let distributions: Vec<serde_json::Value> = args
        .policies
        .iter()
        .flat_map(|&policy| args.loads.iter().map(move |&load| (policy, load)))
        .map(|(policy, load)| {
            let shares: Vec<f64> = runs
                .iter()
                .filter(|r| r["policy"] == policy.name() && r["load"].as_f64() == Some(load))
                .filter_map(|r| r["hit_rate"].as_f64())
                .collect();
            distribution(policy, load, shares)
        })
        .collect();
    let report = json!({
        "machine": machine(),
        "setup": {
            "budget_ms": args.budget_ms,
            "duration_s": args.duration_s,
            "arrivals": args.arrivals.name(),
            "repeat": args.repeat,
            "cores": {"device": args.device_cores, "edge": args.edge_cores, "cloud": args.cloud_cores,
                      "quota": !args.no_cpu_quota},
            "link_delay_ms_each_way": {"device": 0, "edge": args.edge_link_ms, "cloud": args.cloud_link_ms},
            "nodes": nodes.iter().map(|n| json!({"id": n.setup.id, "tier": n.setup.tier.name()})).collect::<Vec<_>>(),
            "seed": args.seed,
        },
        "device_service_ms": device_service_ms,
        "device_service_ms_given": args.device_ms.is_some(),
        "device_capacity_per_s": capacity,
        "runs": runs,
        "distributions": distributions,
        "summary": {
            "hit_rate_at_highest_load": args.policies.iter().map(|p| (p.name(), find(*p, high).map(|r| r["hit_rate"].clone()))).collect::<HashMap<_, _>>(),
            "p50_at_lowest_load_ms": args.policies.iter().map(|p| (p.name(), find(*p, low).map(|r| r["latency_ms"]["median"].clone()))).collect::<HashMap<_, _>>(),
            "p50_budget_over_always_up_at_lowest_load": ratio(find(Policy::Budget, low), find(Policy::AlwaysUp, low), "median"),
            "p99_budget_over_local_only_at_highest_load": ratio(find(Policy::Budget, high), find(Policy::LocalOnly, high), "p99"),
        },
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    let mut brief = report.clone();
    if let Some(runs) = brief["runs"].as_array_mut() {
        for run in runs {
            if let Some(run) = run.as_object_mut() {
                run.remove("latencies_ms");
            }
        }
    }
    println!("{}", serde_json::to_string_pretty(&brief)?);
    eprintln!("report written to {}", args.out.display());
    if args.keep {
        eprintln!("node logs kept in {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

/// The device's service time: the median of 30 jobs sent one at a time, nothing forwarded (30:
/// the machine is shared, and a rate set from a few would swing from run to run).
async fn measure_device(
    nodes: &[BenchNode],
    key: &BenchKey,
    quotas: Option<&[CpuQuota]>,
    sender: &mut Sender,
) -> anyhow::Result<f64> {
    let mut procs = start_mesh(nodes, key, quotas, Policy::LocalOnly, sender).await?;
    let mut service = Vec::new();
    for n in 0..32 {
        let result = sender.one_job(&format!("calibrate-{n}"), n).await?;
        if n >= 2 {
            service.push(result.timing.map(|t| t.total_ms).unwrap_or(f64::NAN));
        }
    }
    stop_mesh(&mut procs);
    Ok(stats(&mut service).median)
}

/// Starts every node under `policy`, each in its CPU quota, and waits until all are online.
async fn start_mesh(
    nodes: &[BenchNode],
    key: &BenchKey,
    quotas: Option<&[CpuQuota]>,
    policy: Policy,
    sender: &mut Sender,
) -> anyhow::Result<Vec<Proc>> {
    let mut flags = ["--offload", policy.name(), "--workers", "1"]
        .map(String::from)
        .to_vec();
    flags.extend(key.node_flags());
    let mut procs = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let proc = start_node(&node.setup, node.port, &flags)?;
        if let Some(quota) = quotas.and_then(|q| q.get(n)) {
            quota.add(proc.pid())?;
        }
        procs.push(proc);
    }
    let mut online: HashMap<String, bool> = HashMap::new();
    let by = Instant::now() + Duration::from_secs(300);
    while !nodes
        .iter()
        .all(|n| online.get(&n.setup.id).copied().unwrap_or(false))
    {
        anyhow::ensure!(Instant::now() < by, "nodes not ready within 300 s");
        if let Ok(Some(p)) =
            tokio::time::timeout(Duration::from_secs(1), sender.events.recv()).await
        {
            if let Some(status) = sender.heard(&p) {
                let ready = status.online && status.module.is_some();
                online.insert(status.node_id.clone(), ready);
            }
        }
    }
    // Statuses reach every node within a status interval.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(procs)
}

fn stop_mesh(procs: &mut Vec<Proc>) {
    for proc in procs.iter_mut() {
        proc.stop();
    }
    procs.clear();
}

impl Sender {
    fn job(&self, job_id: &str, n: usize, budget_ms: u32) -> Vec<u8> {
        Job {
            job_id: job_id.into(),
            image: self.images[n % self.images.len()].clone(),
            reply_to: self.replies.clone(),
            budget_ms,
            ..Default::default()
        }
        .encode_to_vec()
    }

    async fn publish(&self, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(self.topics.jobs("bo-d1"), QoS::AtLeastOnce, false, payload)
            .await?;
        Ok(())
    }

    /// Sends one job and waits for its result.
    async fn one_job(&mut self, job_id: &str, n: usize) -> anyhow::Result<JobResult> {
        self.publish(self.job(job_id, n, 0)).await?;
        let by = Instant::now() + Duration::from_secs(60);
        while let Ok(Some(p)) = tokio::time::timeout(
            by.saturating_duration_since(Instant::now()),
            self.events.recv(),
        )
        .await
        {
            if let Ok(result) = JobResult::decode(p.payload.as_ref()) {
                if result.job_id == job_id {
                    anyhow::ensure!(result.error.is_empty(), "job failed: {}", result.error);
                    return Ok(result);
                }
            }
        }
        anyhow::bail!("no answer to {job_id} within 60 s")
    }

    /// Jobs at `rate` per second for the run's duration, spaced as `--arrivals` says, then waits
    /// for every answer (120 s at most: what is missing then counts as lost).
    async fn stream(
        &mut self,
        prefix: &str,
        rate: f64,
        seed: u64,
        args: &OffloadArgs,
    ) -> anyhow::Result<Vec<Sent>> {
        let mut random = SplitMix(seed);
        let mut sent: Vec<Sent> = Vec::new();
        let started = Instant::now();
        let end = started + Duration::from_secs(args.duration_s);
        let mut next = started;
        loop {
            let now = Instant::now();
            if now >= next {
                if next >= end {
                    break;
                }
                let n = sent.len();
                self.publish(self.job(&format!("{prefix}{n}"), n, args.budget_ms))
                    .await?;
                sent.push(Sent {
                    at: Instant::now(),
                    answer: None,
                });
                let gap = match args.arrivals {
                    Arrivals::Poisson => random.exponential(rate),
                    Arrivals::Steady => 1.0 / rate.max(1e-9),
                };
                next += Duration::from_secs_f64(gap);
                continue;
            }
            if let Ok(Some(p)) = tokio::time::timeout(next - now, self.events.recv()).await {
                self.take(&p, prefix, &mut sent);
            }
        }
        let by = Instant::now() + Duration::from_secs(120);
        while sent.iter().any(|s| s.answer.is_none()) && Instant::now() < by {
            if let Ok(Some(p)) =
                tokio::time::timeout(Duration::from_secs(1), self.events.recv()).await
            {
                self.take(&p, prefix, &mut sent);
            }
        }
        // Let the queues empty (copies of jobs answered already may still run above) before
        // the next run, and their statuses come in.
        tokio::time::sleep(Duration::from_secs(2)).await;
        while let Ok(p) = self.events.try_recv() {
            self.take(&p, prefix, &mut sent);
        }
        Ok(sent)
    }

    /// Takes in one message: an answer to a job of this run, or a node's status.
    fn take(&mut self, p: &Publish, prefix: &str, sent: &mut [Sent]) {
        if self.heard(p).is_none() {
            take_answer(p, prefix, sent);
        }
    }

    /// Records `p` if it is a node's status, and returns it.
    fn heard(&mut self, p: &Publish) -> Option<&NodeStatus> {
        if !p.topic.starts_with(b"isomesh/status/") {
            return None;
        }
        let status = NodeStatus::decode(p.payload.as_ref()).ok()?;
        let node = status.node_id.clone();
        self.statuses.insert(node.clone(), status);
        self.statuses.get(&node)
    }

    /// Jobs the nodes ran to their end so far, in all (from their last statuses).
    fn jobs_done(&self) -> u64 {
        self.statuses.values().map(|s| s.jobs_done).sum()
    }
}

fn take_answer(p: &Publish, prefix: &str, sent: &mut [Sent]) {
    let Ok(result) = JobResult::decode(p.payload.as_ref()) else {
        return;
    };
    let Some(index) = result
        .job_id
        .strip_prefix(prefix)
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return;
    };
    if let Some(job) = sent.get_mut(index) {
        // Hops run from the node the sender reached to the one that ran the job.
        let path = result
            .hops
            .iter()
            .map(|h| h.node.strip_prefix("bo-").unwrap_or(&h.node))
            .collect::<Vec<_>>()
            .join(">");
        let fallback = result
            .hops
            .iter()
            .any(|h| h.action == isomesh_protos::hop::Action::Fallback as i32);
        job.answer.get_or_insert(Answer {
            latency_ms: ms(job.at.elapsed()),
            tier: Tier::try_from(result.tier).unwrap_or(Tier::Unspecified),
            ok: result.error.is_empty(),
            path,
            fallback,
        });
    }
}

fn summary(
    policy: Policy,
    load: f64,
    rate: f64,
    sent: &[Sent],
    budget_ms: u32,
    ran: u64,
) -> serde_json::Value {
    let answered: Vec<&Answer> = sent.iter().filter_map(|s| s.answer.as_ref()).collect();
    let mut latencies: Vec<f64> = answered.iter().map(|a| a.latency_ms).collect();
    let hits = answered
        .iter()
        .filter(|a| a.ok && a.latency_ms <= budget_ms as f64)
        .count();
    let ran_on = |tier: Tier| answered.iter().filter(|a| a.tier == tier).count();
    let missed_on = |tier: Tier| {
        answered
            .iter()
            .filter(|a| a.tier == tier && !(a.ok && a.latency_ms <= budget_ms as f64))
            .count()
    };
    let latency = stats(&mut latencies);
    let mut paths: std::collections::BTreeMap<&str, usize> = Default::default();
    for answer in &answered {
        *paths.entry(answer.path.as_str()).or_default() += 1;
    }
    json!({
        "policy": policy.name(),
        "load": load,
        "rate_per_s": rate,
        "sent": sent.len(),
        "answered": answered.len(),
        "lost": sent.len() - answered.len(),
        "failed": answered.iter().filter(|a| !a.ok).count(),
        "hit_rate": hits as f64 / sent.len().max(1) as f64,
        "ran_on": {"device": ran_on(Tier::Device), "edge": ran_on(Tier::Edge), "cloud": ran_on(Tier::Cloud)},
        "missed_on": {"device": missed_on(Tier::Device), "edge": missed_on(Tier::Edge), "cloud": missed_on(Tier::Cloud)},
        "paths": paths,
        "fallbacks": answered.iter().filter(|a| a.fallback).count(),
        // Every job runs at least once; a copy run above after its sender ran it itself (or
        // the other way round) is run twice, and one of the two answers is dropped.
        "jobs_run": ran,
        "wasted_runs": ran.saturating_sub(answered.len() as u64),
        "latency_ms": latency.to_json(),
        "latencies_ms": latencies,
    })
}

/// What one node had done at some moment: jobs run to their end (its last status) and the CPU
/// time its process had used.
struct NodeWork {
    id: String,
    jobs: u64,
    cpu: Option<Duration>,
}

/// One reading of the mesh: each node's work, and the broker's CPU time (no jobs of its own,
/// but it runs on the same cores).
struct MeshWork {
    nodes: Vec<NodeWork>,
    broker_cpu: Option<Duration>,
}

fn mesh_work(nodes: &[BenchNode], procs: &[Proc], broker_pid: u32, sender: &Sender) -> MeshWork {
    MeshWork {
        nodes: nodes
            .iter()
            .zip(procs)
            .map(|(node, proc)| NodeWork {
                id: node.setup.id.clone(),
                jobs: sender
                    .statuses
                    .get(&node.setup.id)
                    .map_or(0, |s| s.jobs_done),
                cpu: process_cpu_time(proc.pid()),
            })
            .collect(),
        broker_cpu: process_cpu_time(broker_pid),
    }
}

/// CPU time per job run, per node and over the mesh, between two readings, and the CPU the
/// whole run took (nodes and broker) per second of the stream, as a share of the machine's
/// cores: how close the stream came to what this machine can serve at all, and whether a job
/// costs more CPU (not only more wall time) when more nodes compute on the same cores.
fn cpu_per_job(before: &MeshWork, after: &MeshWork, duration_s: u64) -> serde_json::Value {
    let used = |b: Option<Duration>, a: Option<Duration>| Some(a?.saturating_sub(b?));
    let ms_per_job =
        |cpu: Duration, jobs: u64| (jobs > 0).then(|| cpu.as_secs_f64() * 1000.0 / jobs as f64);
    let mut nodes = serde_json::Map::new();
    let (mut all_jobs, mut all_cpu) = (0u64, Duration::ZERO);
    for (b, a) in before.nodes.iter().zip(&after.nodes) {
        let Some(cpu) = used(b.cpu, a.cpu) else {
            continue;
        };
        let jobs = a.jobs.saturating_sub(b.jobs);
        all_jobs += jobs;
        all_cpu += cpu;
        nodes.insert(
            a.id.trim_start_matches("bo-").to_string(),
            json!({"jobs": jobs, "cpu_s": cpu.as_secs_f64(), "cpu_ms_per_job": ms_per_job(cpu, jobs)}),
        );
    }
    let broker = used(before.broker_cpu, after.broker_cpu);
    if let Some(cpu) = broker {
        nodes.insert("broker".into(), json!({"cpu_s": cpu.as_secs_f64()}));
    }
    let broker = broker.unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    json!({
        "nodes": nodes,
        "cpu_ms_per_job": ms_per_job(all_cpu, all_jobs),
        // Over 1: the stream asked more of the cores than they have, and queues grew.
        "cpu_demand_share": (all_cpu + broker).as_secs_f64() / (duration_s.max(1) as f64 * cores as f64),
    })
}

/// The CPU time a process has used, all its threads: the sum of each thread's time on a CPU
/// in `/proc/PID/task/*/schedstat` (nanoseconds, unlike `/proc/PID/stat`'s clock ticks).
/// `None` where procfs is not there to read.
fn process_cpu_time(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            // A thread that ended between the listing and the read.
            continue;
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(Duration::from_nanos(total))
}

/// The in-budget shares of the runs of one policy and load: how they spread, and how many fell
/// below 90%.
fn distribution(policy: Policy, load: f64, mut shares: Vec<f64>) -> serde_json::Value {
    shares.sort_by(f64::total_cmp);
    // Nearest rank: the smallest share with at least `q` of the runs at or below it.
    let rank = |q: f64| -> Option<f64> {
        let n = shares.len();
        (n > 0).then(|| shares[((q * n as f64).ceil() as usize).clamp(1, n) - 1])
    };
    json!({
        "policy": policy.name(),
        "load": load,
        "runs": shares.len(),
        "hit_rate": {
            "min": rank(0.0),
            "p10": rank(0.1),
            "median": rank(0.5),
            "max": rank(1.0),
        },
        "runs_below_90_percent": shares.iter().filter(|&&s| s < 0.9).count(),
        "hit_rates": shares,
    })
}

/// A small seeded generator (splitmix64): the same arrivals for every policy.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// An exponentially distributed gap, in seconds, for arrivals at `rate` per second.
    fn exponential(&mut self, rate: f64) -> f64 {
        // Uniform in (0, 1]: never ln(0).
        let uniform = ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        -uniform.ln() / rate.max(1e-9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_distribution_gives_nearest_rank_percentiles_and_counts_runs_below_90_percent() {
        let shares = vec![0.95, 0.15, 0.92, 0.14, 0.93, 0.94, 0.91, 0.90, 0.96, 0.97];
        let d = distribution(Policy::Budget, 1.5, shares);
        assert_eq!(d["runs"], 10);
        assert_eq!(d["hit_rate"]["min"], 0.14);
        assert_eq!(d["hit_rate"]["p10"], 0.14);
        assert_eq!(d["hit_rate"]["median"], 0.92);
        assert_eq!(d["hit_rate"]["max"], 0.97);
        assert_eq!(d["runs_below_90_percent"], 2);
        let none = distribution(Policy::LocalOnly, 1.0, Vec::new());
        assert_eq!(none["hit_rate"]["median"], serde_json::Value::Null);
    }

    #[test]
    fn exponential_gaps_average_one_over_the_rate() {
        let mut random = SplitMix(7);
        let n = 20_000;
        let mean = (0..n).map(|_| random.exponential(4.0)).sum::<f64>() / n as f64;
        assert!((mean - 0.25).abs() < 0.01, "mean gap {mean}");
        let (mut a, mut b) = (SplitMix(1), SplitMix(1));
        assert_eq!(a.next(), b.next());
    }
}
