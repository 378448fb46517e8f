//! The answers a node gave lately, kept by job (its reply topic and id, see
//! [`Request::key`](crate::request::Request::key)) so that a user who asks again gets the same
//! answer again, and nobody else does: ids are chosen by senders and may be guessed or reused,
//! so a second sender who reuses an id with its own reply topic gets its own job run.
//!
//! Why: a broker that restarts without persistence loses what it held at that moment: a job it
//! acknowledged but had not delivered, or an answer on its way back. The only party that can
//! notice is the user, by the missing answer, and its remedy is to publish the job again with the
//! same id. The node must then neither run the job a second time nor stay silent (a job already
//! taken is otherwise dropped as a redelivery): it sends the answer it gave before.
//!
//! The node's MQTT loop tells the two cases apart by the MQTT DUP flag: a broker redelivering a
//! message sets it (the first answer went out, nothing to do), a user's new publish does not.
//! Jobs still running when asked again are not here yet: their one answer is still to come.

use isomesh_protos::JobResult;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Answers remembered; older ones are forgotten first. Results carry no image, so this is a few
/// MB at most.
const KEEP: usize = 4096;

/// Recent answers by job key; shared by the request tasks (which add) and the MQTT loop (which
/// looks up).
#[derive(Default)]
pub struct Answered {
    inner: Mutex<Recent>,
}

#[derive(Default)]
struct Recent {
    order: VecDeque<String>,
    by_id: HashMap<String, JobResult>,
}

impl Answered {
    /// Remembers the answer just sent for the job with `key`.
    pub fn insert(&self, key: &str, result: &JobResult) {
        let mut recent = match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if recent
            .by_id
            .insert(key.to_string(), result.clone())
            .is_none()
        {
            recent.order.push_back(key.to_string());
        }
        while recent.order.len() > KEEP {
            if let Some(old) = recent.order.pop_front() {
                recent.by_id.remove(&old);
            }
        }
    }

    /// The answer given for the job with `key`, if it is still remembered.
    pub fn get(&self, key: &str) -> Option<JobResult> {
        let recent = match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        recent.by_id.get(key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_answers() {
        let answered = Answered::default();
        for n in 0..KEEP + 10 {
            let job_id = format!("j{n}");
            answered.insert(
                &job_id,
                &JobResult {
                    job_id: job_id.clone(),
                    ..Default::default()
                },
            );
        }
        assert!(answered.get("j0").is_none());
        assert!(answered.get("j9").is_none());
        assert_eq!(answered.get("j10").map(|r| r.job_id), Some("j10".into()));
        assert!(answered.get(&format!("j{}", KEEP + 9)).is_some());
    }
}
