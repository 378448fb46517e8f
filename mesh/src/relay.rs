//! Forwarded jobs this node still owns, waiting for their result from the tier above.
//!
//! A node that forwards a job does not let go of it: the MQTT message that brought the job stays
//! unacknowledged, and the job waits here, by id, for the `JobResult` the tier above publishes
//! to this node's relay topic (`{prefix}/relay/{node}`). The first answer wins, whether it comes
//! from above or from this node running the job itself after waiting too long; whatever arrives
//! later for the same id finds nobody waiting and is dropped. That is what makes one answer per
//! job hold when a parent dies mid-job, the broker loses a message, or a broker replays a dead
//! node's unacknowledged messages to another node.
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

/// Job ids forwarded by this node and not yet answered.
#[derive(Debug, Default)]
pub struct Relay {
    waiting: Mutex<HashMap<String, oneshot::Sender<JobResult>>>,
    /// Moving average of the round trip to each tier above, less the time spent there, ms.
    transit_ms: Mutex<HashMap<Tier, f64>>,
}

/// What [`Relay::deliver`] did with a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A forwarded job was waiting for it.
    Taken,
    /// Nobody waits for this id (already answered, or never forwarded from here): dropped.
    Unclaimed,
}

impl Relay {
    /// Starts waiting for the result of `job_id`. Dropping the [`Awaited`] stops waiting.
    pub fn expect(self: &Arc<Relay>, job_id: &str) -> Awaited {
        let (sender, result) = oneshot::channel();
        self.lock().insert(job_id.to_string(), sender);
        Awaited {
            relay: self.clone(),
            job_id: job_id.to_string(),
            result,
        }
    }

    /// Hands a result from the tier above to the job waiting for it, if any.
    pub fn deliver(&self, result: JobResult) -> Delivery {
        match self.lock().remove(&result.job_id) {
            Some(waiting) => match waiting.send(result) {
                Ok(()) => Delivery::Taken,
                Err(_) => Delivery::Unclaimed,
            },
            None => Delivery::Unclaimed,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<JobResult>>> {
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
    job_id: String,
    pub result: oneshot::Receiver<JobResult>,
}

impl Drop for Awaited {
    fn drop(&mut self) {
        self.relay.lock().remove(&self.job_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(job_id: &str, node: &str) -> JobResult {
        JobResult {
            job_id: job_id.into(),
            node: node.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_first_result_is_taken_and_later_ones_are_dropped() {
        let relay = Arc::new(Relay::default());
        let mut awaited = relay.expect("j1");
        assert_eq!(relay.outstanding(), 1);
        assert_eq!(relay.deliver(result("j1", "e1")), Delivery::Taken);
        assert_eq!(relay.deliver(result("j1", "e2")), Delivery::Unclaimed);
        assert_eq!(relay.deliver(result("j2", "e1")), Delivery::Unclaimed);
        let taken = (&mut awaited.result).await.map(|r| r.node);
        assert_eq!(taken.as_deref(), Ok("e1"));
        assert_eq!(relay.outstanding(), 0);
    }

    #[tokio::test]
    async fn a_job_that_stopped_waiting_takes_nothing() {
        let relay = Arc::new(Relay::default());
        drop(relay.expect("j1"));
        assert_eq!(relay.outstanding(), 0);
        assert_eq!(relay.deliver(result("j1", "e1")), Delivery::Unclaimed);
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
