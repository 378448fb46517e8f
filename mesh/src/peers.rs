//! What a node knows of the rest of the mesh: every node's retained status.
//!
//! Nodes publish a retained `NodeStatus` (tier, online, jobs in the node, moving-average service
//! time, workers) at least every few seconds, and the broker publishes their Last Will
//! (`online: false`) when one vanishes, `kill -9` included. From these the offload policy learns
//! which tier above is alive and how busy its least busy node is. A status not refreshed for
//! [`Peers::stale_after`] counts as offline, in case a Last Will never came.

use crate::offload::{Load, Parent};
use isomesh_protos::{NodeStatus, Tier};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The last status heard from each node.
#[derive(Debug)]
pub struct Peers {
    nodes: HashMap<String, Heard>,
    stale_after: Duration,
}

#[derive(Debug)]
struct Heard {
    status: NodeStatus,
    at: Instant,
}

impl Peers {
    pub fn new(stale_after: Duration) -> Peers {
        Peers {
            nodes: HashMap::new(),
            stale_after,
        }
    }

    /// Records a status (retained or live). An empty payload is a cleared retained status.
    pub fn heard(&mut self, node: &str, status: Option<NodeStatus>) {
        match status {
            Some(status) => {
                self.nodes.insert(
                    node.to_string(),
                    Heard {
                        status,
                        at: Instant::now(),
                    },
                );
            }
            None => {
                self.nodes.remove(node);
            }
        }
    }

    /// How long a status stays believable without a refresh.
    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }

    /// The nearest tier above `tier` with a node online and serving a module, and the estimate
    /// of its least busy node. A node still loading its first module does not count: it takes
    /// none of its tier's shared jobs yet. `forwarded` jobs this node has sent up and not yet seen answered are spread over
    /// that tier's nodes: their statuses may not show them yet.
    pub fn parent(&self, tier: Tier, forwarded: usize) -> Option<Parent> {
        let mut above = tier.parent();
        while let Some(candidate) = above {
            let online: Vec<&NodeStatus> = self
                .nodes
                .values()
                .filter(|heard| heard.at.elapsed() < self.stale_after)
                .map(|heard| &heard.status)
                .filter(|status| {
                    status.online && status.module.is_some() && status.tier == candidate as i32
                })
                .collect();
            if !online.is_empty() {
                let share = forwarded.div_ceil(online.len());
                let estimate_ms = online
                    .iter()
                    .filter_map(|status| {
                        Load {
                            in_system: status.queue_len as usize + share,
                            workers: status.workers.max(1) as usize,
                            ewma_ms: status.ewma_ms,
                            // A status carries the average only.
                            deviation_ms: 0.0,
                        }
                        .estimate_ms()
                    })
                    .reduce(f64::min);
                return Some(Parent {
                    tier: candidate,
                    estimate_ms,
                });
            }
            above = candidate.parent();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(tier: Tier, online: bool, queue_len: u32, ewma_ms: f64) -> Option<NodeStatus> {
        Some(NodeStatus {
            tier: tier as i32,
            online,
            queue_len,
            ewma_ms,
            workers: 1,
            module: Some(Default::default()),
            ..Default::default()
        })
    }

    #[test]
    fn a_node_still_loading_its_first_module_is_no_parent() {
        let mut peers = Peers::new(Duration::from_secs(30));
        let starting = status(Tier::Edge, true, 0, 0.0).map(|s| NodeStatus { module: None, ..s });
        peers.heard("e1", starting);
        assert_eq!(peers.parent(Tier::Device, 0), None);
        peers.heard("e1", status(Tier::Edge, true, 0, 20.0));
        assert_eq!(
            peers.parent(Tier::Device, 0).map(|p| p.tier),
            Some(Tier::Edge)
        );
    }

    #[test]
    fn the_parent_is_the_nearest_tier_above_with_a_node_online() {
        let mut peers = Peers::new(Duration::from_secs(30));
        assert_eq!(peers.parent(Tier::Device, 0), None);
        peers.heard("c1", status(Tier::Cloud, true, 0, 20.0));
        peers.heard("e1", status(Tier::Edge, false, 0, 20.0));
        assert_eq!(
            peers.parent(Tier::Device, 0).map(|p| p.tier),
            Some(Tier::Cloud)
        );
        peers.heard("e1", status(Tier::Edge, true, 3, 20.0));
        peers.heard("e2", status(Tier::Edge, true, 1, 20.0));
        let parent = peers.parent(Tier::Device, 0);
        assert_eq!(parent.map(|p| p.tier), Some(Tier::Edge));
        // e2: one job in it, the new one second: 40 ms.
        assert_eq!(parent.and_then(|p| p.estimate_ms), Some(40.0));
        // Four jobs in flight to the edge tier, two per node: e2 then has 3 ahead.
        assert_eq!(
            peers.parent(Tier::Device, 4).and_then(|p| p.estimate_ms),
            Some(80.0)
        );
        assert_eq!(peers.parent(Tier::Cloud, 0), None);
        peers.heard("e1", None);
        peers.heard("e2", status(Tier::Edge, false, 0, 0.0));
        assert_eq!(
            peers.parent(Tier::Edge, 0).map(|p| p.tier),
            Some(Tier::Cloud)
        );
        assert_eq!(
            peers.parent(Tier::Device, 0).map(|p| p.tier),
            Some(Tier::Cloud)
        );
    }

    #[test]
    fn stale_statuses_count_as_offline() {
        let mut peers = Peers::new(Duration::ZERO);
        peers.heard("e1", status(Tier::Edge, true, 0, 20.0));
        assert_eq!(peers.parent(Tier::Device, 0), None);
    }
}
