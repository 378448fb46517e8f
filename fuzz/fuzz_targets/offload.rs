//! Offload decisions from hostile statuses: retained `NodeStatus` messages of the tiers above
//! (anyone allowed to publish statuses can forge them: NaN or infinite service times, zero
//! workers, huge queues) go through `Peers`, and the policy decides for arbitrary local loads
//! and budgets. Nothing may panic (divisions by zero workers, overflows), a job never goes up
//! past its hop limit or with no tier above, `local-only` never forwards a job it can serve, a
//! forward goes to the tier `Peers` named, and that tier is above this node's.
#![no_main]

use isomesh_mesh::offload::{decide, Decision, Load, Policy, Situation};
use isomesh_mesh::peers::Peers;
use isomesh_protos::{NodeStatus, Tier};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

fn hostile_f64(u: &mut Unstructured<'_>) -> Result<f64> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => f64::NAN,
        1 => f64::INFINITY,
        2 => f64::NEG_INFINITY,
        3 => -0.0,
        4 => f64::from(u.arbitrary::<u16>()?),
        _ => u.arbitrary()?,
    })
}

fn tier(u: &mut Unstructured<'_>) -> Result<Tier> {
    Ok(*u.choose(&[Tier::Device, Tier::Edge, Tier::Cloud])?)
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let mut peers = Peers::new(Duration::from_secs(3600));
    for n in 0..u.int_in_range(0..=6u8)? {
        let status = NodeStatus {
            node_id: format!("n{n}"),
            tier: if u.arbitrary()? {
                tier(&mut u)? as i32
            } else {
                u.arbitrary()?
            },
            online: u.arbitrary()?,
            // A node still loading its first module (no module) is never a parent.
            module: u.arbitrary::<bool>()?.then(Default::default),
            queue_len: u.arbitrary()?,
            ewma_ms: hostile_f64(&mut u)?,
            workers: if u.arbitrary()? { 0 } else { u.arbitrary()? },
            ..Default::default()
        };
        let forget = u.ratio(1, 8)?;
        peers.heard(&format!("n{n}"), (!forget).then_some(status));
    }
    let here = tier(&mut u)?;
    let forwarded = usize::from(u.arbitrary::<u16>()?);
    let parent = peers.parent(here, forwarded);
    if let Some(parent) = &parent {
        assert!(
            std::iter::successors(here.parent(), |t| t.parent()).any(|t| t == parent.tier),
            "{:?} is not above {here:?}",
            parent.tier
        );
        assert!(!parent.estimate_ms.is_some_and(|e| e < 0.0), "{parent:?}");
    }
    let situation = Situation {
        budget_ms: u.arbitrary()?,
        plan_share: hostile_f64(&mut u)?,
        hops: u.int_in_range(0..=5)?,
        max_hops: u.int_in_range(0..=5)?,
        local: Load {
            in_system: u.arbitrary::<u32>()? as usize,
            workers: u.int_in_range(0..=64u8)?.into(),
            ewma_ms: hostile_f64(&mut u)?,
            deviation_ms: hostile_f64(&mut u)?,
        },
        parent,
        cannot_serve: u.arbitrary()?,
    };
    let _ = situation.local.estimate_ms();
    for policy in [Policy::Budget, Policy::LocalOnly, Policy::AlwaysUp] {
        let decision = decide(policy, &situation);
        if let Decision::Forward(to, _) = decision {
            let parent = situation.parent.expect("forwarded with no tier above");
            assert_eq!(to, parent.tier);
            assert!(situation.hops < situation.max_hops, "past the hop limit");
            assert!(
                policy != Policy::LocalOnly || situation.cannot_serve,
                "local-only forwarded a job it can serve"
            );
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
