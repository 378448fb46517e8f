//! Incoming requests: what a node does with the bytes of an MQTT message before it reaches the
//! scheduler, and where the answer must go.
//!
//! Two doors, one flow. A raw image on `images/{node}` (from `mosquitto_pub -f cat.jpg`, say)
//! becomes a `Job` with a fresh id and a JSON reply to its MQTT 5 response topic, or to
//! `results/{node}`. A protobuf `Job` on `jobs/...` gets a protobuf `JobResult` at its `reply_to`.
//! A message that cannot be understood still gets an error answer wherever one can be sent.

use crate::topics::Topics;
use bytes::Bytes;
use isomesh_protos::Job;
use prost::Message;
use std::sync::atomic::{AtomicU64, Ordering};

/// Classes returned when a request does not say.
pub const DEFAULT_TOP_K: u32 = 5;
/// Most classes a request may ask for.
pub const MAX_TOP_K: u32 = 1000;
/// Longest budget a job may carry, ms (10 min). A node forwarding a job waits for its answer
/// about this long at most before running it itself, so a job claiming `u32::MAX` ms (49 days)
/// must not pin its image and its wait in the node for that long.
pub const MAX_BUDGET_MS: u32 = 600_000;

/// Where and how to send the answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyRoute {
    /// JSON result (raw-image requests).
    Json { topic: String },
    /// Protobuf `JobResult` (protobuf `Job` requests).
    Proto { topic: String },
}

impl ReplyRoute {
    pub fn topic(&self) -> &str {
        match self {
            ReplyRoute::Json { topic } | ReplyRoute::Proto { topic } => topic,
        }
    }
}

/// A job and the route of its answer.
#[derive(Debug, Clone)]
pub struct Request {
    pub job: Job,
    pub reply: ReplyRoute,
}

impl Request {
    /// What identifies this job to the node that takes it: its reply topic and its id. Ids are
    /// the sender's choice (and guessable: `{client}-{n}`), so two senders may pick the same
    /// one; the reply topic tells them apart, and a sender who names another's reply topic can
    /// only make the node answer there again. MQTT topics never contain U+0000.
    pub fn key(&self) -> String {
        format!("{}\0{}", self.reply.topic(), self.job.job_id)
    }
}

/// A message that could not become a job, and where to say so.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub job: Job,
    pub reply: ReplyRoute,
    pub message: String,
}

/// Makes unique job ids for raw-image requests.
#[derive(Debug)]
pub struct JobIds {
    node: String,
    started_ms: u128,
    next: AtomicU64,
}

impl JobIds {
    pub fn new(node: &str) -> JobIds {
        let started_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        JobIds {
            node: node.to_string(),
            started_ms,
            next: AtomicU64::new(1),
        }
    }

    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}-{:x}-{n}", self.node, self.started_ms)
    }
}

/// A raw JPEG/PNG payload. `response_topic` and `correlation` come from MQTT 5 properties.
pub fn from_image(
    payload: Bytes,
    response_topic: Option<String>,
    correlation: Option<Bytes>,
    ids: &JobIds,
    topics: &Topics,
    node: &str,
) -> Request {
    let topic = response_topic
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| topics.results(node));
    Request {
        job: Job {
            job_id: ids.next(),
            image: payload.to_vec(),
            top_k: DEFAULT_TOP_K,
            correlation: correlation.map(|c| c.to_vec()).unwrap_or_default(),
            ..Default::default()
        },
        reply: ReplyRoute::Json { topic },
    }
}

/// A protobuf `Job` payload.
pub fn from_job(
    payload: &[u8],
    ids: &JobIds,
    topics: &Topics,
    node: &str,
) -> Result<Request, Box<Unreadable>> {
    let fallback = ReplyRoute::Proto {
        topic: topics.results(node),
    };
    let mut job = match Job::decode(payload) {
        Ok(job) => job,
        Err(e) => {
            return Err(Box::new(Unreadable {
                job: Job::default(),
                reply: fallback,
                message: format!(
                    "payload of {} bytes is not a protobuf isomesh.v1.Job: {e}",
                    payload.len()
                ),
            }))
        }
    };
    let reply = if job.reply_to.is_empty() {
        fallback
    } else {
        ReplyRoute::Proto {
            topic: job.reply_to.clone(),
        }
    };
    if job.job_id.is_empty() {
        job.job_id = ids.next();
    }
    if job.reply_to.contains(['+', '#']) {
        return Err(Box::new(Unreadable {
            message: format!("reply_to {:?} is a topic filter, not a topic", job.reply_to),
            reply: ReplyRoute::Proto {
                topic: topics.results(node),
            },
            job,
        }));
    }
    // Only a node forwarding a job aims its answer at a relay topic, and it always sends a
    // token with it (see `relay`); anyone else doing so is trying to answer in a node's place.
    if topics.is_relay_topic(&job.reply_to) && job.relay_token.is_empty() {
        return Err(Box::new(Unreadable {
            message: format!(
                "reply_to {:?} is a node's relay topic, which only forwarded jobs (with a relay \
                 token) may name; use a topic under results/ or replies/",
                job.reply_to
            ),
            reply: ReplyRoute::Proto {
                topic: topics.results(node),
            },
            job,
        }));
    }
    job.top_k = match job.top_k {
        0 => DEFAULT_TOP_K,
        k => k.min(MAX_TOP_K),
    };
    job.budget_ms = job.budget_ms.min(MAX_BUDGET_MS);
    Ok(Request { job, reply })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (JobIds, Topics) {
        (JobIds::new("d1"), Topics::new("isomesh"))
    }

    #[test]
    fn images_reply_to_the_response_topic_or_the_results_topic() {
        let (ids, topics) = setup();
        let r = from_image(
            Bytes::from_static(b"x"),
            Some("me/r".into()),
            None,
            &ids,
            &topics,
            "d1",
        );
        assert_eq!(
            r.reply,
            ReplyRoute::Json {
                topic: "me/r".into()
            }
        );
        let r2 = from_image(Bytes::from_static(b"x"), None, None, &ids, &topics, "d1");
        assert_eq!(r2.reply.topic(), "isomesh/results/d1");
        assert_ne!(r.job.job_id, r2.job.job_id);
    }

    #[test]
    fn garbage_jobs_are_unreadable_and_answered_on_the_results_topic() {
        let (ids, topics) = setup();
        let garbage = [0xff, 0xff, 0xff, 0x01, 0x02];
        let err = from_job(&garbage, &ids, &topics, "d1").unwrap_err();
        assert_eq!(err.reply.topic(), "isomesh/results/d1");
        assert!(err.message.contains("not a protobuf"), "{}", err.message);
    }

    #[test]
    fn jobs_get_defaults_and_keep_their_route() {
        let (ids, topics) = setup();
        let job = Job {
            reply_to: "cli/1".into(),
            top_k: 5000,
            ..Default::default()
        };
        let r = from_job(&job.encode_to_vec(), &ids, &topics, "d1").unwrap();
        assert_eq!(r.reply.topic(), "cli/1");
        assert_eq!(r.job.top_k, MAX_TOP_K);
        assert!(!r.job.job_id.is_empty());
    }

    #[test]
    fn budgets_are_capped_at_ten_minutes() {
        let (ids, topics) = setup();
        let job = Job {
            budget_ms: u32::MAX,
            ..Default::default()
        };
        let r = from_job(&job.encode_to_vec(), &ids, &topics, "d1").unwrap();
        assert_eq!(r.job.budget_ms, MAX_BUDGET_MS);
    }

    #[test]
    fn a_relay_topic_as_reply_to_needs_a_relay_token() {
        let (ids, topics) = setup();
        let aimed = Job {
            job_id: "j".into(),
            reply_to: "isomesh/relay/e1".into(),
            ..Default::default()
        };
        let err = from_job(&aimed.encode_to_vec(), &ids, &topics, "d1").unwrap_err();
        assert_eq!(err.reply.topic(), "isomesh/results/d1");
        assert!(err.message.contains("relay topic"), "{}", err.message);
        let forwarded = Job {
            relay_token: vec![1; 16],
            ..aimed
        };
        let r = from_job(&forwarded.encode_to_vec(), &ids, &topics, "d1").unwrap();
        assert_eq!(r.reply.topic(), "isomesh/relay/e1");
    }
}
