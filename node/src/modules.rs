//! The module manager: which classifier module a node serves, and where it comes from.
//!
//! Modules are `.wasm` files in the node's module directory (`--modules`). On start the newest
//! file that loads and passes its self-test is served; a file that fails is logged with the
//! reason and skipped, so one bad file never stops a node. The current module sits in a
//! [`ModuleSlot`] the scheduler's workers read before each job: replacing it is how a swap
//! happens, and jobs already running finish on the module they started with.

use crate::sandbox::{LoadedModule, Sandbox};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The module currently served. Cheap to read; replaced as a whole.
#[derive(Default)]
pub struct ModuleSlot {
    current: RwLock<Option<Arc<LoadedModule>>>,
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
        match self.current.write() {
            Ok(mut guard) => *guard = Some(module),
            Err(poisoned) => *poisoned.into_inner() = Some(module),
        }
    }
}

/// `.wasm` files of `dir`, newest first.
pub fn module_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "wasm") && path.is_file() {
            let modified = entry.metadata().and_then(|m| m.modified()).ok();
            files.push((modified, path));
        }
    }
    files.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    Ok(files.into_iter().map(|(_, path)| path).collect())
}

/// Loads the newest good module of `dir`, logging every file it had to reject.
pub fn load_newest(sandbox: &Sandbox, dir: &Path) -> Option<Arc<LoadedModule>> {
    let files = match module_files(dir) {
        Ok(files) => files,
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot list the module directory");
            return None;
        }
    };
    for path in files {
        match sandbox.load_file(&path) {
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
