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
//! [`Policy::Budget`], sends the job up when that would not finish within its planned share of
//! the budget ([`Situation::plan_share`], `--plan-share`, half by default) and the tier above
//! looks faster by the same estimate from its retained status. Where the job goes is
//! [`Decision::Forward`]; whether it comes back in time is the node's business
//! ([`crate::relay`]), not the policy's.
//!
//! Why plan with a share, not the whole budget: a job accepted into a queue is committed to it,
//! but the estimate it was accepted on is not. Nodes that share cores with other work (several
//! nodes on one box, noisy neighbours) slow down exactly when the mesh is busy, since the work
//! they send up runs beside them. A node that fills its queue up to the whole budget leaves every
//! queued job late at the first such slowdown; one that plans to half of it stays on time through
//! a slowdown of 2x, and keeps its worker just as busy (a queue of two or three keeps a steady
//! stream flowing). Measured on one two-core machine with every node on the same cores (issue
//! 23, `docs/evaluation.md`), 20 runs of a steady stream using 90-96% of the CPU: planning to
//! the whole budget kept 18.6 to 95.8% of jobs in budget (5 runs below 90%), planning to half of
//! it 98.3 to 100%.
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
    /// Forward when this node would not finish within its planned share of the budget and the
    /// tier above would not do worse.
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
    /// The share of the budget this node plans to finish the job within (0.1 to 1).
    pub plan_share: f64,
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
    /// The job has no budget, or this node finishes it within its planned share of it (or
    /// nothing better is known).
    WithinBudget,
    /// This node would finish past its planned share of the budget, but the tier above would
    /// do no better.
    ParentNoFaster,
    /// This node would finish past its planned share of the budget.
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
    /// Every reason, in the order of [`Reason::index`].
    pub const ALL: [Reason; 9] = [
        Reason::Policy,
        Reason::NoParent,
        Reason::HopLimit,
        Reason::WithinBudget,
        Reason::ParentNoFaster,
        Reason::OverBudget,
        Reason::AlwaysUp,
        Reason::CannotServe,
        Reason::ForwardLimit,
    ];

    /// The reason's place in [`Reason::ALL`] (for a counter per reason).
    pub fn index(self) -> usize {
        self as usize
    }

    /// A name for metrics labels and logs that read by machine.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Policy => "policy",
            Reason::NoParent => "no_parent",
            Reason::HopLimit => "hop_limit",
            Reason::WithinBudget => "within_budget",
            Reason::ParentNoFaster => "parent_no_faster",
            Reason::OverBudget => "over_budget",
            Reason::AlwaysUp => "always_up",
            Reason::CannotServe => "cannot_serve",
            Reason::ForwardLimit => "forward_limit",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Reason::Policy => "policy is local-only",
            Reason::NoParent => "no tier above is online",
            Reason::HopLimit => "hop limit reached",
            Reason::WithinBudget => "within its planned share of the budget here",
            Reason::ParentNoFaster => {
                "past its planned share of the budget here, but the tier above is no faster"
            }
            Reason::OverBudget => "past its planned share of the budget here",
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
            let planned = situation.budget_ms as f64 * situation.plan_share.clamp(0.1, 1.0);
            if situation.budget_ms == 0 || local <= planned {
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
            plan_share: 1.0,
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
    fn every_reason_has_its_place_and_label() {
        for (n, reason) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(reason.index(), n);
            assert!(!reason.label().is_empty() && !reason.describe().is_empty());
        }
    }

    #[test]
    fn budget_plans_to_finish_within_its_share_of_the_budget() {
        // 5 jobs ahead at 40 ms: done in 240 ms, within a 400 ms budget...
        let mut s = situation(5, 400);
        assert_eq!(
            decide(Policy::Budget, &s),
            Decision::Run(Reason::WithinBudget)
        );
        // ... but not within half of it: the edge (40 ms) is sooner.
        s.plan_share = 0.5;
        assert_eq!(
            decide(Policy::Budget, &s),
            Decision::Forward(Tier::Edge, Reason::OverBudget)
        );
        // Past its share, a job still stays where it is least late.
        s.parent = Some(Parent {
            tier: Tier::Edge,
            estimate_ms: Some(300.0),
        });
        assert_eq!(
            decide(Policy::Budget, &s),
            Decision::Run(Reason::ParentNoFaster)
        );
        // An idle node plans 40 ms of its 200.
        let mut idle = situation(0, 400);
        idle.plan_share = 0.5;
        assert_eq!(
            decide(Policy::Budget, &idle),
            Decision::Run(Reason::WithinBudget)
        );
        // A share out of range (a library caller's) counts as the nearest one allowed.
        idle.plan_share = 0.0;
        assert_eq!(
            decide(Policy::Budget, &idle),
            Decision::Run(Reason::WithinBudget)
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
