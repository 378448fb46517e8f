//! `isomesh status`: the retained status of every node, as a table (`--watch` keeps it live).
//!
//! Its exit code answers "is the mesh up?" for scripts and health checks: 0 when every node it
//! shows is online, 1 when one is offline (its Last Will or its own goodbye says so) or no node
//! matched, 2 on an error (no broker, refused login). `--tier` and `--node` narrow what it shows
//! and so what it answers for.
//!
//! Statuses are retained, so the broker sends them all right after the subscription; the table
//! is drawn once they stop coming ([`QUIET`] without one, [`SETTLE_MAX`] at most), not after a
//! fixed wait. Its SEEN column is the age of each status by the node's clock: a node whose
//! status stops getting younger is hanging even while its connection (and so its "online")
//! lasts.

use isomesh_mesh::topics::{parse_tier, Topics};
use isomesh_protos::rollout_state::Phase;
use isomesh_protos::{NodeStatus, RolloutState, Tier};
use prost::Message;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// The retained statuses are in once none has come for this long after the subscription.
const QUIET: Duration = Duration::from_millis(300);
/// ... or at the latest this long after it (a busy mesh never goes quiet).
const SETTLE_MAX: Duration = Duration::from_secs(3);
/// How often `--watch` redraws.
const REDRAW: Duration = Duration::from_secs(2);

/// Show the nodes of the mesh.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Broker URL, or the members of a clustered broker: URL,URL,... (the first that answers).
    #[arg(long, env = "ISOMESH_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// Keep the table live, redrawing every 2 s.
    #[arg(long)]
    pub watch: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Topic prefix of the mesh.
    #[arg(long, env = "ISOMESH_PREFIX", default_value = "isomesh")]
    pub prefix: String,
    /// Only the nodes of this tier (device, edge, cloud).
    #[arg(long, value_parser = parse_tier)]
    pub tier: Option<Tier>,
    /// Only these nodes (repeat the flag or separate ids with commas).
    #[arg(long = "node", value_name = "ID", value_delimiter = ',')]
    pub nodes: Vec<String>,
}

impl StatusArgs {
    /// Whether `status` is one of the nodes asked for.
    fn shows(&self, status: &NodeStatus) -> bool {
        self.tier.is_none_or(|tier| status.tier == tier as i32)
            && (self.nodes.is_empty() || self.nodes.contains(&status.node_id))
    }
}

/// Prints the nodes; `Ok(true)` when every node shown is online (see the module docs).
pub async fn run(args: StatusArgs) -> anyhow::Result<bool> {
    let topics = Topics::new(args.prefix.clone());
    let (client, mut eventloop) = isomesh_mqtt::connect::connect(
        &args.broker,
        &isomesh_mqtt::connect::client_id_at(&args.broker, "status"),
    )
    .await?;
    client
        .subscribe(topics.all_status(), QoS::AtLeastOnce)
        .await?;
    let mut nodes: BTreeMap<String, NodeStatus> = BTreeMap::new();
    // Until the subscription is acknowledged, nothing is drawn (a broker that never answers
    // ends in the connection's own timeout).
    let mut subscribed: Option<Instant> = None;
    let mut last_retained: Option<Instant> = None;
    let mut drawn = false;
    let mut next_redraw = Instant::now();
    loop {
        let draw_at = if drawn {
            Some(next_redraw)
        } else {
            subscribed.map(|at| {
                let quiet = last_retained.unwrap_or(at) + QUIET;
                quiet.min(at + SETTLE_MAX)
            })
        };
        let draw = async {
            match draw_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = eventloop.poll() => {
                match event? {
                    Event::Incoming(Packet::SubAck(_)) => {
                        subscribed.get_or_insert_with(Instant::now);
                    }
                    Event::Incoming(Packet::Publish(publish)) => {
                        if publish.retain {
                            last_retained = Some(Instant::now());
                        }
                        match NodeStatus::decode(publish.payload.as_ref()) {
                            Ok(status) if args.shows(&status) => { nodes.insert(status.node_id.clone(), status); }
                            Ok(_) => {}
                            Err(e) => eprintln!("isomesh: unreadable status on {}: {e}", String::from_utf8_lossy(&publish.topic)),
                        }
                    }
                    _ => {}
                }
            }
            _ = draw => {
                drawn = true;
                next_redraw = Instant::now() + REDRAW;
                // JSON is for programs: a stream of lines, never terminal control codes.
                if args.watch && !args.json {
                    print!("\x1b[2J\x1b[H");
                }
                print_nodes(&nodes, args.json);
                if !args.watch {
                    break;
                }
            }
        }
    }
    let _ = client.disconnect().await;
    let offline: Vec<&str> = nodes
        .values()
        .filter(|s| !s.online)
        .map(|s| s.node_id.as_str())
        .collect();
    if nodes.is_empty() {
        // Not the broker URL: it may carry a password.
        let filtered = args.tier.is_some() || !args.nodes.is_empty();
        eprintln!(
            "isomesh: no node status{} on the broker (topic {}): are the nodes running, and is \
             --prefix theirs?",
            if filtered { " matched" } else { "" },
            topics.all_status()
        );
        return Ok(false);
    }
    if !offline.is_empty() {
        eprintln!(
            "isomesh: {} of {} nodes offline: {}",
            offline.len(),
            nodes.len(),
            offline.join(", ")
        );
        return Ok(false);
    }
    Ok(true)
}

fn print_nodes(nodes: &BTreeMap<String, NodeStatus>, json: bool) {
    if json {
        for s in nodes.values() {
            let module = s.module.clone().unwrap_or_default();
            println!(
                "{}",
                serde_json::json!({
                    "node": s.node_id, "tier": tier_name(s.tier), "online": s.online,
                    "module": {"name": module.name, "version": module.version, "sha256": module.sha256,
                   "code_sha256": module.code_sha256, "model_sha256": module.model_sha256},
                    "queue": s.queue_len, "ewma_ms": s.ewma_ms, "done": s.jobs_done,
                    "failed": s.jobs_failed, "uptime_s": s.uptime_s,
                    "target": s.target, "engines": s.engines,
                    "published_at_ms": s.published_at_ms,
                    "age_s": age(s).map(|a| a.as_secs_f64()),
                    "rollout": s.rollout.as_ref().map(|r| serde_json::json!({
                        "module": r.module.as_ref().map(|m| serde_json::json!({"name": m.name, "version": m.version, "sha256": m.sha256})),
                        "phase": phase_name(r.phase), "chunks_done": r.chunks_done,
                        "chunk_count": r.chunk_count, "reason": r.reason, "code": r.code,
                    })),
                    "sandbox": s.sandbox.as_ref().map(|l| serde_json::json!({
                        "memory_limit_bytes": l.memory_limit_bytes,
                        "call_timeout_ms": l.call_timeout_ms,
                        "max_table_elements": l.max_table_elements,
                        "max_tables": l.max_tables, "max_memories": l.max_memories,
                        "max_instances": l.max_instances, "wasi": l.wasi,
                        "max_payload_bytes": l.max_payload_bytes,
                        "allow_unsigned": l.allow_unsigned,
                    })),
                })
            );
        }
        return;
    }
    println!(
        "{:<10} {:<7} {:<8} {:>6} {:<7} {:<28} {:>5} {:>9} {:>7} {:>7}  {:<18} ROLLOUT",
        "NODE",
        "TIER",
        "STATE",
        "SEEN",
        "ARCH",
        "MODULE",
        "QUEUE",
        "EWMA_MS",
        "DONE",
        "FAILED",
        "SANDBOX"
    );
    for s in nodes.values() {
        let module = s
            .module
            .as_ref()
            .map(isomesh_module::package::label)
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<10} {:<7} {:<8} {:>6} {:<7} {:<28} {:>5} {:>9.1} {:>7} {:>7}  {:<18} {}",
            s.node_id,
            tier_name(s.tier),
            if s.online { "online" } else { "offline" },
            age(s).map_or_else(|| "-".into(), describe_age),
            // The architecture part of the target triple; `-` for a node too old to say.
            s.target
                .split('-')
                .next()
                .filter(|a| !a.is_empty())
                .unwrap_or("-"),
            module,
            s.queue_len,
            s.ewma_ms,
            s.jobs_done,
            s.jobs_failed,
            s.sandbox.as_ref().map(describe_limits).unwrap_or_default(),
            s.rollout.as_ref().map(describe_rollout).unwrap_or_default()
        );
    }
}

/// How old `status` is by the node's clock; `None` for a Last Will (the broker sends it later
/// than it was written) or a node too old to say.
fn age(status: &NodeStatus) -> Option<Duration> {
    if status.published_at_ms == 0 {
        return None;
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    // A node's clock a little ahead of this one's reads as just now.
    Some(now.saturating_sub(Duration::from_millis(status.published_at_ms)))
}

/// An age in a few characters: `0s`, `42s`, `7m`, `3h`, `2d`.
fn describe_age(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        0..=99 => format!("{s}s"),
        100..=5999 => format!("{}m", s / 60),
        6000..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// A node's sandbox in a few characters: `768MiB 10.0s`, with `UNSIGNED` when it runs modules
/// nobody signed.
pub fn describe_limits(limits: &isomesh_protos::SandboxLimits) -> String {
    format!(
        "{}MiB {:.1}s{}",
        limits.memory_limit_bytes >> 20,
        limits.call_timeout_ms as f64 / 1000.0,
        if limits.allow_unsigned {
            " UNSIGNED"
        } else {
            ""
        }
    )
}

/// One line on a node's latest rollout: `fetching m@2 (12/130)`, `rejected m@2: reason`.
pub fn describe_rollout(state: &RolloutState) -> String {
    let module = state
        .module
        .as_ref()
        .map(|m| {
            if m.name.is_empty() {
                isomesh_module::digest::short(&m.sha256).to_string()
            } else {
                isomesh_module::package::label(m)
            }
        })
        .unwrap_or_default();
    match Phase::try_from(state.phase).unwrap_or(Phase::Unspecified) {
        Phase::Fetching => format!(
            "fetching {module} ({}/{})",
            state.chunks_done, state.chunk_count
        ),
        Phase::Rejected => format!("rejected {module}: {}", state.reason),
        phase => format!("{} {module}", phase_name(phase as i32)),
    }
}

/// Lower-case name of a rollout phase.
pub fn phase_name(phase: i32) -> &'static str {
    match Phase::try_from(phase).unwrap_or(Phase::Unspecified) {
        Phase::Unspecified => "-",
        Phase::Fetching => "fetching",
        Phase::Loading => "loading",
        Phase::Serving => "serving",
        Phase::Rejected => "rejected",
    }
}

fn tier_name(tier: i32) -> &'static str {
    Tier::try_from(tier).unwrap_or(Tier::Unspecified).name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_fit_a_narrow_column() {
        let age = |s| describe_age(Duration::from_secs(s));
        assert_eq!(age(0), "0s");
        assert_eq!(age(99), "99s");
        assert_eq!(age(100), "1m");
        assert_eq!(age(5999), "99m");
        assert_eq!(age(7200), "2h");
        assert_eq!(age(3 * 86_400), "3d");
    }

    #[test]
    fn a_last_will_has_no_age() {
        assert_eq!(age(&NodeStatus::default()), None);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let status = NodeStatus {
            published_at_ms: now.as_millis() as u64 - 5_000,
            ..Default::default()
        };
        let seen = age(&status).unwrap();
        assert!(
            seen >= Duration::from_secs(5) && seen < Duration::from_secs(60),
            "{seen:?}"
        );
        let ahead = NodeStatus {
            published_at_ms: now.as_millis() as u64 + 60_000,
            ..Default::default()
        };
        assert_eq!(age(&ahead), Some(Duration::ZERO));
    }
}
