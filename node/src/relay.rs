//! Forwarded jobs this node still owns, waiting for their result from the tier above.
//!
//! A node that forwards a job does not let go of it: the MQTT message that brought the job stays
//! unacknowledged, and the job waits here, by id, for the `JobResult` the tier above publishes
//! to this node's relay topic (`{prefix}/relay/{node}`). The first answer wins, whether it comes
//! from above or from this node running the job itself after waiting too long; whatever arrives
//! later for the same id finds nobody waiting and is dropped. That is what makes one answer per
//! job hold when a parent dies mid-job, the broker loses a message, or a broker replays a dead
//! node's unacknowledged messages to another node.

use isomesh_protos::JobResult;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Job ids forwarded by this node and not yet answered.
#[derive(Debug, Default)]
pub struct Relay {
    waiting: Mutex<HashMap<String, oneshot::Sender<JobResult>>>,
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
}
