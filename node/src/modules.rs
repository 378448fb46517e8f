//! The module manager: which classifier module a node serves, and how it changes.
//!
//! Modules are `.wasm` files in the node's module directory (`--modules`). On start the newest
//! file that loads and passes its self-test is served. After that, the [`ModuleManager`] takes
//! every complete new file the directory watcher reports (a rolled-out module renamed into place,
//! or one an operator copied in), compiles it in the background, self-tests it, builds the
//! workers' instances ahead of time, and only then swaps it into the [`ModuleSlot`]. Jobs already
//! running finish on the module they started with; the next job runs on the new one and does not
//! wait for anything. A file that fails any step is rejected: the reason goes to the logs and the
//! node's status, a marker keeps it from being tried again (also after a restart), and the
//! previous module keeps serving.

use crate::sandbox::{LoadedModule, Sandbox};
use crate::trust::ModuleTrust;
use isomesh_protos::rollout_state::Phase;
use isomesh_protos::{ModuleManifest, ModuleRef, RolloutState};
use prost::Message;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// Folder of the module directory where rejected modules are remembered, by sha256.
const REJECTED_DIR: &str = ".rejected";

/// The module currently served. Cheap to read; replaced as a whole.
#[derive(Default)]
pub struct ModuleSlot {
    current: RwLock<Option<Arc<LoadedModule>>>,
    /// Modules installed over another one (metrics: `isomesh_module_swaps_total`).
    swaps: std::sync::atomic::AtomicU64,
}

impl ModuleSlot {
    /// The module to run the next job on, if any is installed.
    pub fn current(&self) -> Option<Arc<LoadedModule>> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Serves `module` from the next job on.
    pub fn install(&self, module: Arc<LoadedModule>) {
        let previous = match self.current.write() {
            Ok(mut guard) => guard.replace(module),
            Err(poisoned) => poisoned.into_inner().replace(module),
        };
        if previous.is_some() {
            self.swaps
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// How many times a module replaced another since the node started.
    pub fn swaps(&self) -> u64 {
        self.swaps.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// What became of the newest module this node heard of; read by status reports. Setting it
/// wakes the status reporter so a swap or a rejection is public at once.
#[derive(Default)]
pub struct RolloutBoard {
    state: Mutex<Option<RolloutState>>,
    pub changed: tokio::sync::Notify,
}

impl RolloutBoard {
    pub fn set(&self, module: ModuleRef, phase: Phase, chunks: (u32, u32), reason: String) {
        let state = RolloutState {
            module: Some(module),
            phase: phase as i32,
            chunks_done: chunks.0,
            chunk_count: chunks.1,
            reason,
        };
        match self.state.lock() {
            Ok(mut guard) => *guard = Some(state),
            Err(poisoned) => *poisoned.into_inner() = Some(state),
        }
        self.changed.notify_one();
    }

    pub fn get(&self) -> Option<RolloutState> {
        match self.state.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// `.wasm` files of `dir`, newest first.
pub fn module_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if crate::watcher::is_module_file(&path) && path.is_file() {
            let modified = entry.metadata().and_then(|m| m.modified()).ok();
            files.push((modified, path));
        }
    }
    files.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    Ok(files.into_iter().map(|(_, path)| path).collect())
}

/// Loads the newest good module of `dir` that `trust` lets run, logging every file it had to
/// reject.
pub fn load_newest(
    sandbox: &Sandbox,
    trust: &ModuleTrust,
    dir: &Path,
) -> Option<Arc<LoadedModule>> {
    let files = match module_files(dir) {
        Ok(files) => files,
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot list the module directory");
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
        let sha256 = crate::sandbox::sha256_hex(&bytes);
        if let Some(reason) = rejected_before(dir, &sha256) {
            tracing::info!(file = %path.display(), %reason, "skipping a module rejected before");
            continue;
        }
        if let Err(reason) = trust.check(&path, &sha256) {
            tracing::error!(file = %path.display(), %reason, "module refused");
            continue;
        }
        match sandbox.load_bytes(&path, &bytes, sha256) {
            Ok(module) => {
                tracing::info!(
                    file = %path.display(),
                    name = %module.info.name,
                    version = %module.info.version,
                    sha256 = %module.sha256,
                    from_cache = module.compiled.from_cache,
                    compile_ms = module.compiled.elapsed.as_millis() as u64,
                    "module loaded"
                );
                return Some(module);
            }
            Err(e) => tracing::error!(error = %e, "module rejected"),
        }
    }
    None
}

/// The manifest a rollout wrote beside a module file, if there is one (unchecked).
pub fn read_sidecar(module: &Path) -> Option<ModuleManifest> {
    let bytes = std::fs::read(crate::trust::sidecar_path(module)).ok()?;
    ModuleManifest::decode(bytes.as_slice()).ok()
}

/// Why the module with digest `sha256` was rejected on this node before, if it was.
pub fn rejected_before(dir: &Path, sha256: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(REJECTED_DIR).join(sha256)).ok()
}

/// Remembers that the module with digest `sha256` was rejected, and why.
pub fn mark_rejected(dir: &Path, sha256: &str, reason: &str) {
    if sha256.is_empty() {
        return;
    }
    let marker_dir = dir.join(REJECTED_DIR);
    if let Err(e) = std::fs::create_dir_all(&marker_dir)
        .and_then(|_| std::fs::write(marker_dir.join(sha256), reason))
    {
        tracing::warn!(error = %e, "cannot record a rejected module; it may be tried again");
    }
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
    pub dir: PathBuf,
    /// Which files may run at all.
    pub trust: ModuleTrust,
    /// Instances to build before a swap: one per worker.
    pub workers: usize,
    /// Module files kept on disk (the newest ones); older ones are deleted after a swap.
    pub keep: usize,
}

/// How a module file the manager considered ended.
pub enum Considered {
    Served(Arc<LoadedModule>),
    Rejected {
        module: ModuleRef,
        reason: String,
    },
    /// Already served, rejected before, or gone.
    Skipped,
}

impl ModuleManager {
    /// Runs on its own thread, one file at a time, until `found` closes. `done` hears of every
    /// file that was served or rejected.
    pub fn spawn(
        self,
        found: std::sync::mpsc::Receiver<PathBuf>,
        done: tokio::sync::mpsc::UnboundedSender<Considered>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("module-manager".into())
            .spawn(move || {
                background_priority();
                // A file is often reported twice (by the rollout agent and by the watcher): an
                // unchanged file (same path, size and time) is not read and hashed again.
                let mut last_seen = None;
                while let Ok(path) = found.recv() {
                    let stamp = std::fs::metadata(&path)
                        .ok()
                        .map(|m| (path.clone(), m.len(), m.modified().ok()));
                    if stamp.is_some() && stamp == last_seen {
                        continue;
                    }
                    last_seen = stamp;
                    let outcome = self.consider(&path);
                    if !matches!(outcome, Considered::Skipped) && done.send(outcome).is_err() {
                        return;
                    }
                }
            })
    }

    /// Loads, self-tests and swaps in one module file, or rejects it.
    pub fn consider(&self, path: &Path) -> Considered {
        let Ok(bytes) = std::fs::read(path) else {
            return Considered::Skipped; // gone again
        };
        let sha256 = crate::sandbox::sha256_hex(&bytes);
        if self.slot.current().is_some_and(|m| m.sha256 == sha256) {
            return Considered::Skipped;
        }
        if let Some(reason) = rejected_before(&self.dir, &sha256) {
            tracing::info!(file = %path.display(), %reason, "skipping a module rejected before");
            return Considered::Skipped;
        }
        let trusted = self.trust.check(path, &sha256);
        // The name and version to report: the verified manifest's, else what the unchecked
        // sidecar says (read again only then).
        let label = match &trusted {
            Ok(Some(verified)) => Some(verified.clone()),
            _ => read_sidecar(path).filter(|m| m.sha256 == sha256),
        };
        let mut module_ref = ModuleRef {
            name: label.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
            version: label
                .as_ref()
                .map(|m| m.version.clone())
                .unwrap_or_default(),
            sha256: sha256.clone(),
        };
        let manifest = match trusted {
            Ok(verified) => verified,
            // No marker: signing the file (or trusting its key) and restarting fixes this.
            Err(reason) => return self.reject(path, module_ref, reason),
        };
        self.board
            .set(module_ref.clone(), Phase::Loading, (0, 0), String::new());
        let started = Instant::now();
        let module = match self.sandbox.load_bytes(path, &bytes, sha256.clone()) {
            Ok(module) => module,
            Err(e) => {
                // The module itself is bad: remember it so it is never compiled again.
                let reason = e.to_string();
                mark_rejected(&self.dir, &sha256, &reason);
                return self.reject(path, module_ref, reason);
            }
        };
        if let Some(m) = &manifest {
            if m.name != module.info.name || m.version != module.info.version {
                // The pairing is wrong, not the module: no marker (the same module may yet come
                // with a true manifest), but the mislabelled file goes, so no restart serves it.
                let reason = format!(
                    "the module says it is {}@{}, its signed manifest says {}@{}",
                    module.info.name, module.info.version, m.name, m.version
                );
                let _ = std::fs::remove_file(path);
                let _ = std::fs::remove_file(crate::trust::sidecar_path(path));
                return self.reject(path, module_ref, reason);
            }
        }
        if let Err(e) = self.sandbox.prewarm(&module, self.workers) {
            return self.reject(path, module_ref, format!("cannot start the module: {e}"));
        }
        let previous = self.slot.current();
        module_ref.name = module.info.name.clone();
        module_ref.version = module.info.version.clone();
        tracing::info!(
            file = %path.display(),
            name = %module.info.name,
            version = %module.info.version,
            sha256 = %module.sha256,
            previous = %previous.map(|p| format!("{}@{}", p.info.name, p.info.version)).unwrap_or_default(),
            from_cache = module.compiled.from_cache,
            compile_ms = module.compiled.elapsed.as_millis() as u64,
            ready_ms = started.elapsed().as_millis() as u64,
            "module swapped in"
        );
        // After the log line, so whoever sees the new module in a status finds the swap logged.
        self.slot.install(module.clone());
        self.board
            .set(module_ref, Phase::Serving, (0, 0), String::new());
        self.prune(&module.path);
        Considered::Served(module)
    }

    fn reject(&self, path: &Path, module: ModuleRef, reason: String) -> Considered {
        tracing::error!(
            file = %path.display(),
            %reason,
            "module rejected; the previous module keeps serving"
        );
        self.board
            .set(module.clone(), Phase::Rejected, (0, 0), reason.clone());
        Considered::Rejected { module, reason }
    }

    /// Deletes module files past the newest `keep`, never the one being served.
    fn prune(&self, serving: &Path) {
        let Ok(files) = module_files(&self.dir) else {
            return;
        };
        for old in files.into_iter().skip(self.keep.max(1)) {
            if old == serving {
                continue;
            }
            tracing::info!(file = %old.display(), "deleting an old module file");
            let _ = std::fs::remove_file(&old);
            let _ = std::fs::remove_file(crate::trust::sidecar_path(&old));
        }
    }
}
