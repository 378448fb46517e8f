//! Why a rollout or a module file was refused: one enum for every reason, so callers decide on
//! kinds ([`Rejection::code`], published in statuses beside the sentence) and people read the
//! sentence ([`std::fmt::Display`]). A refused module never replaces the one being served.
//!
//! Some refusals condemn the module's bytes for good ([`Rejection::condemns_module`]: they are
//! marked and never fetched or compiled again); the others are about this attempt only (the
//! transport, a timeout, a full disk) and the node tries again later.

use crate::fetch::TransferError;
use crate::package::ManifestError;
use crate::signing::SigningError;
use crate::trust::Untrusted;
use crate::version::VersionError;

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
    /// A signed manifest not published after the one this node accepted last: an old manifest
    /// replayed (forced or not), or another module's older one.
    #[error("{offered} (published at {published_at_ms} ms) is not newer than {accepted} accepted here (published at {accepted_at_ms} ms): a replayed or stale manifest is refused; roll out again to change the module")]
    Replay {
        offered: String,
        published_at_ms: u64,
        accepted: String,
        accepted_at_ms: u64,
    },
    /// The version cannot be ordered against the one accepted before.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// No chunk arrived for `--fetch-timeout-s`.
    #[error("fetch abandoned after {after_s} s without progress: {missing}")]
    Stalled { after_s: u64, missing: String },
    /// The signed bytes are bad: every chunk matched its signed digest, yet the whole does not
    /// decode, is not of the signed size or digest, or is not Wasm.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The chunks do not give the signed bytes, and the manifest has no per-chunk digests to
    /// tell a corrupted chunk from bad signed bytes: tried again later, not condemned.
    #[error(
        "{0} (the manifest has no per-chunk digests to find the bad chunk; trying again later)"
    )]
    Garbled(TransferError),
    #[error("cannot write {path}: {error}")]
    Write { path: String, error: String },
    /// The node could not start installing (no thread): tried again later.
    #[error("cannot start installing the module: {0}")]
    Install(String),
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
            Rejection::Replay { .. } => "replay",
            Rejection::Version(_) => "version",
            Rejection::Stalled { .. } => "stalled",
            Rejection::Transfer(TransferError::NotWasm) => "not-wasm",
            Rejection::Transfer(_) => "transfer",
            Rejection::Garbled(_) => "garbled",
            Rejection::Write { .. } => "write",
            Rejection::Install(_) => "install",
            Rejection::Untrusted(_) => "untrusted",
            Rejection::Load(_) => "load",
            Rejection::Mislabelled { .. } => "mislabelled",
            Rejection::Start(_) => "start",
        }
    }

    /// Whether the refusal is about the signed bytes themselves, so the module is remembered as
    /// rejected and never fetched or compiled again. Transport errors, timeouts and a disk that
    /// refused the file are not: the node tries again later.
    pub fn condemns_module(&self) -> bool {
        match self {
            Rejection::Transfer(_) | Rejection::Load(_) => true,
            Rejection::Signature(_)
            | Rejection::Manifest(_)
            | Rejection::RejectedBefore(_)
            | Rejection::Downgrade { .. }
            | Rejection::SameVersion { .. }
            | Rejection::Replay { .. }
            | Rejection::Version(_)
            | Rejection::Stalled { .. }
            | Rejection::Garbled(_)
            | Rejection::Write { .. }
            | Rejection::Install(_)
            | Rejection::Untrusted(_)
            | Rejection::Mislabelled { .. }
            | Rejection::Start(_) => false,
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
    // A model rollout names the code it runs by digest and by the version that code calls
    // itself; its own version is the rollout's.
    let signed_version = manifest
        .code
        .as_ref()
        .map_or(manifest.version.as_str(), |c| c.version.as_str());
    if manifest.name == name && signed_version == version {
        return Ok(());
    }
    Err(Rejection::Mislabelled {
        module: format!("{name}@{version}"),
        manifest: format!("{}@{signed_version}", manifest.name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_signed_bytes_failing_condemns_a_module() {
        let digest = TransferError::Digest {
            got: "a".into(),
            expected: "b".into(),
        };
        assert!(Rejection::Transfer(digest.clone()).condemns_module());
        assert!(Rejection::Transfer(TransferError::NotWasm).condemns_module());
        assert!(Rejection::Load("no exports".into()).condemns_module());
        let garbled = Rejection::Garbled(digest);
        assert!(!garbled.condemns_module());
        assert_eq!(garbled.code(), "garbled");
        let full = Rejection::Write {
            path: "/m".into(),
            error: "No space left on device".into(),
        };
        assert!(!full.condemns_module());
        let thread = Rejection::Install("Resource temporarily unavailable".into());
        assert!(!thread.condemns_module());
        assert_eq!(
            thread.to_string(),
            "cannot start installing the module: Resource temporarily unavailable"
        );
        let stalled = Rejection::Stalled {
            after_s: 60,
            missing: "chunk 3".into(),
        };
        assert!(!stalled.condemns_module());
    }

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
