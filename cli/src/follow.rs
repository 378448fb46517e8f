//! What `isomesh rollout --wait` knows of the nodes while it waits, and when it is done: a state
//! machine fed the nodes' statuses in the order they arrive, with no I/O, tested below.
//!
//! The nodes it waits for are the targeted nodes it has seen online (their retained statuses
//! arrive first) and every node named with `--node`. Each is done when it serves the module or
//! says it rejected it; when the time runs out, the rest are reported with the last step they
//! were seen at.
//!
//! A node seen online that goes offline half-way (its Last Will: a lost connection, a restart) is
//! still waited for. It comes back to the same retained manifest and finishes the rollout, and
//! if it is not back in time the report says it went offline. Dropping it from the wait instead
//! ended a rollout whose one node lost its connection while fetching with "no online node is
//! targeted by this rollout" and exit 1, though the node went on to serve the module (seen in CI).

use crate::progress::progress;
use crate::status::describe_rollout;
use isomesh_protos::rollout_state::Phase;
use isomesh_protos::{ModuleManifest, NodeStatus, RolloutState, Tier};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How a rollout went on one node: serving it, this long after the rollout started, or why not.
pub type Outcome = Result<Duration, String>;

/// The nodes' statuses and outcomes for the rollout of one manifest.
pub struct Follow<'a> {
    manifest: &'a ModuleManifest,
    /// Nodes named with `--node`: waited for whether or not they were seen.
    named: Vec<String>,
    /// Each node's latest status.
    nodes: BTreeMap<String, NodeStatus>,
    /// Targeted nodes seen online since the wait began.
    expected: BTreeSet<String>,
    /// Each node's last step on this rollout (a Last Will carries none, so it is kept apart).
    steps: BTreeMap<String, RolloutState>,
    /// When each waited-for node that is offline now went offline.
    offline_since: BTreeMap<String, Duration>,
    outcome: BTreeMap<String, Outcome>,
}

impl<'a> Follow<'a> {
    pub fn new(manifest: &'a ModuleManifest, named: &[String]) -> Follow<'a> {
        Follow {
            manifest,
            named: named.to_vec(),
            nodes: BTreeMap::new(),
            expected: BTreeSet::new(),
            steps: BTreeMap::new(),
            offline_since: BTreeMap::new(),
            outcome: BTreeMap::new(),
        }
    }

    /// Whether the rollout is meant for the node of `status`.
    fn targeted(&self, status: &NodeStatus) -> bool {
        let tier = Tier::try_from(status.tier).unwrap_or(Tier::Unspecified);
        isomesh_module::package::is_target(self.manifest, tier, &status.node_id)
    }

    /// Takes a status heard `after` the rollout started; returns the line to print, if the
    /// node's progress moved on or it went offline while waited for.
    pub fn heard(&mut self, status: NodeStatus, after: Duration) -> Option<String> {
        let id = status.node_id.clone();
        let sha256 = &self.manifest.sha256;
        let watched = self.targeted(&status) || self.named.contains(&id);
        if status.online && self.targeted(&status) {
            self.expected.insert(id.clone());
        }
        if status.module.as_ref().is_some_and(|m| &m.sha256 == sha256) {
            self.outcome.entry(id.clone()).or_insert(Ok(after));
        } else if let Some(state) = status
            .rollout
            .as_ref()
            .filter(|r| r.module.as_ref().is_some_and(|m| &m.sha256 == sha256))
        {
            if state.phase == Phase::Rejected as i32 {
                self.outcome
                    .entry(id.clone())
                    .or_insert(Err(format!("rejected: {}", state.reason)));
            }
            self.steps.insert(id.clone(), state.clone());
        }
        let mut line = None;
        if watched {
            line = progress(self.nodes.get(&id), &status, sha256);
            let was_online = self.nodes.get(&id).is_some_and(|s| s.online);
            if status.online {
                self.offline_since.remove(&id);
            } else if was_online && self.is_waiting_for(&id) {
                self.offline_since.insert(id.clone(), after);
                line = Some(format!(
                    "{id:<12} offline (its broker connection ended); waiting for it to come back"
                ));
            }
        }
        self.nodes.insert(id, status);
        line
    }

    fn is_waiting_for(&self, id: &String) -> bool {
        (self.expected.contains(id) || self.named.contains(id)) && !self.outcome.contains_key(id)
    }

    /// The nodes still to hear from: targeted nodes seen online, and named nodes, without an
    /// outcome yet.
    pub fn waiting(&self) -> Vec<String> {
        let mut ids: BTreeSet<&String> = self.expected.iter().collect();
        ids.extend(self.named.iter());
        ids.into_iter()
            .filter(|id| !self.outcome.contains_key(*id))
            .cloned()
            .collect()
    }

    /// Gives every node still waited for its outcome: `timeout_s` ran out.
    pub fn time_out(&mut self, timeout_s: u64) {
        for id in self.waiting() {
            let last = self
                .steps
                .get(&id)
                .map(describe_rollout)
                .unwrap_or_else(|| "no status".into());
            let reason = match self.offline_since.get(&id) {
                Some(since) => format!(
                    "offline since {:.1} s after the rollout started, not back within {timeout_s} s; last: {last}",
                    since.as_secs_f64()
                ),
                None => format!("timed out after {timeout_s} s; last: {last}"),
            };
            self.outcome.insert(id, Err(reason));
        }
    }

    /// Each node's outcome, by node id.
    pub fn outcome(&self) -> &BTreeMap<String, Outcome> {
        &self.outcome
    }

    /// The tier a node last said it is of, for the report.
    pub fn tier_name(&self, id: &str) -> &'static str {
        self.nodes
            .get(id)
            .map(|s| Tier::try_from(s.tier).unwrap_or(Tier::Unspecified).name())
            .unwrap_or("?")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isomesh_protos::ModuleRef;

    const NEW: &str = "aa11";

    fn manifest() -> ModuleManifest {
        ModuleManifest {
            name: "mobilenet_v2".into(),
            version: "0.2.0".into(),
            sha256: NEW.into(),
            ..Default::default()
        }
    }

    fn module(version: &str, sha256: &str) -> ModuleRef {
        ModuleRef {
            name: "mobilenet_v2".into(),
            version: version.into(),
            sha256: sha256.into(),
            ..Default::default()
        }
    }

    fn online(id: &str) -> NodeStatus {
        NodeStatus {
            node_id: id.into(),
            tier: Tier::Edge as i32,
            online: true,
            module: Some(module("0.1.0", "old")),
            ..Default::default()
        }
    }

    fn fetching(id: &str, done: u32) -> NodeStatus {
        NodeStatus {
            rollout: Some(RolloutState {
                module: Some(module("0.2.0", NEW)),
                phase: Phase::Fetching as i32,
                chunks_done: done,
                chunk_count: 100,
                ..Default::default()
            }),
            ..online(id)
        }
    }

    fn serving(id: &str) -> NodeStatus {
        NodeStatus {
            module: Some(module("0.2.0", NEW)),
            ..online(id)
        }
    }

    /// What the broker publishes when a node's connection ends without a DISCONNECT.
    fn last_will(id: &str) -> NodeStatus {
        NodeStatus {
            node_id: id.into(),
            tier: Tier::Edge as i32,
            online: false,
            ..Default::default()
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_node_that_drops_offline_while_fetching_is_waited_for_until_it_serves() {
        let manifest = manifest();
        let mut follow = Follow::new(&manifest, &[]);
        follow.heard(online("e1"), S);
        follow.heard(fetching("e1", 10), S);
        let line = follow.heard(last_will("e1"), 2 * S);
        assert_eq!(
            line.as_deref(),
            Some("e1           offline (its broker connection ended); waiting for it to come back")
        );
        assert_eq!(follow.waiting(), ["e1"]);
        follow.heard(fetching("e1", 60), 3 * S);
        follow.heard(serving("e1"), 4 * S);
        assert!(follow.waiting().is_empty());
        assert_eq!(follow.outcome()["e1"], Ok(4 * S));
    }

    #[test]
    fn a_node_still_offline_at_the_timeout_is_reported_with_its_last_step() {
        let manifest = manifest();
        let mut follow = Follow::new(&manifest, &[]);
        follow.heard(fetching("e1", 30), S);
        follow.heard(last_will("e1"), 2 * S);
        follow.time_out(300);
        assert_eq!(
            follow.outcome()["e1"],
            Err("offline since 2.0 s after the rollout started, not back within 300 s; last: fetching mobilenet_v2@0.2.0 (30/100)".into())
        );
    }

    #[test]
    fn nodes_offline_from_the_start_or_not_targeted_are_not_waited_for() {
        let mut manifest = manifest();
        manifest.target_tiers = vec![Tier::Edge as i32];
        let mut follow = Follow::new(&manifest, &[]);
        follow.heard(last_will("e9"), S);
        follow.heard(
            NodeStatus {
                tier: Tier::Device as i32,
                ..online("d1")
            },
            S,
        );
        assert!(follow.waiting().is_empty());
        follow.heard(online("e9"), 2 * S);
        assert_eq!(follow.waiting(), ["e9"]);
    }

    #[test]
    fn a_rejection_ends_the_wait_for_that_node_and_a_named_node_is_waited_for_unseen() {
        let manifest = manifest();
        let mut follow = Follow::new(&manifest, &["c1".to_string()]);
        let mut rejected = fetching("e1", 0);
        if let Some(state) = rejected.rollout.as_mut() {
            state.phase = Phase::Rejected as i32;
            state.reason = "bad signature".into();
        }
        follow.heard(rejected, S);
        assert_eq!(follow.waiting(), ["c1"]);
        follow.time_out(5);
        assert_eq!(
            follow.outcome()["e1"],
            Err("rejected: bad signature".into())
        );
        assert_eq!(
            follow.outcome()["c1"],
            Err("timed out after 5 s; last: no status".into())
        );
    }
}
