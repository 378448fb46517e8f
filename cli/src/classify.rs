//! `isomesh classify IMAGE...`: sends each image as a protobuf `Job` to a node or a tier and
//! prints the answers as a table or JSON lines.

use anyhow::Context;
use isomesh_mesh::report;
use isomesh_mesh::topics::parse_tier;
use isomesh_mesh::topics::Topics;
use isomesh_protos::{Job, JobResult, Tier};
use prost::Message;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Classify images on the mesh.
#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    /// JPEG or PNG files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Broker URL, or the members of a clustered broker: URL,URL,... (the first that answers).
    #[arg(long, env = "ISOMESH_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// Send to this node.
    #[arg(long, conflicts_with = "tier")]
    pub node: Option<String>,
    /// Send to any node of this tier (device, edge, cloud).
    #[arg(long, value_parser = parse_tier)]
    pub tier: Option<Tier>,
    /// Latency budget of each job, ms (0 = the node's default).
    #[arg(long, default_value_t = 0)]
    pub budget_ms: u32,
    /// Classes to return per image.
    #[arg(long, default_value_t = 5)]
    pub top_k: u32,
    /// Run only on this module: `name@version`, a version, or a sha256 (prefix of 12+ digits).
    #[arg(long)]
    pub module: Option<String>,
    /// Print one JSON result per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Give up on answers after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// Topic prefix of the mesh.
    #[arg(long, env = "ISOMESH_PREFIX", default_value = "isomesh")]
    pub prefix: String,
}

/// Runs the command; `Ok(false)` when some image got an error or no answer.
pub async fn run(args: ClassifyArgs) -> anyhow::Result<bool> {
    let topics = Topics::new(args.prefix.clone());
    let target = match (&args.node, args.tier) {
        (Some(node), _) => topics.jobs(node),
        (None, Some(tier)) => topics.tier_jobs(tier),
        (None, None) => {
            anyhow::bail!("name where to classify: --node ID or --tier device|edge|cloud")
        }
    };
    let id = isomesh_mqtt::connect::client_id_at(&args.broker, "classify");
    let reply_to = topics.replies(&id);
    let (client, mut eventloop) = isomesh_mqtt::connect::connect(&args.broker, &id).await?;
    client.subscribe(reply_to.clone(), QoS::AtLeastOnce).await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await? {
            break;
        }
    }

    let mut pending: HashMap<String, (PathBuf, Instant)> = HashMap::new();
    let mut all_ok = true;
    if !args.json {
        print_header();
    }
    for (n, path) in args.images.iter().enumerate() {
        let image = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let job = Job {
            job_id: format!("{id}-{n}"),
            image,
            reply_to: reply_to.clone(),
            budget_ms: args.budget_ms,
            top_k: args.top_k,
            module_version: args.module.clone().unwrap_or_default(),
            ..Default::default()
        };
        pending.insert(job.job_id.clone(), (path.clone(), Instant::now()));
        client
            .publish(target.clone(), QoS::AtLeastOnce, false, job.encode_to_vec())
            .await?;
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_s);
    while !pending.is_empty() {
        let event = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(event) => event.context("lost the broker connection while waiting for answers")?,
            Err(_) => break,
        };
        let Event::Incoming(Packet::Publish(publish)) = event else {
            continue;
        };
        let Ok(result) = JobResult::decode(publish.payload.as_ref()) else {
            eprintln!("isomesh: ignoring an unreadable reply on {reply_to}");
            continue;
        };
        // Results are deduplicated by job id: the first answer counts.
        let Some((path, sent)) = pending.remove(&result.job_id) else {
            continue;
        };
        all_ok &= result.error.is_empty();
        print_answer(args.json, args.budget_ms, &path, &result, sent.elapsed());
    }
    for (job_id, (path, _)) in pending {
        all_ok = false;
        let message = format!("no answer within {} s", args.timeout_s);
        if args.json {
            println!(
                "{}",
                serde_json::json!({"job_id": job_id, "file": path.display().to_string(), "error": message})
            );
        } else {
            println!("{:<22} error: {message}", file_name(&path));
        }
    }
    let _ = client.disconnect().await;
    Ok(all_ok)
}

/// The column heads of [`print_answer`]'s table.
pub(crate) fn print_header() {
    println!(
        "{:<22} {:<28} {:>6} {:<8} {:<12} {:>8} {:<8} {:<10}",
        "FILE", "LABEL", "PROB", "NODE", "PATH", "MS", "IN TIME", "MODULE"
    );
}

/// Prints one answer as a table row or a JSON line (with `file`). `budget_ms` is what the job
/// was sent with, for answers that carry no hops.
pub(crate) fn print_answer(
    json: bool,
    budget_ms: u32,
    path: &std::path::Path,
    result: &JobResult,
    round_trip: Duration,
) {
    if json {
        let mut value = report::to_json(result);
        value["file"] = serde_json::Value::String(path.display().to_string());
        println!("{value}");
        return;
    }
    if !result.error.is_empty() {
        println!(
            "{:<22} error from {}: {}",
            file_name(path),
            result.node,
            result.error
        );
        return;
    }
    let (label, prob) = result
        .top
        .first()
        .map(|c| {
            (
                c.label.split(',').next().unwrap_or_default().to_string(),
                c.prob,
            )
        })
        .unwrap_or_default();
    let module = result
        .module
        .as_ref()
        .map(|m| m.version.clone())
        .unwrap_or_default();
    // Judged by the node that took the job, against the budget the job had there (this
    // command's --budget-ms, or the node's default).
    let budget = result.hops.first().map_or(budget_ms, |hop| hop.budget_ms);
    let in_time = match (budget, result.deadline_met) {
        (0, _) => "-",
        (_, true) => "yes",
        (_, false) => "LATE",
    };
    println!(
        "{:<22} {:<28} {:>6.3} {:<8} {:<12} {:>8.1} {:<8} {:<10}",
        file_name(path),
        label,
        prob,
        result.node,
        result.path.join(">"),
        round_trip.as_secs_f64() * 1000.0,
        in_time,
        module
    );
}

fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
