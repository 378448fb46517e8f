//! The rollout agent driven through every bad rollout, with no broker, no disk and no clock.
use super::*;
use crate::package::{Package, PackageSpec};
use crate::signing::SecretKey;

const NODE: &str = "d1";

/// A signing key the agent trusts, and the agent.
fn agent() -> (SecretKey, RolloutAgent) {
    let key = SecretKey::generate().unwrap();
    let mut trusted = TrustedKeys::default();
    trusted.add(key.public());
    let agent = RolloutAgent::new(
        AgentConfig {
            node: NODE.into(),
            tier: Tier::Device,
            topics: Topics::new("isomesh"),
            trusted,
            engine: "engine-a".into(),
            give_up_after: Duration::from_secs(60),
        },
        Vec::new(),
    );
    (key, agent)
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
        key.sign(&mut package.manifest);
        package
    }
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
        Event::Serving(Serving {
            module: module_ref(&package.manifest),
            manifest: Some(package.manifest.clone()),
        }),
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
fn chunks_whose_bytes_are_not_the_signed_ones_fail_and_are_never_fetched_again() {
    let (key, mut agent) = agent();
    let now = Instant::now();
    let mut package = Rollout::of("0.2.0").package(&key, &module(3));
    package.chunks[2].data[10] ^= 0xff;
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
