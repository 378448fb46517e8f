//! Which module files a node may run: only those a trusted key signed.
//!
//! A rollout is checked when its manifest arrives (see `rollout`), but a module can also reach
//! the module directory another way: copied in by an operator, baked into an image, or dropped
//! there by whoever got write access to the disk. So every file is checked again right before
//! it is compiled, on start and on every swap: the signed manifest beside it
//! (`NAME.manifest` next to `NAME.wasm`, written by a rollout or by `isomesh sign`) must carry a
//! valid signature by a `--trusted-key` and the file's own sha256. A compromised broker or a
//! writable directory therefore cannot make a node run code nobody with the secret key signed.
//!
//! `--allow-unsigned` turns the check into a warning on every load: for development only.

use crate::package::ManifestError;
use crate::signing::{SecretKey, SigningError, TrustedKeys};
use crate::store::{sidecar_path, write_atomically};
use isomesh_protos::ModuleManifest;
use prost::Message;
use std::path::{Path, PathBuf};

/// Why a module file may not run.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("unsigned: no {} beside it", .0.display())]
    Unsigned(PathBuf),
    #[error("cannot read {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} is not a module manifest: {error}", .path.display())]
    NotManifest {
        path: PathBuf,
        error: prost::DecodeError,
    },
    #[error("{} is for the module with sha256 {signed}, not for this file ({actual})", .path.display())]
    OtherFile {
        path: PathBuf,
        signed: String,
        actual: String,
    },
    #[error("no --trusted-key is configured to check its signature")]
    NoKeys,
    #[error("its manifest's signature does not verify: {0}")]
    Signature(#[from] SigningError),
}

/// A module file refused by [`ModuleTrust::check`], with what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{0}; the node runs only modules signed by a --trusted-key (roll it out with `isomesh rollout`, sign a copied file with `isomesh sign`, or start the node with --allow-unsigned for development)")]
pub struct Untrusted(pub TrustError);

/// Why `isomesh sign` could not sign a module file.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("cannot write {}: {error}", .path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Decides whether a module file may run.
#[derive(Clone)]
pub struct ModuleTrust {
    keys: TrustedKeys,
    allow_unsigned: bool,
}

impl ModuleTrust {
    pub fn new(keys: TrustedKeys, allow_unsigned: bool) -> ModuleTrust {
        ModuleTrust {
            keys,
            allow_unsigned,
        }
    }

    /// Whether unsigned modules run (with a warning) rather than being refused.
    pub fn allows_unsigned(&self) -> bool {
        self.allow_unsigned
    }

    /// The verified manifest of the module at `path` (whose bytes hash to `sha256`), or why it
    /// must not run. With `--allow-unsigned` a missing or bad signature is logged and the
    /// module may run (`Ok` with the manifest only if it verified).
    pub fn check(&self, path: &Path, sha256: &str) -> Result<Option<ModuleManifest>, Untrusted> {
        match self.verify(path, sha256) {
            Ok(manifest) => Ok(Some(manifest)),
            Err(reason) if self.allow_unsigned => {
                tracing::warn!(
                    file = %path.display(),
                    %reason,
                    "running a module without a valid signature because of --allow-unsigned"
                );
                Ok(None)
            }
            Err(reason) => Err(Untrusted(reason)),
        }
    }

    fn verify(&self, path: &Path, sha256: &str) -> Result<ModuleManifest, TrustError> {
        let manifest_path = sidecar_path(path);
        let bytes = match std::fs::read(&manifest_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TrustError::Unsigned(manifest_path))
            }
            Err(error) => {
                return Err(TrustError::Read {
                    path: manifest_path,
                    error,
                })
            }
        };
        let manifest =
            ModuleManifest::decode(bytes.as_slice()).map_err(|error| TrustError::NotManifest {
                path: manifest_path.clone(),
                error,
            })?;
        if manifest.sha256 != sha256 {
            return Err(TrustError::OtherFile {
                path: manifest_path,
                signed: manifest.sha256,
                actual: sha256.to_string(),
            });
        }
        if self.keys.is_empty() {
            return Err(TrustError::NoKeys);
        }
        self.keys.verify(&manifest)?;
        Ok(manifest)
    }
}

/// Writes the manifest that lets a node run the module file at `path` (whose bytes are
/// `module`) as `name@version`, signed with `key`: what `isomesh sign` does.
pub fn write_signed_manifest(
    path: &Path,
    module: &[u8],
    name: &str,
    version: &str,
    key: &SecretKey,
) -> Result<ModuleManifest, SignError> {
    let mut manifest = crate::package::Package::new(
        &crate::package::PackageSpec {
            name,
            version,
            chunk_size: crate::package::DEFAULT_CHUNK_SIZE,
            target_tiers: Vec::new(),
            target_nodes: Vec::new(),
            force: false,
            // Not deflated: signing stays a matter of milliseconds. Only a node that republishes
            // the module (after a broker lost it) sends the chunks this describes.
            compress: false,
        },
        module,
        &[],
    )
    .manifest;
    crate::package::check_manifest(&manifest)?;
    key.sign(&mut manifest);
    let target = sidecar_path(path);
    write_atomically(&target, &manifest.encode_to_vec()).map_err(|error| SignError::Write {
        path: target,
        error,
    })?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed_file(dir: &Path, key: &SecretKey, module: &[u8]) -> PathBuf {
        let path = dir.join("m-1.0.wasm");
        std::fs::write(&path, module).unwrap();
        let mut manifest = ModuleManifest {
            name: "m".into(),
            version: "1.0".into(),
            sha256: crate::digest::sha256_hex(module),
            ..Default::default()
        };
        key.sign(&mut manifest);
        std::fs::write(sidecar_path(&path), manifest.encode_to_vec()).unwrap();
        path
    }

    #[test]
    fn only_files_signed_by_a_trusted_key_pass() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        let mut keys = TrustedKeys::default();
        keys.add(key.public());
        let trust = ModuleTrust::new(keys.clone(), false);
        let module = b"\0asm\x01\0\0\0".to_vec();
        let path = signed_file(dir.path(), &key, &module);
        let sha = crate::digest::sha256_hex(&module);
        assert_eq!(trust.check(&path, &sha).unwrap().unwrap().name, "m");

        // The file was swapped after signing.
        let err = trust.check(&path, &"0".repeat(64)).unwrap_err();
        assert!(matches!(err.0, TrustError::OtherFile { .. }), "{err}");

        // Signed by a key the node does not trust.
        let stranger = SecretKey::generate().unwrap();
        let foreign = signed_file(dir.path(), &stranger, &module);
        let err = trust.check(&foreign, &sha).unwrap_err();
        assert!(
            matches!(err.0, TrustError::Signature(SigningError::UnknownKey(_))),
            "{err}"
        );

        // No manifest at all, or junk instead of one.
        std::fs::remove_file(sidecar_path(&path)).unwrap();
        let err = trust.check(&path, &sha).unwrap_err();
        assert!(matches!(err.0, TrustError::Unsigned(_)), "{err}");
        // The refusal tells the user what to do.
        assert!(err.to_string().contains("isomesh sign"), "{err}");
        std::fs::write(sidecar_path(&path), b"\xff\xff\xff").unwrap();
        assert!(matches!(
            trust.check(&path, &sha).unwrap_err().0,
            TrustError::NotManifest { .. }
        ));

        // --allow-unsigned lets it run, without a manifest to trust.
        let lax = ModuleTrust::new(keys, true);
        assert!(lax.check(&path, &sha).unwrap().is_none());
    }
}
