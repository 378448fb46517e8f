//! `isomesh bench swap`: a rollout under load, against the restart it replaces.
//!
//! In one run on this machine: an `isomesh-broker` and N nodes (device, edge, cloud, ...) serving
//! version A, a steady stream of photos to the first node, then a signed rollout of version B.
//! Measured: (a) time from the rollout's start to each node serving B, split into compile (at the
//! publisher), publish and node phases; (b) jobs failed or lost; (c) round-trip latency before and
//! during the swap. Then the baseline the paper compares against: stop the first node, start it
//! on B, and time until it answers its first job (cold: compiling B; warm: from the
//! compiled-module cache). Writes JSON.

use crate::common::{listen, machine, ms, read_files, stats, tempdir, Listener};
use isomesh_protos::{NodeStatus, Tier};
use isomesh_sandbox::{Sandbox, SandboxConfig};
use isomesh_testkit::harness::{start_broker, start_node, BenchKey, NodeSetup};
use prost::Message;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct SwapArgs {
    /// The module the nodes start with.
    #[arg(long)]
    pub from: PathBuf,
    /// The module rolled out (another version of the same classifier).
    #[arg(long)]
    pub to: PathBuf,
    /// Photos sent as load.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Nodes in the mesh (tiers cycle device, edge, cloud).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Jobs per second sent to the first node.
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,
    /// Seconds of load before the rollout.
    #[arg(long, default_value_t = 10)]
    pub before_s: u64,
    /// Publish no precompiled code: every node compiles the new module itself.
    #[arg(long)]
    pub no_precompile: bool,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-out/swap.json")]
    pub out: PathBuf,
    /// Keep the working directory (node logs, module dirs) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
}

/// One job sent as load.
struct Sent {
    at: Instant,
    answer: Option<(Instant, String, bool)>,
}

pub async fn swap(args: SwapArgs) -> anyhow::Result<()> {
    let images = read_files(&args.images)?;
    let (from, to) = (std::fs::read(&args.from)?, std::fs::read(&args.to)?);
    let work = tempdir()?;
    let port = isomesh_testkit::try_free_port()?;
    let _broker = start_broker(port)?;
    let key = BenchKey::new(&work)?;
    let trusted_flag = key.node_flags();

    // Each node its own module dir and compiled-module cache, as on separate machines; the
    // starting module is compiled once and copied into every cache so setup stays short.
    // The publisher's compiler cache: it compiled the starting version, as an operator's
    // machine that rolled it out would have.
    let publisher_cache = work.join("publisher-cache");
    let sandbox = Sandbox::new(SandboxConfig {
        cache_dir: Some(publisher_cache.clone()),
        ..SandboxConfig::default()
    })?;
    eprintln!("compiling the starting module once for all nodes...");
    let (from_info, from_code) = sandbox.precompile(&from)?;
    let to_info = Sandbox::new(SandboxConfig::default())?.precompile(&to)?.0;
    let tiers = [Tier::Device, Tier::Edge, Tier::Cloud];
    let mut setups = Vec::new();
    for n in 0..args.nodes.max(1) {
        let dir = work.join(format!("n{n}"));
        let setup = NodeSetup {
            id: format!("bench-n{n}"),
            tier: tiers[n % 3],
            modules: dir.join("modules"),
            cache: dir.join("cache"),
            log: dir.join("node.log"),
        };
        std::fs::create_dir_all(&setup.modules)?;
        key.place(&setup.modules, "from.wasm", &from, &from_info)?;
        let node_sandbox = Sandbox::new(SandboxConfig {
            cache_dir: Some(setup.cache.clone()),
            ..SandboxConfig::default()
        })?;
        node_sandbox.store_precompiled(&isomesh_module::digest::sha256_hex(&from), &from_code)?;
        setups.push(setup);
    }
    let mut nodes = Vec::new();
    for setup in &setups {
        nodes.push(start_node(setup, port, &trusted_flag)?);
    }

    let Listener {
        client,
        broker_url,
        topics,
        replies,
        mut events,
    } = listen(port, "bench-swap").await?;

    let from_sha = isomesh_module::digest::sha256_hex(&from);
    let to_sha = isomesh_module::digest::sha256_hex(&to);
    let mut statuses: HashMap<String, NodeStatus> = HashMap::new();
    let mut serving_to: HashMap<String, Duration> = HashMap::new();
    let mut sent: Vec<Sent> = Vec::new();
    let target = topics.images(&setups[0].id);
    let period = Duration::from_secs_f64(1.0 / args.rate.max(0.1));

    // Wait until every node is up on the starting module.
    eprintln!("starting {} nodes...", setups.len());
    let up_by = Instant::now() + Duration::from_secs(300);
    while !setups.iter().all(|s| {
        statuses
            .get(&s.id)
            .is_some_and(|st| st.online && st.module.as_ref().is_some_and(|m| m.sha256 == from_sha))
    }) {
        anyhow::ensure!(
            Instant::now() < up_by,
            "nodes not ready within 300 s (logs in {})",
            work.display()
        );
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
            if let Ok(status) = NodeStatus::decode(p.payload.as_ref()) {
                statuses.insert(status.node_id.clone(), status);
            }
        }
    }

    // The run: load before, the rollout, load until every node serves the new module, a tail.
    let mut rollout_started: Option<Instant> = None;
    let mut all_serving_at: Option<Instant> = None;
    let run_started = Instant::now();
    let mut next_send = Instant::now();
    let mut rollout_task: Option<tokio::task::JoinHandle<anyhow::Result<(Instant, String)>>> = None;
    let mut published: Option<(Instant, String)> = None;
    loop {
        let now = Instant::now();
        if rollout_started.is_none() && now >= run_started + Duration::from_secs(args.before_s) {
            rollout_started = Some(now);
            eprintln!("rolling out...");
            // The real command, on its own connection, as an operator would run it.
            let mut command = tokio::process::Command::new(isomesh_testkit::binary("isomesh")?);
            command
                .arg("rollout")
                .arg(&args.to)
                .args(["--name", &to_info.name, "--version", &to_info.version])
                .arg("--key")
                .arg(&key.secret_path)
                .arg("--broker")
                .arg(&broker_url)
                .arg("--compile-cache")
                .arg(&publisher_cache)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if args.no_precompile {
                command.arg("--no-precompile");
            }
            let child = command.spawn()?;
            rollout_task = Some(tokio::spawn(async move {
                let output = child.wait_with_output().await?;
                let published = Instant::now();
                let said = String::from_utf8_lossy(&output.stderr).into_owned();
                anyhow::ensure!(output.status.success(), "isomesh rollout failed: {said}");
                Ok((published, said))
            }));
        }
        if let Some(at) = all_serving_at {
            if now >= at + Duration::from_secs(5) {
                break;
            }
        }
        if now >= run_started + Duration::from_secs(args.before_s + 600) {
            anyhow::bail!(
                "the rollout did not finish within 600 s (logs in {})",
                work.display()
            );
        }
        if now >= next_send {
            let job_id = sent.len().to_string();
            let props = PublishProperties {
                response_topic: Some(replies.clone()),
                correlation_data: Some(job_id.into_bytes().into()),
                ..Default::default()
            };
            let image = images[sent.len() % images.len()].clone();
            client
                .publish_with_properties(target.clone(), QoS::AtLeastOnce, false, image, props)
                .await?;
            sent.push(Sent {
                at: Instant::now(),
                answer: None,
            });
            next_send += period;
        }
        let wait = next_send.saturating_duration_since(Instant::now());
        if let Ok(Some(p)) = tokio::time::timeout(wait, events.recv()).await {
            take_event(&p, &mut sent, &mut statuses);
        }
        if let Some(task) = &rollout_task {
            if task.is_finished() {
                if let Some(task) = rollout_task.take() {
                    published = Some(task.await??);
                }
            }
        }
        if let Some(started) = rollout_started {
            for (id, status) in &statuses {
                if status.module.as_ref().is_some_and(|m| m.sha256 == to_sha) {
                    serving_to
                        .entry(id.clone())
                        .or_insert_with(|| started.elapsed());
                }
            }
            if all_serving_at.is_none() && serving_to.len() == setups.len() {
                all_serving_at = Some(Instant::now());
            }
        }
    }
    // Drain: every job must get its answer.
    let drain_by = Instant::now() + Duration::from_secs(60);
    while sent.iter().any(|s| s.answer.is_none()) && Instant::now() < drain_by {
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
            take_event(&p, &mut sent, &mut statuses);
        }
    }
    let rollout_started = rollout_started.unwrap_or(run_started);
    let swapped_at = all_serving_at.unwrap_or_else(Instant::now);
    let window = |from: Instant, to: Instant| -> Vec<f64> {
        sent.iter()
            .filter(|s| s.at >= from && s.at < to)
            .filter_map(|s| {
                s.answer
                    .as_ref()
                    .map(|(at, _, _)| ms(at.duration_since(s.at)))
            })
            .collect()
    };
    let mut before = window(run_started, rollout_started);
    let mut during = window(rollout_started, swapped_at);
    let (b, d) = (stats(&mut before), stats(&mut during));
    let failed = sent
        .iter()
        .filter(|s| s.answer.as_ref().is_some_and(|(_, _, ok)| !ok))
        .count();
    let lost: Vec<usize> = (0..sent.len())
        .filter(|&n| sent[n].answer.is_none())
        .collect();
    let answered_by_new = sent
        .iter()
        .filter(|s| s.answer.as_ref().is_some_and(|(_, v, _)| *v == to_sha))
        .count();

    // The baseline: stop the first node, start it on the new module, and time from the stop to
    // the answer to its first job, sent once it reports ready. Cold: a fresh cache, so it
    // compiles; warm: from its cache.
    let mut restarts = json!({});
    for (label, fresh_cache) in [("cold_cache", true), ("warm_cache", false)] {
        let setup = &setups[0];
        let stopped = Instant::now();
        nodes[0].stop();
        let _ = std::fs::remove_file(setup.modules.join("from.wasm"));
        let _ = std::fs::remove_file(setup.modules.join("from.manifest"));
        key.place(&setup.modules, "to.wasm", &to, &to_info)?;
        if fresh_cache {
            let _ = std::fs::remove_dir_all(&setup.cache);
        }
        nodes[0] = start_node(setup, port, &trusted_flag)?;
        // Ready when its status says so; then the first job, answered by the new module. Only
        // statuses after the stopped process's last one (offline) count: an "online" one still
        // queued from before the stop once sent the job to a node that was not there.
        let mut old_process_gone = false;
        loop {
            anyhow::ensure!(
                stopped.elapsed() < Duration::from_secs(300),
                "the restarted node was not ready within 300 s"
            );
            if let Ok(Some(p)) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
                if let Ok(status) = NodeStatus::decode(p.payload.as_ref()) {
                    if status.node_id == setup.id && !status.online {
                        old_process_gone = true;
                    }
                    let ready = old_process_gone
                        && status.node_id == setup.id
                        && status.online
                        && status.module.as_ref().is_some_and(|m| m.sha256 == to_sha);
                    if ready {
                        break;
                    }
                }
            }
        }
        let job_id = format!("restart-{label}");
        let props = PublishProperties {
            response_topic: Some(replies.clone()),
            correlation_data: Some(job_id.clone().into_bytes().into()),
            ..Default::default()
        };
        client
            .publish_with_properties(
                target.clone(),
                QoS::AtLeastOnce,
                false,
                images[0].clone(),
                props,
            )
            .await?;
        let answered = loop {
            let left = Duration::from_secs(300).saturating_sub(stopped.elapsed());
            match tokio::time::timeout(left, events.recv()).await {
                Ok(Some(p)) => {
                    let correlation = p
                        .properties
                        .as_ref()
                        .and_then(|pr| pr.correlation_data.clone());
                    if correlation.as_deref() == Some(job_id.as_bytes()) {
                        break stopped.elapsed();
                    }
                }
                _ => anyhow::bail!("the restarted node did not answer within 300 s"),
            }
        };
        restarts[label] = json!(ms(answered));
    }
    drop(nodes);

    let swap_ms: Vec<f64> = setups
        .iter()
        .map(|s| serving_to.get(&s.id).map(|d| ms(*d)).unwrap_or(f64::NAN))
        .collect();
    let slowest = swap_ms.iter().cloned().fold(0.0, f64::max);
    let published_ms = published
        .as_ref()
        .map(|(at, _)| ms(at.duration_since(rollout_started)));
    let node_side_ms: Vec<f64> = swap_ms
        .iter()
        .map(|total| total - published_ms.unwrap_or(f64::NAN))
        .collect();
    let report = json!({
        "machine": machine(),
        "nodes": setups.iter().map(|s| json!({"id": s.id, "tier": s.tier.name()})).collect::<Vec<_>>(),
        "precompiled_artifact": !args.no_precompile,
        "rollout_output": published.as_ref().map(|(_, said)| said.trim().to_string()),
        "rollout_to_serving_ms": swap_ms,
        "rollout_to_published_ms": published_ms,
        "published_to_serving_ms": node_side_ms,
        "rollout_to_all_serving_ms": slowest,
        "jobs": {"sent": sent.len(), "failed": failed, "lost": lost.len(), "lost_jobs": lost, "answered_by_new_module": answered_by_new, "rate_per_s": args.rate},
        "latency_ms": {"before": b.to_json(), "during_swap": d.to_json(),
                        "p99_during_over_before": d.p99 / b.p99},
        "restart_baseline_ms": restarts,
        "restart_cold_over_swap": restarts["cold_cache"].as_f64().unwrap_or(0.0) / slowest,
        "restart_warm_over_swap": restarts["warm_cache"].as_f64().unwrap_or(0.0) / slowest,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if args.keep {
        eprintln!("logs and module directories kept in {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

fn take_event(
    p: &rumqttc::v5::mqttbytes::v5::Publish,
    sent: &mut [Sent],
    statuses: &mut HashMap<String, NodeStatus>,
) {
    if p.topic.starts_with(b"isomesh/status/") {
        if let Ok(status) = NodeStatus::decode(p.payload.as_ref()) {
            statuses.insert(status.node_id.clone(), status);
        }
        return;
    }
    let Some(index) = p
        .properties
        .as_ref()
        .and_then(|pr| pr.correlation_data.as_ref())
        .and_then(|c| std::str::from_utf8(c).ok())
        .and_then(|c| c.parse::<usize>().ok())
    else {
        return;
    };
    let Ok(result) = serde_json::from_slice::<serde_json::Value>(&p.payload) else {
        return;
    };
    if let Some(job) = sent.get_mut(index) {
        let sha = result["module"]["sha256"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let ok = result.get("error").is_none();
        job.answer.get_or_insert((Instant::now(), sha, ok));
    }
}
