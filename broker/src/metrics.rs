//! Prometheus metrics of the broker, served as text on `--metrics-listen HOST:PORT`
//! (`GET /metrics`, beside `GET /healthz`), so an operator sees the broker the way the nodes'
//! pages show the nodes: who is connected, how many messages flow, where they pile up.
//!
//! What a scrape shows, and where it comes from:
//! - Counters kept by hooks on rmqtt's events ([`register`]; an atomic add per event):
//!   `isomesh_broker_connects_total{result}` (`accepted` or `refused`: a CONNACK that let the
//!   client in or turned it away, bad logins and foreign client ids included);
//!   `isomesh_broker_messages_received_total` (every PUBLISH read from a client, and every Last
//!   Will the broker published for one); `isomesh_broker_messages_delivered_total` (copies
//!   handed to subscribers, retained ones to new subscribers included);
//!   `isomesh_broker_messages_dropped_total{reason}`: `refused` (the ACL said no),
//!   `queue_full` (a subscriber's queue held `--max-queue` messages: a stalled consumer),
//!   `inflight_full`, `expired` (waited longer than `--message-expiry-s`), `other` (a session
//!   ended with messages still queued, say).
//! - Gauges read from rmqtt when the scrape comes: `isomesh_broker_connections`,
//!   `isomesh_broker_sessions` (persistent sessions of clients that are away included),
//!   `isomesh_broker_subscriptions`, `isomesh_broker_queued_messages` (waiting in sessions'
//!   queues: what a slow or offline subscriber has not taken yet), `isomesh_broker_inflight_messages`
//!   (sent at QoS 1/2 and not yet acknowledged), `isomesh_broker_retained_messages` and
//!   `isomesh_broker_retained_bytes` (payloads: mostly module chunks, the mesh's rollout state),
//!   and `process_resident_memory_bytes`.
//!
//! rmqtt keeps the gauges itself once its `stats` feature is on (a counter on each queue push
//! and pop); the retained bytes are summed over the retained store at scrape time, a few hundred
//! messages in a mesh (each held as a shared buffer, so the walk copies no payload).

use isomesh_http::header;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::types::Reason;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;

/// Why a message was dropped, as the `reason` label says it.
const DROP_REASONS: [&str; 5] = ["refused", "queue_full", "inflight_full", "expired", "other"];

/// The counters the hooks keep.
#[derive(Debug, Default)]
pub struct Counters {
    connects_accepted: AtomicU64,
    connects_refused: AtomicU64,
    received: AtomicU64,
    delivered: AtomicU64,
    dropped: [AtomicU64; DROP_REASONS.len()],
}

/// The `reason` label of a drop: an index into [`DROP_REASONS`].
fn drop_reason(reason: &Reason) -> usize {
    match reason {
        Reason::PublishResult(_) => 0,
        Reason::MessageQueueFull => 1,
        Reason::InflightWindowFull => 2,
        Reason::MessageExpiration => 3,
        _ => 4,
    }
}

impl Counters {
    fn count(&self, param: &Parameter) {
        let counter = match param {
            Parameter::ClientConnack(_, reason) if reason.success() => &self.connects_accepted,
            Parameter::ClientConnack(..) => &self.connects_refused,
            Parameter::MessagePublish(..) => &self.received,
            Parameter::MessageDelivered(..) => &self.delivered,
            Parameter::MessageDropped(_, _, _, reason) => &self.dropped[drop_reason(reason)],
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts the events behind the counters, through rmqtt's hooks.
pub async fn register(scx: &ServerContext, counters: Arc<Counters>) {
    let register = scx.extends.hook_mgr().register();
    for typ in [
        Type::ClientConnack,
        Type::MessagePublish,
        Type::MessageDelivered,
        Type::MessageDropped,
    ] {
        register
            .add(typ, Box::new(Counting(counters.clone())))
            .await;
    }
    register.start().await;
}

struct Counting(Arc<Counters>);

#[async_trait::async_trait]
impl Handler for Counting {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        self.0.count(param);
        // Only counting: the next handler (and rmqtt) decide as if this one were not here.
        (true, acc)
    }
}

/// What rmqtt knows at the moment of a scrape.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Gauges {
    pub connections: i64,
    pub sessions: i64,
    pub subscriptions: i64,
    pub queued_messages: i64,
    pub inflight_messages: i64,
    pub retained_messages: i64,
    pub retained_bytes: u64,
    pub resident_memory_bytes: Option<u64>,
}

impl Gauges {
    /// Reads them from the server.
    pub async fn read(scx: &ServerContext) -> Gauges {
        let stats = scx.stats.clone(scx).await;
        let retained = {
            let retain = scx.extends.retain().await;
            retain
                .get(&rmqtt::types::TopicFilter::from("#"))
                .await
                .unwrap_or_default()
        };
        Gauges {
            connections: stats.connections.count() as i64,
            sessions: stats.sessions.count() as i64,
            subscriptions: stats.subscriptions.count() as i64,
            queued_messages: stats.message_queues.count() as i64,
            inflight_messages: stats.out_inflights.count() as i64,
            retained_messages: retained.len() as i64,
            retained_bytes: retained
                .iter()
                .map(|(_, r)| r.publish.payload.len() as u64)
                .sum(),
            resident_memory_bytes: isomesh_http::resident_memory_bytes(),
        }
    }
}

/// The text exposition of `counters` and `gauges`.
pub fn render(counters: &Counters, gauges: &Gauges) -> String {
    let mut out = String::with_capacity(2048);
    // Writing to a String cannot fail.
    let _ = write_all(&mut out, counters, gauges);
    out
}

fn write_all(out: &mut String, counters: &Counters, gauges: &Gauges) -> std::fmt::Result {
    let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
    header(
        out,
        "isomesh_broker_connects_total",
        "counter",
        "CONNECTs answered, by result.",
    )?;
    writeln!(
        out,
        "isomesh_broker_connects_total{{result=\"accepted\"}} {}",
        read(&counters.connects_accepted)
    )?;
    writeln!(
        out,
        "isomesh_broker_connects_total{{result=\"refused\"}} {}",
        read(&counters.connects_refused)
    )?;
    let totals = [
        (
            "isomesh_broker_messages_received_total",
            "PUBLISH packets read from clients, and Last Wills published for them.",
            read(&counters.received),
        ),
        (
            "isomesh_broker_messages_delivered_total",
            "Messages handed to subscribers, retained ones included.",
            read(&counters.delivered),
        ),
    ];
    for (name, help, value) in totals {
        header(out, name, "counter", help)?;
        writeln!(out, "{name} {value}")?;
    }
    header(
        out,
        "isomesh_broker_messages_dropped_total",
        "counter",
        "Messages not delivered, by reason.",
    )?;
    for (reason, counter) in DROP_REASONS.iter().zip(&counters.dropped) {
        writeln!(
            out,
            "isomesh_broker_messages_dropped_total{{reason=\"{reason}\"}} {}",
            read(counter)
        )?;
    }
    let gauges_now = [
        (
            "isomesh_broker_connections",
            "Clients connected now.",
            gauges.connections as f64,
        ),
        (
            "isomesh_broker_sessions",
            "Sessions, persistent ones of clients away included.",
            gauges.sessions as f64,
        ),
        (
            "isomesh_broker_subscriptions",
            "Subscriptions of all sessions.",
            gauges.subscriptions as f64,
        ),
        (
            "isomesh_broker_queued_messages",
            "Messages waiting in sessions' queues.",
            gauges.queued_messages as f64,
        ),
        (
            "isomesh_broker_inflight_messages",
            "QoS 1/2 messages sent and not yet acknowledged.",
            gauges.inflight_messages as f64,
        ),
        (
            "isomesh_broker_retained_messages",
            "Retained messages kept.",
            gauges.retained_messages as f64,
        ),
        (
            "isomesh_broker_retained_bytes",
            "Payload bytes of the retained messages.",
            gauges.retained_bytes as f64,
        ),
    ];
    for (name, help, value) in gauges_now {
        header(out, name, "gauge", help)?;
        writeln!(out, "{name} {value}")?;
    }
    if let Some(bytes) = gauges.resident_memory_bytes {
        header(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the broker process.",
        )?;
        writeln!(out, "process_resident_memory_bytes {bytes}")?;
    }
    Ok(())
}

/// Serves `GET /metrics` and `GET /healthz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, scx: ServerContext, counters: Arc<Counters>) {
    isomesh_http::serve(
        listener,
        "GET /metrics and /healthz",
        move |path: String| {
            let (scx, counters) = (scx.clone(), counters.clone());
            async move {
                match path.as_str() {
                    "/metrics" => {
                        let gauges = Gauges::read(&scx).await;
                        Some(isomesh_http::Page::metrics(render(&counters, &gauges)))
                    }
                    "/healthz" => Some(isomesh_http::Page::ok("ok\n".to_string())),
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
    use isomesh_testkit::metrics::value;

    #[test]
    fn drops_are_counted_by_reason_and_every_reason_is_shown() {
        let counters = Counters::default();
        for reason in [
            Reason::MessageQueueFull,
            Reason::MessageQueueFull,
            Reason::MessageExpiration,
            Reason::SessionExpiration,
        ] {
            counters.dropped[drop_reason(&reason)].fetch_add(1, Ordering::Relaxed);
        }
        let text = render(&counters, &Gauges::default());
        let dropped = |reason: &str| {
            value(
                &text,
                &format!("isomesh_broker_messages_dropped_total{{reason=\"{reason}\"}}"),
            )
        };
        assert_eq!(dropped("queue_full"), Some(2.0), "{text}");
        assert_eq!(dropped("expired"), Some(1.0), "{text}");
        assert_eq!(dropped("other"), Some(1.0), "{text}");
        assert_eq!(dropped("refused"), Some(0.0), "{text}");
        assert_eq!(dropped("inflight_full"), Some(0.0), "{text}");
    }

    #[test]
    fn every_series_has_its_help_and_type_and_the_gauges_their_values() {
        let gauges = Gauges {
            connections: 3,
            sessions: 4,
            subscriptions: 9,
            queued_messages: 12,
            inflight_messages: 1,
            retained_messages: 64,
            retained_bytes: 16 << 20,
            resident_memory_bytes: Some(8 << 20),
        };
        let text = render(&Counters::default(), &gauges);
        assert_eq!(value(&text, "isomesh_broker_connections"), Some(3.0));
        assert_eq!(value(&text, "isomesh_broker_queued_messages"), Some(12.0));
        assert_eq!(
            value(&text, "isomesh_broker_retained_bytes"),
            Some(16_777_216.0)
        );
        assert_eq!(
            value(&text, "process_resident_memory_bytes"),
            Some(8_388_608.0)
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "no TYPE for {name}:\n{text}"
            );
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}:\n{text}"
            );
        }
    }
}
