//! Who may roll out a module: ed25519 keys and signed manifests.
//!
//! An operator makes a key pair once with `isomesh keygen`, keeps the secret key where
//! `isomesh rollout` runs, and gives every node the public key (`--trusted-key FILE`). A node
//! installs a module only when its manifest carries a valid signature by one of its trusted
//! keys; the manifest holds the module's sha256 and size, so the signature covers every byte of
//! the module too.
//!
//! Key files are one line of text, `isomesh-ed25519-secret <hex>` or `isomesh-ed25519-public <hex>`,
//! so they can be pasted into a config or an environment variable and a mixed-up file names itself.
//! The signed bytes are the protobuf encoding of the manifest with an empty `signature` field.

use crate::digest::{hex, unhex};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use isomesh_protos::ModuleManifest;
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const SECRET_TAG: &str = "isomesh-ed25519-secret";
const PUBLIC_TAG: &str = "isomesh-ed25519-public";

/// Why a key could not be read or a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not an isomesh {wanted} key file ({reason}); make one with `isomesh keygen`"
    )]
    Format {
        path: PathBuf,
        wanted: &'static str,
        reason: String,
    },
    #[error("cannot get randomness for a new key: {0}")]
    Random(String),
    #[error("the manifest is not signed")]
    Unsigned,
    #[error("the manifest is signed by key {0}, which this node does not trust (add its public key with --trusted-key)")]
    UnknownKey(String),
    #[error("the manifest's signature does not match its contents (signed by key {0}): it was altered or signed with another key")]
    BadSignature(String),
}

/// A secret key, used by `isomesh rollout` to sign manifests.
pub struct SecretKey {
    key: SigningKey,
}

impl SecretKey {
    /// A new random key.
    pub fn generate() -> Result<SecretKey, SigningError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| SigningError::Random(e.to_string()))?;
        Ok(SecretKey {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The key of a fixed 32-byte seed. Deterministic, so never for real rollouts: it lets the
    /// fuzz targets sign hostile manifests with a key their agent trusts, so they reach past the
    /// signature check into the fetch and the rollout rules.
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey {
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn read(path: &Path) -> Result<SecretKey, SigningError> {
        let seed = read_tagged(path, SECRET_TAG, "secret")?;
        Ok(SecretKey {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Writes the key, readable by its owner only.
    pub fn write(&self, path: &Path) -> Result<(), SigningError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let text = format!("{SECRET_TAG} {}\n", hex(&self.key.to_bytes()));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(|source| SigningError::Write {
                path: path.to_owned(),
                source,
            })
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            key: self.key.verifying_key(),
        }
    }

    /// Sets `manifest.key_id` and `manifest.signature`.
    pub fn sign(&self, manifest: &mut ModuleManifest) {
        manifest.key_id = self.public().id();
        manifest.signature.clear();
        let signature = self.key.sign(&manifest.encode_to_vec());
        manifest.signature = signature.to_bytes().to_vec();
    }
}

/// A public key, trusted by nodes to verify manifests.
#[derive(Clone)]
pub struct PublicKey {
    key: VerifyingKey,
}

impl PublicKey {
    pub fn read(path: &Path) -> Result<PublicKey, SigningError> {
        let bytes = read_tagged(path, PUBLIC_TAG, "public")?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|e| SigningError::Format {
            path: path.to_owned(),
            wanted: "public",
            reason: e.to_string(),
        })?;
        Ok(PublicKey { key })
    }

    pub fn write(&self, path: &Path) -> Result<(), SigningError> {
        let text = format!("{PUBLIC_TAG} {}\n", hex(self.key.as_bytes()));
        std::fs::write(path, text).map_err(|source| SigningError::Write {
            path: path.to_owned(),
            source,
        })
    }

    /// Short id naming the key in manifests: hex of the first 8 bytes.
    pub fn id(&self) -> String {
        hex(&self.key.as_bytes()[..8])
    }
}

/// The keys a node accepts manifests from.
#[derive(Clone, Default)]
pub struct TrustedKeys {
    by_id: HashMap<String, PublicKey>,
}

impl TrustedKeys {
    /// Reads every public key file of `paths`.
    pub fn read(paths: &[PathBuf]) -> Result<TrustedKeys, SigningError> {
        let mut keys = TrustedKeys::default();
        for path in paths {
            keys.add(PublicKey::read(path)?);
        }
        Ok(keys)
    }

    pub fn add(&mut self, key: PublicKey) {
        self.by_id.insert(key.id(), key);
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Checks that `manifest` is signed by one of these keys.
    pub fn verify(&self, manifest: &ModuleManifest) -> Result<(), SigningError> {
        if manifest.signature.is_empty() {
            return Err(SigningError::Unsigned);
        }
        let key = self
            .by_id
            .get(&manifest.key_id)
            .ok_or_else(|| SigningError::UnknownKey(manifest.key_id.clone()))?;
        let bad = || SigningError::BadSignature(manifest.key_id.clone());
        let signature =
            ed25519_dalek::Signature::from_slice(&manifest.signature).map_err(|_| bad())?;
        let mut unsigned = manifest.clone();
        unsigned.signature.clear();
        key.key
            .verify_strict(&unsigned.encode_to_vec(), &signature)
            .map_err(|_| bad())
    }
}

fn read_tagged(path: &Path, tag: &str, wanted: &'static str) -> Result<[u8; 32], SigningError> {
    let text = std::fs::read_to_string(path).map_err(|source| SigningError::Read {
        path: path.to_owned(),
        source,
    })?;
    let format_error = |reason: String| SigningError::Format {
        path: path.to_owned(),
        wanted,
        reason,
    };
    let (found_tag, body) = text
        .trim()
        .split_once(' ')
        .ok_or_else(|| format_error("expected `<tag> <hex>`".into()))?;
    if found_tag != tag {
        return Err(format_error(format!("it starts with {found_tag:?}")));
    }
    let bytes = unhex(body.trim()).ok_or_else(|| format_error("the key is not hex".into()))?;
    bytes
        .try_into()
        .map_err(|bytes: Vec<u8>| format_error(format!("{} bytes instead of 32", bytes.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> ModuleManifest {
        ModuleManifest {
            name: "m".into(),
            version: "1.0.0".into(),
            sha256: "ab".repeat(32),
            size: 10,
            ..Default::default()
        }
    }

    #[test]
    fn a_signed_manifest_verifies_and_any_change_breaks_it() {
        let secret = SecretKey::generate().unwrap();
        let mut trusted = TrustedKeys::default();
        trusted.add(secret.public());
        let mut signed = manifest();
        secret.sign(&mut signed);
        trusted.verify(&signed).unwrap();

        let mut altered = signed.clone();
        altered.version = "9.0.0".into();
        assert!(matches!(
            trusted.verify(&altered),
            Err(SigningError::BadSignature(_))
        ));

        let stranger = SecretKey::generate().unwrap();
        let mut foreign = manifest();
        stranger.sign(&mut foreign);
        assert!(matches!(
            trusted.verify(&foreign),
            Err(SigningError::UnknownKey(_))
        ));
        assert!(matches!(
            trusted.verify(&manifest()),
            Err(SigningError::Unsigned)
        ));
    }

    #[test]
    fn key_files_round_trip_and_a_swapped_file_says_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let secret = SecretKey::generate().unwrap();
        secret.write(&dir.path().join("k.key")).unwrap();
        secret.public().write(&dir.path().join("k.pub")).unwrap();
        let again = SecretKey::read(&dir.path().join("k.key")).unwrap();
        assert_eq!(again.public().id(), secret.public().id());
        assert_eq!(
            PublicKey::read(&dir.path().join("k.pub")).unwrap().id(),
            secret.public().id()
        );
        let err = PublicKey::read(&dir.path().join("k.key"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("isomesh-ed25519-secret"), "{err}");
    }
}
