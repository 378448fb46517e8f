//! Recognising redelivered jobs: the last few thousand jobs a node took, by key (reply topic
//! and job id, see [`Request::key`](crate::request::Request::key)).
//!
//! A broker hands a QoS 1 message again when it did not see its acknowledgement (the node
//! restarted, the connection dropped); a node must answer each job once, so it drops a job
//! whose key it has taken already. Bounded: the oldest keys are forgotten first.

use std::collections::{HashSet, VecDeque};

/// Job ids remembered by default.
pub const RECENT_JOB_IDS: usize = 4096;

/// The last `capacity` job ids taken.
#[derive(Debug)]
pub struct RecentIds {
    capacity: usize,
    order: VecDeque<String>,
    seen: HashSet<String>,
}

impl Default for RecentIds {
    fn default() -> Self {
        RecentIds::with_capacity(RECENT_JOB_IDS)
    }
}

impl RecentIds {
    pub fn with_capacity(capacity: usize) -> RecentIds {
        RecentIds {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            seen: HashSet::new(),
        }
    }

    /// `false` if `id` was already taken.
    pub fn insert(&mut self, id: &str) -> bool {
        if !self.seen.insert(id.to_string()) {
            return false;
        }
        self.order.push_back(id.to_string());
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_id_is_refused_until_it_is_forgotten() {
        let mut recent = RecentIds::with_capacity(2);
        assert!(recent.insert("a"));
        assert!(!recent.insert("a"));
        assert!(recent.insert("b"));
        assert!(recent.insert("c")); // "a" is forgotten now
        assert!(recent.insert("a"));
        assert!(!recent.insert("c"));
    }
}
