//! The rollout executor: the I/O around the node's rollout agent.
//!
//! The agent ([`isomesh_module::agent`]) decides and never touches anything; this module feeds
//! it the node's events with the time and carries out its actions: subscribing to chunk topics,
//! showing rollout phases in the status, remembering refused modules in the store, installing a
//! finished fetch on a thread of its own (inflate, check, write the file; the module manager
//! then compiles, self-tests and swaps it in), and publishing the served module again when the
//! broker lost it or a peer never got it. It also keeps the agent's history of accepted manifests in the module
//! directory ([`isomesh_module::history`]): restored before the agent's first event, saved
//! whenever a newly served module extends it.

use crate::manager::{background_priority, thread_cpu_time, Considered, Found};
use crate::slot::{ModuleSlot, RolloutBoard};
use isomesh_mesh::topics::Topics;
use isomesh_module::agent::{Action, Event, Reseed, RolloutAgent, Serving};
use isomesh_module::digest::sha256_hex;
use isomesh_module::fetch::{Fetch, TransferError};
use isomesh_module::history::History;
use isomesh_module::package::{self, label, module_ref};
use isomesh_module::rejection::Rejection;
use isomesh_module::store::{read_sidecar, ModuleStore};
use isomesh_protos::ModuleRef;
use isomesh_sandbox::{LoadedModule, Sandbox};
use prost::Message;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// A fetched module that could not be installed, and why.
type InstallFailure = (ModuleRef, Rejection);

/// The agent and the channels of its background work.
pub struct RolloutExecutor {
    pub agent: RolloutAgent,
    pub sandbox: Arc<Sandbox>,
    pub store: ModuleStore,
    pub slot: Arc<ModuleSlot>,
    pub board: Arc<RolloutBoard>,
    pub client: AsyncClient,
    pub topics: Topics,
    /// To the module manager: a module file to consider.
    pub found: std::sync::mpsc::Sender<Found>,
    /// From the module manager: a file was served or rejected.
    pub considered: mpsc::UnboundedReceiver<Considered>,
    /// From install threads: a fetched module could not be written.
    pub failed: (
        mpsc::UnboundedSender<InstallFailure>,
        mpsc::UnboundedReceiver<InstallFailure>,
    ),
}

impl RolloutExecutor {
    /// Hands `event` to the agent and carries out what it says.
    pub fn handle(&mut self, event: Event<'_>) {
        if !self.agent.history_restored() {
            // Before anything else: a manifest must be measured against what this node accepted
            // before it restarted, not only since.
            let kept = History::load(self.store.dir());
            for action in self.agent.restore_history(kept) {
                self.apply(action);
            }
        }
        let actions = self.agent.handle(event, Instant::now());
        for action in actions {
            self.apply(action);
        }
    }

    /// Tells the agent what the node serves now.
    pub fn serving(&mut self, module: &LoadedModule) {
        let manifest = read_sidecar(&module.path).filter(|m| m.sha256 == module.sha256);
        self.handle(Event::Serving(Box::new(Serving {
            module: module.module_ref(),
            manifest,
        })));
    }

    /// What the module manager made of a file.
    pub fn considered(&mut self, considered: Considered) {
        match considered {
            Considered::Served(module) => self.serving(&module),
            Considered::Rejected { module, marked } => {
                self.handle(Event::Refused { module, marked })
            }
            Considered::Skipped => {}
        }
    }

    fn apply(&self, action: Action) {
        match action {
            Action::Subscribe(topic) => {
                if let Err(e) = self.client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                    tracing::warn!(%topic, error = %e, "cannot subscribe to a module chunk");
                }
            }
            Action::Unsubscribe(topic) => {
                let _ = self.client.try_unsubscribe(topic);
            }
            Action::Report(state) => self.board.show(state),
            Action::MarkRejected { sha256, reason } => self.store.mark_rejected(&sha256, &reason),
            Action::SaveHistory(history) => {
                // A few hundred bytes: written on the loop. Failing to keep it only weakens the
                // replay check after a restart, so the node carries on.
                if let Err(e) = history.save(self.store.dir()) {
                    tracing::warn!(dir = %self.store.dir().display(), error = %e, "cannot save the rollout history");
                }
            }
            Action::Install(fetch) => self.install(*fetch),
            Action::Reseed(reseed) => {
                let Some(current) = self.slot.current() else {
                    return;
                };
                let artifact = self.sandbox.cached_code_path(&current.code_sha256);
                tokio::spawn(reseed_module(
                    self.client.clone(),
                    self.topics.clone(),
                    *reseed,
                    current.path.clone(),
                    // The store's copy of a model rollout's code outlives the module file it
                    // first came in (pruned once newer ones arrive).
                    self.store
                        .code_path(&current.code_sha256)
                        .filter(|path| path.exists())
                        .unwrap_or_else(|| current.code_path.clone()),
                    artifact,
                ));
            }
        }
    }

    /// Checks and writes a finished fetch on a thread of its own, at background priority.
    fn install(&self, fetch: Fetch) {
        let module = module_ref(&fetch.manifest);
        let (sandbox, store) = (self.sandbox.clone(), self.store.clone());
        // A model rollout on the code served now: that code's file, to keep beside the model.
        let code_at_hand = self
            .slot
            .current()
            .map(|current| (current.code_sha256.clone(), current.code_path.clone()));
        let (found, failed) = (self.found.clone(), self.failed.0.clone());
        let failing = module.clone();
        let spawned = std::thread::Builder::new()
            .name("module-install".into())
            .spawn(move || {
                background_priority();
                match install(fetch, &store, &sandbox, code_at_hand) {
                    // Straight to the manager, bytes and all: no need to wait for the watcher's
                    // event, nor to read the file back.
                    Ok(written) => {
                        let _ = found.send(written);
                    }
                    Err(reason) => {
                        let _ = failed.send((module, reason));
                    }
                }
            });
        if let Err(e) = spawned {
            // Out of threads for now: the agent tries the rollout again later.
            let reason = Rejection::Install(format!("no thread to install it: {e}"));
            let _ = self.failed.0.send((failing, reason));
        }
    }
}

/// Checks a finished fetch and writes it into the store, with its precompiled artifact in the
/// sandbox's cache. Returns the module written, for the manager. Blocking.
/// A model rollout's model goes in after its code: fetched with it, or the file of the code
/// served now (`code_at_hand`: its digest and path), kept in the store so a restart finds it.
fn install(
    fetch: Fetch,
    store: &ModuleStore,
    sandbox: &Sandbox,
    code_at_hand: Option<(String, PathBuf)>,
) -> Result<Found, Rejection> {
    let started = Instant::now();
    let cpu = thread_cpu_time();
    let manifest = fetch.manifest.clone();
    let code_sha256 = package::code_of(&manifest).sha256;
    // With every chunk checked against its signed digest, a whole that still fails is the signed
    // bytes' fault (condemned); without per-chunk digests it may be a corrupted chunk (tried
    // again). Not Wasm is always the signed bytes: the whole digest matched first.
    let verified = fetch.chunks_verified();
    let fetched = fetch.finish().map_err(|e| {
        if verified || matches!(e, TransferError::NotWasm | TransferError::NotModel(_)) {
            Rejection::Transfer(e)
        } else {
            Rejection::Garbled(e)
        }
    })?;
    let checked = started.elapsed();
    if let Some((artifact, code)) = &fetched.artifact {
        // Its digest was checked against the signed manifest by `finish`.
        if let Err(e) = sandbox.store_precompiled(&code_sha256, code) {
            tracing::warn!(artifact = %artifact.sha256, error = %e, "cannot store the precompiled artifact; the module will be compiled");
        }
    }
    let write_error = |e: std::io::Error| Rejection::Write {
        path: store.dir().display().to_string(),
        error: e.to_string(),
    };
    if manifest.code.is_some() {
        match (&fetched.code, code_at_hand) {
            // Its digest was checked against the signed manifest by `finish`.
            (Some(code), _) => {
                store
                    .install_code(&code_sha256, code)
                    .map_err(write_error)?;
            }
            // A link, not a copy (30 MB): the store's copy is hashed against the signed digest
            // whenever it is loaded from there.
            (None, Some((served, path))) if served == code_sha256 => {
                store.keep_code(&code_sha256, &path).map_err(write_error)?;
            }
            _ => {
                return Err(Rejection::Install(
                    "the code the model rollout names is no longer served here".into(),
                ))
            }
        }
    }
    let path = store
        .install(&manifest, &fetched.module)
        .map_err(write_error)?;
    tracing::info!(
        file = %path.display(),
        inflate_and_check_ms = checked.as_millis() as u64,
        write_ms = (started.elapsed() - checked).as_millis() as u64,
        cpu_ms = thread_cpu_time().saturating_sub(cpu).as_millis() as u64,
        "module written"
    );
    Ok(Found::Written {
        path,
        bytes: fetched.module,
        // What `finish` checked the bytes against.
        sha256: manifest.sha256,
        model: fetched.model,
    })
}

/// Publishes a module's chunks (and its precompiled artifact's), then its manifest, retained.
async fn reseed_module(
    client: AsyncClient,
    topics: Topics,
    reseed: Reseed,
    module: PathBuf,
    code: PathBuf,
    artifact: Option<PathBuf>,
) {
    let manifest = reseed.manifest;
    let module_bytes = match tokio::fs::read(&module).await {
        Ok(bytes) if sha256_hex(&bytes) == manifest.sha256 => bytes,
        _ => {
            tracing::warn!(file = %module.display(), "module file changed; not re-seeding it");
            return;
        }
    };
    let mut blobs = vec![module_bytes];
    if let Some(part) = &manifest.code {
        // A model rollout: its code too, which a node that never had it fetches.
        match tokio::fs::read(&code).await {
            Ok(bytes) if sha256_hex(&bytes) == part.sha256 => blobs.push(bytes),
            _ => {
                tracing::warn!(file = %code.display(), "code file changed; not re-seeding the model rollout");
                return;
            }
        }
    }
    if let (Some(described), Some(path)) = (reseed.artifact, artifact) {
        // The cache may hold code compiled here rather than the published artifact: only the
        // published bytes match the manifest.
        if let Ok(code) = tokio::fs::read(path).await {
            if sha256_hex(&code) == described.sha256 {
                blobs.push(code);
            }
        }
    }
    let started = Instant::now();
    let mut chunks = 0;
    for (n, blob) in blobs.iter().enumerate() {
        let (_, pieces) = package::cut(blob, manifest.chunk_size, &manifest.encoding);
        // Chunks are cut (and deflated) again here: with per-chunk digests in the manifest they
        // must come out byte for byte as the publisher's, or fetching nodes would drop every one.
        let signed = match n {
            0 => &manifest.chunk_sha256,
            1 if manifest.code.is_some() => match &manifest.code {
                Some(part) => &part.chunk_sha256,
                None => continue,
            },
            _ => match manifest
                .artifacts
                .iter()
                .find(|a| a.sha256 == sha256_hex(blob))
            {
                Some(artifact) => &artifact.chunk_sha256,
                None => continue,
            },
        };
        if !signed.is_empty() && *signed != package::chunk_digests(&pieces) {
            tracing::error!(
                module = %label(&module_ref(&manifest)),
                "cannot re-seed: this node's compressor does not reproduce the published chunks"
            );
            return;
        }
        for chunk in pieces {
            let topic = topics.chunk(&chunk.sha256, chunk.index);
            chunks += 1;
            if let Err(e) = client
                .publish(topic, QoS::AtLeastOnce, true, chunk.encode_to_vec())
                .await
            {
                tracing::error!(error = %e, "re-seeding stopped: cannot publish a chunk");
                return;
            }
        }
    }
    let topic = topics.manifest(&manifest.name);
    match client
        .publish(topic, QoS::AtLeastOnce, true, manifest.encode_to_vec())
        .await
    {
        Ok(()) => tracing::info!(
            module = %label(&module_ref(&manifest)),
            chunks,
            ms = started.elapsed().as_millis() as u64,
            "module re-seeded on the broker"
        ),
        Err(e) => tracing::error!(error = %e, "re-seeding stopped: cannot publish the manifest"),
    }
}
