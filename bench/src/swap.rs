//! `isomesh bench swap`: a rollout under load, against the restart it replaces.
//!
//! In one run on this machine: an `isomesh-broker` and N nodes (device, edge, cloud, ...) serving
//! version A, a steady stream of photos to the first node, then a signed rollout of version B.
//! Measured: (a) time from the rollout's start to each node serving B, split into compile (at the
//! publisher), publish and node phases; (b) jobs failed or lost; (c) round-trip latency before and
//! during the swap. Then the baseline the paper compares against: stop the first node, start it
//! on B, and time until it answers its first job (cold: compiling B; warm: from the
//! compiled-module cache). Writes JSON.
//!
//! With `--arm64 PATH`, one more node: the aarch64 `isomesh-node` at PATH, a device, run by
//! `qemu-aarch64-static` on this machine (emulated, not a board). Its cache holds the starting
//! module's aarch64 code, compiled here ([`CrossCompiler::compile_into_cache`]), so it starts
//! without compiling; the rollout also publishes code for it unless `--no-precompile`. Its
//! figures go to the report's own `arm64` object, apart from the x86_64 nodes' (whose fields keep
//! their meaning: the during-swap window ends when the x86_64 nodes serve), and the restart
//! baseline stays x86_64-only. The published manifest's sizes (the module, each precompiled
//! artifact with its engine and target) are read from the retained manifest itself.

use crate::common::{listen, machine, ms, read_files, stats, tempdir, Listener};
use anyhow::Context as _;
use isomesh_protos::{ModuleManifest, NodeStatus, Tier};
use isomesh_sandbox::target::CrossCompiler;
use isomesh_sandbox::{Sandbox, SandboxConfig};
use isomesh_testkit::harness::{
    qemu_aarch64, start_broker, start_node, start_node_as, BenchKey, NodeSetup, Proc,
};
use prost::Message;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
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
    /// The aarch64 `isomesh-node` (`make arm64-node`): one more node, a device, run here by
    /// `qemu-aarch64-static`, starting on the starting module's aarch64 code compiled here.
    /// Unless --no-precompile, the rollout also publishes code for it. Its figures are
    /// reported apart ("arm64"): emulated, not a board's.
    #[arg(long, value_name = "PATH")]
    pub arm64: Option<PathBuf>,
    /// A model rollout instead: roll out this ONNX classifier served by --to's code (`isomesh
    /// rollout TO --model ...`). With --to the same file as --from, nodes fetch the model alone
    /// and compile nothing; the publisher finds the code on the broker (the nodes publish their
    /// module's manifest again when the broker holds none) and publishes only the model. No
    /// restart baseline is run.
    #[arg(
        long,
        value_name = "MODEL.onnx",
        requires = "labels",
        conflicts_with = "arm64"
    )]
    pub model: Option<PathBuf>,
    /// The class names of --model.
    #[arg(long, value_name = "LABELS.txt", requires = "model")]
    pub labels: Option<PathBuf>,
    /// The version --model is rolled out as.
    #[arg(long, default_value = "0.3.0", requires = "model")]
    pub model_version: String,
}

/// The target of `--arm64`'s node.
const ARM_TARGET: &str = "aarch64-unknown-linux-musl";
/// Its call deadline: an emulated classification takes ~4 s here, not tens of ms.
const ARM_CALL_TIMEOUT_MS: &str = "120000";

/// The `--arm64` node: where it keeps its things and how it is run.
struct ArmNode {
    setup: NodeSetup,
    qemu: PathBuf,
    binary: PathBuf,
    /// The engine id of the aarch64 code its cache was seeded with.
    engine: String,
}

/// One job sent as load.
struct Sent {
    at: Instant,
    answer: Option<(Instant, String, bool)>,
}

pub async fn swap(args: SwapArgs) -> anyhow::Result<()> {
    // The aarch64 node's emulator and binary, checked before any work.
    let arm_program = match &args.arm64 {
        Some(binary) => {
            anyhow::ensure!(
                binary.is_file(),
                "--arm64 {}: no such file (the aarch64 isomesh-node: `make arm64-node`)",
                binary.display()
            );
            Some((qemu_aarch64()?, binary.clone()))
        }
        None => None,
    };
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
    // What the rolled-out module calls itself, from its identity section: compiling it here
    // to ask would cost a full compile and warm no cache the measured rollout uses.
    let to_identity = isomesh_module::identity::read(&to)
        .with_context(|| format!("reading {}'s identity section", args.to.display()))?;
    let to_info = isomesh_protos::GuestInfo {
        name: to_identity.name,
        version: match &args.model {
            Some(_) => args.model_version.clone(),
            None => to_identity.version,
        },
        ..Default::default()
    };
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
    let arm = match arm_program {
        Some((qemu, binary)) => Some(arm_setup(&work, qemu, binary, &key, &from, &from_info)?),
        None => None,
    };
    let mut nodes = Vec::new();
    for setup in &setups {
        nodes.push(start_node(setup, port, &trusted_flag)?);
    }
    let arm_started = Instant::now();
    let mut arm_proc: Option<Proc> = match &arm {
        Some(arm) => {
            let mut flags = trusted_flag.clone();
            flags.extend(["--call-timeout-ms".to_string(), ARM_CALL_TIMEOUT_MS.into()]);
            let command: [OsString; 2] = [arm.qemu.clone().into(), arm.binary.clone().into()];
            Some(start_node_as(&command, &arm.setup, port, &flags)?)
        }
        None => None,
    };
    // Every node's id, the x86_64 ones first; the aarch64 node last, if any.
    let all_ids: Vec<String> = setups
        .iter()
        .chain(arm.as_ref().map(|a| &a.setup))
        .map(|s| s.id.clone())
        .collect();

    let Listener {
        client,
        broker_url,
        topics,
        replies,
        mut events,
    } = listen(port, "bench-swap").await?;
    // The manifest the rollout publishes (retained): the sizes of what it carries.
    client
        .subscribe(topics.manifest(&to_info.name), QoS::AtLeastOnce)
        .await?;
    let mut manifest: Option<ModuleManifest> = None;

    let from_sha = isomesh_module::digest::sha256_hex(&from);
    // A model rollout is named by its model file's digest, known once its manifest is
    // published (below); until then no node serves it.
    let mut to_sha = match args.model {
        Some(_) => String::new(),
        None => isomesh_module::digest::sha256_hex(&to),
    };
    let mut statuses: HashMap<String, NodeStatus> = HashMap::new();
    let mut serving_to: HashMap<String, Duration> = HashMap::new();
    let mut sent: Vec<Sent> = Vec::new();
    let target = topics.images(&setups[0].id);
    let period = Duration::from_secs_f64(1.0 / args.rate.max(0.1));

    // Wait until every node is up on the starting module (an emulated one takes longer).
    eprintln!("starting {} nodes...", all_ids.len());
    let up_within = if arm.is_some() { 900 } else { 300 };
    let up_by = Instant::now() + Duration::from_secs(up_within);
    let serving = |statuses: &HashMap<String, NodeStatus>, id: &str, sha: &str| {
        statuses
            .get(id)
            .is_some_and(|st| st.online && st.module.as_ref().is_some_and(|m| m.sha256 == sha))
    };
    let mut arm_up_ms: Option<f64> = None;
    while !all_ids.iter().all(|id| serving(&statuses, id, &from_sha)) {
        anyhow::ensure!(
            Instant::now() < up_by,
            "nodes not ready within {up_within} s (logs in {})",
            work.display()
        );
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
            if let Ok(status) = NodeStatus::decode(p.payload.as_ref()) {
                statuses.insert(status.node_id.clone(), status);
            }
        }
        if let Some(arm) = &arm {
            if arm_up_ms.is_none() && serving(&statuses, &arm.setup.id, &from_sha) {
                arm_up_ms = Some(ms(arm_started.elapsed()));
            }
        }
    }
    if arm.is_some() {
        let up = *arm_up_ms.get_or_insert_with(|| ms(arm_started.elapsed()));
        eprintln!(
            "the aarch64 node serves the starting module {:.1} s after its start, under qemu",
            up / 1000.0
        );
    }

    // The run: load before, the rollout, load until every node serves the new module, a tail.
    let mut rollout_started: Option<Instant> = None;
    // Every node serving the new module; the x86_64 nodes alone (the during-swap window).
    let mut all_serving_at: Option<Instant> = None;
    let mut x86_serving_at: Option<Instant> = None;
    // Compiling the classifier under emulation takes minutes.
    let rollout_within = if arm.is_some() { 2400 } else { 600 };
    let run_started = Instant::now();
    let mut next_send = Instant::now();
    let mut rollout_task: Option<tokio::task::JoinHandle<anyhow::Result<(Instant, String)>>> = None;
    let mut published: Option<(Instant, String)> = None;
    loop {
        let now = Instant::now();
        // A model rollout on code the broker holds needs that code's manifest retained first.
        let code_on_broker = args.model.is_none() || manifest.is_some();
        if rollout_started.is_none()
            && code_on_broker
            && now >= run_started + Duration::from_secs(args.before_s)
        {
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
            if let (Some(model), Some(labels)) = (&args.model, &args.labels) {
                command
                    .arg("--model")
                    .arg(model)
                    .arg("--labels")
                    .arg(labels);
            }
            if args.no_precompile {
                command.arg("--no-precompile");
            } else if arm.is_some() {
                command.args(["--target", ARM_TARGET]);
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
        if now >= run_started + Duration::from_secs(args.before_s + rollout_within) {
            anyhow::bail!(
                "the rollout did not finish within {rollout_within} s (logs in {})",
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
            take_event(&p, &mut sent, &mut statuses, &mut manifest);
        }
        if let Some(task) = &rollout_task {
            if task.is_finished() {
                if let Some(task) = rollout_task.take() {
                    published = Some(task.await??);
                }
            }
        }
        // The manifest comes before any node acts on it.
        if let Some(published) = manifest.as_ref().filter(|m| m.code.is_some()) {
            if args.model.is_some() && published.sha256 != to_sha {
                to_sha = published.sha256.clone();
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
            if x86_serving_at.is_none() && setups.iter().all(|s| serving_to.contains_key(&s.id)) {
                x86_serving_at = Some(Instant::now());
            }
            if all_serving_at.is_none() && all_ids.iter().all(|id| serving_to.contains_key(id)) {
                all_serving_at = Some(Instant::now());
            }
        }
    }
    // Drain: every job must get its answer.
    let drain_by = Instant::now() + Duration::from_secs(60);
    while sent.iter().any(|s| s.answer.is_none()) && Instant::now() < drain_by {
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
            take_event(&p, &mut sent, &mut statuses, &mut manifest);
        }
    }
    // The retained manifest came with the rollout; wait a little if it is still on its way.
    let manifest_by = Instant::now() + Duration::from_secs(10);
    while manifest.as_ref().is_none_or(|m| m.sha256 != to_sha) && Instant::now() < manifest_by {
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
            take_event(&p, &mut sent, &mut statuses, &mut manifest);
        }
    }
    let manifest = manifest.filter(|m| m.sha256 == to_sha);
    // The aarch64 node is done: stopped before the (x86_64-only) restart baseline, so it takes
    // no CPU from it.
    let arm_target = arm
        .as_ref()
        .and_then(|a| statuses.get(&a.setup.id))
        .map(|s| s.target.clone());
    if let Some(mut proc) = arm_proc.take() {
        proc.stop();
    }
    let rollout_started = rollout_started.unwrap_or(run_started);
    let swapped_at = x86_serving_at.unwrap_or_else(Instant::now);
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
    let baselines: &[(&str, bool)] = match args.model {
        Some(_) => &[],
        None => &[("cold_cache", true), ("warm_cache", false)],
    };
    for &(label, fresh_cache) in baselines {
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
    let arm_json = arm.as_ref().map(|arm| {
        let total = serving_to.get(&arm.setup.id).map(|d| ms(*d));
        let log = std::fs::read_to_string(&arm.setup.log).unwrap_or_default();
        let started = log_line(&log, "module loaded", &from_sha);
        let swapped = log_line(&log, "module swapped in", &to_sha);
        let fetching = log
            .lines()
            .find(|l| l.contains("fetching a rolled-out module"));
        let artifact_bytes = manifest.as_ref().and_then(|m| {
            m.artifacts
                .iter()
                .find(|a| a.engine == arm.engine)
                .map(|a| a.size)
        });
        let flag = |line: Option<&str>, name: &str| {
            line.and_then(|l| log_field(l, name)).map(|v| v == "true")
        };
        let number = log_number;
        json!({
            "emulated": true,
            "emulator": arm.qemu.display().to_string(),
            "binary": arm.binary.display().to_string(),
            "node": {"id": arm.setup.id, "tier": arm.setup.tier.name(), "target": arm_target},
            "call_timeout_ms": ARM_CALL_TIMEOUT_MS.parse::<u64>().ok(),
            "engine": arm.engine,
            "precompiled_artifact_published": !args.no_precompile,
            "artifact_bytes": artifact_bytes,
            "start_to_serving_ms": arm_up_ms,
            "started_from_cache": flag(started, "from_cache"),
            "rollout_to_serving_ms": total,
            "published_to_serving_ms": total.map(|t| t - published_ms.unwrap_or(f64::NAN)),
            "fetched_precompiled": flag(fetching, "precompiled"),
            "from_cache": flag(swapped, "from_cache"),
            "compile_ms": number(swapped, "compile_ms"),
            "ready_ms": number(swapped, "ready_ms"),
        })
    });
    let published_manifest = manifest
        .as_ref()
        .map(|m| manifest_json(m, &sandbox, arm.as_ref()));
    let report = json!({
        "machine": machine(),
        "nodes": setups.iter().map(|s| json!({"id": s.id, "tier": s.tier.name()})).collect::<Vec<_>>(),
        "precompiled_artifact": !args.no_precompile,
        "model_rollout": args.model.as_ref().map(|m| json!({
            "model": m.display().to_string(),
            "code_unchanged": from_sha == isomesh_module::digest::sha256_hex(&to),
            "node_log": setups.iter().map(|s| {
                let log = std::fs::read_to_string(&s.log).unwrap_or_default();
                let line = |needle: &str| log.lines().find(|l| l.contains(needle)).map(str::to_string);
                let swapped = log_line(&log, "module swapped in", &to_sha);
                json!({"fetching": line("fetching a model rollout"),
                       "nothing_compiled": line("nothing to compile").is_some(),
                       "swapped": swapped,
                       "phases": model_phases(&log, swapped)})
            }).collect::<Vec<_>>(),
        })),
        "rollout_output": published.as_ref().map(|(_, said)| said.trim().to_string()),
        "rollout_to_serving_ms": swap_ms,
        "rollout_to_published_ms": published_ms,
        "published_to_serving_ms": node_side_ms,
        "rollout_to_all_serving_ms": slowest,
        "jobs": {"sent": sent.len(), "failed": failed, "lost": lost.len(), "lost_jobs": lost, "answered_by_new_module": answered_by_new, "rate_per_s": args.rate},
        "latency_ms": {"before": b.to_json(), "during_swap": d.to_json(),
                        "p99_during_over_before": d.p99 / b.p99},
        "restart_baseline_ms": restarts,
        "restart_cold_over_swap": restarts["cold_cache"].as_f64().map(|r| r / slowest),
        "restart_warm_over_swap": restarts["warm_cache"].as_f64().map(|r| r / slowest),
        "published_manifest": published_manifest,
        "arm64": arm_json,
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

/// Prepares the `--arm64` node: its module dir with the signed starting module, and its cache
/// holding that module's aarch64 code (and the cache's key, beside it where the node looks).
fn arm_setup(
    work: &Path,
    qemu: PathBuf,
    binary: PathBuf,
    key: &BenchKey,
    from: &[u8],
    from_info: &isomesh_protos::GuestInfo,
) -> anyhow::Result<ArmNode> {
    let dir = work.join("arm64");
    let setup = NodeSetup {
        id: "bench-arm64".into(),
        tier: Tier::Device,
        modules: dir.join("modules"),
        cache: dir.join("cache"),
        log: dir.join("node.log"),
    };
    std::fs::create_dir_all(&setup.modules)?;
    std::fs::create_dir_all(&setup.cache)?;
    key.place(&setup.modules, "from.wasm", from, from_info)?;
    eprintln!("compiling the starting module for {ARM_TARGET} into the aarch64 node's cache...");
    let cross = CrossCompiler::new(ARM_TARGET, Some(&setup.cache), None)?;
    cross.compile_into_cache(from)?;
    Ok(ArmNode {
        setup,
        qemu,
        binary,
        engine: cross.engine_id(),
    })
}

/// The published manifest's sizes: the module's, and each precompiled artifact's with its engine
/// and the target it is for (this machine's engine, its portable one, or aarch64's).
fn manifest_json(
    manifest: &ModuleManifest,
    host: &Sandbox,
    arm: Option<&ArmNode>,
) -> serde_json::Value {
    let host_ids = host.engine_ids();
    let arm_engine = match arm {
        Some(arm) => Some(arm.engine.clone()),
        None => CrossCompiler::new(ARM_TARGET, None, None)
            .ok()
            .map(|c| c.engine_id()),
    };
    let artifacts: Vec<serde_json::Value> = manifest
        .artifacts
        .iter()
        .map(|a| {
            let (target, engine_kind) = if host_ids.first() == Some(&a.engine) {
                (host.target(), "this machine's engine")
            } else if host_ids.contains(&a.engine) {
                (host.target(), "portable, baseline CPU")
            } else if arm_engine.as_deref() == Some(a.engine.as_str()) {
                (ARM_TARGET.to_string(), "portable, baseline CPU")
            } else {
                ("unknown".to_string(), "unknown")
            };
            json!({"engine": a.engine, "target": target, "engine_kind": engine_kind,
                   "size": a.size, "stored_size": a.stored_size, "chunk_count": a.chunk_count})
        })
        .collect();
    json!({
        "name": manifest.name,
        "version": manifest.version,
        "encoding": manifest.encoding,
        "module": {"size": manifest.size, "stored_size": manifest.stored_size,
                   "chunk_count": manifest.chunk_count},
        "code": manifest.code.as_ref().map(|c| json!({"sha256": c.sha256, "size": c.size,
                   "stored_size": c.stored_size, "chunk_count": c.chunk_count})),
        "artifacts": artifacts,
    })
}

/// The first line of a node's log with `message` about the module `sha256`.
fn log_line<'a>(log: &'a str, message: &str, sha256: &str) -> Option<&'a str> {
    log.lines()
        .find(|l| l.contains(message) && l.contains(sha256))
}

/// Where a model rollout's time went on one node, from its log: the fetch, the install thread's
/// check and write (wall and CPU), the plan and self-test in the guest, and from the manager
/// taking the file to serving (wall and CPU). Wall against CPU tells work from waiting for a
/// core.
fn model_phases(log: &str, swapped: Option<&str>) -> serde_json::Value {
    let last = |message: &str| log.lines().rev().find(|l| l.contains(message));
    let number = log_number;
    let written = last("module written");
    let planned = last("model plan built");
    json!({
        "fetch_ms": number(last("all chunks in"), "ms"),
        "check_ms": number(written, "inflate_and_check_ms"),
        "write_ms": number(written, "write_ms"),
        "install_cpu_ms": number(written, "cpu_ms"),
        "plan_ms": number(planned, "plan_ms"),
        "self_test_ms": number(planned, "self_test_ms"),
        "ready_ms": number(swapped, "ready_ms"),
        "ready_cpu_ms": number(swapped, "ready_cpu_ms"),
    })
}

/// The whole number `name=N` in a log line, if the line is there and has it.
fn log_number(line: Option<&str>, name: &str) -> Option<u64> {
    line.and_then(|l| log_field(l, name))
        .and_then(|v| v.parse().ok())
}

/// The value of `name=value` in a log line (values without spaces).
fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
}

fn take_event(
    p: &rumqttc::v5::mqttbytes::v5::Publish,
    sent: &mut [Sent],
    statuses: &mut HashMap<String, NodeStatus>,
    manifest: &mut Option<ModuleManifest>,
) {
    if p.topic.starts_with(b"isomesh/status/") {
        if let Ok(status) = NodeStatus::decode(p.payload.as_ref()) {
            statuses.insert(status.node_id.clone(), status);
        }
        return;
    }
    if p.topic.starts_with(b"isomesh/modules/") && p.topic.ends_with(b"/manifest") {
        if let Ok(m) = ModuleManifest::decode(p.payload.as_ref()) {
            *manifest = Some(m);
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
