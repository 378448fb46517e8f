//! Forwarded jobs this node still owns, waiting for their result from the tier above.
//!
//! A node that forwards a job does not let go of it: the MQTT message that brought the job stays
//! unacknowledged, and the job waits here for the `JobResult` the tier above publishes to this
//! node's relay topic (`{prefix}/relay/{node}`). The first answer wins, whether it comes from
//! above or from this node running the job itself after waiting too long; whatever arrives later
//! for the same job finds nobody waiting and is dropped. That is what makes one answer per job
//! hold when a parent dies mid-job, the broker loses a message, or a broker replays a dead node's
//! unacknowledged messages to another node.
//!
//! Waits are keyed by a relay token, not by the job id. Every forwarded copy carries a fresh
//! random token (`Job.relay_token`) and an answer counts only if it echoes it: job ids are
//! chosen by users and seen by every node of a tier, but the token is seen only by the tier the
//! job went to. So another node, or a camera that aims a job's `reply_to` at this relay topic,
//! cannot answer a job in place of the tier above.
//!
//! The relay also learns what a trip up costs. The answer says how long the job spent at the
//! tier above; what this node waited beyond that went to the broker and the links both ways.
//! A job forwarded later leaves with its budget less that transit time, so the tier above judges
//! it against the time it really has.

use isomesh_protos::{JobResult, Tier};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// Weight of the newest sample in the moving average of transit times.
const TRANSIT_ALPHA: f64 = 0.2;

/// Bytes of a relay token: 128 random bits, as unguessable as a UUIDv4.
pub const TOKEN_BYTES: usize = 16;

/// A forwarded job waiting for its answer: the id it must carry, and where to hand it.
#[derive(Debug)]
struct Waiting {
    job_id: String,
    answer: oneshot::Sender<JobResult>,
}

/// Jobs forwarded by this node and not yet answered, by relay token.
#[derive(Debug, Default)]
pub struct Relay {
    waiting: Mutex<HashMap<Vec<u8>, Waiting>>,
    /// Moving average of the round trip to each tier above, less the time spent there, ms.
    transit_ms: Mutex<HashMap<Tier, f64>>,
}

/// What [`Relay::deliver`] did with a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A forwarded job was waiting for it.
    Taken,
    /// No job waits for its token (already answered, never forwarded from here, or a forgery
    /// without the token): dropped.
    Unclaimed,
    /// Its token is that of a waiting job, but it answers another job id: dropped, and the job
    /// keeps waiting.
    WrongJob,
}

impl Relay {
    /// Starts waiting for the answer to `job_id` sent up with `token` (fresh and random for
    /// each forwarded copy). Dropping the [`Awaited`] stops waiting.
    pub fn expect(self: &Arc<Relay>, job_id: &str, token: [u8; TOKEN_BYTES]) -> Awaited {
        let (answer, result) = oneshot::channel();
        let waiting = Waiting {
            job_id: job_id.to_string(),
            answer,
        };
        self.lock().insert(token.to_vec(), waiting);
        Awaited {
            relay: self.clone(),
            token,
            result,
        }
    }

    /// Hands a result from the tier above to the job waiting for it, if its token says so.
    pub fn deliver(&self, result: JobResult) -> Delivery {
        let mut waiting = self.lock();
        match waiting.get(&result.relay_token) {
            None => Delivery::Unclaimed,
            Some(job) if job.job_id != result.job_id => Delivery::WrongJob,
            Some(_) => match waiting.remove(&result.relay_token) {
                Some(job) => match job.answer.send(result) {
                    Ok(()) => Delivery::Taken,
                    // The job stopped waiting a moment ago (it ran here after all).
                    Err(_) => Delivery::Unclaimed,
                },
                None => Delivery::Unclaimed,
            },
        }
    }

    /// Jobs forwarded and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.lock().len()
    }

    /// Records one answered trip to `tier`: `waited` here, of which the job spent `above` there.
    pub fn record_transit(&self, tier: Tier, waited: Duration, above: Duration) {
        let sample = waited.saturating_sub(above).as_secs_f64() * 1000.0;
        let mut transit = self
            .transit_ms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        transit
            .entry(tier)
            .and_modify(|average| *average += TRANSIT_ALPHA * (sample - *average))
            .or_insert(sample);
    }

    /// The moving-average transit time to `tier` and back, ms (0 before the first answer).
    pub fn transit_ms(&self, tier: Tier) -> f64 {
        self.transit_ms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&tier)
            .copied()
            .unwrap_or(0.0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Waiting>> {
        // The map stays consistent whatever a panicking holder did: every operation is one call.
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The wait for one forwarded job's result.
#[derive(Debug)]
pub struct Awaited {
    relay: Arc<Relay>,
    token: [u8; TOKEN_BYTES],
    pub result: oneshot::Receiver<JobResult>,
}

impl Awaited {
    /// The token the forwarded copy carries, for the answer to echo.
    pub fn token(&self) -> &[u8] {
        &self.token
    }
}

impl Drop for Awaited {
    fn drop(&mut self) {
        self.relay.lock().remove(self.token.as_slice());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(job_id: &str, node: &str, token: &[u8]) -> JobResult {
        JobResult {
            job_id: job_id.into(),
            node: node.into(),
            relay_token: token.to_vec(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_first_result_is_taken_and_later_ones_are_dropped() {
        let relay = Arc::new(Relay::default());
        let mut awaited = relay.expect("j1", [1; TOKEN_BYTES]);
        let token = awaited.token().to_vec();
        assert_eq!(relay.outstanding(), 1);
        assert_eq!(relay.deliver(result("j1", "e1", &token)), Delivery::Taken);
        assert_eq!(
            relay.deliver(result("j1", "e2", &token)),
            Delivery::Unclaimed
        );
        assert_eq!(
            relay.deliver(result("j2", "e1", &token)),
            Delivery::Unclaimed
        );
        let taken = (&mut awaited.result).await.map(|r| r.node);
        assert_eq!(taken.as_deref(), Ok("e1"));
        assert_eq!(relay.outstanding(), 0);
    }

    #[tokio::test]
    async fn answers_without_the_token_or_for_another_job_are_not_taken() {
        let relay = Arc::new(Relay::default());
        let mut awaited = relay.expect("j1", [7; TOKEN_BYTES]);
        let token = awaited.token().to_vec();
        // A forger who knows the job id but not the token, or who has no token at all.
        assert_eq!(
            relay.deliver(result("j1", "evil", &[])),
            Delivery::Unclaimed
        );
        assert_eq!(
            relay.deliver(result("j1", "evil", &[8; TOKEN_BYTES])),
            Delivery::Unclaimed
        );
        // The token of this job on another job's answer.
        assert_eq!(
            relay.deliver(result("j2", "e1", &token)),
            Delivery::WrongJob
        );
        assert_eq!(relay.outstanding(), 1);
        assert_eq!(relay.deliver(result("j1", "e1", &token)), Delivery::Taken);
        let taken = (&mut awaited.result).await.map(|r| r.node);
        assert_eq!(taken.as_deref(), Ok("e1"));
    }

    #[tokio::test]
    async fn two_waits_for_one_job_id_are_told_apart_by_their_tokens() {
        let relay = Arc::new(Relay::default());
        let mut first = relay.expect("same", [1; TOKEN_BYTES]);
        let mut second = relay.expect("same", [2; TOKEN_BYTES]);
        assert_eq!(relay.outstanding(), 2);
        let second_token = second.token().to_vec();
        assert_eq!(
            relay.deliver(result("same", "c2", &second_token)),
            Delivery::Taken
        );
        assert!(first.result.try_recv().is_err());
        assert_eq!(
            (&mut second.result).await.map(|r| r.node).as_deref(),
            Ok("c2")
        );
    }

    #[tokio::test]
    async fn a_job_that_stopped_waiting_takes_nothing() {
        let relay = Arc::new(Relay::default());
        drop(relay.expect("j1", [3; TOKEN_BYTES]));
        assert_eq!(relay.outstanding(), 0);
        assert_eq!(
            relay.deliver(result("j1", "e1", &[3; TOKEN_BYTES])),
            Delivery::Unclaimed
        );
    }

    #[test]
    fn transit_is_the_wait_less_the_time_above_averaged() {
        let relay = Relay::default();
        assert_eq!(relay.transit_ms(Tier::Edge), 0.0);
        let ms = Duration::from_millis;
        relay.record_transit(Tier::Edge, ms(150), ms(100));
        assert!((relay.transit_ms(Tier::Edge) - 50.0).abs() < 0.01);
        relay.record_transit(Tier::Edge, ms(100), ms(0));
        assert!((relay.transit_ms(Tier::Edge) - 60.0).abs() < 0.01);
        // An answer claiming more time above than was waited here counts as no transit.
        relay.record_transit(Tier::Cloud, ms(10), ms(30));
        assert_eq!(relay.transit_ms(Tier::Cloud), 0.0);
        assert_eq!(relay.transit_ms(Tier::Device), 0.0);
    }
}
