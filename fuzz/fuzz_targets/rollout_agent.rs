//! The rollout agent driven by hostile but *signed* input: manifests signed with a key the agent
//! trusts (a fixed seed, so runs reproduce), with arbitrary counts, sizes, chunk digests,
//! versions, dates and `force`; chunks with arbitrary digests, indexes and bytes; ticks,
//! reconnects, swaps and failed installs in any order. A random key would stop every manifest
//! at the signature check; this one lets the fuzzer reach `check_manifest`, `Fetch::new`, the
//! history rules and the install hand-over. Every install the agent asks for is finished (the
//! inflate and digest checks) as the node would, and fed back.
#![no_main]

use isomesh_mesh::topics::Topics;
use isomesh_module::agent::{Action, AgentConfig, Event, RolloutAgent, Serving};
use isomesh_module::package::module_ref;
use isomesh_module::rejection::Rejection;
use isomesh_module::signing::{SecretKey, TrustedKeys};
use isomesh_protos::{ModuleChunk, ModuleManifest, PrecompiledArtifact, Tier};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const ENGINE: &str = "fuzz-engine";

fn key() -> &'static SecretKey {
    static KEY: OnceLock<SecretKey> = OnceLock::new();
    KEY.get_or_init(|| SecretKey::from_seed([7; 32]))
}

fn agent() -> RolloutAgent {
    let mut trusted = TrustedKeys::default();
    trusted.add(key().public());
    RolloutAgent::new(
        AgentConfig {
            node: "d1".into(),
            tier: Tier::Device,
            topics: Topics::new("isomesh"),
            trusted,
            engines: vec![ENGINE.into()],
            give_up_after: Duration::from_secs(30),
        },
        Vec::new(),
    )
}

/// A few digests to pick from, so chunks and manifests meet.
const DIGESTS: [&str; 3] = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "not-a-digest",
];
const NAMES: [&str; 3] = ["mobilenet_v2", "other", "../x"];
const VERSIONS: [&str; 6] = ["0.1.0", "0.2.0", "1.0.0-rc1", "1.0.0", "t1", ""];

/// Small numbers most of the time, any u64 now and then.
fn count(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => u64::from(u.int_in_range(0..=8u8)?),
        1 => u64::from(u.int_in_range(0..=5000u16)?),
        2 => u64::from(u.arbitrary::<u32>()?),
        _ => u.arbitrary::<u64>()?,
    })
}

fn digest_list(u: &mut Unstructured<'_>) -> Result<Vec<String>> {
    let n = u.int_in_range(0..=6u8)?;
    (0..n)
        .map(|_| Ok(u.choose(&DIGESTS)?.to_string()))
        .collect()
}

fn manifest(u: &mut Unstructured<'_>) -> Result<ModuleManifest> {
    let mut manifest = ModuleManifest {
        name: u.choose(&NAMES)?.to_string(),
        version: u.choose(&VERSIONS)?.to_string(),
        sha256: u.choose(&DIGESTS)?.to_string(),
        size: count(u)?,
        chunk_size: count(u)? as u32,
        chunk_count: count(u)? as u32,
        published_at_ms: u64::from(u.int_in_range(0..=20u8)?),
        force: u.arbitrary()?,
        encoding: if u.arbitrary()? { "deflate" } else { "" }.into(),
        stored_size: count(u)?,
        chunk_sha256: digest_list(u)?,
        ..Default::default()
    };
    if u.arbitrary()? {
        manifest.artifacts.push(PrecompiledArtifact {
            engine: ENGINE.into(),
            sha256: u.choose(&DIGESTS)?.to_string(),
            size: count(u)?,
            chunk_count: count(u)? as u32,
            stored_size: count(u)?,
            chunk_sha256: digest_list(u)?,
        });
    }
    // Usually signed with the trusted key; sometimes not, or signed then altered.
    match u.int_in_range(0..=5u8)? {
        0 => {}
        1 => {
            key().sign(&mut manifest);
            manifest.force = !manifest.force;
        }
        _ => key().sign(&mut manifest),
    }
    Ok(manifest)
}

fn chunk(u: &mut Unstructured<'_>, manifests: &[ModuleManifest]) -> Result<ModuleChunk> {
    let sha256 = match manifests.last() {
        Some(m) if u.arbitrary()? => m.sha256.clone(),
        _ => u.choose(&DIGESTS)?.to_string(),
    };
    let len = u.int_in_range(0..=64u8)?;
    Ok(ModuleChunk {
        sha256,
        index: count(u)? as u32,
        count: count(u)? as u32,
        data: u.bytes(usize::from(len))?.to_vec(),
    })
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let mut agent = agent();
    let mut now = Instant::now();
    let mut manifests: Vec<ModuleManifest> = Vec::new();
    let mut pending = Vec::new();
    while !u.is_empty() {
        let event_actions = match u.int_in_range(0..=7u8)? {
            0 | 1 => {
                let manifest = manifest(&mut u)?;
                let payload = manifest.encode_to_vec();
                let topic = format!("isomesh/modules/{}/manifest", manifest.name);
                manifests.push(manifest);
                agent.handle(
                    Event::Publish {
                        topic: &topic,
                        payload: &payload,
                    },
                    now,
                )
            }
            2 | 3 => {
                let chunk = chunk(&mut u, &manifests)?;
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
            4 => {
                now += Duration::from_millis(u64::from(u.arbitrary::<u16>()?) * 16);
                agent.handle(Event::Tick, now)
            }
            5 => agent.handle(Event::Connected, now),
            6 => match manifests.last() {
                Some(m) => agent.handle(
                    Event::Serving(Box::new(Serving {
                        module: module_ref(m),
                        manifest: Some(m.clone()),
                    })),
                    now,
                ),
                None => Vec::new(),
            },
            _ => match manifests.last() {
                Some(m) => agent.handle(
                    Event::InstallFailed {
                        module: module_ref(m),
                        reason: Rejection::Install("no thread".into()),
                    },
                    now,
                ),
                None => Vec::new(),
            },
        };
        pending.extend(event_actions);
        // Carry out installs as the node does: finish (inflate, digests) and report back.
        for action in std::mem::take(&mut pending) {
            if let Action::Install(fetch) = action {
                let module = module_ref(&fetch.manifest);
                let verified = fetch.chunks_verified();
                let event = match fetch.finish() {
                    Ok(_) => Event::Serving(Box::new(Serving {
                        module,
                        manifest: None,
                    })),
                    Err(e) => Event::InstallFailed {
                        module,
                        reason: if verified {
                            Rejection::Transfer(e)
                        } else {
                            Rejection::Garbled(e)
                        },
                    },
                };
                pending.extend(agent.handle(event, now));
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
