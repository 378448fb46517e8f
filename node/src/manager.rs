//! The module manager: which classifier module a node serves, and how it changes.
//!
//! Modules are `.wasm` files in the node's [`ModuleStore`]. On start, the [`ModuleManager`]
//! thread first serves the newest file that is trusted, loads and passes its self-test
//! ([`load_newest`]): newest by its signed manifest's publication time (what the rollout history
//! orders by), not by the file's modification time, which anyone copying a file sets. The node
//! is connected meanwhile and its workers wait ([`ModuleSlot::wait_started`]). After that the
//! thread takes every complete new file the directory watcher (or the rollout
//! executor) reports, checks its signature ([`ModuleTrust`]: also for files copied in by hand),
//! compiles it in the background, self-tests it, builds the workers' instances ahead of time,
//! and only then swaps it into the [`ModuleSlot`]. Jobs already running finish on the module they
//! started with; the next job runs on the new one and waits for nothing. A file that fails any
//! step is rejected: the reason goes to the logs and the node's status, a marker keeps bytes
//! that failed to load from being tried again (also after a restart), and the previous module
//! keeps serving. A file copied in by hand obeys the rollout rules too
//! ([`isomesh_module::history`]): its signed manifest must be newer than the served module's,
//! and not a downgrade unless forced.

use crate::slot::{ModuleSlot, RolloutBoard};
use isomesh_module::digest::sha256_hex;
use isomesh_module::history::History;
use isomesh_module::rejection::{check_identity, Rejection};
use isomesh_module::selftest;
use isomesh_module::store::{read_sidecar, ModuleStore};
use isomesh_module::trust::ModuleTrust;
use isomesh_protos::rollout_state::Phase;
use isomesh_protos::{ModelFile, ModuleManifest, ModuleRef};
use isomesh_sandbox::{LoadedModule, ModelRollout, Sandbox};
use prost::Message;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Loads the newest good module of `store` that `trust` lets run, logging every file it had to
/// skip or reject; `board` shows each file being loaded (the node's status says "loading").
pub fn load_newest(
    sandbox: &Sandbox,
    trust: &ModuleTrust,
    store: &ModuleStore,
    board: &RolloutBoard,
) -> Option<Arc<LoadedModule>> {
    let files = match store.module_files() {
        Ok(files) => newest_signed_first(files),
        Err(e) => {
            tracing::error!(dir = %store.dir().display(), error = %e, "cannot list the module directory");
            return None;
        }
    };
    for path in files {
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read a module file");
                continue;
            }
        };
        let sha256 = sha256_hex(&bytes);
        if let Some(reason) = store.rejected_before(&sha256) {
            tracing::info!(file = %path.display(), %reason, "skipping a module rejected before");
            continue;
        }
        let (module_ref, manifest) = match trust.check(&path, &sha256) {
            Ok(verified) => (labelled(&path, &sha256, verified.as_ref()), verified),
            Err(reason) => {
                tracing::error!(file = %path.display(), %reason, "module refused");
                continue;
            }
        };
        board.set(module_ref.clone(), Phase::Loading);
        let loaded = if is_model_file(&path) {
            load_model_file(
                sandbox,
                store,
                None,
                &path,
                &bytes,
                None,
                sha256,
                manifest.as_ref(),
            )
            .map_err(|(reason, _)| reason.to_string())
        } else {
            sandbox
                .load(&path, &bytes, sha256, self_test)
                .map_err(|e| e.to_string())
        };
        match loaded {
            Ok(module) => {
                tracing::info!(
                    file = %path.display(),
                    module = %module.label(),
                    sha256 = %module.sha256,
                    from_cache = module.compiled.from_cache,
                    compile_ms = module.compiled.elapsed.as_millis() as u64,
                    "module loaded"
                );
                board.started(module.module_ref());
                return Some(module);
            }
            Err(e) => {
                tracing::error!(error = %e, "module rejected");
                board.show(isomesh_module::agent::rejected(
                    module_ref,
                    &Rejection::Load(e),
                ));
            }
        }
    }
    None
}

/// Whether `path` is a model rollout's model file (`{name}-{version}.model`).
fn is_model_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "model")
}

/// Loads a model rollout's model file (its bytes hash to `sha256`; `manifest` is its verified
/// manifest): the code it names, served already (`current`) or kept in the store, serving the
/// model. No compile when the code is served or its machine code cached. On failure, the
/// reason and whether the model itself is bad (to remember it). `decoded`: the bytes as a
/// model file, when the caller decoded them already.
#[allow(clippy::too_many_arguments)]
fn load_model_file(
    sandbox: &Sandbox,
    store: &ModuleStore,
    current: Option<Arc<LoadedModule>>,
    path: &Path,
    bytes: &[u8],
    decoded: Option<ModelFile>,
    sha256: String,
    manifest: Option<&ModuleManifest>,
) -> Result<Arc<LoadedModule>, (Rejection, bool)> {
    let refused = |why: String, mark: bool| (Rejection::Load(why), mark);
    let Some(manifest) = manifest else {
        return Err(refused(
            "a model file serves only with its signed manifest beside it, which names the code that runs it".into(),
            false,
        ));
    };
    let Some(code) = &manifest.code else {
        return Err(refused(
            "its manifest names no code to run it".into(),
            false,
        ));
    };
    let file = match decoded {
        Some(file) => file,
        None => ModelFile::decode(bytes)
            .map_err(|e| refused(format!("not an encoded model file: {e}"), true))?,
    };
    if file.code_sha256 != code.sha256 {
        return Err(refused(
            "it was made for other code than its manifest names".into(),
            true,
        ));
    }
    let Some(model) = file.model else {
        return Err(refused("it holds no model".into(), true));
    };
    if sha256_hex(&model.onnx) != model.sha256 {
        return Err(refused(
            "its ONNX bytes do not hash to the digest it names".into(),
            true,
        ));
    }
    let base = match current.filter(|c| c.code_sha256 == code.sha256) {
        Some(served) => {
            tracing::info!(
                file = %path.display(),
                code = %isomesh_module::digest::short(&code.sha256),
                "a model for the code served now: building its plan, nothing to compile"
            );
            served
        }
        None => {
            let missing = |why: String| {
                refused(
                    format!(
                        "its code {} {why}: roll the module out again",
                        isomesh_module::digest::short(&code.sha256)
                    ),
                    false,
                )
            };
            let code_path = store
                .code_path(&code.sha256)
                .ok_or_else(|| missing("is not a digest".into()))?;
            let code_bytes = std::fs::read(&code_path).map_err(|e| {
                missing(format!("cannot be read from {}: {e}", code_path.display()))
            })?;
            if sha256_hex(&code_bytes) != code.sha256 {
                return Err(missing(format!("in {} has changed", code_path.display())));
            }
            sandbox
                .load(&code_path, &code_bytes, code.sha256.clone(), self_test)
                .map_err(|e| missing(format!("does not load: {e}")))?
        }
    };
    // The code's own version: a model served now renames `info` after its rollout.
    check_identity(manifest, &base.info.name, &base.code_version).map_err(|e| (e, false))?;
    let rollout = ModelRollout {
        path: path.to_owned(),
        sha256,
        name: manifest.name.clone(),
        version: manifest.version.clone(),
    };
    sandbox
        .load_with_model(&base, model, Some(rollout), self_test)
        .map_err(|e| refused(e.to_string(), true))
}

/// The module a file holds, as statuses name it: the name and version of its verified manifest,
/// else what the unchecked sidecar says (only shown, never trusted).
fn labelled(path: &Path, sha256: &str, verified: Option<&ModuleManifest>) -> ModuleRef {
    let label = verified
        .cloned()
        .or_else(|| read_sidecar(path).filter(|m| m.sha256 == sha256));
    ModuleRef {
        name: label.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
        version: label
            .as_ref()
            .map(|m| m.version.clone())
            .unwrap_or_default(),
        sha256: sha256.to_string(),
        code_sha256: label
            .map(|m| isomesh_module::package::code_of(&m).sha256)
            .unwrap_or_else(|| sha256.to_string()),
        model_sha256: String::new(),
    }
}

/// Orders module files (given newest modification first) by the publication time of the manifest
/// beside them, newest first; files without one (unsigned, for `--allow-unsigned`) come last,
/// and ties keep the modification order. The manifests are not checked here: a forged one fails
/// the trust check that follows, and the next file is tried.
fn newest_signed_first(files: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut keyed: Vec<(u64, PathBuf)> = files
        .into_iter()
        .map(|path| {
            let published = read_sidecar(&path).map_or(0, |m| m.published_at_ms);
            (published, path)
        })
        .collect();
    // Stable: equal times keep the modification order.
    keyed.sort_by_key(|(published, _)| std::cmp::Reverse(*published));
    keyed.into_iter().map(|(_, path)| path).collect()
}

/// The self-test a module passes before it serves, on its probe instance; the log says which
/// checks it could run (a classifier of other classes has no known photo to recognise).
pub fn self_test(
    probe: &mut isomesh_sandbox::Instance,
    info: &isomesh_protos::GuestInfo,
) -> Result<std::time::Duration, selftest::SelfTestError> {
    let (service, checked) = selftest::run_saying(&mut probe.classifier(), info)?;
    tracing::info!(
        model = %isomesh_module::digest::short(&info.model_sha256),
        checks = checked.describe(),
        "self-test passed"
    );
    Ok(service)
}

/// Gives back to the OS the memory a load freed on this thread. A load reads the module (~30 MB)
/// and its cached machine code (~60 MB) into buffers that are dropped once checked and copied
/// into wasmtime's own mappings, and compiling or self-testing frees more. mimalloc, the
/// binaries' allocator, keeps a thread's freed pages until that thread allocates again, and this
/// thread then waits for the next rollout: a node with one worker held 234 MiB once idle, 148
/// MiB with mimalloc purging at once (`MIMALLOC_PURGE_DELAY=0`; `isomesh bench mesh`, same run).
fn release_freed_memory() {
    // SAFETY: mi_collect has no preconditions. Where mimalloc is not the global allocator (this
    // library's tests), its heaps are empty and it does nothing.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// CPU time the calling thread has used so far. Logged beside wall times: on a device held to a
/// CPU quota, a load's wall time is mostly waiting for the quota (shared with the workers, which
/// run on other cores at the same time whatever their priority), and only the CPU time says what
/// the work itself costs.
pub fn thread_cpu_time() -> std::time::Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer. On failure `now` stays
    // zero, which only shows as 0 ms in a log line.
    let _ = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    std::time::Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Lowers the calling thread's CPU priority (nice 10): compiling, inflating and checking a new
/// module must not slow the jobs the current module is serving meanwhile.
pub fn background_priority() {
    // SAFETY: setpriority has no memory-safety preconditions; on Linux PRIO_PROCESS with id 0
    // applies to the calling thread only. Failure just leaves the priority as it was.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
}

/// Swaps modules in as the directory watcher finds them.
pub struct ModuleManager {
    pub sandbox: Arc<Sandbox>,
    pub slot: Arc<ModuleSlot>,
    pub board: Arc<RolloutBoard>,
    pub store: ModuleStore,
    /// Which files may run at all.
    pub trust: ModuleTrust,
    /// Instances to build before a swap: one per worker.
    pub workers: usize,
    /// Module files kept on disk (the newest ones); older ones are deleted after a swap.
    pub keep: usize,
}

/// A module file for the manager to consider.
pub enum Found {
    /// A complete file the directory watcher found (copied in by hand, or written by a rollout).
    File(PathBuf),
    /// A fetched module the rollout executor has just written, with its bytes and their digest,
    /// which it checked against the signed manifest: the manager serves them without reading
    /// the file back and hashing it again (14-30 MB; on a device a few hundred milliseconds of
    /// a rollout).
    Written {
        path: PathBuf,
        bytes: Vec<u8>,
        sha256: String,
        /// A model file's bytes, decoded.
        model: Option<ModelFile>,
    },
}

impl From<PathBuf> for Found {
    fn from(path: PathBuf) -> Found {
        Found::File(path)
    }
}

impl Found {
    fn path(&self) -> &Path {
        match self {
            Found::File(path) | Found::Written { path, .. } => path,
        }
    }
}

/// How a module file the manager considered ended.
pub enum Considered {
    Served(Arc<LoadedModule>),
    Rejected {
        module: ModuleRef,
        /// The reason, when the refusal is remembered in the store (the bytes failed to load).
        marked: Option<String>,
    },
    /// Already served, rejected before, or gone.
    Skipped,
}

impl ModuleManager {
    /// Runs on its own thread: first loads the module the node starts with ([`load_newest`]),
    /// installs it, ends the slot's start and sends it (or `None`) to `started`; then takes one
    /// file at a time until `found` closes. `done` hears of every file that was served or
    /// rejected.
    pub fn spawn(
        self,
        found: std::sync::mpsc::Receiver<Found>,
        done: tokio::sync::mpsc::UnboundedSender<Considered>,
        started: tokio::sync::oneshot::Sender<Option<Arc<LoadedModule>>>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("module-manager".into())
            .spawn(move || {
                // At normal priority: nothing is served before it.
                let first = load_newest(&self.sandbox, &self.trust, &self.store, &self.board);
                match &first {
                    Some(module) => {
                        // The workers' instances, so the first jobs do not wait for them.
                        if let Err(e) = self.sandbox.prewarm(module, self.workers) {
                            tracing::warn!(error = %e, "cannot build the workers' instances ahead");
                        }
                        self.slot.install(module.clone());
                    }
                    None => tracing::warn!(
                        dir = %self.store.dir().display(),
                        "no usable classifier module yet; jobs get an error answer until one is installed"
                    ),
                }
                self.slot.finish_start();
                let _ = started.send(first);
                release_freed_memory();
                background_priority();
                // A file is often reported twice (by the rollout executor and by the watcher):
                // an unchanged file (same path, size and time) is not read and hashed again.
                let mut last_seen = None;
                while let Ok(found) = found.recv() {
                    let path = found.path().to_owned();
                    let stamp = std::fs::metadata(&path)
                        .ok()
                        .map(|m| (path, m.len(), m.modified().ok()));
                    if stamp.is_some() && stamp == last_seen {
                        continue;
                    }
                    last_seen = stamp;
                    let outcome = self.consider(found);
                    if !matches!(outcome, Considered::Skipped) {
                        release_freed_memory();
                        if done.send(outcome).is_err() {
                            return;
                        }
                    }
                }
            })
    }

    /// Loads, self-tests and swaps in one module file, or rejects it.
    pub fn consider(&self, found: Found) -> Considered {
        let (path, bytes, sha256, decoded) = match found {
            Found::File(path) => {
                let Ok(bytes) = std::fs::read(&path) else {
                    return Considered::Skipped; // gone again
                };
                let sha256 = sha256_hex(&bytes);
                (path, bytes, sha256, None)
            }
            Found::Written {
                path,
                bytes,
                sha256,
                model,
            } => (path, bytes, sha256, model),
        };
        let path = path.as_path();
        if self.slot.current().is_some_and(|m| m.sha256 == sha256) {
            return Considered::Skipped;
        }
        if let Some(reason) = self.store.rejected_before(&sha256) {
            tracing::info!(file = %path.display(), %reason, "skipping a module rejected before");
            return Considered::Skipped;
        }
        let trusted = self.trust.check(path, &sha256);
        let module_ref = labelled(
            path,
            &sha256,
            trusted.as_ref().ok().and_then(Option::as_ref),
        );
        let manifest = match trusted {
            Ok(verified) => verified,
            // No marker: signing the file (or trusting its key) and restarting fixes this.
            Err(untrusted) => return self.reject(path, module_ref, untrusted.into(), false),
        };
        if let Some(offered) = &manifest {
            // The manifest of the module served now (it passed the trust check when loaded).
            let served = self.slot.current().and_then(|current| {
                read_sidecar(&current.path).filter(|m| m.sha256 == current.sha256)
            });
            if let Some(served) = served {
                if let Err(reason) = History::serving(&served).check(offered) {
                    // An older signed file copied in: refused, not marked (the same bytes may
                    // come again with a newer manifest).
                    return self.reject(path, module_ref, reason, false);
                }
            }
        }
        self.board.set(module_ref.clone(), Phase::Loading);
        let started = (Instant::now(), thread_cpu_time());
        if is_model_file(path) {
            let current = self.slot.current();
            return match load_model_file(
                &self.sandbox,
                &self.store,
                current,
                path,
                &bytes,
                decoded,
                sha256,
                manifest.as_ref(),
            ) {
                Ok(module) => self.swap_in(path, module, started),
                Err((reason, mark)) => self.reject(path, module_ref, reason, mark),
            };
        }
        let module = match self.sandbox.load(path, &bytes, sha256.clone(), self_test) {
            Ok(module) => module,
            // The module itself is bad: remember it so it is never compiled again.
            Err(e) => return self.reject(path, module_ref, Rejection::Load(e.to_string()), true),
        };
        if let Some(manifest) = &manifest {
            if let Err(mislabelled) =
                check_identity(manifest, &module.info.name, &module.info.version)
            {
                // The pairing is wrong, not the module: no marker (the same module may yet come
                // with a true manifest), but the mislabelled file goes, so no restart serves it.
                self.store.remove(path);
                return self.reject(path, module_ref, mislabelled, false);
            }
        }
        self.swap_in(path, module, started)
    }

    /// Builds the workers' instances of a loaded module, then swaps it in.
    /// `started`: when its load began, in wall and this thread's CPU time.
    fn swap_in(
        &self,
        path: &Path,
        module: Arc<LoadedModule>,
        started: (Instant, std::time::Duration),
    ) -> Considered {
        let module_ref = module.module_ref();
        if let Err(e) = self.sandbox.prewarm(&module, self.workers) {
            return self.reject(path, module_ref, Rejection::Start(e.to_string()), false);
        }
        let previous = self.slot.current();
        tracing::info!(
            file = %path.display(),
            module = %module.label(),
            sha256 = %module.sha256,
            previous = %previous.map(|p| p.label()).unwrap_or_default(),
            from_cache = module.compiled.from_cache,
            compile_ms = module.compiled.elapsed.as_millis() as u64,
            ready_ms = started.0.elapsed().as_millis() as u64,
            ready_cpu_ms = thread_cpu_time().saturating_sub(started.1).as_millis() as u64,
            "module swapped in"
        );
        // After the log line, so whoever sees the new module in a status finds the swap logged.
        self.slot.install(module.clone());
        self.board.set(module.module_ref(), Phase::Serving);
        self.store.prune(self.keep, &module.path);
        Considered::Served(module)
    }

    fn reject(&self, path: &Path, module: ModuleRef, reason: Rejection, mark: bool) -> Considered {
        tracing::error!(
            file = %path.display(),
            %reason,
            "module rejected; the previous module keeps serving"
        );
        let text = reason.to_string();
        if mark {
            self.store.mark_rejected(&module.sha256, &text);
        }
        self.board
            .show(isomesh_module::agent::rejected(module.clone(), &reason));
        Considered::Rejected {
            module,
            marked: mark.then_some(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_start_the_newest_signed_manifest_wins_not_the_newest_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(dir.path()).unwrap();
        let install = |version: &str, published_at_ms: u64| {
            let manifest = ModuleManifest {
                name: "m".into(),
                version: version.into(),
                sha256: sha256_hex(version.as_bytes()),
                published_at_ms,
                ..Default::default()
            };
            store.install(&manifest, version.as_bytes()).unwrap()
        };
        let newer = install("0.2.0", 200);
        let older = install("0.1.0", 100);
        // The old one copied back by hand: the newest file on disk.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&older)
            .unwrap()
            .set_modified(later)
            .unwrap();
        let unsigned = dir.path().join("hand.wasm");
        std::fs::write(&unsigned, b"x").unwrap();
        let by_mtime = store.module_files().unwrap();
        assert_eq!(by_mtime[0], older);
        assert_eq!(newest_signed_first(by_mtime), vec![newer, older, unsigned]);
    }
}
