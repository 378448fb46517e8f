//! The offload policy: for each job, run it here or publish it one tier up.
//!
//! A job carries a relative budget in ms, decremented at every hop, so no two clocks need to
//! agree. A node estimates when it would finish the job itself,
//!
//! ```text
//! local = ceil((jobs in the node + 1) / workers) x (average service time + its deviation)
//! ```
//!
//! (service time includes decoding: the guest decodes; the deviation is the moving average of
//! how far a job strays from the average, as TCP tracks round-trip variation: a deadline is
//! missed by the slow jobs, so a node whose jobs vary, such as one on a throttled CPU, plans with
//! a margin and one whose jobs do not keeps nearly all of them), and under the default policy,
//! [`Policy::Budget`], sends the job up when that would miss the budget and the tier above
//! looks faster by the same estimate from its retained status. Where the job goes is
//! [`Decision::Forward`]; whether it comes back in time is the node's business
//! ([`crate::relay`]), not the policy's.
//!
//! Every policy runs the job here when going up is impossible: this is the top tier, no tier
//! above has a node online, or the job has made [`Situation::max_hops`] hops already. The one
//! exception to "here is fine" is a job this node cannot serve (pinned to a module it lacks, or
//! no module installed yet): it goes up whatever the policy says, since here it can only fail.
//!
//! The alternatives exist to be compared (`isomesh bench offload`): [`Policy::LocalOnly`] never
//! forwards, [`Policy::AlwaysUp`] forwards whatever the budget.

use isomesh_protos::Tier;

/// How a node chooses between running a job and forwarding it (`--offload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Forward when this node would miss the budget and the tier above would not do worse.
    Budget,
    /// Never forward (but pinned jobs this node cannot serve).
    LocalOnly,
    /// Forward every job while a tier above is online.
    AlwaysUp,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Budget => "budget",
            Policy::LocalOnly => "local-only",
            Policy::AlwaysUp => "always-up",
        }
    }
}

/// Estimated time for a node to finish one more job, from its load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// Jobs waiting or running there.
    pub in_system: usize,
    pub workers: usize,
    /// Moving-average service time per job, ms; 0 = not known yet.
    pub ewma_ms: f64,
    /// Moving-average deviation of the service time from `ewma_ms`, ms.
    pub deviation_ms: f64,
}

impl Load {
    /// Estimated completion of a job that arrives now, ms; `None` while the service time is not
    /// known.
    pub fn estimate_ms(&self) -> Option<f64> {
        if self.ewma_ms <= 0.0 {
            return None;
        }
        let workers = self.workers.max(1);
        let rounds = (self.in_system + 1).div_ceil(workers);
        Some(rounds as f64 * (self.ewma_ms + self.deviation_ms.max(0.0)))
    }
}

/// The tier a job would be forwarded to, and how busy its least busy node is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Parent {
    pub tier: Tier,
    /// The least busy online node's estimate, ms; `None` when no node of the tier has reported
    /// a service time yet.
    pub estimate_ms: Option<f64>,
}

/// Everything the policy looks at for one job.
#[derive(Debug, Clone, Copy)]
pub struct Situation {
    /// Remaining budget, ms; 0 = the job has no deadline.
    pub budget_ms: u32,
    pub hops: u32,
    pub max_hops: u32,
    /// This node's load.
    pub local: Load,
    /// The nearest tier above with a node online, if any.
    pub parent: Option<Parent>,
    /// This node serves no module the job may run on (none at all, or not the one it is pinned
    /// to).
    pub cannot_serve: bool,
}

/// What to do with one job, and why (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    Run(Reason),
    Forward(Tier, Reason),
}

/// Why a job was run here or sent up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The policy is `local-only`.
    Policy,
    /// No tier above has a node online (or this is the cloud).
    NoParent,
    /// The job has made its last allowed hop.
    HopLimit,
    /// The job has no budget, or this node meets it (or nothing better is known).
    WithinBudget,
    /// This node would miss the budget, but the tier above would do no better.
    ParentNoFaster,
    /// This node would miss the budget.
    OverBudget,
    /// The policy is `always-up`.
    AlwaysUp,
    /// This node serves no module the job may run on.
    CannotServe,
    /// The job would go up, but as many forwarded jobs as `--max-queue` already await their
    /// answers here (the tier above is slow or gone): each holds its image until answered.
    ForwardLimit,
}

impl Reason {
    pub fn describe(self) -> &'static str {
        match self {
            Reason::Policy => "policy is local-only",
            Reason::NoParent => "no tier above is online",
            Reason::HopLimit => "hop limit reached",
            Reason::WithinBudget => "within budget here",
            Reason::ParentNoFaster => "would miss the budget, but the tier above is no faster",
            Reason::OverBudget => "would miss the budget here",
            Reason::AlwaysUp => "policy is always-up",
            Reason::CannotServe => "this node serves no module the job may run on",
            Reason::ForwardLimit => "too many forwarded jobs await their answers (--max-queue)",
        }
    }
}

/// Decides where one job runs.
pub fn decide(policy: Policy, situation: &Situation) -> Decision {
    let parent = match situation.parent {
        None => return Decision::Run(Reason::NoParent),
        Some(_) if situation.hops >= situation.max_hops => return Decision::Run(Reason::HopLimit),
        Some(parent) => parent,
    };
    if situation.cannot_serve {
        return Decision::Forward(parent.tier, Reason::CannotServe);
    }
    match policy {
        Policy::LocalOnly => Decision::Run(Reason::Policy),
        Policy::AlwaysUp => Decision::Forward(parent.tier, Reason::AlwaysUp),
        Policy::Budget => {
            let Some(local) = situation.local.estimate_ms() else {
                return Decision::Run(Reason::WithinBudget);
            };
            if situation.budget_ms == 0 || local <= situation.budget_ms as f64 {
                return Decision::Run(Reason::WithinBudget);
            }
            match parent.estimate_ms {
                Some(up) if up >= local => Decision::Run(Reason::ParentNoFaster),
                _ => Decision::Forward(parent.tier, Reason::OverBudget),
            }
        }
    }
}

/// What is left of a budget after `spent` at this node; a job with a budget keeps one (1 ms at
/// least), so it is still judged against a deadline above. A budget of 0 (none) stays 0.
pub fn remaining_budget(budget_ms: u32, spent: std::time::Duration) -> u32 {
    if budget_ms == 0 {
        return 0;
    }
    let spent = u32::try_from(spent.as_millis()).unwrap_or(u32::MAX);
    budget_ms.saturating_sub(spent).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_shrinks_with_time_spent_but_never_to_none() {
        use std::time::Duration;
        assert_eq!(remaining_budget(500, Duration::from_millis(120)), 380);
        assert_eq!(remaining_budget(500, Duration::from_secs(9)), 1);
        assert_eq!(remaining_budget(0, Duration::from_millis(5)), 0);
    }

    fn situation(in_system: usize, budget_ms: u32) -> Situation {
        Situation {
            budget_ms,
            hops: 0,
            max_hops: 3,
            local: Load {
                in_system,
                workers: 1,
                ewma_ms: 40.0,
                deviation_ms: 0.0,
            },
            parent: Some(Parent {
                tier: Tier::Edge,
                estimate_ms: Some(40.0),
            }),
            cannot_serve: false,
        }
    }

    #[test]
    fn estimates_count_rounds_of_workers() {
        let load = |in_system, workers| Load {
            in_system,
            workers,
            ewma_ms: 10.0,
            deviation_ms: 0.0,
        };
        assert_eq!(load(0, 1).estimate_ms(), Some(10.0));
        assert_eq!(load(3, 1).estimate_ms(), Some(40.0));
        assert_eq!(load(3, 2).estimate_ms(), Some(20.0));
        assert_eq!(load(4, 2).estimate_ms(), Some(30.0));
        let unknown = Load {
            ewma_ms: 0.0,
            ..load(9, 1)
        };
        assert_eq!(unknown.estimate_ms(), None);
        // Each round may run a deviation past the average.
        let varying = Load {
            deviation_ms: 5.0,
            ..load(3, 2)
        };
        assert_eq!(varying.estimate_ms(), Some(30.0));
    }

    #[test]
    fn budget_runs_here_while_the_estimate_fits() {
        // 4 jobs ahead of it at 40 ms: done in 200 ms.
        let s = situation(4, 200);
        assert_eq!(
            decide(Policy::Budget, &s),
            Decision::Run(Reason::WithinBudget)
        );
        assert_eq!(
            decide(Policy::Budget, &situation(5, 200)),
            Decision::Forward(Tier::Edge, Reason::OverBudget)
        );
        // The same queue on a node whose jobs vary by 10 ms misses that budget.
        let mut varying = situation(4, 200);
        varying.local.deviation_ms = 10.0;
        assert_eq!(
            decide(Policy::Budget, &varying),
            Decision::Forward(Tier::Edge, Reason::OverBudget)
        );
    }

    #[test]
    fn budget_keeps_jobs_without_deadline_or_service_time_here() {
        assert_eq!(
            decide(Policy::Budget, &situation(50, 0)),
            Decision::Run(Reason::WithinBudget)
        );
        let mut s = situation(50, 100);
        s.local.ewma_ms = 0.0;
        assert_eq!(
            decide(Policy::Budget, &s),
            Decision::Run(Reason::WithinBudget)
        );
    }

    #[test]
    fn budget_does_not_forward_to_a_parent_that_is_no_faster() {
        let mut s = situation(5, 100);
        s.parent = Some(Parent {
            tier: Tier::Edge,
            estimate_ms: Some(500.0),
        });
        assert_eq!(
            decide(Policy::Budget, &s),
            Decision::Run(Reason::ParentNoFaster)
        );
        // A parent that has not run a job yet is given the benefit of the doubt.
        s.parent = Some(Parent {
            tier: Tier::Cloud,
            estimate_ms: None,
        });
        assert_eq!(
            decide(Policy::Budget, &s),
            Decision::Forward(Tier::Cloud, Reason::OverBudget)
        );
    }

    #[test]
    fn every_policy_runs_here_without_a_parent_or_past_the_hop_limit() {
        for policy in [Policy::Budget, Policy::LocalOnly, Policy::AlwaysUp] {
            let mut s = situation(100, 10);
            s.parent = None;
            assert_eq!(decide(policy, &s), Decision::Run(Reason::NoParent));
            let mut s = situation(100, 10);
            s.hops = 3;
            s.cannot_serve = true;
            assert_eq!(decide(policy, &s), Decision::Run(Reason::HopLimit));
        }
    }

    #[test]
    fn local_only_and_always_up_ignore_the_budget() {
        assert_eq!(
            decide(Policy::LocalOnly, &situation(100, 10)),
            Decision::Run(Reason::Policy)
        );
        assert_eq!(
            decide(Policy::AlwaysUp, &situation(0, 0)),
            Decision::Forward(Tier::Edge, Reason::AlwaysUp)
        );
    }

    #[test]
    fn pinned_jobs_go_up_under_every_policy() {
        for policy in [Policy::Budget, Policy::LocalOnly, Policy::AlwaysUp] {
            let mut s = situation(0, 0);
            s.cannot_serve = true;
            assert_eq!(
                decide(policy, &s),
                Decision::Forward(Tier::Edge, Reason::CannotServe)
            );
        }
    }
}
