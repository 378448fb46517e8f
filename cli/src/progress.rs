//! What `isomesh rollout --wait` prints while it waits: a line per node each time its progress
//! on the rollout moves on, as `kubectl rollout status` does, so the operator watches the nodes
//! fetch, compile and swap instead of half a minute of silence before the final table.
//!
//! The nodes already say all of it in their retained statuses (`NodeStatus.rollout`: the phase
//! and, while fetching, chunks done of chunk count); [`progress`] compares a node's status with
//! its previous one and words the difference. It does no I/O, so it is tested below on statuses
//! made by hand. Fetching is reported at each quarter of the chunks, not at every chunk: a 30 MB
//! module is ~130 chunks and statuses come up to once a second.

use crate::status::describe_rollout;
use isomesh_protos::rollout_state::Phase;
use isomesh_protos::NodeStatus;

/// Where a node stands on the rollout of one module: its phase, and the quarter of the chunks
/// it has (0-4) while fetching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stage {
    phase: i32,
    quarter: u32,
}

/// The stage `status` shows for the module `sha256`; `None` when the node has not started on
/// it (another module, or no rollout state).
fn stage(status: &NodeStatus, sha256: &str) -> Option<Stage> {
    if status.module.as_ref().is_some_and(|m| m.sha256 == sha256) {
        return Some(Stage {
            phase: Phase::Serving as i32,
            quarter: 4,
        });
    }
    let state = status
        .rollout
        .as_ref()
        .filter(|r| r.module.as_ref().is_some_and(|m| m.sha256 == sha256))?;
    // Chunk counts matter while fetching only: a node may report them, or not, once loading.
    let quarter = match state.chunk_count {
        count if count > 0 && state.phase == Phase::Fetching as i32 => {
            state.chunks_done.min(count) * 4 / count
        }
        _ => 0,
    };
    Some(Stage {
        phase: state.phase,
        quarter,
    })
}

/// The line to print for `now`, the newest status of a node, given the one before it (`None`
/// for the first seen): `None` when its progress on `sha256` did not move on.
pub fn progress(before: Option<&NodeStatus>, now: &NodeStatus, sha256: &str) -> Option<String> {
    let stage_now = stage(now, sha256)?;
    if before.and_then(|b| stage(b, sha256)) == Some(stage_now) {
        return None;
    }
    let what = match (&now.module, &now.rollout) {
        (Some(module), _) if stage_now.phase == Phase::Serving as i32 => {
            format!("serving {}", isomesh_module::package::label(module))
        }
        (_, Some(state)) => describe_rollout(state),
        (_, None) => return None,
    };
    Some(format!("{:<12} {what}", now.node_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use isomesh_protos::{ModuleRef, RolloutState};

    const NEW: &str = "aa11";

    fn module(version: &str, sha256: &str) -> ModuleRef {
        ModuleRef {
            name: "mobilenet_v2".into(),
            version: version.into(),
            sha256: sha256.into(),
            ..Default::default()
        }
    }

    fn fetching(done: u32, count: u32) -> NodeStatus {
        NodeStatus {
            node_id: "d1".into(),
            module: Some(module("0.1.0", "old")),
            rollout: Some(RolloutState {
                module: Some(module("0.2.0", NEW)),
                phase: Phase::Fetching as i32,
                chunks_done: done,
                chunk_count: count,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn in_phase(phase: Phase, reason: &str) -> NodeStatus {
        let mut status = fetching(0, 0);
        if let Some(state) = status.rollout.as_mut() {
            state.phase = phase as i32;
            state.reason = reason.into();
        }
        status
    }

    #[test]
    fn a_node_is_followed_from_fetching_to_serving_a_line_per_step() {
        let serving = NodeStatus {
            module: Some(module("0.2.0", NEW)),
            ..fetching(0, 0)
        };
        let steps = [
            fetching(1, 100),
            fetching(10, 100),
            fetching(30, 100),
            fetching(99, 100),
            fetching(100, 100),
            in_phase(Phase::Loading, ""),
            // Still loading, now with the chunk counts in the status: not a new step.
            NodeStatus {
                rollout: fetching(100, 100).rollout.map(|r| RolloutState {
                    phase: Phase::Loading as i32,
                    ..r
                }),
                ..fetching(0, 0)
            },
            serving.clone(),
            serving,
        ];
        let mut before = None;
        let mut said = Vec::new();
        for now in &steps {
            said.extend(progress(before, now, NEW));
            before = Some(now);
        }
        assert_eq!(
            said,
            [
                "d1           fetching mobilenet_v2@0.2.0 (1/100)",
                "d1           fetching mobilenet_v2@0.2.0 (30/100)",
                "d1           fetching mobilenet_v2@0.2.0 (99/100)",
                "d1           fetching mobilenet_v2@0.2.0 (100/100)",
                "d1           loading mobilenet_v2@0.2.0",
                "d1           serving mobilenet_v2@0.2.0",
            ]
        );
    }

    #[test]
    fn a_refusal_is_said_with_its_reason_once() {
        let rejected = in_phase(Phase::Rejected, "bad signature");
        let first = progress(Some(&fetching(3, 10)), &rejected, NEW);
        assert_eq!(
            first.as_deref(),
            Some("d1           rejected mobilenet_v2@0.2.0: bad signature")
        );
        assert_eq!(progress(Some(&rejected), &rejected, NEW), None);
    }

    #[test]
    fn other_modules_and_odd_counts_say_nothing_or_stay_in_range() {
        // A status about another rollout is not this one's progress.
        assert_eq!(progress(None, &fetching(5, 10), "bb22"), None);
        // More chunks done than counted (a confused node) is the last quarter, not a panic.
        assert!(progress(None, &fetching(50, 10), NEW).is_some());
    }
}
