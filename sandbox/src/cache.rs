//! Compiled machine code on disk, so a module is compiled once per host and engine.
//!
//! Compiling the ~31 MB classifier with Cranelift takes ~10-20 s and ~600 MB; loading compiled
//! code back takes milliseconds. Entries are named `{module sha256}-{engine id}.cwasm`, so code is
//! never used across wasmtime versions, settings or CPU features (wasmtime checks that header
//! again on load); they are written atomically, and a lock file per entry makes a second node
//! of the host wait for the first one's compilation instead of compiling the same module again.
//! Cranelift's per-function incremental cache lives in `incremental/`: a new version that changes
//! only weights or a little code reuses the machine code of every unchanged function.

use crate::{LoadError, Sandbox};
use isomesh_module::digest::sha256_hex;
use isomesh_module::store::write_atomically;
use std::path::{Path, PathBuf};
use wasmtime::Module;

impl Sandbox {
    /// Stores a precompiled artifact for the module with digest `module_sha256` where
    /// [`Sandbox::load_file`] looks for compiled code. Only for artifacts whose digest was checked
    /// against a signed manifest: loading one runs its machine code.
    pub fn store_precompiled(&self, module_sha256: &str, code: &[u8]) -> std::io::Result<()> {
        let Some(dir) = &self.config.cache_dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir)?;
        let stem = format!("{module_sha256}-{}", self.engine_id());
        write_atomically(&dir.join(format!("{stem}.cwasm")), code)
    }

    /// Where the compiled code of the module with digest `module_sha256` is cached, if caching.
    pub fn cached_code_path(&self, module_sha256: &str) -> Option<PathBuf> {
        let dir = self.config.cache_dir.as_ref()?;
        Some(dir.join(format!("{module_sha256}-{}.cwasm", self.engine_id())))
    }

    pub(crate) fn compile_cached(
        &self,
        path: &Path,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Module, bool), LoadError> {
        let compile = || {
            Module::new(&self.engine, bytes).map_err(|e| LoadError::Compile {
                path: path.to_owned(),
                reason: format!("{e:#}"),
            })
        };
        let Some(dir) = &self.config.cache_dir else {
            return Ok((compile()?, false));
        };
        let stem = format!("{sha256}-{}", self.engine_id());
        let cached = dir.join(format!("{stem}.cwasm"));
        // The lock makes a second node on this host wait for the first one's compilation
        // instead of compiling the same module again.
        let _lock = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::File::create(dir.join(format!("{stem}.lock"))))
            .and_then(|file| file.lock().map(|_| file));
        if cached.is_file() {
            // SAFETY: files in the cache dir are written only by `Module::serialize` below, renamed
            // into place atomically, and named after the engine's compatibility hash; wasmtime checks
            // that header again on load.
            match unsafe { Module::deserialize_file(&self.engine, &cached) } {
                Ok(module) => return Ok((module, true)),
                Err(e) => {
                    tracing::warn!(file = %cached.display(), error = %e, "ignoring unusable compiled-module cache entry")
                }
            }
        }
        let module = compile()?;
        match module.serialize() {
            Ok(code) => {
                if let Err(e) = write_atomically(&cached, &code) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot write the compiled-module cache");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot serialize compiled module"),
        }
        Ok((module, false))
    }
}

/// Cranelift's incremental compilation cache on disk: one file per compiled function, named by
/// the digest of its key (the function's body and the compiler's settings).
#[derive(Debug)]
pub(crate) struct FunctionCache {
    pub(crate) dir: PathBuf,
}

impl FunctionCache {
    fn path(&self, key: &[u8]) -> PathBuf {
        let digest = sha256_hex(key);
        self.dir.join(&digest[..2]).join(&digest[2..])
    }
}

impl wasmtime::CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
        std::fs::read(self.path(key)).ok().map(Into::into)
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let path = self.path(key);
        let Some(dir) = path.parent() else {
            return false;
        };
        std::fs::create_dir_all(dir)
            .and_then(|_| write_atomically(&path, &value))
            .is_ok()
    }
}
