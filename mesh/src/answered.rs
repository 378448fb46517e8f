//! The answers a node gave lately, kept by job id so that a user who asks again gets the same
//! answer again.
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

/// Recent answers by job id; shared by the request tasks (which add) and the MQTT loop (which
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
    /// Remembers the answer just sent for `result.job_id`.
    pub fn insert(&self, result: &JobResult) {
        let mut recent = match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if recent
            .by_id
            .insert(result.job_id.clone(), result.clone())
            .is_none()
        {
            recent.order.push_back(result.job_id.clone());
        }
        while recent.order.len() > KEEP {
            if let Some(old) = recent.order.pop_front() {
                recent.by_id.remove(&old);
            }
        }
    }

    /// The answer given for `job_id`, if it is still remembered.
    pub fn get(&self, job_id: &str) -> Option<JobResult> {
        let recent = match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        recent.by_id.get(job_id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_answers() {
        let answered = Answered::default();
        for n in 0..KEEP + 10 {
            answered.insert(&JobResult {
                job_id: format!("j{n}"),
                ..Default::default()
            });
        }
        assert!(answered.get("j0").is_none());
        assert!(answered.get("j9").is_none());
        assert_eq!(answered.get("j10").map(|r| r.job_id), Some("j10".into()));
        assert!(answered.get(&format!("j{}", KEEP + 9)).is_some());
    }
}
