//! The node's side of a rollout: from a signed manifest on the broker to a module file on disk.
//!
//! The [`RolloutAgent`] lives in the node's MQTT loop and never blocks it: for every manifest and
//! chunk that arrives it returns [`Action`]s (subscribe to chunks, write the finished module) for
//! the loop to carry out. What it checks, in order: that the manifest targets this node, that it is
//! signed by a trusted key, that it is well formed, and that it is not a downgrade or a replay of a
//! version already served. Then it fetches the chunks (see [`crate::fetch`]) and hands the checked
//! bytes to [`install`], which writes them atomically into the module directory; from there the
//! directory watcher and the module manager take over, exactly as for a file copied in by hand.
//!
//! The agent also keeps rollouts alive across a broker that forgets its retained messages (a
//! restart without persistence): after connecting, a node that serves a rolled-out module and
//! sees no manifest for it publishes that manifest and its chunks again ([`Reseed`]), so nodes
//! that join later still converge with no operator action.

use crate::fetch::{ChunkRef, Fetch, Taken};
use crate::modules::{ModuleSlot, RolloutBoard};
use crate::package::{compare_versions, describe_targets, is_target};
use crate::sandbox::Sandbox;
use crate::signing::TrustedKeys;
use crate::topics::Topics;
use isomesh_protos::rollout_state::Phase;
use isomesh_protos::{ModuleChunk, ModuleManifest, ModuleRef, PrecompiledArtifact, Tier};
use prost::Message;
use std::cmp::Ordering;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// With nothing but the precompiled artifact missing for this long, compile instead.
const ARTIFACT_PATIENCE: Duration = Duration::from_secs(5);
/// After connecting, how long to listen for retained manifests before re-seeding.
const RESEED_DELAY: Duration = Duration::from_secs(3);

/// Something the MQTT loop must do for the agent.
pub enum Action {
    Subscribe(String),
    Unsubscribe(String),
    /// Check the finished fetch and write it into the module directory (blocking work).
    Install(Box<Fetch>),
    /// Publish a module's chunks and manifest again.
    Reseed(Box<Reseed>),
}

/// A module this node holds, to publish again because the broker lost it.
pub struct Reseed {
    pub manifest: ModuleManifest,
    pub module: PathBuf,
    /// The precompiled artifact of the manifest this node holds in its cache, if any.
    pub artifact: Option<(PrecompiledArtifact, PathBuf)>,
}

/// Settings of the agent.
pub struct AgentConfig {
    pub node: String,
    pub tier: Tier,
    pub topics: Topics,
    pub trusted: TrustedKeys,
    /// The node's module directory.
    pub dir: PathBuf,
    /// A fetch with no chunk arriving for this long is abandoned and reported.
    pub give_up_after: Duration,
}

/// Follows manifests and fetches the modules meant for this node.
pub struct RolloutAgent {
    config: AgentConfig,
    sandbox: Arc<Sandbox>,
    slot: Arc<ModuleSlot>,
    board: Arc<RolloutBoard>,
    fetch: Option<Fetch>,
    /// Digest of the module written to disk and not yet served or rejected.
    installing: Option<String>,
    /// Names of the modules whose manifest the broker handed over since the last connect.
    manifests_seen: HashSet<String>,
    reseed_at: Option<Instant>,
}

impl RolloutAgent {
    pub fn new(
        config: AgentConfig,
        sandbox: Arc<Sandbox>,
        slot: Arc<ModuleSlot>,
        board: Arc<RolloutBoard>,
    ) -> RolloutAgent {
        RolloutAgent {
            config,
            sandbox,
            slot,
            board,
            fetch: None,
            installing: None,
            manifests_seen: HashSet::new(),
            reseed_at: None,
        }
    }

    /// The broker (re)connected: ask again for what a fetch still misses, and plan a re-seed
    /// check once the retained manifests have had time to arrive.
    pub fn on_connected(&mut self) -> Vec<Action> {
        self.manifests_seen.clear();
        // Spread the nodes' checks so one of them re-seeds and the others see its manifest.
        let jitter = self
            .config
            .node
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
            % 2000;
        self.reseed_at = Some(Instant::now() + RESEED_DELAY + Duration::from_millis(jitter));
        match &self.fetch {
            Some(fetch) => self.subscribe(fetch.outstanding()),
            None => Vec::new(),
        }
    }

    /// A message on a module topic.
    pub fn on_publish(&mut self, topic: &str, payload: &[u8]) -> Vec<Action> {
        if payload.is_empty() {
            return Vec::new(); // a retained message being cleared
        }
        if topic.ends_with("/manifest") {
            match ModuleManifest::decode(payload) {
                Ok(manifest) => self.on_manifest(manifest),
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "unreadable module manifest ignored");
                    Vec::new()
                }
            }
        } else {
            match ModuleChunk::decode(payload) {
                Ok(chunk) => self.on_chunk(chunk),
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "unreadable module chunk ignored");
                    Vec::new()
                }
            }
        }
    }

    fn on_manifest(&mut self, manifest: ModuleManifest) -> Vec<Action> {
        let module = ModuleRef {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            sha256: manifest.sha256.clone(),
        };
        let label = format!("{}@{}", manifest.name, manifest.version);
        let verified = self.config.trusted.verify(&manifest);
        if verified.is_ok() {
            // Only a verified manifest proves the name's retained topic is in use, and any one
            // does, whichever nodes it is for: re-seeding must never write over a rollout to
            // other nodes (a device re-seeding 0.1.0 over an edge-only 0.2.0).
            self.manifests_seen.insert(manifest.name.clone());
        }
        if !is_target(&manifest, self.config.tier, &self.config.node) {
            tracing::info!(module = %label, targets = %describe_targets(&manifest), "manifest is not for this node; ignored");
            return Vec::new();
        }
        if let Err(e) = verified {
            return self.reject(module, format!("signature check failed: {e}"));
        }
        if let Err(e) = crate::package::check_manifest(&manifest) {
            return self.reject(module, format!("malformed manifest: {e}"));
        }
        let current = self.slot.current();
        if current
            .as_ref()
            .is_some_and(|c| c.sha256 == manifest.sha256)
        {
            tracing::debug!(module = %label, "manifest for the module already served");
            return Vec::new();
        }
        if self.installing.as_deref() == Some(&manifest.sha256)
            || self
                .fetch
                .as_ref()
                .is_some_and(|f| f.manifest.sha256 == manifest.sha256)
        {
            return Vec::new();
        }
        if let Some(reason) = crate::modules::rejected_before(&self.config.dir, &manifest.sha256) {
            return self.reject(module, format!("rejected before: {reason}"));
        }
        if let Some(current) = current.filter(|c| c.info.name == manifest.name) {
            let order = compare_versions(&manifest.version, &current.info.version);
            if order == Ordering::Less && !manifest.force {
                return self.reject(
                    module,
                    format!(
                        "version {} is older than the served {}: downgrade refused (roll out with --force to allow it)",
                        manifest.version, current.info.version
                    ),
                );
            }
            if order == Ordering::Equal && !manifest.force {
                return self.reject(
                    module,
                    format!(
                        "version {} is already served with another sha256 ({}): give the new module a new version",
                        manifest.version,
                        &current.sha256[..12]
                    ),
                );
            }
        }
        let engine = self.sandbox.engine_id();
        let artifact = manifest
            .artifacts
            .iter()
            .find(|a| a.engine == engine)
            .cloned();
        tracing::info!(
            module = %label,
            sha256 = %manifest.sha256,
            bytes = manifest.size,
            chunks = manifest.chunk_count,
            precompiled = artifact.is_some(),
            "fetching a rolled-out module"
        );
        let mut actions = self.abandon_fetch();
        let mut fetch = Fetch::new(manifest, artifact);
        let wanted = fetch.next_requests();
        self.report_fetch(&fetch);
        self.fetch = Some(fetch);
        actions.extend(self.subscribe(wanted));
        actions
    }

    fn on_chunk(&mut self, chunk: ModuleChunk) -> Vec<Action> {
        let Some(fetch) = &mut self.fetch else {
            return Vec::new();
        };
        let key = (chunk.sha256.clone(), chunk.index);
        match fetch.take(chunk) {
            Taken::Stored => {}
            Taken::Duplicate | Taken::Foreign => return Vec::new(),
            Taken::Malformed(problem) => {
                tracing::warn!(chunk = key.1, %problem, "malformed module chunk ignored");
                return Vec::new();
            }
        }
        let mut actions = self.unsubscribe(vec![key]);
        let Some(fetch) = self.fetch.as_mut() else {
            return actions;
        };
        let wanted = fetch.next_requests();
        let complete = fetch.is_complete();
        let (done, all) = fetch.progress();
        actions.extend(self.subscribe(wanted));
        if complete {
            if let Some(fetch) = self.fetch.take() {
                tracing::info!(
                    module = %format!("{}@{}", fetch.manifest.name, fetch.manifest.version),
                    chunks = all,
                    ms = fetch.started.elapsed().as_millis() as u64,
                    "all chunks in"
                );
                self.installing = Some(fetch.manifest.sha256.clone());
                self.board.set(
                    module_ref(&fetch.manifest),
                    Phase::Loading,
                    (done, all),
                    String::new(),
                );
                actions.push(Action::Install(Box::new(fetch)));
            }
        } else if done % 16 == 0 {
            if let Some(fetch) = &self.fetch {
                self.report_fetch(fetch);
            }
        }
        actions
    }

    /// Called a few times a second: asks again for missing chunks, gives up on stalled fetches,
    /// and re-seeds when the broker lost the module this node serves.
    pub fn on_tick(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(fetch) = &mut self.fetch {
            let again = fetch.retry();
            if fetch.only_artifact_missing() && fetch.stalled_for() > ARTIFACT_PATIENCE {
                tracing::warn!("precompiled artifact chunks missing; fetching the module alone and compiling it");
                let dropped = fetch.drop_artifact();
                let complete = fetch.is_complete();
                actions.extend(self.unsubscribe(dropped));
                if complete {
                    if let Some(fetch) = self.fetch.take() {
                        self.installing = Some(fetch.manifest.sha256.clone());
                        actions.push(Action::Install(Box::new(fetch)));
                    }
                }
            } else if fetch.stalled_for() > self.config.give_up_after {
                let reason = format!(
                    "fetch abandoned after {} s without progress: {}",
                    self.config.give_up_after.as_secs(),
                    fetch.missing()
                );
                let module = module_ref(&fetch.manifest);
                actions.extend(self.abandon_fetch());
                actions.extend(self.reject(module, reason));
            } else if !again.is_empty() {
                tracing::debug!(chunks = again.len(), "asking again for missing chunks");
                actions.extend(self.subscribe(again));
            }
        }
        if self.reseed_at.is_some_and(|at| Instant::now() >= at) {
            self.reseed_at = None;
            actions.extend(self.reseed_if_lost());
        }
        actions
    }

    /// The module written by an [`Action::Install`] was served or rejected, or could not be written.
    pub fn install_finished(&mut self, module: ModuleRef, error: Option<String>) {
        if self.installing.as_deref() == Some(module.sha256.as_str()) {
            self.installing = None;
        }
        if let Some(reason) = error {
            crate::modules::mark_rejected(&self.config.dir, &module.sha256, &reason);
            self.reject(module, reason);
        }
    }

    fn reseed_if_lost(&self) -> Vec<Action> {
        let Some(current) = self.slot.current() else {
            return Vec::new();
        };
        let Some(manifest) = crate::modules::read_sidecar(&current.path) else {
            return Vec::new(); // dropped in by hand: nothing signed to publish
        };
        if manifest.sha256 != current.sha256 || self.manifests_seen.contains(&manifest.name) {
            return Vec::new();
        }
        let engine = self.sandbox.engine_id();
        let artifact = manifest
            .artifacts
            .iter()
            .find(|a| a.engine == engine)
            .cloned()
            .zip(self.sandbox.cached_code_path(&current.sha256));
        tracing::warn!(
            module = %format!("{}@{}", manifest.name, manifest.version),
            "the broker holds no manifest for the module served here (restarted without persistence?); publishing it again"
        );
        vec![Action::Reseed(Box::new(Reseed {
            manifest,
            module: current.path.clone(),
            artifact,
        }))]
    }

    fn reject(&self, module: ModuleRef, reason: String) -> Vec<Action> {
        tracing::error!(
            module = %format!("{}@{}", module.name, module.version),
            sha256 = %module.sha256,
            %reason,
            "rollout rejected; the current module keeps serving"
        );
        self.board.set(module, Phase::Rejected, (0, 0), reason);
        Vec::new()
    }

    fn report_fetch(&self, fetch: &Fetch) {
        self.board.set(
            module_ref(&fetch.manifest),
            Phase::Fetching,
            fetch.progress(),
            String::new(),
        );
    }

    /// Drops the fetch in progress, if any, with its subscriptions.
    fn abandon_fetch(&mut self) -> Vec<Action> {
        match self.fetch.take() {
            Some(fetch) => self.unsubscribe(fetch.outstanding()),
            None => Vec::new(),
        }
    }

    fn subscribe(&self, chunks: Vec<ChunkRef>) -> Vec<Action> {
        chunks
            .into_iter()
            .map(|(sha, index)| Action::Subscribe(self.config.topics.chunk(&sha, index)))
            .collect()
    }

    fn unsubscribe(&self, chunks: Vec<ChunkRef>) -> Vec<Action> {
        chunks
            .into_iter()
            .map(|(sha, index)| Action::Unsubscribe(self.config.topics.chunk(&sha, index)))
            .collect()
    }
}

/// Names the module a manifest describes.
pub fn module_ref(manifest: &ModuleManifest) -> ModuleRef {
    ModuleRef {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        sha256: manifest.sha256.clone(),
    }
}

/// Checks a finished fetch and writes it into `dir` as `{name}-{version}.wasm`, with its manifest
/// beside it (for re-seeding) and its precompiled artifact in the sandbox's cache. The module file
/// is renamed into place last, so the directory watcher only ever sees it whole.
/// Returns the module's path. Blocking.
pub fn install(fetch: Fetch, dir: &Path, sandbox: &Sandbox) -> Result<PathBuf, String> {
    let started = std::time::Instant::now();
    let manifest = fetch.manifest.clone();
    let fetched = fetch.finish()?;
    let checked = started.elapsed();
    if !fetched.module.starts_with(b"\0asm") {
        return Err("not a WebAssembly module (it does not start with \\0asm)".into());
    }
    if let Some((artifact, code)) = &fetched.artifact {
        // Its digest was checked against the signed manifest by `finish`.
        if let Err(e) = sandbox.store_precompiled(&manifest.sha256, code) {
            tracing::warn!(artifact = %artifact.sha256, error = %e, "cannot store the precompiled artifact; the module will be compiled");
        }
    }
    let stem = format!("{}-{}", manifest.name, manifest.version);
    // No fsync: a file cut short by a power loss fails its load on the next start and the
    // previous module serves, while syncing 30 MB would delay every swap.
    let write = |name: String, bytes: &[u8]| -> std::io::Result<()> {
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, dir.join(name))
    };
    let path = dir.join(format!("{stem}.wasm"));
    write(format!("{stem}.manifest"), &manifest.encode_to_vec())
        .and_then(|_| write(format!("{stem}.wasm"), &fetched.module))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    tracing::info!(
        file = %path.display(),
        inflate_and_check_ms = checked.as_millis() as u64,
        write_ms = (started.elapsed() - checked).as_millis() as u64,
        "module written"
    );
    Ok(path)
}
