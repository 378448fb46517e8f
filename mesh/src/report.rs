//! Results as users see them: the `JobResult` a node builds for every job, and its JSON form
//! (the contract of DESIGN.md) for replies to raw images and for `isomesh classify --json`.

use crate::outcome::Outcome;
use isomesh_protos::{hop, Hop, Job, JobResult, Tier, Timing};
use serde_json::{json, Value};
use std::time::Duration;

/// Who is answering: copied into every result.
#[derive(Debug, Clone)]
pub struct Responder {
    pub node: String,
    pub tier: Tier,
    /// The node's CPU architecture (`x86_64`, `aarch64`), named in its hops.
    pub arch: String,
}

/// Builds the one answer to `job` from its outcome. `total` runs from acceptance to now.
pub fn job_result(
    responder: &Responder,
    job: &Job,
    outcome: &Outcome,
    total: Duration,
) -> JobResult {
    let mut path = job.path.clone();
    path.push(responder.node.clone());
    let mut result = JobResult {
        job_id: job.job_id.clone(),
        node: responder.node.clone(),
        tier: responder.tier as i32,
        path,
        correlation: job.correlation.clone(),
        relay_token: job.relay_token.clone(),
        ..Default::default()
    };
    match outcome {
        Ok(answer) => {
            result.module = Some(answer.module.clone());
            result.top = answer.top.clone();
            let total_ms = ms(total);
            result.timing = Some(Timing {
                queue_ms: ms(answer.queued),
                decode_ms: answer.decode_us as f64 / 1000.0,
                infer_ms: answer.infer_us as f64 / 1000.0,
                total_ms,
            });
            result.deadline_met = job.budget_ms == 0 || total_ms <= job.budget_ms as f64;
        }
        Err(failure) => {
            result.error = failure.message.clone();
            result.module = failure.module.as_deref().cloned();
        }
    }
    result
}

/// This node's part in a job: `held` is how long the job spent here before it ran to its end or
/// went up, `total` from acceptance to the answer, `budget_ms` what the job arrived with.
pub fn hop(
    responder: &Responder,
    action: hop::Action,
    held: Duration,
    total: Duration,
    budget_ms: u32,
) -> Hop {
    Hop {
        node: responder.node.clone(),
        tier: responder.tier as i32,
        action: action as i32,
        ms: ms(held),
        total_ms: ms(total),
        budget_ms,
        arch: responder.arch.clone(),
    }
}

/// Makes the answer that came back from the tier above this node's own: its hop goes first,
/// and the total time and the deadline verdict are measured against this node's clock and the
/// budget the job had here.
pub fn relayed(mut result: JobResult, this: Hop) -> JobResult {
    if result.error.is_empty() {
        if let Some(timing) = result.timing.as_mut() {
            timing.total_ms = this.total_ms;
        }
        result.deadline_met = this.budget_ms == 0 || this.total_ms <= this.budget_ms as f64;
    }
    result.hops.insert(0, this);
    result
}

/// An error answer for a request that never reached the scheduler.
pub fn rejection(responder: &Responder, job: &Job, message: String) -> JobResult {
    let mut path = job.path.clone();
    path.push(responder.node.clone());
    JobResult {
        job_id: job.job_id.clone(),
        node: responder.node.clone(),
        tier: responder.tier as i32,
        path,
        error: message,
        correlation: job.correlation.clone(),
        relay_token: job.relay_token.clone(),
        ..Default::default()
    }
}

/// The JSON form of a result, as in DESIGN.md; a failure is `{"job_id","node","error"}`.
pub fn to_json(result: &JobResult) -> Value {
    if !result.error.is_empty() {
        return json!({
            "job_id": result.job_id,
            "node": result.node,
            "error": result.error,
        });
    }
    let module = result.module.clone().unwrap_or_default();
    let timing = result.timing.unwrap_or_default();
    json!({
        "job_id": result.job_id,
        "node": result.node,
        "tier": Tier::try_from(result.tier).unwrap_or(Tier::Unspecified).name(),
        "module": {"name": module.name, "version": module.version, "sha256": module.sha256,
                   "code_sha256": module.code_sha256, "model_sha256": module.model_sha256},
        "top": result.top.iter().map(|c| json!({
            "index": c.index,
            "label": c.label,
            "prob": round(c.prob as f64, 4),
        })).collect::<Vec<_>>(),
        "timing_ms": {
            "queue": round(timing.queue_ms, 2),
            "decode": round(timing.decode_ms, 2),
            "infer": round(timing.infer_ms, 2),
            "total": round(timing.total_ms, 2),
        },
        "path": result.path,
        "deadline_met": result.deadline_met,
        "hops": result.hops.iter().map(hop_json).collect::<Vec<_>>(),
    })
}

fn hop_json(hop: &Hop) -> Value {
    let action = match hop::Action::try_from(hop.action) {
        Ok(hop::Action::Ran) => "ran",
        Ok(hop::Action::Forwarded) => "forwarded",
        Ok(hop::Action::Fallback) => "fallback",
        _ => "unknown",
    };
    json!({
        "node": hop.node,
        "tier": Tier::try_from(hop.tier).unwrap_or(Tier::Unspecified).name(),
        "action": action,
        "ms": round(hop.ms, 2),
        "total_ms": round(hop.total_ms, 2),
        "budget_ms": hop.budget_ms,
        "arch": hop.arch,
    })
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use isomesh_protos::ClassScore;

    #[test]
    fn failures_are_three_fields_and_successes_follow_the_contract() {
        let failed = JobResult {
            job_id: "j".into(),
            node: "d1".into(),
            error: "bad".into(),
            ..Default::default()
        };
        assert_eq!(
            to_json(&failed),
            json!({"job_id": "j", "node": "d1", "error": "bad"})
        );
        let ok = JobResult {
            job_id: "j".into(),
            node: "e1".into(),
            tier: Tier::Edge as i32,
            top: vec![ClassScore {
                index: 954,
                label: "banana".into(),
                prob: 0.95123,
            }],
            path: vec!["d1".into(), "e1".into()],
            deadline_met: true,
            ..Default::default()
        };
        let value = to_json(&ok);
        assert_eq!(value["tier"], "edge");
        assert_eq!(value["top"][0]["label"], "banana");
        assert_eq!(value["top"][0]["prob"], 0.9512);
        assert_eq!(value["path"], json!(["d1", "e1"]));
        for key in ["queue", "decode", "infer", "total"] {
            assert!(value["timing_ms"].get(key).is_some(), "timing_ms.{key}");
        }
    }
}
