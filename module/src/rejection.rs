//! Why a rollout or a module file was refused: one enum for every reason, so callers decide on
//! kinds ([`Rejection::code`], published in statuses beside the sentence) and people read the
//! sentence ([`std::fmt::Display`]). A refused module never replaces the one being served.

use crate::fetch::TransferError;
use crate::package::ManifestError;
use crate::signing::SigningError;
use crate::trust::Untrusted;

/// Why a module was refused.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// The manifest is not signed by a trusted key, or was altered.
    #[error("signature check failed: {0}")]
    Signature(#[from] SigningError),
    #[error("malformed manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// This node refused the same bytes before (the marker in the module directory says why).
    #[error("rejected before: {0}")]
    RejectedBefore(String),
    #[error("version {offered} is older than the served {served}: downgrade refused (roll out with --force to allow it)")]
    Downgrade { offered: String, served: String },
    #[error("version {version} is already served with another sha256 ({served}): give the new module a new version")]
    SameVersion { version: String, served: String },
    /// No chunk arrived for `--fetch-timeout-s`.
    #[error("fetch abandoned after {after_s} s without progress: {missing}")]
    Stalled { after_s: u64, missing: String },
    /// The chunks do not give the signed bytes.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error("cannot write {path}: {error}")]
    Write { path: String, error: String },
    /// A module file without a valid signature beside it.
    #[error(transparent)]
    Untrusted(#[from] Untrusted),
    /// The sandbox could not compile or probe it, or its self-test failed.
    #[error("{0}")]
    Load(String),
    #[error("the module says it is {module}, its signed manifest says {manifest}")]
    Mislabelled { module: String, manifest: String },
    #[error("cannot start the module: {0}")]
    Start(String),
}

impl Rejection {
    /// A stable name for the kind of refusal, for statuses and tests (the sentence may change).
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Signature(_) => "signature",
            Rejection::Manifest(_) => "manifest",
            Rejection::RejectedBefore(_) => "rejected-before",
            Rejection::Downgrade { .. } => "downgrade",
            Rejection::SameVersion { .. } => "same-version",
            Rejection::Stalled { .. } => "stalled",
            Rejection::Transfer(TransferError::NotWasm) => "not-wasm",
            Rejection::Transfer(_) => "transfer",
            Rejection::Write { .. } => "write",
            Rejection::Untrusted(_) => "untrusted",
            Rejection::Load(_) => "load",
            Rejection::Mislabelled { .. } => "mislabelled",
            Rejection::Start(_) => "start",
        }
    }
}

/// Checks that a module calls itself what its signed manifest calls it: a manifest signed for
/// one module must not vouch for another's name.
pub fn check_identity(
    manifest: &isomesh_protos::ModuleManifest,
    name: &str,
    version: &str,
) -> Result<(), Rejection> {
    if manifest.name == name && manifest.version == version {
        return Ok(());
    }
    Err(Rejection::Mislabelled {
        module: format!("{name}@{version}"),
        manifest: format!("{}@{}", manifest.name, manifest.version),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_must_call_itself_what_its_manifest_says() {
        let manifest = isomesh_protos::ModuleManifest {
            name: "mobilenet_v2".into(),
            version: "0.2.0".into(),
            ..Default::default()
        };
        assert!(check_identity(&manifest, "mobilenet_v2", "0.2.0").is_ok());
        let err = check_identity(&manifest, "mobilenet_v2", "0.1.0").unwrap_err();
        assert_eq!(err.code(), "mislabelled");
        assert_eq!(
            err.to_string(),
            "the module says it is mobilenet_v2@0.1.0, its signed manifest says mobilenet_v2@0.2.0"
        );
    }
}
