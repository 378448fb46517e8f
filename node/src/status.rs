//! The node's retained status (`{prefix}/status/{node}`): who it is, what it serves, its load,
//! its sandbox's limits and where the latest rollout stands. Published every
//! `--status-interval-s`, at most once a second while jobs flow, at once when a rollout changes
//! phase, and as offline on shutdown (the Last Will says the same if the node dies).
//!
//! Other nodes read these statuses to steer offloading ([`isomesh_mesh::peers`]), and
//! `isomesh status` and `isomesh rollout --wait` to show the mesh.

use crate::scheduler::Load;
use crate::slot::{ModuleSlot, RolloutBoard};
use isomesh_mesh::report::Responder;
use isomesh_mesh::topics::Topics;
use isomesh_protos::{NodeStatus, SandboxLimits};
use prost::Message;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use std::sync::Arc;
use std::time::Instant;

/// Publishes this node's retained status.
pub struct StatusReporter {
    pub responder: Responder,
    pub topics: Topics,
    pub client: AsyncClient,
    /// The scheduler's load figures.
    pub load: Arc<Load>,
    pub slot: Arc<ModuleSlot>,
    /// Where the latest rollout stands; the event loop waits on its `changed`.
    pub board: Arc<RolloutBoard>,
    /// What modules may do here.
    pub limits: SandboxLimits,
    /// The target triple this node runs on, and the engine ids of the code it loads.
    pub target: String,
    pub engines: Vec<String>,
    pub budget_ms: u32,
    pub workers: usize,
    pub started: Instant,
    /// When the last status went out.
    pub published: std::cell::Cell<Instant>,
}

impl StatusReporter {
    pub fn last_published(&self) -> Instant {
        self.published.get()
    }

    /// Publishes the status now, from the event loop (never waits on the client's queue).
    pub fn publish(&self, online: bool) {
        self.published.set(Instant::now());
        let load = &self.load;
        let status = NodeStatus {
            node_id: self.responder.node.clone(),
            tier: self.responder.tier as i32,
            online,
            module: self.slot.current().map(|m| m.module_ref()),
            queue_len: load.in_system() as u32,
            ewma_ms: load.ewma_ms(),
            jobs_done: load.done(),
            jobs_failed: load.failed(),
            uptime_s: self.started.elapsed().as_secs(),
            budget_ms: self.budget_ms,
            workers: self.workers as u32,
            rollout: self.board.get(),
            sandbox: Some(self.limits.clone()),
            target: self.target.clone(),
            engines: self.engines.clone(),
            published_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let topic = self.topics.status(&self.responder.node);
        if let Err(e) =
            self.client
                .try_publish(topic, QoS::AtLeastOnce, true, status.encode_to_vec())
        {
            tracing::debug!(error = %e, "status not published");
        }
    }
}

/// A node's status, or `None` for a cleared (or unreadable) one.
pub fn read_status(node: &str, payload: &[u8]) -> Option<NodeStatus> {
    if payload.is_empty() {
        return None;
    }
    NodeStatus::decode(payload)
        .map_err(
            |e| tracing::warn!(%node, error = %e, "unreadable node status; ignoring that node"),
        )
        .ok()
}
