//! The rollout agent driven through every bad rollout, with no broker, no disk and no clock.
use super::*;
use crate::fetch::TransferError;
use crate::package::{Package, PackageSpec};
use crate::signing::SecretKey;

const NODE: &str = "d1";

/// A signing key the agent trusts, and the agent.
fn agent() -> (SecretKey, RolloutAgent) {
    let key = SecretKey::generate().unwrap();
    let agent = agent_trusting(&key);
    (key, agent)
}

/// An agent trusting `key`.
fn agent_trusting(key: &SecretKey) -> RolloutAgent {
    let mut trusted = TrustedKeys::default();
    trusted.add(key.public());
    RolloutAgent::new(
        AgentConfig {
            node: NODE.into(),
            tier: Tier::Device,
            topics: Topics::new("isomesh"),
            trusted,
            engines: vec!["engine-a".into()],
            give_up_after: Duration::from_secs(60),
        },
        Vec::new(),
    )
}

/// A Wasm-looking module of 1000 bytes whose content depends on `seed`.
fn module(seed: u8) -> Vec<u8> {
    let mut bytes = b"\0asm\x01\0\0\0".to_vec();
    bytes.extend((0..992u32).map(|i| (i as u8).wrapping_mul(seed)));
    bytes
}

struct Rollout {
    version: &'static str,
    tiers: Vec<Tier>,
    force: bool,
    artifact: Option<Vec<u8>>,
}

impl Rollout {
    fn of(version: &'static str) -> Rollout {
        Rollout {
            version,
            tiers: vec![],
            force: false,
            artifact: None,
        }
    }

    /// The package of `bytes` as this rollout, signed with `key`, in 300-byte chunks.
    fn package(&self, key: &SecretKey, bytes: &[u8]) -> Package {
        let spec = PackageSpec {
            name: "mobilenet_v2",
            version: self.version,
            chunk_size: 300,
            target_tiers: self.tiers.clone(),
            target_nodes: vec![],
            force: self.force,
            compress: false,
        };
        let artifacts: Vec<(String, Vec<u8>)> = self
            .artifact
            .iter()
            .map(|code| ("engine-a".to_string(), code.clone()))
            .collect();
        let mut package = Package::new(&spec, bytes, &artifacts);
        // A publisher's clock that moves on between two packages, whatever the real one says.
        package.manifest.published_at_ms = next_publish_time();
        key.sign(&mut package.manifest);
        package
    }
}

/// Publication times in the order the test makes packages.
fn next_publish_time() -> u64 {
    static CLOCK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1_000);
    CLOCK.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn manifest_event(
    agent: &mut RolloutAgent,
    manifest: &ModuleManifest,
    now: Instant,
) -> Vec<Action> {
    let payload = manifest.encode_to_vec();
    let topic = format!("isomesh/modules/{}/manifest", manifest.name);
    agent.handle(
        Event::Publish {
            topic: &topic,
            payload: &payload,
        },
        now,
    )
}

fn chunk_event(agent: &mut RolloutAgent, chunk: &ModuleChunk, now: Instant) -> Vec<Action> {
    let payload = chunk.encode_to_vec();
    let topic = format!("isomesh/modules/blobs/{}/{}", chunk.sha256, chunk.index);
    agent.handle(
        Event::Publish {
            topic: &topic,
            payload: &payload,
        },
        now,
    )
}

fn subscriptions(actions: &[Action]) -> Vec<&str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Subscribe(topic) => Some(topic.as_str()),
            _ => None,
        })
        .collect()
}

/// The code of the one rejection among `actions`.
fn rejection(actions: &[Action]) -> Option<&str> {
    actions.iter().find_map(|a| match a {
        Action::Report(state) if state.phase == Phase::Rejected as i32 => Some(state.code.as_str()),
        _ => None,
    })
}

fn take_install(actions: Vec<Action>) -> Option<Fetch> {
    actions.into_iter().find_map(|a| match a {
        Action::Install(fetch) => Some(*fetch),
        _ => None,
    })
}

/// Feeds every chunk of `package` (in `order`), returning the install it ends with.
fn deliver(
    agent: &mut RolloutAgent,
    package: &Package,
    order: &[usize],
    now: Instant,
) -> Option<Fetch> {
    let mut install = None;
    for &i in order {
        let actions = chunk_event(agent, &package.chunks[i], now);
        install = install.or(take_install(actions));
    }
    install
}

fn serving(agent: &mut RolloutAgent, package: &Package, now: Instant) {
    agent.handle(
        Event::Serving(Box::new(Serving {
            module: module_ref(&package.manifest),
            manifest: Some(package.manifest.clone()),
        })),
        now,
    );
}

#[test]
fn a_signed_rollout_is_fetched_in_any_order_with_duplicates_and_installed_once() {
    let (key, mut agent) = agent();
    let now = Instant::now();
    let package = Rollout::of("0.2.0").package(&key, &module(3));
    let actions = manifest_event(&mut agent, &package.manifest, now);
    assert_eq!(rejection(&actions), None);
    assert_eq!(
        subscriptions(&actions).len(),
        4,
        "1000 bytes in 300-byte chunks"
    );
    // Out of order, with a duplicate: installed when the last one is in, and only then.
    let fetch = deliver(&mut agent, &package, &[3, 1, 1, 0, 2], now).expect("install");
    let fetched = fetch.finish().unwrap();
    assert_eq!(fetched.module, module(3));
    // The same manifest again while installing: nothing to do.
    assert!(manifest_event(&mut agent, &package.manifest, now).is_empty());
    serving(&mut agent, &package, now);
    assert!(manifest_event(&mut agent, &package.manifest, now).is_empty());
}

#[test]
fn an_altered_manifest_is_refused_before_anything_is_fetched() {
    let (key, mut agent) = agent();
    let mut manifest = Rollout::of("0.2.0").package(&key, &module(3)).manifest;
    manifest.size += 1;
    let actions = manifest_event(&mut agent, &manifest, Instant::now());
    assert_eq!(rejection(&actions), Some("signature"));
    assert!(subscriptions(&actions).is_empty());
}

#[test]
fn a_manifest_signed_by_an_unknown_key_is_refused() {
    let (_, mut agent) = agent();
    let stranger = SecretKey::generate().unwrap();
    let manifest = Rollout::of("0.2.0").package(&stranger, &module(3)).manifest;
    let actions = manifest_event(&mut agent, &manifest, Instant::now());
    assert_eq!(rejection(&actions), Some("signature"));
    let Some(Action::Report(state)) = actions.first() else {
        panic!("{actions:?}")
    };
    assert!(state.reason.contains("does not trust"), "{}", state.reason);
}

#[test]
fn a_signed_but_malformed_manifest_is_refused() {
    let (key, mut agent) = agent();
    let mut package = Rollout::of("0.2.0").package(&key, &module(3));
    package.manifest.chunk_count = 1;
    key.sign(&mut package.manifest);
    let actions = manifest_event(&mut agent, &package.manifest, Instant::now());
    assert_eq!(rejection(&actions), Some("manifest"));
}

#[test]
fn a_chunk_that_fails_its_signed_digest_is_asked_for_again_and_the_module_installs() {
    let (key, mut agent) = agent();
    let start = Instant::now();
    let package = Rollout::of("0.2.0").package(&key, &module(3));
    let mut corrupt = package.chunks[2].clone();
    corrupt.data[10] ^= 0xff;
    manifest_event(&mut agent, &package.manifest, start);
    assert!(chunk_event(&mut agent, &corrupt, start).is_empty());
    assert!(deliver(&mut agent, &package, &[0, 1, 3], start).is_none());
    let asked = agent.handle(Event::Tick, start + crate::fetch::RETRY_AFTER);
    assert_eq!(
        subscriptions(&asked),
        vec![format!(
            "isomesh/modules/blobs/{}/2",
            package.manifest.sha256
        )]
    );
    let fetch = deliver(&mut agent, &package, &[2], start).expect("install");
    assert_eq!(fetch.finish().unwrap().module, module(3));
}

#[test]
fn signed_bytes_that_do_not_hash_to_the_manifest_fail_and_are_never_fetched_again() {
    let (key, mut agent) = agent();
    let now = Instant::now();
    // Every chunk matches its signed digest, but the signed whole digest names other bytes:
    // the signed bytes themselves are bad.
    let mut package = Rollout::of("0.2.0").package(&key, &module(3));
    package.manifest.sha256 = crate::digest::sha256_hex(b"other bytes");
    for chunk in &mut package.chunks {
        chunk.sha256 = package.manifest.sha256.clone();
    }
    key.sign(&mut package.manifest);
    manifest_event(&mut agent, &package.manifest, now);
    let fetch = deliver(&mut agent, &package, &[0, 1, 2, 3], now).expect("install");
    let module = module_ref(&fetch.manifest);
    let reason = fetch.finish().unwrap_err();
    assert!(matches!(reason, crate::fetch::TransferError::Digest { .. }));
    let actions = agent.handle(
        Event::InstallFailed {
            module,
            reason: reason.into(),
        },
        now,
    );
    assert_eq!(rejection(&actions), Some("transfer"));
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::MarkRejected { .. })));
    let again = manifest_event(&mut agent, &package.manifest, now);
    assert_eq!(rejection(&again), Some("rejected-before"));
    assert!(subscriptions(&again).is_empty());
}

/// A failed install of `package`'s fetch, for `reason`.
fn install_failed(
    agent: &mut RolloutAgent,
    fetch: &Fetch,
    reason: Rejection,
    now: Instant,
) -> Vec<Action> {
    agent.handle(
        Event::InstallFailed {
            module: module_ref(&fetch.manifest),
            reason,
        },
        now,
    )
}

fn marks(actions: &[Action]) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::MarkRejected { .. }))
}

#[test]
fn garbled_chunks_without_chunk_digests_are_never_a_rejection_for_good() {
    let (key, mut agent) = agent();
    let start = Instant::now();
    // A manifest from before chunk digests: a corrupt chunk only shows in the whole digest.
    let mut package = Rollout::of("0.2.0").package(&key, &module(3));
    package.manifest.chunk_sha256.clear();
    key.sign(&mut package.manifest);
    package.chunks[2].data[10] ^= 0xff;
    manifest_event(&mut agent, &package.manifest, start);
    let fetch = deliver(&mut agent, &package, &[0, 1, 2, 3], start).expect("install");
    assert!(!fetch.chunks_verified());
    let error = deliver_again(&package).finish().unwrap_err();
    let actions = install_failed(&mut agent, &fetch, Rejection::Garbled(error), start);
    assert_eq!(rejection(&actions), Some("garbled"));
    assert!(!marks(&actions));
    // Tried again once the wait is over, from the start.
    assert!(agent
        .handle(Event::Tick, start + RETRY_FIRST / 2)
        .is_empty());
    let again = agent.handle(Event::Tick, start + RETRY_FIRST);
    assert_eq!(subscriptions(&again).len(), 4, "{again:?}");
}

/// A fresh fetch of `package` with all its chunks in (for an error to hand the agent).
fn deliver_again(package: &Package) -> Fetch {
    let now = Instant::now();
    let mut fetch = Fetch::new(package.manifest.clone(), None, now);
    for chunk in &package.chunks {
        fetch.take(chunk.clone(), now);
    }
    fetch
}

#[test]
fn a_full_disk_or_no_thread_is_tried_again_later_never_marked() {
    for reason in [
        Rejection::Write {
            path: "/modules".into(),
            error: "No space left on device (os error 28)".into(),
        },
        Rejection::Install("Resource temporarily unavailable".into()),
    ] {
        let (key, mut agent) = agent();
        let start = Instant::now();
        let package = Rollout::of("0.2.0").package(&key, &module(3));
        manifest_event(&mut agent, &package.manifest, start);
        let fetch = deliver(&mut agent, &package, &[0, 1, 2, 3], start).expect("install");
        let actions = install_failed(&mut agent, &fetch, reason, start);
        assert!(!marks(&actions));
        let again = agent.handle(Event::Tick, start + RETRY_FIRST);
        assert_eq!(subscriptions(&again).len(), 4);
        // A second failure waits twice as long.
        let fetch = deliver(&mut agent, &package, &[0, 1, 2, 3], start).expect("install");
        install_failed(
            &mut agent,
            &fetch,
            Rejection::Install("again".into()),
            start + RETRY_FIRST,
        );
        assert!(agent
            .handle(Event::Tick, start + RETRY_FIRST * 2)
            .is_empty());
        let again = agent.handle(Event::Tick, start + RETRY_FIRST * 3);
        assert_eq!(subscriptions(&again).len(), 4);
    }
}

#[test]
fn a_stalled_fetch_is_tried_again_later() {
    let (key, mut agent) = agent();
    let start = Instant::now();
    let package = Rollout::of("0.2.0").package(&key, &module(3));
    manifest_event(&mut agent, &package.manifest, start);
    let late = start + Duration::from_secs(61);
    assert_eq!(rejection(&agent.handle(Event::Tick, late)), Some("stalled"));
    let again = agent.handle(Event::Tick, late + RETRY_FIRST);
    assert_eq!(subscriptions(&again).len(), 4);
}

#[test]
fn an_old_manifest_replayed_with_force_is_refused_as_a_replay() {
    let (key, mut agent) = agent();
    let now = Instant::now();
    let old_forced = Rollout {
        force: true,
        ..Rollout::of("0.1.0")
    }
    .package(&key, &module(4));
    let current = Rollout::of("0.2.0").package(&key, &module(3));
    serving(&mut agent, &current, now);
    let actions = manifest_event(&mut agent, &old_forced.manifest, now);
    assert_eq!(rejection(&actions), Some("replay"));
    assert!(subscriptions(&actions).is_empty());
}

#[test]
fn another_names_older_manifest_is_a_replay() {
    let (key, mut agent) = agent();
    let now = Instant::now();
    let mut other = Package::new(
        &PackageSpec {
            name: "resnet",
            version: "9.0.0",
            chunk_size: 300,
            target_tiers: vec![],
            target_nodes: vec![],
            force: false,
            compress: false,
        },
        &module(5),
        &[],
    );
    other.manifest.published_at_ms = next_publish_time();
    key.sign(&mut other.manifest);
    let current = Rollout::of("0.2.0").package(&key, &module(3));
    serving(&mut agent, &current, now);
    let actions = manifest_event(&mut agent, &other.manifest, now);
    assert_eq!(rejection(&actions), Some("replay"));
}

#[test]
fn the_history_is_saved_on_serving_and_restored_after_a_restart() {
    let (key, mut agent) = agent();
    let now = Instant::now();
    let old = Rollout {
        force: true,
        ..Rollout::of("0.1.0")
    }
    .package(&key, &module(4));
    let current = Rollout::of("0.2.0").package(&key, &module(3));
    let actions = agent.handle(
        Event::Serving(Box::new(Serving {
            module: module_ref(&current.manifest),
            manifest: Some(current.manifest.clone()),
        })),
        now,
    );
    let saved = actions
        .into_iter()
        .find_map(|a| match a {
            Action::SaveHistory(history) => Some(history),
            _ => None,
        })
        .expect("the history is saved");
    // Restarted with its module file gone: without the history it would take the old
    // manifest; with it, the old manifest is still a replay.
    let mut restarted = agent_trusting(&key);
    assert!(restarted.restore_history(saved).is_empty());
    assert!(restarted.history_restored());
    let actions = manifest_event(&mut restarted, &old.manifest, now);
    assert_eq!(rejection(&actions), Some("replay"));
    let mut forgetful = agent_trusting(&key);
    let actions = manifest_event(&mut forgetful, &old.manifest, now);
    assert_eq!(
        rejection(&actions),
        None,
        "an empty node takes any signed manifest"
    );
}

#[test]
fn a_forged_serving_manifest_never_moves_the_history() {
    let (key, mut agent) = agent();
    let now = Instant::now();
    let mut forged = Rollout::of("0.2.0").package(&key, &module(3));
    forged.manifest.published_at_ms = u64::MAX;
    let actions = agent.handle(
        Event::Serving(Box::new(Serving {
            module: module_ref(&forged.manifest),
            manifest: Some(forged.manifest.clone()),
        })),
        now,
    );
    assert!(actions.is_empty());
    assert!(agent.history().last().is_none());
}

#[test]
fn a_version_that_is_not_semver_is_refused_when_it_must_be_ordered() {
    let (key, mut agent) = agent();
    let now = Instant::now();
    serving(
        &mut agent,
        &Rollout::of("0.2.0").package(&key, &module(3)),
        now,
    );
    let latest = Rollout::of("latest").package(&key, &module(4));
    assert_eq!(
        rejection(&manifest_event(&mut agent, &latest.manifest, now)),
        Some("version")
    );
}

#[test]
fn a_module_that_is_not_wasm_fails_its_check() {
    let (key, mut agent) = agent();
    let now = Instant::now();
    let package = Rollout::of("0.2.0").package(&key, &[7u8; 1000]);
    manifest_event(&mut agent, &package.manifest, now);
    let fetch = deliver(&mut agent, &package, &[0, 1, 2, 3], now).expect("install");
    assert_eq!(
        fetch.finish().unwrap_err(),
        crate::fetch::TransferError::NotWasm
    );
}

#[test]
fn missing_chunks_are_asked_for_again_then_the_fetch_is_abandoned_and_named() {
    let (key, mut agent) = agent();
    let start = Instant::now();
    let package = Rollout::of("0.2.0").package(&key, &module(3));
    manifest_event(&mut agent, &package.manifest, start);
    // A truncated chunk 1 stays missing, as do 2 and 3.
    let mut short = package.chunks[1].clone();
    short.data.truncate(10);
    assert!(deliver(&mut agent, &package, &[0], start).is_none());
    assert!(chunk_event(&mut agent, &short, start).is_empty());
    let asked = agent.handle(Event::Tick, start + crate::fetch::RETRY_AFTER);
    assert_eq!(subscriptions(&asked).len(), 3);
    assert_eq!(rejection(&asked), None);
    let late = start + Duration::from_secs(61);
    let actions = agent.handle(Event::Tick, late);
    assert_eq!(rejection(&actions), Some("stalled"));
    let Some(Action::Report(state)) = actions.iter().find(|a| matches!(a, Action::Report(_)))
    else {
        panic!("{actions:?}")
    };
    assert!(
        state.reason.contains("chunks 1, 2, 3") && state.reason.contains("10 bytes"),
        "{}",
        state.reason
    );
    let unsubscribed = actions
        .iter()
        .filter(|a| matches!(a, Action::Unsubscribe(_)))
        .count();
    assert_eq!(unsubscribed, 3);
    assert!(agent.fetching().is_none());
}

#[test]
fn a_manifest_for_another_tier_is_ignored() {
    let (key, mut agent) = agent();
    let rollout = Rollout {
        tiers: vec![Tier::Edge],
        ..Rollout::of("0.2.0")
    };
    let manifest = rollout.package(&key, &module(3)).manifest;
    assert!(manifest_event(&mut agent, &manifest, Instant::now()).is_empty());
}

#[test]
fn a_downgrade_or_a_second_build_of_the_served_version_is_refused_unless_forced() {
    let (key, mut agent) = agent();
    let now = Instant::now();
    serving(
        &mut agent,
        &Rollout::of("0.2.0").package(&key, &module(3)),
        now,
    );
    let older = Rollout::of("0.1.0").package(&key, &module(4));
    assert_eq!(
        rejection(&manifest_event(&mut agent, &older.manifest, now)),
        Some("downgrade")
    );
    let rebuilt = Rollout::of("0.2.0").package(&key, &module(5));
    assert_eq!(
        rejection(&manifest_event(&mut agent, &rebuilt.manifest, now)),
        Some("same-version")
    );
    let forced = Rollout {
        force: true,
        ..Rollout::of("0.1.0")
    }
    .package(&key, &module(4));
    let actions = manifest_event(&mut agent, &forced.manifest, now);
    assert_eq!(rejection(&actions), None);
    assert_eq!(subscriptions(&actions).len(), 4);
    let newer = Rollout::of("0.10.0").package(&key, &module(6));
    let actions = manifest_event(&mut agent, &newer.manifest, now);
    assert_eq!(rejection(&actions), None);
    // The newer manifest replaced the forced fetch: its chunks were let go.
    assert!(actions.iter().any(|a| matches!(a, Action::Unsubscribe(_))));
}

#[test]
fn the_precompiled_artifact_is_fetched_first_and_dropped_when_it_never_comes() {
    let (key, mut agent) = agent();
    let start = Instant::now();
    let rollout = Rollout {
        artifact: Some(vec![9u8; 500]),
        ..Rollout::of("0.2.0")
    };
    let package = rollout.package(&key, &module(3));
    let actions = manifest_event(&mut agent, &package.manifest, start);
    let artifact_sha = &package.manifest.artifacts[0].sha256;
    assert!(
        subscriptions(&actions)[0].contains(artifact_sha.as_str()),
        "the artifact's chunks are asked for first"
    );
    // The module's chunks (the first four) arrive, the artifact's never do.
    assert!(deliver(&mut agent, &package, &[0, 1, 2, 3], start).is_none());
    let fetch = take_install(agent.handle(Event::Tick, start + Duration::from_secs(6)))
        .expect("installed without the artifact");
    assert!(fetch.finish().unwrap().artifact.is_none());
}

#[test]
fn a_node_reseeds_its_module_only_when_the_broker_has_no_manifest_for_it() {
    let (key, mut agent) = agent();
    let start = Instant::now();
    let package = Rollout::of("0.2.0").package(&key, &module(3));
    serving(&mut agent, &package, start);
    agent.handle(Event::Connected, start);
    assert!(agent
        .handle(Event::Tick, start + Duration::from_secs(1))
        .is_empty());
    let actions = agent.handle(Event::Tick, start + Duration::from_secs(6));
    assert!(matches!(actions.as_slice(), [Action::Reseed(r)] if r.manifest.version == "0.2.0"));

    // After the next connect the broker hands over a manifest of that name (even one for
    // other nodes): nothing to re-seed.
    agent.handle(Event::Connected, start);
    let for_edges = Rollout {
        tiers: vec![Tier::Edge],
        ..Rollout::of("0.3.0")
    }
    .package(&key, &module(4));
    manifest_event(&mut agent, &for_edges.manifest, start);
    assert!(agent
        .handle(Event::Tick, start + Duration::from_secs(6))
        .is_empty());
}

/// The status of peer `node`: a device, online unless said, serving `serves` of
/// mobilenet_v2 and having last heard of `heard`, if given.
fn peer_status(node: &str, serves: &str, heard: Option<&str>) -> NodeStatus {
    let module = |version: &str| ModuleRef {
        name: "mobilenet_v2".into(),
        version: version.into(),
        sha256: format!("{version}-digest"),
        ..Default::default()
    };
    NodeStatus {
        node_id: node.into(),
        tier: Tier::Device as i32,
        online: true,
        module: Some(module(serves)),
        rollout: heard.map(|v| RolloutState {
            module: Some(module(v)),
            phase: Phase::Fetching as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn peer_event(agent: &mut RolloutAgent, status: &NodeStatus, now: Instant) -> Vec<Action> {
    agent.handle(
        Event::PeerStatus {
            node: &status.node_id,
            status,
        },
        now,
    )
}

fn reseeds(actions: &[Action]) -> Vec<&str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reseed(r) => Some(r.manifest.version.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_peer_is_behind_only_if_it_should_serve_the_module_and_never_heard_of_it() {
    let key = SecretKey::generate().unwrap();
    let manifest = Rollout::of("0.2.0").package(&key, &module(3)).manifest;
    let behind = |status: &NodeStatus| peer_is_behind(&manifest, &status.node_id, status);

    assert!(behind(&peer_status("d3", "0.1.0", None)));
    assert!(behind(&peer_status("d3", "0.1.0", Some("0.1.0"))));
    // Heard of this one (fetching, refused, ...) or of a newer one: publishing again won't help.
    assert!(!behind(&peer_status("d3", "0.1.0", Some("0.2.0"))));
    assert!(!behind(&peer_status("d3", "0.1.0", Some("0.3.0"))));
    // Serving it, or something newer, or nothing yet (it subscribes once it serves).
    assert!(!behind(&peer_status("d3", "0.2.0", None)));
    assert!(!behind(&peer_status("d3", "0.3.0", None)));
    assert!(!behind(&NodeStatus {
        module: None,
        ..peer_status("d3", "0.1.0", None)
    }));
    // Offline, another module, a version that is not semver.
    assert!(!behind(&NodeStatus {
        online: false,
        ..peer_status("d3", "0.1.0", None)
    }));
    let mut other_module = peer_status("d3", "0.1.0", None);
    if let Some(m) = other_module.module.as_mut() {
        m.name = "other".into();
    }
    assert!(!behind(&other_module));
    assert!(!behind(&peer_status("d3", "latest", None)));

    // Not a target: the module is for edges, or for other nodes.
    let for_edges = Rollout {
        tiers: vec![Tier::Edge],
        ..Rollout::of("0.2.0")
    }
    .package(&key, &module(3))
    .manifest;
    let d3 = peer_status("d3", "0.1.0", None);
    assert!(!peer_is_behind(&for_edges, "d3", &d3));
    let for_d1 = ModuleManifest {
        target_nodes: vec!["d1".into()],
        ..manifest.clone()
    };
    assert!(!peer_is_behind(&for_d1, "d3", &d3));
    assert!(peer_is_behind(&for_d1, "d1", &d3));
}

#[test]
fn a_node_publishes_its_module_again_for_a_peer_still_behind_after_a_while_and_less_often_after() {
    let (key, mut agent) = agent();
    let start = Instant::now();
    let package = Rollout::of("0.2.0").package(&key, &module(3));
    serving(&mut agent, &package, start);
    let d3 = peer_status("d3", "0.1.0", None);

    // Its own status never counts.
    peer_event(&mut agent, &peer_status(NODE, "0.1.0", None), start);
    assert!(reseeds(&agent.handle(Event::Tick, start + Duration::from_secs(20))).is_empty());

    // A peer serving the same module after this node by id ("d2" > "d1") does not delay it.
    let d2 = NodeStatus {
        module: Some(module_ref(&package.manifest)),
        ..peer_status("d2", "", None)
    };
    peer_event(&mut agent, &d2, start);
    peer_event(&mut agent, &d3, start);
    let at = start + PEER_PATIENCE;
    assert!(reseeds(&agent.handle(Event::Tick, at - Duration::from_millis(1))).is_empty());
    // Once, not on every tick after.
    assert_eq!(reseeds(&agent.handle(Event::Tick, at)), ["0.2.0"]);
    assert!(reseeds(&agent.handle(Event::Tick, at + Duration::from_secs(1))).is_empty());

    // Still behind: again after PEER_RESEED_AGAIN, then after twice that.
    peer_event(&mut agent, &d3, at + Duration::from_secs(5));
    assert!(reseeds(&agent.handle(Event::Tick, at + PEER_RESEED_AGAIN / 2)).is_empty());
    let again = at + PEER_RESEED_AGAIN;
    assert_eq!(reseeds(&agent.handle(Event::Tick, again)), ["0.2.0"]);
    assert!(reseeds(&agent.handle(Event::Tick, again + PEER_RESEED_AGAIN)).is_empty());
    let third = again + 2 * PEER_RESEED_AGAIN;
    assert_eq!(reseeds(&agent.handle(Event::Tick, third)), ["0.2.0"]);

    // It heard of it at last (fetching): nothing more, ever, for it.
    peer_event(
        &mut agent,
        &peer_status("d3", "0.1.0", Some("0.2.0")),
        third,
    );
    assert!(reseeds(&agent.handle(Event::Tick, third + RETRY_MAX * 2)).is_empty());
}

#[test]
fn a_peer_that_catches_up_or_a_module_published_again_by_another_calls_the_reseed_off() {
    let (key, mut agent) = agent();
    let start = Instant::now();
    let package = Rollout::of("0.2.0").package(&key, &module(3));
    serving(&mut agent, &package, start);

    // d3 behind, then serving it before the patience ran out.
    peer_event(&mut agent, &peer_status("d3", "0.1.0", None), start);
    peer_event(
        &mut agent,
        &peer_status("d3", "0.2.0", None),
        start + Duration::from_secs(3),
    );
    assert!(reseeds(&agent.handle(Event::Tick, start + Duration::from_secs(30))).is_empty());

    // d2 behind, and "d0" serves the same module: d0's turn comes first, this node's one turn
    // later. d0 publishes it again: d2 gets its time to take it.
    let t = start + Duration::from_secs(40);
    let d0 = NodeStatus {
        module: Some(module_ref(&package.manifest)),
        ..peer_status("d0", "", None)
    };
    peer_event(&mut agent, &d0, t);
    peer_event(&mut agent, &peer_status("d2", "0.1.0", None), t);
    assert!(reseeds(&agent.handle(Event::Tick, t + PEER_PATIENCE)).is_empty());
    let republished = t + PEER_PATIENCE + Duration::from_secs(5);
    manifest_event(&mut agent, &package.manifest, republished);
    let turn = t + PEER_PATIENCE + PEER_TURN;
    assert!(reseeds(&agent.handle(Event::Tick, turn)).is_empty());
    // It did not take it: this node publishes it itself, its turn after the republication.
    let later = republished + PEER_PATIENCE + PEER_TURN;
    assert!(reseeds(&agent.handle(Event::Tick, later - Duration::from_millis(1))).is_empty());
    assert_eq!(reseeds(&agent.handle(Event::Tick, later)), ["0.2.0"]);

    // A newer module served here: the peers are measured against it from their next status on.
    let newer = Rollout::of("0.3.0").package(&key, &module(4));
    serving(&mut agent, &newer, later);
    assert!(reseeds(&agent.handle(Event::Tick, later + RETRY_MAX)).is_empty());
}

#[test]
fn a_node_takes_the_artifact_of_its_own_engine_else_the_portable_one_of_its_target() {
    let key = SecretKey::generate().unwrap();
    let start = Instant::now();
    let spec = PackageSpec {
        name: "mobilenet_v2",
        version: "0.2.0",
        chunk_size: 300,
        target_tiers: vec![],
        target_nodes: vec![],
        force: false,
        compress: false,
    };
    // What a publisher ships: code for its own CPU, and baseline code for each --target.
    let code = |engine: &str, byte: u8| (engine.to_string(), vec![byte; 400]);
    // The artifacts a manifest carries, and the engine whose artifact the node should fetch.
    type Case<'a> = (&'a [(String, Vec<u8>)], Option<&'a str>);
    let cases: [Case; 3] = [
        (
            &[
                code("x86-publisher", 1),
                code("aarch64-portable", 2),
                code("own", 3),
            ],
            Some("own"),
        ),
        (
            &[code("x86-publisher", 1), code("aarch64-portable", 2)],
            Some("aarch64-portable"),
        ),
        (&[code("x86-publisher", 1)], None),
    ];
    for (artifacts, wanted) in cases {
        let mut trusted = TrustedKeys::default();
        trusted.add(key.public());
        let mut agent = RolloutAgent::new(
            AgentConfig {
                node: NODE.into(),
                tier: Tier::Device,
                topics: Topics::new("isomesh"),
                trusted,
                engines: vec!["own".into(), "aarch64-portable".into()],
                give_up_after: Duration::from_secs(60),
            },
            Vec::new(),
        );
        let mut package = Package::new(&spec, &module(3), artifacts);
        package.manifest.published_at_ms = next_publish_time();
        key.sign(&mut package.manifest);
        let actions = manifest_event(&mut agent, &package.manifest, start);
        let first = subscriptions(&actions)[0].to_string();
        let expected = match wanted {
            Some(engine) => {
                let artifact = package
                    .manifest
                    .artifacts
                    .iter()
                    .find(|a| a.engine == engine);
                artifact.expect("in the manifest").sha256.clone()
            }
            None => package.manifest.sha256.clone(),
        };
        assert!(
            first.contains(&expected),
            "wanted {wanted:?} first, subscribed {first}"
        );
    }
}

/// A model rollout of `model` on the code `code` (published with it), signed with `key`.
fn model_package(key: &SecretKey, version: &str, model: &[u8], code: &[u8]) -> Package {
    let spec = PackageSpec {
        name: "mobilenet_v2",
        version,
        chunk_size: 300,
        target_tiers: vec![],
        target_nodes: vec![],
        force: false,
        compress: false,
    };
    let code = crate::package::Code::New {
        module: code,
        version: "0.1.0",
        artifacts: &[("engine-a".to_string(), vec![7u8; 400])],
    };
    let mut package = Package::model(&spec, model, code);
    package.manifest.published_at_ms = next_publish_time();
    key.sign(&mut package.manifest);
    package
}

/// An encoded model of about 700 bytes.
fn model_blob(seed: u8) -> Vec<u8> {
    isomesh_protos::ModelFile {
        model: Some(isomesh_protos::GuestModel {
            onnx: (0..600u32).map(|i| (i as u8).wrapping_mul(seed)).collect(),
            labels: vec!["a".into(), "b".into()],
            input: None,
            sha256: "00".repeat(32),
        }),
        code_sha256: "11".repeat(32),
    }
    .encode_to_vec()
}

#[test]
fn a_model_rollout_on_the_code_served_fetches_the_model_alone() {
    let (key, mut agent) = agent();
    let now = Instant::now();
    let code = Rollout::of("0.1.0").package(&key, &module(3));
    serving(&mut agent, &code, now);
    let package = model_package(&key, "0.3.0", &model_blob(5), &module(3));
    let model_sha = package.manifest.sha256.clone();
    let actions = manifest_event(&mut agent, &package.manifest, now);
    assert_eq!(rejection(&actions), None);
    let wanted = subscriptions(&actions);
    assert!(!wanted.is_empty());
    assert!(
        wanted.iter().all(|t| t.contains(model_sha.as_str())),
        "only the model's chunks are asked for: {wanted:?}"
    );
    let model_chunks = package.manifest.chunk_count as usize;
    let fetch = deliver(
        &mut agent,
        &package,
        &(0..model_chunks).collect::<Vec<_>>(),
        now,
    )
    .expect("installed with the model's chunks alone");
    let fetched = fetch.finish().unwrap();
    assert_eq!(fetched.module, model_blob(5));
    assert!(fetched.code.is_none() && fetched.artifact.is_none());
}

#[test]
fn a_model_rollout_on_other_code_fetches_the_code_and_its_machine_code_too() {
    let (key, mut agent) = agent();
    let now = Instant::now();
    let code = Rollout::of("0.1.0").package(&key, &module(3));
    serving(&mut agent, &code, now);
    let package = model_package(&key, "0.3.0", &model_blob(5), &module(4));
    let actions = manifest_event(&mut agent, &package.manifest, now);
    let wanted = subscriptions(&actions);
    let code_sha = &package.manifest.code.as_ref().unwrap().sha256;
    let artifact_sha = &package.manifest.artifacts[0].sha256;
    assert!(wanted[0].contains(artifact_sha.as_str()), "{wanted:?}");
    assert!(
        wanted.iter().any(|t| t.contains(code_sha.as_str())),
        "{wanted:?}"
    );
    let all: Vec<usize> = (0..package.chunks.len()).collect();
    let fetched = deliver(&mut agent, &package, &all, now)
        .expect("installed")
        .finish()
        .unwrap();
    assert_eq!(fetched.module, model_blob(5));
    assert_eq!(fetched.code, Some(module(4)));
    assert_eq!(
        fetched.artifact.map(|(_, bytes)| bytes),
        Some(vec![7u8; 400])
    );

    // A model rollout whose model is no model: refused as the signed bytes' fault.
    let bad = model_package(&key, "0.3.1", b"\xff\xff\xff not a model", &module(4));
    let all: Vec<usize> = (0..bad.chunks.len()).collect();
    let mut agent = agent_trusting(&key);
    manifest_event(&mut agent, &bad.manifest, now);
    let error = deliver(&mut agent, &bad, &all, now)
        .expect("installed")
        .finish()
        .unwrap_err();
    assert!(matches!(error, TransferError::NotModel(_)), "{error}");
}
