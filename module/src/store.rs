//! The module directory (`--modules`), and the one place that knows its layout:
//!
//! ```text
//! mobilenet_v2-0.2.0.wasm       a module file: served if it is the newest one that passes
//! mobilenet_v2-0.2.0.manifest   its signed manifest (the "sidecar"), written by a rollout or `isomesh sign`
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

    /// `.wasm` files of the directory, newest first.
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
    pub fn install(&self, manifest: &ModuleManifest, module: &[u8]) -> std::io::Result<PathBuf> {
        let path = self
            .dir
            .join(format!("{}-{}.wasm", manifest.name, manifest.version));
        write_atomically(&sidecar_path(&path), &manifest.encode_to_vec())?;
        write_atomically(&path, module)?;
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
    !hidden && path.extension().is_some_and(|e| e == "wasm")
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
}
