//! The module directory (`--modules`), and the one place that knows its layout:
//!
//! ```text
//! mobilenet_v2-0.2.0.wasm       a module file: served if it is the newest one that passes
//! mobilenet_v2-0.2.0.manifest   its signed manifest (the "sidecar"), written by a rollout or `isomesh sign`
//! mobilenet_v2-0.3.0.model      a model rollout: an encoded `ModelFile` (ONNX, labels, input),
//! mobilenet_v2-0.3.0.manifest   served by the code its signed manifest names, which is kept in
//! .code/{sha256}.wasm           the module file of that digest
//! .rejected/{sha256}            why the module with that digest was refused; it is never tried again
//! .name.pid.n.tmp               a file being written; renamed into place whole
//! ```
//!
//! Every write goes through [`write_atomically`]: the bytes go to a hidden temporary file in the
//! same directory, which is then renamed over the target, so a reader (the directory watcher, a
//! restarting node) never sees half a file. No fsync: a file cut short by a power loss fails its
//! load on the next start and the previous module serves, while syncing 30 MB would delay every
//! swap.

use isomesh_protos::ModuleManifest;
use prost::Message;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Folder of the module directory where rejected modules are remembered, by sha256.
const REJECTED_DIR: &str = ".rejected";
/// Folder of the module directory where the code of model rollouts is kept, by sha256.
const CODE_DIR: &str = ".code";

/// A node's module directory.
#[derive(Debug, Clone)]
pub struct ModuleStore {
    dir: PathBuf,
}

impl ModuleStore {
    /// Opens `dir`, creating it if needed.
    pub fn open(dir: &Path) -> std::io::Result<ModuleStore> {
        std::fs::create_dir_all(dir)?;
        Ok(ModuleStore {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Module files (`.wasm`, and `.model` files of model rollouts) of the directory, newest
    /// first.
    pub fn module_files(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            if is_module_file(&path) && path.is_file() {
                let modified = entry.metadata().and_then(|m| m.modified()).ok();
                files.push((modified, path));
            }
        }
        files.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
        Ok(files.into_iter().map(|(_, path)| path).collect())
    }

    /// Writes a fetched module as `{name}-{version}.wasm` with its manifest beside it, the module
    /// file last, so the directory watcher only ever sees it whole with its manifest in place.
    /// Returns the module's path.
    /// A model rollout's model is written as `{name}-{version}.model` (its code goes in first,
    /// with [`ModuleStore::install_code`]).
    pub fn install(&self, manifest: &ModuleManifest, module: &[u8]) -> std::io::Result<PathBuf> {
        let extension = if manifest.code.is_some() {
            "model"
        } else {
            "wasm"
        };
        let path = self.dir.join(format!(
            "{}-{}.{extension}",
            manifest.name, manifest.version
        ));
        write_atomically(&sidecar_path(&path), &manifest.encode_to_vec())?;
        write_atomically(&path, module)?;
        Ok(path)
    }

    /// Where the code of digest `sha256` a model rollout runs is kept (`None` for a digest
    /// that is no digest).
    pub fn code_path(&self, sha256: &str) -> Option<PathBuf> {
        crate::digest::is_sha256_hex(sha256)
            .then(|| self.dir.join(CODE_DIR).join(format!("{sha256}.wasm")))
    }

    /// Keeps `module` (whose digest the caller checked) as the code of digest `sha256`,
    /// replacing whatever was kept under that digest (a damaged copy fails its digest on load).
    pub fn install_code(&self, sha256: &str, module: &[u8]) -> std::io::Result<PathBuf> {
        let path = self.new_code_path(sha256)?;
        write_atomically(&path, module)?;
        Ok(path)
    }

    /// Keeps the module file at `module` (whose digest the caller knows to be `sha256`) as the
    /// code of that digest, unless some is kept already: a hard link where the file system
    /// allows one, else a copy.
    pub fn keep_code(&self, sha256: &str, module: &Path) -> std::io::Result<PathBuf> {
        let path = self.new_code_path(sha256)?;
        if path.exists() {
            return Ok(path);
        }
        match std::fs::hard_link(module, &path) {
            Ok(()) => Ok(path),
            Err(_) => self.install_code(sha256, &std::fs::read(module)?),
        }
    }

    /// [`ModuleStore::code_path`], with its folder made.
    fn new_code_path(&self, sha256: &str) -> std::io::Result<PathBuf> {
        let Some(path) = self.code_path(sha256) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{sha256:?} is not a sha256"),
            ));
        };
        std::fs::create_dir_all(self.dir.join(CODE_DIR))?;
        Ok(path)
    }

    /// Deletes a module file and its manifest.
    pub fn remove(&self, module: &Path) {
        let _ = std::fs::remove_file(module);
        let _ = std::fs::remove_file(sidecar_path(module));
    }

    /// Deletes module files past the newest `keep`, never `serving`.
    pub fn prune(&self, keep: usize, serving: &Path) {
        let Ok(files) = self.module_files() else {
            return;
        };
        for old in files.into_iter().skip(keep.max(1)) {
            if old == serving {
                continue;
            }
            tracing::info!(file = %old.display(), "deleting an old module file");
            self.remove(&old);
        }
        self.prune_code(serving);
    }

    /// Deletes kept code no model file left in the directory runs, except `serving`'s.
    fn prune_code(&self, serving: &Path) {
        let Ok(entries) = std::fs::read_dir(self.dir.join(CODE_DIR)) else {
            return;
        };
        let files = self.module_files().unwrap_or_default();
        let used: std::collections::HashSet<String> = files
            .iter()
            .chain(std::iter::once(&serving.to_path_buf()))
            .filter_map(|f| read_sidecar(f)?.code.map(|c| c.sha256))
            .collect();
        for entry in entries.flatten() {
            let path = entry.path();
            let sha256 = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            if !used.contains(sha256) {
                tracing::info!(file = %path.display(), "deleting code no model file runs any more");
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Why the module with digest `sha256` was rejected here before, if it was.
    pub fn rejected_before(&self, sha256: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(REJECTED_DIR).join(sha256)).ok()
    }

    /// Every module rejected here before: digest and reason.
    pub fn rejected(&self) -> Vec<(String, String)> {
        let Ok(entries) = std::fs::read_dir(self.dir.join(REJECTED_DIR)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let sha256 = entry.file_name().to_str()?.to_string();
                let reason = std::fs::read_to_string(entry.path()).ok()?;
                Some((sha256, reason))
            })
            .collect()
    }

    /// Remembers that the module with digest `sha256` was rejected, and why.
    pub fn mark_rejected(&self, sha256: &str, reason: &str) {
        if !crate::digest::is_sha256_hex(sha256) {
            return;
        }
        let marker_dir = self.dir.join(REJECTED_DIR);
        if let Err(e) = std::fs::create_dir_all(&marker_dir)
            .and_then(|_| write_atomically(&marker_dir.join(sha256), reason.as_bytes()))
        {
            tracing::warn!(error = %e, "cannot record a rejected module; it may be tried again");
        }
    }
}

/// Whether `path` names a module file (hidden and temporary files are not).
pub fn is_module_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    !hidden
        && path
            .extension()
            .is_some_and(|e| e == "wasm" || e == "model")
}

/// The signed manifest beside a module file.
pub fn sidecar_path(module: &Path) -> PathBuf {
    module.with_extension("manifest")
}

/// The manifest beside a module file, if there is one (unchecked: see [`crate::trust`]).
pub fn read_sidecar(module: &Path) -> Option<ModuleManifest> {
    let bytes = std::fs::read(sidecar_path(module)).ok()?;
    ModuleManifest::decode(bytes.as_slice()).ok()
}

/// Writes `bytes` to `path` through a hidden temporary file in the same directory and a rename,
/// so nobody ever reads a partial file. Safe from several threads and processes at once.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_installed_whole_beside_their_manifest_and_rejections_are_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(&dir.path().join("modules")).unwrap();
        let manifest = ModuleManifest {
            name: "m".into(),
            version: "1.0".into(),
            sha256: crate::digest::sha256_hex(b"\0asm"),
            ..Default::default()
        };
        let path = store.install(&manifest, b"\0asm").unwrap();
        assert_eq!(path, store.dir().join("m-1.0.wasm"));
        assert_eq!(read_sidecar(&path).unwrap().sha256, manifest.sha256);
        assert_eq!(store.module_files().unwrap(), vec![path.clone()]);
        // No temporary file is left, and none would count as a module.
        let names: Vec<_> = std::fs::read_dir(store.dir()).unwrap().flatten().collect();
        assert_eq!(names.len(), 2);
        assert!(!is_module_file(Path::new("/m/.m-1.0.wasm.1.0.tmp")));

        assert_eq!(store.rejected_before(&manifest.sha256), None);
        store.mark_rejected(&manifest.sha256, "it trapped");
        assert_eq!(
            store.rejected_before(&manifest.sha256).as_deref(),
            Some("it trapped")
        );
        assert_eq!(
            store.rejected(),
            vec![(manifest.sha256.clone(), "it trapped".to_string())]
        );
        // A digest that is no digest never becomes a path.
        store.mark_rejected("../../etc/passwd", "no");
        assert_eq!(store.rejected().len(), 1);

        store.remove(&path);
        assert!(store.module_files().unwrap().is_empty());
        assert!(read_sidecar(&path).is_none());
    }

    #[test]
    fn a_model_rollout_is_kept_as_a_model_file_with_its_code_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::open(dir.path()).unwrap();
        let code_sha = crate::digest::sha256_hex(b"\0asm code");
        let code = store.install_code(&code_sha, b"\0asm code").unwrap();
        assert_eq!(Some(code.clone()), store.code_path(&code_sha));
        // Kept from a module file: linked, the same bytes.
        let other = dir.path().join(".other.wasm");
        std::fs::write(&other, b"\0asm other").unwrap();
        let other_sha = crate::digest::sha256_hex(b"\0asm other");
        let kept = store.keep_code(&other_sha, &other).unwrap();
        assert_eq!(std::fs::read(&kept).unwrap(), b"\0asm other");
        assert!(store.code_path("../x").is_none());
        let manifest = ModuleManifest {
            name: "m".into(),
            version: "1.1.0".into(),
            sha256: crate::digest::sha256_hex(b"model"),
            code: Some(isomesh_protos::CodePart {
                sha256: code_sha.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let model = store.install(&manifest, b"model").unwrap();
        assert_eq!(model, store.dir().join("m-1.1.0.model"));
        assert_eq!(store.module_files().unwrap(), vec![model.clone()]);
        // Kept while a model file runs it, deleted once none does.
        store.prune(3, &model);
        assert!(code.exists());
        store.remove(&model);
        store.prune(3, Path::new("/none"));
        assert!(!code.exists());
    }
}
