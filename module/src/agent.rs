//! The node's side of a rollout, as a state machine without I/O: events and the time in,
//! [`Action`]s out (rumqttc's `state.rs` is the model). The node's event loop feeds it every
//! module message, every connect, a tick a few times a second and what became of each install,
//! and carries out what it returns; the tests at the bottom of this file drive it the same way,
//! with no broker, no disk and no clock.
//!
//! What it checks when a manifest arrives, in order: that it targets this node, that it is
//! signed by a trusted key, that it is well formed, and that it is not the module already
//! served, one being fetched or installed, one this node refused before, a replay (not
//! published after the manifest accepted last), a downgrade or a second build of the version
//! accepted last (unless forced): the rules of [`crate::history`]. Then it [`Fetch`]es the
//! chunks, asking for a window at a time and again after a quiet spell; a chunk that fails its
//! signed digest is dropped and asked for again. Once all are in it hands the fetch over
//! ([`Action::Install`]): the node checks the bytes ([`Fetch::finish`]), writes them to its
//! [`crate::store::ModuleStore`], and its module manager compiles, self-tests and swaps them in,
//! exactly as for a file copied in by hand. Every phase is reported ([`Action::Report`]) so the
//! node's status tells operators where the rollout stands.
//!
//! Only a failure of the signed bytes themselves condemns a module
//! ([`Rejection::condemns_module`]); a fetch that stalled, chunks that did not add up without
//! per-chunk digests to say which was bad, or a disk that refused the file are tried again
//! later, waiting longer each time ([`RETRY_FIRST`] doubling up to [`RETRY_MAX`]).
//!
//! The node restores the history of accepted manifests ([`RolloutAgent::restore_history`])
//! before the first event; every module served with a signed manifest extends it, and the agent
//! asks for it to be saved ([`Action::SaveHistory`]).
//!
//! The agent also keeps rollouts alive across a broker that forgets its retained messages (a
//! restart without persistence): after connecting, a node that serves a rolled-out module and
//! sees no manifest for it publishes that manifest and its chunks again ([`Action::Reseed`]),
//! so nodes that join later still converge with no operator action.
//!
//! And across a clustered broker that lost a rollout on one member: a member cut off from the
//! others when a rollout was published never gets its retained messages, and its nodes keep
//! serving the old version with nothing to tell them. Their statuses still reach the other
//! members once the cluster heals, so a node serving the rolled-out module that hears a peer it
//! targets serve an older version, without ever having heard of the new one
//! ([`peer_is_behind`]), publishes the module again for it: [`PEER_PATIENCE`] after first seeing
//! it behind if this node comes first of the nodes it hears serve the same module (by id), each
//! later one [`PEER_TURN`] after that, so one of them does it and the others see its manifest
//! come again (a mesh of a hundred nodes must not publish it a hundred times).

use crate::fetch::{ChunkRef, Fetch, Taken};
use crate::history::History;
use crate::package::{check_manifest, describe_targets, is_target, label, module_ref};
use crate::rejection::Rejection;
use crate::signing::TrustedKeys;
use crate::version::compare_versions;
use isomesh_mesh::topics::Topics;
use isomesh_protos::rollout_state::Phase;
use isomesh_protos::{
    ModuleChunk, ModuleManifest, ModuleRef, NodeStatus, PrecompiledArtifact, RolloutState, Tier,
};
use prost::Message;
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

/// With nothing but the precompiled artifact missing for this long, compile instead.
pub const ARTIFACT_PATIENCE: Duration = Duration::from_secs(5);
/// After connecting, how long to listen for retained manifests before re-seeding.
pub const RESEED_DELAY: Duration = Duration::from_secs(3);
/// First wait before trying again a rollout that failed for a passing reason.
pub const RETRY_FIRST: Duration = Duration::from_secs(10);
/// Longest wait between two tries of such a rollout.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// How long a peer must look behind (see [`peer_is_behind`]) before this node publishes the
/// served module again for it: a peer that hears a rollout reports it within a second or two.
pub const PEER_PATIENCE: Duration = Duration::from_secs(10);
/// How much longer each node serving the same module waits than the one before it (by id) to
/// publish it again for a peer behind: long enough for the first one's chunks and manifest to
/// get through.
pub const PEER_TURN: Duration = Duration::from_secs(20);
/// After publishing the module again for peers, the wait before doing it again for peers
/// still behind (it doubles up to [`RETRY_MAX`]): a peer that cannot take it must not make
/// its neighbours publish tens of MB in a loop.
pub const PEER_RESEED_AGAIN: Duration = Duration::from_secs(60);
/// Report fetch progress every this many chunks.
const PROGRESS_EVERY: u32 = 16;

/// Something that happened, for the agent to act on.
pub enum Event<'a> {
    /// The broker (re)connected.
    Connected,
    /// A message on a module topic (`{prefix}/modules/...`).
    Publish { topic: &'a str, payload: &'a [u8] },
    /// Time passed: ask again for missing chunks, give up on stalled fetches, re-seed.
    Tick,
    /// The node serves this module now (on start, and after every swap).
    /// Boxed: a signed manifest is large beside the other events.
    Serving(Box<Serving>),
    /// Another node's status (`node`, from its status topic).
    PeerStatus {
        node: &'a str,
        status: &'a NodeStatus,
    },
    /// The module manager refused the module an [`Action::Install`] wrote; `marked` says the
    /// refusal is remembered (the bytes themselves are bad), with its reason.
    Refused {
        module: ModuleRef,
        marked: Option<String>,
    },
    /// The fetched module could not be installed (its bytes are not the signed ones, or the
    /// disk refused them).
    InstallFailed {
        module: ModuleRef,
        reason: Rejection,
    },
}

/// What the node serves, as the agent needs to know it.
#[derive(Debug, Clone)]
pub struct Serving {
    pub module: ModuleRef,
    /// The signed manifest the module file came with (`None` for a file dropped in by hand
    /// under `--allow-unsigned`): what a re-seed publishes.
    pub manifest: Option<ModuleManifest>,
}

/// Something the node must do for the agent.
#[derive(Debug)]
pub enum Action {
    Subscribe(String),
    Unsubscribe(String),
    /// Check the finished fetch and write it into the module directory (blocking work).
    Install(Box<Fetch>),
    /// Publish the served module's chunks and manifest again.
    Reseed(Box<Reseed>),
    /// Show this rollout state in the node's status.
    Report(RolloutState),
    /// Remember that these bytes were refused, so they are never fetched or compiled again.
    MarkRejected {
        sha256: String,
        reason: String,
    },
    /// Keep this history of accepted manifests (in the module directory), for after a restart.
    SaveHistory(History),
}

/// The module this node serves, to publish again because the broker lost it, or a member of a
/// clustered broker never had it.
#[derive(Debug)]
pub struct Reseed {
    pub manifest: ModuleManifest,
    /// The manifest's precompiled artifact for this node's engine, if it has one.
    pub artifact: Option<PrecompiledArtifact>,
}

/// Settings of the agent.
pub struct AgentConfig {
    pub node: String,
    pub tier: Tier,
    pub topics: Topics,
    pub trusted: TrustedKeys,
    /// The engine ids of the precompiled artifacts this node can load, the one it prefers first
    /// (its own engine's, then portable code for its target: `Sandbox::engine_ids`).
    pub engines: Vec<String>,
    /// A fetch with no chunk arriving for this long is abandoned and reported.
    pub give_up_after: Duration,
}

/// Follows manifests and fetches the modules meant for this node.
pub struct RolloutAgent {
    config: AgentConfig,
    serving: Option<Serving>,
    fetch: Option<Fetch>,
    /// The manifest of the module handed over for installing and not yet served or refused.
    installing: Option<ModuleManifest>,
    /// The signed manifests accepted before: what a replay or a downgrade is measured against.
    history: History,
    history_restored: bool,
    /// A rollout that failed for a passing reason, to try again at the given time.
    again: Option<(ModuleManifest, Instant)>,
    /// The wait before the next such try.
    backoff: Duration,
    /// Modules refused before, by digest, with the reason.
    rejected: HashMap<String, String>,
    /// Names of the modules whose manifest the broker handed over since the last connect.
    manifests_seen: HashSet<String>,
    reseed_at: Option<Instant>,
    /// Peers whose status shows them behind the served module ([`peer_is_behind`]).
    behind: BTreeSet<String>,
    /// Peers whose status shows them online serving the same module as this node.
    alike: BTreeSet<String>,
    /// When to publish the served module again for the peers behind, if they still are.
    peer_reseed_at: Option<Instant>,
    /// The wait after such a re-seed before the next one.
    peer_backoff: Duration,
}

impl RolloutAgent {
    /// An agent that knows of the modules refused before (the module directory's markers).
    pub fn new(
        config: AgentConfig,
        rejected: impl IntoIterator<Item = (String, String)>,
    ) -> RolloutAgent {
        RolloutAgent {
            config,
            serving: None,
            fetch: None,
            installing: None,
            history: History::default(),
            history_restored: false,
            again: None,
            backoff: RETRY_FIRST,
            rejected: rejected.into_iter().collect(),
            manifests_seen: HashSet::new(),
            reseed_at: None,
            behind: BTreeSet::new(),
            alike: BTreeSet::new(),
            peer_reseed_at: None,
            peer_backoff: PEER_RESEED_AGAIN,
        }
    }

    /// Whether [`RolloutAgent::restore_history`] was called.
    pub fn history_restored(&self) -> bool {
        self.history_restored
    }

    /// Takes the history of accepted manifests kept from before a restart (merged with what the
    /// agent learnt since it started).
    pub fn restore_history(&mut self, kept: History) -> Vec<Action> {
        self.history_restored = true;
        self.history = kept;
        // What the agent learnt before: only the served module, whose manifest counts again.
        match self.serving.take() {
            Some(serving) => self.on_serving(serving),
            None => Vec::new(),
        }
    }

    /// The history of accepted manifests.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The fetch in progress, if any.
    pub fn fetching(&self) -> Option<&Fetch> {
        self.fetch.as_ref()
    }

    /// Takes one event at time `now` and says what to do about it.
    pub fn handle(&mut self, event: Event<'_>, now: Instant) -> Vec<Action> {
        match event {
            Event::Connected => self.on_connected(now),
            Event::Publish { topic, payload } => self.on_publish(topic, payload, now),
            Event::Tick => self.on_tick(now),
            Event::Serving(serving) => self.on_serving(*serving),
            Event::PeerStatus { node, status } => self.on_peer_status(node, status, now),
            Event::Refused { module, marked } => {
                self.take_installing(&module.sha256);
                if let Some(reason) = marked {
                    self.rejected.insert(module.sha256, reason);
                }
                Vec::new()
            }
            Event::InstallFailed { module, reason } => {
                let manifest = self.take_installing(&module.sha256);
                if !reason.condemns_module() {
                    // The transport or the disk, not the module: try again later.
                    let mut actions = self.reject(module, reason);
                    if let Some(manifest) = manifest {
                        actions.extend(self.try_again_later(manifest, now));
                    }
                    return actions;
                }
                let text = reason.to_string();
                self.rejected.insert(module.sha256.clone(), text.clone());
                let mut actions = vec![Action::MarkRejected {
                    sha256: module.sha256.clone(),
                    reason: text,
                }];
                actions.extend(self.reject(module, reason));
                actions
            }
        }
    }

    /// The manifest being installed, if it is the one of `sha256`; it is no longer installing.
    fn take_installing(&mut self, sha256: &str) -> Option<ModuleManifest> {
        if self.installing.as_ref().is_some_and(|m| m.sha256 == sha256) {
            return self.installing.take();
        }
        None
    }

    /// The node serves `serving` now: a signed one joins the history of accepted manifests.
    fn on_serving(&mut self, serving: Serving) -> Vec<Action> {
        self.take_installing(&serving.module.sha256);
        let mut actions = Vec::new();
        if let Some(manifest) = &serving.manifest {
            // The sidecar is read unchecked: only a manifest signed by a trusted key may move the
            // history forward (a forged far-future date would block every later rollout).
            let signed = manifest.sha256 == serving.module.sha256
                && self.config.trusted.verify(manifest).is_ok();
            if signed && self.history.accept(manifest) {
                actions.push(Action::SaveHistory(self.history.clone()));
            }
        }
        // Whatever was waiting to be tried again is superseded by what serves now, and peers
        // are measured against it from their next status on.
        self.again = None;
        self.backoff = RETRY_FIRST;
        self.behind.clear();
        self.alike.clear();
        self.peer_reseed_at = None;
        self.peer_backoff = PEER_RESEED_AGAIN;
        self.serving = Some(serving);
        actions
    }

    /// Plans another try of `manifest` after a failure that was not the module's fault.
    fn try_again_later(&mut self, manifest: ModuleManifest, now: Instant) -> Vec<Action> {
        tracing::warn!(
            module = %label(&module_ref(&manifest)),
            in_s = self.backoff.as_secs(),
            "the rollout failed for a passing reason; trying again later"
        );
        self.again = Some((manifest, now + self.backoff));
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
        Vec::new()
    }

    /// Ask again for what a fetch still misses, and plan a re-seed check once the retained
    /// manifests have had time to arrive.
    fn on_connected(&mut self, now: Instant) -> Vec<Action> {
        self.manifests_seen.clear();
        // Spread the nodes' checks so one of them re-seeds and the others see its manifest.
        self.reseed_at = Some(now + RESEED_DELAY + self.jitter(2000));
        match &self.fetch {
            Some(fetch) => self.subscribe(fetch.outstanding()),
            None => Vec::new(),
        }
    }

    /// A wait under `max_ms` fixed for one node, from its id. (A weak spread: ids that differ
    /// only in their last character, d1 and d2, get waits 1 ms apart; which is why re-seeding
    /// for peers goes by turns instead.)
    fn jitter(&self, max_ms: u64) -> Duration {
        let hash = self
            .config
            .node
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        Duration::from_millis(hash % max_ms)
    }

    /// Notes whether `node` is behind the served module, and plans to publish it again for it.
    fn on_peer_status(&mut self, node: &str, status: &NodeStatus, now: Instant) -> Vec<Action> {
        if node == self.config.node {
            return Vec::new();
        }
        let Some(manifest) = self.served_manifest() else {
            return Vec::new();
        };
        let alike = status.online
            && status
                .module
                .as_ref()
                .is_some_and(|m| m.sha256 == manifest.sha256);
        let behind = peer_is_behind(manifest, node, status);
        if alike {
            self.alike.insert(node.to_string());
        } else {
            self.alike.remove(node);
        }
        if behind {
            if self.behind.insert(node.to_string()) {
                tracing::info!(peer = %node, "a peer the served module is for serves an older version and never heard of this one");
            }
            if self.peer_reseed_at.is_none() {
                self.peer_reseed_at = Some(now + self.peer_wait());
            }
        } else if self.behind.remove(node) && self.behind.is_empty() {
            self.peer_reseed_at = None;
        }
        Vec::new()
    }

    /// How long to let a peer look behind before publishing the module again for it: this
    /// node's turn among those serving the same module, ordered by id.
    fn peer_wait(&self) -> Duration {
        let before = self
            .alike
            .iter()
            .take_while(|n| n.as_str() < self.config.node.as_str())
            .count()
            .min(1000) as u32; // a bound that keeps the product far from overflowing
        PEER_PATIENCE + PEER_TURN * before
    }

    fn on_publish(&mut self, topic: &str, payload: &[u8], now: Instant) -> Vec<Action> {
        if payload.is_empty() {
            return Vec::new(); // a retained message being cleared
        }
        if topic.ends_with("/manifest") {
            match ModuleManifest::decode(payload) {
                Ok(manifest) => self.on_manifest(manifest, now),
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "unreadable module manifest ignored");
                    Vec::new()
                }
            }
        } else {
            match ModuleChunk::decode(payload) {
                Ok(chunk) => self.on_chunk(chunk, now),
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "unreadable module chunk ignored");
                    Vec::new()
                }
            }
        }
    }

    fn on_manifest(&mut self, manifest: ModuleManifest, now: Instant) -> Vec<Action> {
        let module = module_ref(&manifest);
        let verified = self.config.trusted.verify(&manifest);
        if verified.is_ok() {
            // Only a verified manifest proves the name's retained topic is in use, and any one
            // does, whichever nodes it is for: re-seeding must never write over a rollout to
            // other nodes (a device re-seeding 0.1.0 over an edge-only 0.2.0).
            self.manifests_seen.insert(manifest.name.clone());
        }
        if !is_target(&manifest, self.config.tier, &self.config.node) {
            tracing::info!(module = %label(&module), targets = %describe_targets(&manifest), "manifest is not for this node; ignored");
            return Vec::new();
        }
        if let Err(e) = verified {
            return self.reject(module, e.into());
        }
        if let Err(e) = check_manifest(&manifest) {
            return self.reject(module, e.into());
        }
        let served = self.serving.as_ref().map(|s| s.module.clone());
        if served.as_ref().is_some_and(|s| s.sha256 == manifest.sha256) {
            tracing::debug!(module = %label(&module), "manifest for the module already served");
            // Published again (by a peer, for the peers behind): they get their time to take it.
            if let Some(at) = self.peer_reseed_at {
                self.peer_reseed_at = Some(at.max(now + self.peer_wait()));
            }
            return Vec::new();
        }
        if self
            .installing
            .as_ref()
            .is_some_and(|m| m.sha256 == manifest.sha256)
            || self
                .fetch
                .as_ref()
                .is_some_and(|f| f.manifest.sha256 == manifest.sha256)
        {
            return Vec::new();
        }
        if let Some(reason) = self.rejected.get(&manifest.sha256) {
            let reason = Rejection::RejectedBefore(reason.clone());
            return self.reject(module, reason);
        }
        if let Err(reason) = self.history.check(&manifest) {
            return self.reject(module, reason);
        }
        // A module served without a signed manifest (dropped in by hand under
        // --allow-unsigned) is not in the history: its version still counts.
        if let Some(served) = served.filter(|s| s.name == manifest.name) {
            let order = match compare_versions(&manifest.version, &served.version) {
                Ok(order) => order,
                Err(e) if e.version == manifest.version => return self.reject(module, e.into()),
                Err(_) => Ordering::Greater, // the served version is not semver: the new one wins
            };
            if order == Ordering::Less && !manifest.force {
                let reason = Rejection::Downgrade {
                    offered: manifest.version.clone(),
                    served: served.version,
                };
                return self.reject(module, reason);
            }
            if order == Ordering::Equal && !manifest.force {
                let reason = Rejection::SameVersion {
                    version: manifest.version.clone(),
                    served: crate::digest::short(&served.sha256).to_string(),
                };
                return self.reject(module, reason);
            }
        }
        let artifact = self.artifact_for_this_node(&manifest);
        let has_code = self.has_code_of(&manifest);
        match &manifest.code {
            Some(code) if has_code => tracing::info!(
                module = %label(&module),
                sha256 = %manifest.sha256,
                bytes = manifest.size,
                chunks = manifest.chunk_count,
                code = %crate::digest::short(&code.sha256),
                "fetching a model rollout on the code served here: the model alone, nothing to compile"
            ),
            Some(code) => tracing::info!(
                module = %label(&module),
                sha256 = %manifest.sha256,
                bytes = manifest.size + code.size,
                chunks = manifest.chunk_count + code.chunk_count,
                code = %crate::digest::short(&code.sha256),
                precompiled = artifact.is_some(),
                "fetching a model rollout and the code it runs on"
            ),
            None => tracing::info!(
                module = %label(&module),
                sha256 = %manifest.sha256,
                bytes = manifest.size,
                chunks = manifest.chunk_count,
                precompiled = artifact.is_some(),
                "fetching a rolled-out module"
            ),
        }
        let mut actions = self.abandon_fetch();
        if self
            .again
            .as_ref()
            .is_some_and(|(m, _)| m.sha256 != manifest.sha256)
        {
            self.again = None; // a newer rollout supersedes the one waiting to be tried again
        }
        let mut fetch = Fetch::new(manifest, artifact, now);
        if has_code {
            // A model rollout on the code served here: the model alone, nothing to compile.
            fetch.code_at_hand();
        }
        let wanted = fetch.next_requests(now);
        actions.push(report(&fetch, Phase::Fetching));
        self.fetch = Some(fetch);
        actions.extend(self.subscribe(wanted));
        actions
    }

    fn on_chunk(&mut self, chunk: ModuleChunk, now: Instant) -> Vec<Action> {
        let Some(fetch) = &mut self.fetch else {
            return Vec::new();
        };
        let key = (chunk.sha256.clone(), chunk.index);
        match fetch.take(chunk, now) {
            Taken::Stored => {}
            Taken::Duplicate | Taken::Foreign => return Vec::new(),
            Taken::Malformed(problem) => {
                tracing::warn!(chunk = key.1, %problem, "malformed module chunk ignored");
                return Vec::new();
            }
            Taken::Corrupt(problem) => {
                // Kept outstanding: asked for again after a quiet spell, like a missing chunk.
                tracing::warn!(chunk = key.1, %problem, "module chunk does not match its signed digest; dropped, asking again");
                return Vec::new();
            }
        }
        let wanted = fetch.next_requests(now);
        let (done, _) = fetch.progress();
        let mut actions = self.unsubscribe(vec![key]);
        actions.extend(self.subscribe(wanted));
        match self.fetch.take() {
            Some(fetch) if fetch.is_complete() => {
                tracing::info!(
                    module = %label(&module_ref(&fetch.manifest)),
                    chunks = done,
                    ms = now.saturating_duration_since(fetch.started).as_millis() as u64,
                    "all chunks in"
                );
                actions.extend(self.install(fetch));
            }
            Some(fetch) => {
                if done % PROGRESS_EVERY == 0 {
                    actions.push(report(&fetch, Phase::Fetching));
                }
                self.fetch = Some(fetch);
            }
            None => {}
        }
        actions
    }

    fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(mut fetch) = self.fetch.take() {
            let again = fetch.retry(now);
            if fetch.only_artifact_missing() && fetch.stalled_for(now) > ARTIFACT_PATIENCE {
                tracing::warn!("precompiled artifact chunks missing; fetching the module alone and compiling it");
                let dropped = fetch.drop_artifact(now);
                actions.extend(self.unsubscribe(dropped));
                if fetch.is_complete() {
                    actions.extend(self.install(fetch));
                } else {
                    self.fetch = Some(fetch);
                }
            } else if fetch.stalled_for(now) > self.config.give_up_after {
                let reason = Rejection::Stalled {
                    after_s: self.config.give_up_after.as_secs(),
                    missing: fetch.missing(),
                };
                actions.extend(self.unsubscribe(fetch.outstanding()));
                actions.extend(self.reject(module_ref(&fetch.manifest), reason));
                actions.extend(self.try_again_later(fetch.manifest, now));
            } else {
                if !again.is_empty() {
                    tracing::debug!(chunks = again.len(), "asking again for missing chunks");
                    actions.extend(self.subscribe(again));
                }
                self.fetch = Some(fetch);
            }
        }
        let due = self.again.as_ref().is_some_and(|(_, at)| now >= *at);
        if due && self.fetch.is_none() && self.installing.is_none() {
            if let Some((manifest, _)) = self.again.take() {
                tracing::info!(module = %label(&module_ref(&manifest)), "trying a rollout again");
                actions.extend(self.on_manifest(manifest, now));
            }
        }
        if self.reseed_at.is_some_and(|at| now >= at) {
            self.reseed_at = None;
            actions.extend(self.reseed_if_lost());
        }
        if self.peer_reseed_at.is_some_and(|at| now >= at) {
            actions.extend(self.reseed_for_peers(now));
        }
        actions
    }

    /// Hands a complete fetch over for checking and writing.
    fn install(&mut self, fetch: Fetch) -> Vec<Action> {
        self.installing = Some(fetch.manifest.clone());
        let (done, all) = fetch.progress();
        let loading = RolloutState {
            module: Some(module_ref(&fetch.manifest)),
            phase: Phase::Loading as i32,
            chunks_done: done,
            chunk_count: all,
            ..Default::default()
        };
        vec![Action::Report(loading), Action::Install(Box::new(fetch))]
    }

    /// The signed manifest of the module served, if it came with one: what a re-seed publishes.
    /// (`None` when nothing is served, or a file was dropped in by hand.)
    fn served_manifest(&self) -> Option<&ModuleManifest> {
        match &self.serving {
            Some(Serving {
                module,
                manifest: Some(manifest),
            }) if manifest.sha256 == module.sha256 => Some(manifest),
            _ => None,
        }
    }

    fn reseed_if_lost(&self) -> Vec<Action> {
        let Some(manifest) = self.served_manifest() else {
            return Vec::new();
        };
        if self.manifests_seen.contains(&manifest.name) {
            return Vec::new();
        }
        let artifact = self.artifact_for_this_node(manifest);
        tracing::warn!(
            module = %label(&module_ref(manifest)),
            "the broker holds no manifest for the module served here (restarted without persistence?); publishing it again"
        );
        vec![Action::Reseed(Box::new(Reseed {
            manifest: manifest.clone(),
            artifact,
        }))]
    }

    /// Publishes the served module again for the peers still behind it, then waits longer
    /// before the next time.
    fn reseed_for_peers(&mut self, now: Instant) -> Vec<Action> {
        self.peer_reseed_at = None;
        let Some(manifest) = self.served_manifest() else {
            return Vec::new();
        };
        if self.behind.is_empty() {
            return Vec::new();
        }
        let manifest = manifest.clone();
        let artifact = self.artifact_for_this_node(&manifest);
        tracing::warn!(
            module = %label(&module_ref(&manifest)),
            peers = ?self.behind,
            again_in_s = self.peer_backoff.as_secs(),
            "peers the served module is for still serve an older version and never heard of this one (their broker member was cut off when it was published?); publishing it again"
        );
        self.peer_reseed_at = Some(now + self.peer_backoff);
        self.peer_backoff = (self.peer_backoff * 2).min(RETRY_MAX);
        vec![Action::Reseed(Box::new(Reseed { manifest, artifact }))]
    }

    /// Whether `manifest` is a model rollout whose code this node serves already.
    fn has_code_of(&self, manifest: &ModuleManifest) -> bool {
        let (Some(code), Some(serving)) = (&manifest.code, &self.serving) else {
            return false;
        };
        code.sha256 == serving.module.code_sha256 || code.sha256 == serving.module.sha256
    }

    /// The manifest's precompiled artifact this node loads best, if any.
    fn artifact_for_this_node(&self, manifest: &ModuleManifest) -> Option<PrecompiledArtifact> {
        self.config.engines.iter().find_map(|engine| {
            manifest
                .artifacts
                .iter()
                .find(|a| &a.engine == engine)
                .cloned()
        })
    }

    fn reject(&self, module: ModuleRef, reason: Rejection) -> Vec<Action> {
        tracing::error!(
            module = %label(&module),
            sha256 = %module.sha256,
            %reason,
            "rollout rejected; the current module keeps serving"
        );
        vec![Action::Report(rejected(module, &reason))]
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

/// Whether a peer's status shows it behind `manifest`: online, targeted by it, serving an older
/// version of its module, and the newest rollout it heard of older too (a peer that heard of
/// this one, or a newer one, is fetching, refused it or moved on: publishing again would not
/// help it). A version that is not semver never counts as older.
pub fn peer_is_behind(manifest: &ModuleManifest, node: &str, status: &NodeStatus) -> bool {
    let older = |m: &ModuleRef| {
        m.name == manifest.name
            && compare_versions(&m.version, &manifest.version).is_ok_and(|o| o == Ordering::Less)
    };
    let targeted = Tier::try_from(status.tier).is_ok_and(|tier| is_target(manifest, tier, node));
    let serves_older = status.module.as_ref().is_some_and(older);
    let heard = status
        .rollout
        .as_ref()
        .and_then(|r| r.module.as_ref())
        .is_some_and(|m| m.name == manifest.name && !older(m));
    status.online && targeted && serves_older && !heard
}

/// The state of a fetch in progress.
fn report(fetch: &Fetch, phase: Phase) -> Action {
    let (done, all) = fetch.progress();
    Action::Report(RolloutState {
        module: Some(module_ref(&fetch.manifest)),
        phase: phase as i32,
        chunks_done: done,
        chunk_count: all,
        ..Default::default()
    })
}

/// The state of a refused module: its reason as a sentence and as a code.
pub fn rejected(module: ModuleRef, reason: &Rejection) -> RolloutState {
    RolloutState {
        module: Some(module),
        phase: Phase::Rejected as i32,
        reason: reason.to_string(),
        code: reason.code().to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
