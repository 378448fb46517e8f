//! Prometheus metrics of one node, served as text on `--metrics-listen HOST:PORT` (`GET /metrics`),
//! and beside them the two probes an orchestrator asks: `GET /healthz` (the process answers: 200)
//! and `GET /readyz` (200 only while the node serves a self-tested module, is connected to its
//! broker and is not shutting down; 503 with the reason otherwise).
//!
//! What a scrape shows, and where it comes from:
//! - `isomesh_jobs_total{outcome,where}`: every answer this node gave its users, counted by
//!   [`Metrics::answered`] as it leaves: `outcome` is `ok`, `late` (answered past its budget) or
//!   `error`; `where` is `here` (ran on this node), `forwarded` (answered by a tier above) or
//!   `fallback` (forwarded, no answer in time, ran here after all).
//! - `isomesh_job_stage_seconds{stage}`: histograms of `queue`, `decode` and `infer` for jobs run
//!   on this node, and of `total` (acceptance to answer) for every answered job.
//! - `isomesh_offloads_total{to}`: jobs published to a tier above ([`Metrics::offloaded`]).
//! - `isomesh_placements_total{reason}`: every decision where a job runs, by its reason
//!   ([`Metrics::placed`]); `parent_no_faster` counts jobs kept here past their planned share of
//!   the budget because no tier above looked sooner: the mesh as a whole is overloaded.
//! - `isomesh_queue_depth`, `isomesh_service_ewma_seconds`: read from the scheduler's live load
//!   at scrape time, as are `isomesh_forwarded_waiting` from the relay (jobs sent up and not
//!   answered yet: together with the queue, every job this node holds), and `isomesh_module_info{name,version,sha256}` and
//!   `isomesh_module_swaps_total` from the module slot.
//!
//! - `isomesh_rollout_fetches_total`, `isomesh_rollout_fetch_seconds` (the last one),
//!   `isomesh_module_loads_total`, `isomesh_module_load_seconds` (the last compile or cache load,
//!   self-test and instances) and `isomesh_rollout_rejections_total{code}`: the
//!   [`crate::slot::Tally`] of the rollout board, which sees every phase a module goes through.
//! - `process_resident_memory_bytes`: the node's resident memory (Prometheus' usual name).
//! - `isomesh_broker_connected` (1 while connected) and `isomesh_broker_connects_total` (every
//!   CONNACK: more than 1 means the node lost its broker and came back), set by the MQTT loop
//!   ([`Metrics::link_up`], [`Metrics::link_down`]), which also says when it starts to drain
//!   ([`Metrics::draining`]); with several `--broker` members, `isomesh_broker_member` (which
//!   one, 1 for the first) and `isomesh_broker_member_changes_total` (fail-overs).
//!
//! The node's MQTT loop holds the [`Metrics`] handle and calls the counters; everything else
//! is read when a scrape comes, so the hot path costs a few atomic adds. The HTTP side is
//! [`isomesh_http`], which the broker's metrics share.

use crate::scheduler::Load;
use crate::slot::{ModuleSlot, RolloutBoard};
use isomesh_http::{header, Page};
use isomesh_mesh::offload::Reason;
use isomesh_mesh::relay::Relay;
use isomesh_protos::{hop, JobResult, Tier};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;

/// Upper bounds of the latency histograms' buckets, seconds: 1 ms to 60 s, about 2.5x apart,
/// which covers a cached decode (~1 ms) up to a device's queue under a burst, or a job that
/// waited for a node's first compile.
const BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0,
];

const OUTCOMES: [&str; 3] = ["ok", "late", "error"];
const WHERES: [&str; 3] = ["here", "forwarded", "fallback"];
const STAGES: [&str; 4] = ["queue", "decode", "infer", "total"];
const UPPER_TIERS: [Tier; 2] = [Tier::Edge, Tier::Cloud];

/// The node's counters and the live figures a scrape reads.
pub struct Metrics {
    node: String,
    tier: Tier,
    /// The scheduler's load figures (queue depth, service-time average).
    load: Arc<Load>,
    /// The module served, and how many times it was swapped.
    slot: Arc<ModuleSlot>,
    /// Where rollouts stand, and their tally.
    board: Arc<RolloutBoard>,
    /// Jobs forwarded up and waiting for their answer.
    relay: Arc<Relay>,
    /// Answers by [outcome][where], indexed as [`OUTCOMES`] and [`WHERES`].
    jobs: [[AtomicU64; 3]; 3],
    /// Latency histograms, indexed as [`STAGES`].
    stages: [Histogram; 4],
    /// Jobs published to a tier above, indexed as [`UPPER_TIERS`].
    offloads: [AtomicU64; 2],
    /// Placement decisions, indexed as [`Reason::ALL`].
    placements: [AtomicU64; Reason::ALL.len()],
    /// Whether the MQTT link is up (between a CONNACK and the next connection error).
    connected: AtomicBool,
    /// CONNACKs received.
    connects: AtomicU64,
    /// The `--broker` member of the last CONNACK, counted from 1; 0 before the first.
    member: AtomicUsize,
    /// CONNACKs from another member than the one before.
    member_changes: AtomicU64,
    /// Set once the node starts to shut down: it answers what it holds and takes nothing new.
    draining: AtomicBool,
}

impl Metrics {
    pub fn new(
        node: &str,
        tier: Tier,
        load: Arc<Load>,
        slot: Arc<ModuleSlot>,
        board: Arc<RolloutBoard>,
        relay: Arc<Relay>,
    ) -> Metrics {
        Metrics {
            node: node.to_string(),
            tier,
            load,
            slot,
            board,
            relay,
            jobs: Default::default(),
            stages: Default::default(),
            offloads: Default::default(),
            placements: Default::default(),
            connected: AtomicBool::new(false),
            connects: AtomicU64::new(0),
            member: AtomicUsize::new(0),
            member_changes: AtomicU64::new(0),
            draining: AtomicBool::new(false),
        }
    }

    /// The broker accepted the connection (a CONNACK), member `member` of `--broker` (from 0).
    pub fn link_up(&self, member: usize) {
        self.connected.store(true, Ordering::Relaxed);
        self.connects.fetch_add(1, Ordering::Relaxed);
        let before = self.member.swap(member + 1, Ordering::Relaxed);
        if before != 0 && before != member + 1 {
            self.member_changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The connection failed or was lost; the MQTT loop connects again by itself.
    pub fn link_down(&self) {
        self.connected.store(false, Ordering::Relaxed);
    }

    /// The node started to shut down.
    pub fn draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// `Ok(what it serves)` when the node is ready for jobs, else `Err(why not)`: what `/readyz`
    /// answers.
    pub fn readiness(&self) -> Result<String, String> {
        let mut missing = Vec::new();
        let module = self.slot.current();
        if module.is_none() {
            missing.push("no self-tested module serving yet (compiling, or none installed)");
        }
        if !self.connected.load(Ordering::Relaxed) {
            missing.push("not connected to the broker");
        }
        if self.draining.load(Ordering::Relaxed) {
            missing.push("shutting down");
        }
        match module {
            Some(module) if missing.is_empty() => {
                Ok(format!("serving {}, connected", module.label()))
            }
            _ => Err(missing.join("; ")),
        }
    }

    /// Counts one answer sent to a user (an error answer included).
    pub fn answered(&self, result: &JobResult) {
        let outcome = if !result.error.is_empty() {
            2
        } else if !result.deadline_met {
            1
        } else {
            0
        };
        // This node's own hop comes first (a relayed answer gets it inserted at the front); an
        // answer with no hop was a rejection made here.
        let action = result
            .hops
            .first()
            .filter(|h| h.node == self.node)
            .map(|h| hop::Action::try_from(h.action).unwrap_or(hop::Action::Ran))
            .unwrap_or(hop::Action::Ran);
        let place = match action {
            hop::Action::Forwarded => 1,
            hop::Action::Fallback => 2,
            _ => 0,
        };
        self.jobs[outcome][place].fetch_add(1, Ordering::Relaxed);
        let Some(timing) = result.timing.as_ref().filter(|_| result.error.is_empty()) else {
            return;
        };
        if place != 1 {
            self.stages[0].observe(timing.queue_ms / 1000.0);
            self.stages[1].observe(timing.decode_ms / 1000.0);
            self.stages[2].observe(timing.infer_ms / 1000.0);
        }
        self.stages[3].observe(timing.total_ms / 1000.0);
    }

    /// Counts one job published to `tier`.
    pub fn offloaded(&self, tier: Tier) {
        if let Some(i) = UPPER_TIERS.iter().position(|t| *t == tier) {
            self.offloads[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one decision of where a job runs.
    pub fn placed(&self, reason: Reason) {
        if let Some(count) = self.placements.get(reason.index()) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The text exposition format (version 0.0.4) of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = self.write_all(&mut out);
        out
    }

    fn write_all(&self, out: &mut String) -> std::fmt::Result {
        header(
            out,
            "isomesh_node_info",
            "gauge",
            "This node: its id and tier (always 1).",
        )?;
        writeln!(
            out,
            "isomesh_node_info{{node=\"{}\",tier=\"{}\"}} 1",
            escape(&self.node),
            self.tier.name()
        )?;
        header(
            out,
            "isomesh_jobs_total",
            "counter",
            "Answers this node gave its users, by outcome (ok, late, error) and where the job ran \
             (here, forwarded = by a tier above, fallback = here after the tier above did not answer).",
        )?;
        for (o, outcome) in OUTCOMES.iter().enumerate() {
            for (w, place) in WHERES.iter().enumerate() {
                writeln!(
                    out,
                    "isomesh_jobs_total{{outcome=\"{outcome}\",where=\"{place}\"}} {}",
                    self.jobs[o][w].load(Ordering::Relaxed)
                )?;
            }
        }
        header(
            out,
            "isomesh_job_stage_seconds",
            "histogram",
            "Time per stage: queue, decode and infer of jobs run here; total (acceptance to \
             answer) of every answered job.",
        )?;
        for (stage, histogram) in STAGES.iter().zip(&self.stages) {
            histogram.write(out, "isomesh_job_stage_seconds", stage)?;
        }
        header(
            out,
            "isomesh_offloads_total",
            "counter",
            "Jobs this node published to a tier above.",
        )?;
        for (tier, count) in UPPER_TIERS.iter().zip(&self.offloads) {
            writeln!(
                out,
                "isomesh_offloads_total{{to=\"{}\"}} {}",
                tier.name(),
                count.load(Ordering::Relaxed)
            )?;
        }
        header(
            out,
            "isomesh_placements_total",
            "counter",
            "Decisions where a job runs, by reason; parent_no_faster: kept here past its planned \
             share of the budget since no tier above looked sooner (the mesh is overloaded).",
        )?;
        for (reason, count) in Reason::ALL.iter().zip(&self.placements) {
            writeln!(
                out,
                "isomesh_placements_total{{reason=\"{}\"}} {}",
                reason.label(),
                count.load(Ordering::Relaxed)
            )?;
        }
        header(
            out,
            "isomesh_queue_depth",
            "gauge",
            "Jobs waiting or running on this node now.",
        )?;
        writeln!(out, "isomesh_queue_depth {}", self.load.in_system())?;
        header(
            out,
            "isomesh_forwarded_waiting",
            "gauge",
            "Jobs this node sent up and holds until their answer comes back.",
        )?;
        writeln!(
            out,
            "isomesh_forwarded_waiting {}",
            self.relay.outstanding()
        )?;
        header(
            out,
            "isomesh_service_ewma_seconds",
            "gauge",
            "Moving average of one job's service time here (0 before the first job).",
        )?;
        writeln!(
            out,
            "isomesh_service_ewma_seconds {}",
            self.load.ewma_ms() / 1000.0
        )?;
        header(
            out,
            "isomesh_module_info",
            "gauge",
            "The classifier module served (1), by name, version and sha256; absent while none is.",
        )?;
        if let Some(module) = self.slot.current() {
            writeln!(
                out,
                "isomesh_module_info{{name=\"{}\",version=\"{}\",sha256=\"{}\"}} 1",
                escape(&module.info.name),
                escape(&module.info.version),
                escape(&module.sha256)
            )?;
        }
        header(
            out,
            "isomesh_module_swaps_total",
            "counter",
            "Modules swapped in while the node ran (the one loaded at start not counted).",
        )?;
        writeln!(out, "isomesh_module_swaps_total {}", self.slot.swaps())?;
        self.render_rollouts(out)?;
        if let Some(bytes) = isomesh_http::resident_memory_bytes() {
            header(
                out,
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory of the node process.",
            )?;
            writeln!(out, "process_resident_memory_bytes {bytes}")?;
        }
        header(
            out,
            "isomesh_broker_connected",
            "gauge",
            "1 while the node is connected to its broker, else 0.",
        )?;
        writeln!(
            out,
            "isomesh_broker_connected {}",
            u8::from(self.connected.load(Ordering::Relaxed))
        )?;
        header(
            out,
            "isomesh_broker_connects_total",
            "counter",
            "Connections the broker accepted (CONNACKs); each one past the first is a reconnect.",
        )?;
        writeln!(
            out,
            "isomesh_broker_connects_total {}",
            self.connects.load(Ordering::Relaxed)
        )?;
        header(
            out,
            "isomesh_broker_member",
            "gauge",
            "Which --broker member the node connected to last (1 for the first; 0 before any).",
        )?;
        writeln!(
            out,
            "isomesh_broker_member {}",
            self.member.load(Ordering::Relaxed)
        )?;
        header(
            out,
            "isomesh_broker_member_changes_total",
            "counter",
            "Connections to another --broker member than the one before: fail-overs.",
        )?;
        writeln!(
            out,
            "isomesh_broker_member_changes_total {}",
            self.member_changes.load(Ordering::Relaxed)
        )
    }
}

impl Metrics {
    fn render_rollouts(&self, out: &mut String) -> std::fmt::Result {
        let tally = self.board.tally();
        header(
            out,
            "isomesh_rollout_fetches_total",
            "counter",
            "Rollouts whose chunks all came in.",
        )?;
        writeln!(out, "isomesh_rollout_fetches_total {}", tally.fetched)?;
        header(
            out,
            "isomesh_module_loads_total",
            "counter",
            "Modules compiled (or loaded from the cache), self-tested and served, the first included.",
        )?;
        writeln!(out, "isomesh_module_loads_total {}", tally.loaded)?;
        header(
            out,
            "isomesh_rollout_rejections_total",
            "counter",
            "Modules refused, by the code of the refusal (signature, load, downgrade, ...).",
        )?;
        for (code, count) in &tally.rejections {
            writeln!(
                out,
                "isomesh_rollout_rejections_total{{code=\"{}\"}} {count}",
                escape(code)
            )?;
        }
        for (name, help, last) in [
            (
                "isomesh_rollout_fetch_seconds",
                "How long the last rollout's chunks took to come in.",
                tally.last_fetch,
            ),
            (
                "isomesh_module_load_seconds",
                "How long the last module took from file to serving: compile or cache, self-test, instances.",
                tally.last_load,
            ),
        ] {
            if let Some(last) = last {
                header(out, name, "gauge", help)?;
                writeln!(out, "{name} {}", last.as_secs_f64())?;
            }
        }
        Ok(())
    }
}

/// A label value as the exposition format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A fixed-bucket histogram of seconds, updated with atomics only.
#[derive(Default)]
struct Histogram {
    /// Observations per bucket (not cumulative; the last one is +Inf).
    counts: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of the observations, microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, seconds: f64) {
        let seconds = if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        };
        let bucket = BUCKETS
            .iter()
            .position(|le| seconds <= *le)
            .unwrap_or(BUCKETS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, stage: &str) -> std::fmt::Result {
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            writeln!(
                out,
                "{name}_bucket{{stage=\"{stage}\",le=\"{le}\"}} {cumulative}"
            )?;
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        writeln!(out, "{name}_sum{{stage=\"{stage}\"}} {sum}")?;
        writeln!(out, "{name}_count{{stage=\"{stage}\"}} {cumulative}")
    }
}

/// Binds the metrics listener; a bad or busy address fails the node's start, not a later scrape.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    if let Ok(local) = listener.local_addr() {
        tracing::info!(listen = %local, "serving Prometheus metrics on /metrics, probes on /healthz and /readyz");
    }
    Ok(listener)
}

/// Why [`probe_ready`] could not say "ready".
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no --metrics-listen address: the node serves no /readyz to ask")]
    NoAddress,
    #[error("cannot ask {addr}/readyz: {source}")]
    Unreachable {
        addr: String,
        source: std::io::Error,
    },
    #[error("not ready: {0}")]
    NotReady(String),
}

/// Asks the node serving on `listen` (its `--metrics-listen`) whether it is ready: what
/// `isomesh-node --check-ready` does, a health check for a container image that has no shell
/// or curl. A wildcard address is asked on loopback.
pub async fn probe_ready(listen: Option<&str>) -> Result<String, ProbeError> {
    let listen = listen.ok_or(ProbeError::NoAddress)?;
    let addr = match listen.rsplit_once(':') {
        Some(("0.0.0.0" | "[::]" | "", port)) => format!("127.0.0.1:{port}"),
        _ => listen.to_string(),
    };
    let unreachable = |source| ProbeError::Unreachable {
        addr: addr.clone(),
        source,
    };
    let response = isomesh_http::get(&addr, "/readyz")
        .await
        .map_err(unreachable)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let body = body.trim().to_string();
    if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") {
        Ok(body)
    } else {
        let why = body.strip_prefix("not ready: ").unwrap_or(&body);
        Err(ProbeError::NotReady(why.to_string()))
    }
}

/// Serves `GET /metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    isomesh_http::serve(
        listener,
        "GET /metrics, /healthz and /readyz",
        move |path: String| {
            let metrics = metrics.clone();
            async move {
                match path.as_str() {
                    "/metrics" => Some(Page::metrics(metrics.render())),
                    "/healthz" => Some(Page::ok("ok\n".to_string())),
                    "/readyz" => Some(match metrics.readiness() {
                        Ok(serving) => Page::ok(format!("ready: {serving}\n")),
                        Err(why) => Page::unavailable(format!("not ready: {why}\n")),
                    }),
                    _ => None,
                }
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use isomesh_protos::{Hop, Timing};

    fn metrics() -> Metrics {
        Metrics::new(
            "n1",
            Tier::Device,
            Arc::new(Load::default()),
            Arc::new(ModuleSlot::default()),
            Arc::new(RolloutBoard::default()),
            Arc::new(Relay::default()),
        )
    }

    fn result(action: hop::Action, deadline_met: bool, error: &str) -> JobResult {
        JobResult {
            node: "x".into(),
            error: error.into(),
            deadline_met,
            timing: Some(Timing {
                queue_ms: 2.0,
                decode_ms: 7.0,
                infer_ms: 40.0,
                total_ms: 300.0,
            }),
            hops: vec![Hop {
                node: "n1".into(),
                action: action as i32,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn answers_are_counted_by_outcome_and_place() {
        let m = metrics();
        m.answered(&result(hop::Action::Ran, true, ""));
        m.answered(&result(hop::Action::Forwarded, false, ""));
        m.answered(&result(hop::Action::Fallback, true, "trapped"));
        m.offloaded(Tier::Cloud);
        let text = m.render();
        assert!(text.contains("isomesh_jobs_total{outcome=\"ok\",where=\"here\"} 1"));
        assert!(text.contains("isomesh_jobs_total{outcome=\"late\",where=\"forwarded\"} 1"));
        assert!(text.contains("isomesh_jobs_total{outcome=\"error\",where=\"fallback\"} 1"));
        assert!(text.contains("isomesh_jobs_total{outcome=\"ok\",where=\"forwarded\"} 0"));
        assert!(text.contains("isomesh_offloads_total{to=\"cloud\"} 1"));
        assert!(text.contains("isomesh_offloads_total{to=\"edge\"} 0"));
        // Stages of the job run here only; totals of both answered jobs; the error counts in none.
        assert!(text.contains("isomesh_job_stage_seconds_count{stage=\"infer\"} 1"));
        assert!(text.contains("isomesh_job_stage_seconds_count{stage=\"total\"} 2"));
        assert!(text.contains("isomesh_job_stage_seconds_bucket{stage=\"infer\",le=\"0.025\"} 0"));
        assert!(text.contains("isomesh_job_stage_seconds_bucket{stage=\"infer\",le=\"0.05\"} 1"));
        assert!(text.contains("isomesh_job_stage_seconds_bucket{stage=\"total\",le=\"+Inf\"} 2"));
        assert!(text.contains("isomesh_node_info{node=\"n1\",tier=\"device\"} 1"));
        assert!(!text.contains("isomesh_module_info{"));
    }

    #[test]
    fn a_rejection_without_hops_counts_as_an_error_here() {
        let m = metrics();
        m.answered(&JobResult {
            error: "not an image".into(),
            ..Default::default()
        });
        assert!(m
            .render()
            .contains("isomesh_jobs_total{outcome=\"error\",where=\"here\"} 1"));
    }

    #[test]
    fn readiness_names_everything_missing_and_the_link_is_counted() {
        let m = metrics();
        let why = m.readiness().expect_err("no module, no broker");
        assert!(
            why.contains("no self-tested module") && why.contains("not connected"),
            "{why}"
        );
        m.link_up(0);
        let why = m.readiness().expect_err("still no module");
        assert!(!why.contains("not connected"), "{why}");
        m.draining();
        let why = m.readiness().expect_err("draining");
        assert!(why.contains("shutting down"), "{why}");
        let text = m.render();
        assert!(text.contains("\nisomesh_broker_connected 1\n"), "{text}");
        m.link_down();
        m.link_up(0);
        let text = m.render();
        assert!(text.contains("\nisomesh_broker_connects_total 2"), "{text}");
        assert!(text.contains("\nisomesh_broker_member 1\n"), "{text}");
        assert!(
            text.contains("\nisomesh_broker_member_changes_total 0"),
            "{text}"
        );
        // A fail-over to the second member, and back.
        m.link_down();
        m.link_up(1);
        m.link_down();
        m.link_up(0);
        let text = m.render();
        assert!(text.contains("\nisomesh_broker_member 1\n"), "{text}");
        assert!(
            text.contains("\nisomesh_broker_member_changes_total 2"),
            "{text}"
        );
        m.link_down();
        assert!(m.render().contains("\nisomesh_broker_connected 0\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
