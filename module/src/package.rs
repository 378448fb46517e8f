//! What a rollout publishes: a module cut into retained chunks, and the manifest that names it.
//!
//! `isomesh rollout` builds a [`Package`] and publishes it; nodes check incoming manifests with
//! [`check_manifest`] and [`is_target`] before fetching anything. Chunks are addressed by the
//! sha256 of the blob they belong to (`isomesh/modules/blobs/{sha256}/{index}`), so two rollouts of
//! the same bytes share them and a chunk can never be mistaken for a piece of another module.
//!
//! Blobs are stored deflate-compressed by default: the classifier's weights and machine code
//! shrink about 3x (31 MB module to 9 MB, 66 MB of compiled code to 23 MB), which is what a node
//! waits for during a rollout. Digests and sizes in the manifest describe the decoded bytes, so
//! the signature vouches for what runs, and decoding stops at the announced size.

use crate::digest::{is_sha256_hex, sha256_hex};
use isomesh_protos::{CodePart, ModuleChunk, ModuleManifest, ModuleRef, PrecompiledArtifact, Tier};

/// Default chunk size: fits every common broker's message limit.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 << 10;
/// The compressed encoding of blobs (raw deflate, RFC 1951).
pub const DEFLATE: &str = "deflate";
/// Largest module a node accepts, bytes.
pub const MAX_MODULE_SIZE: u64 = 1 << 30;
/// Largest chunk a manifest may announce: beyond every common broker's message limit anyway.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Most chunks one manifest may announce, module and artifacts together. A node keeps a slot per
/// chunk while fetching, so this bounds what a signed but hostile manifest (chunk size 1, size
/// 1 GiB) can make it allocate: 1 GiB in the default 256 KiB chunks is 4096 of them.
pub const MAX_CHUNKS: u32 = 1 << 16;

/// A module (and optional precompiled artifacts) ready to publish.
pub struct Package {
    /// Unsigned until [`crate::signing::SecretKey::sign`] is applied.
    pub manifest: ModuleManifest,
    /// Chunks of the module, then of each artifact.
    pub chunks: Vec<ModuleChunk>,
}

/// What a rollout says about its module.
pub struct PackageSpec<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub chunk_size: u32,
    pub target_tiers: Vec<Tier>,
    pub target_nodes: Vec<String>,
    pub force: bool,
    /// Store blobs deflate-compressed.
    pub compress: bool,
}

/// The code a model rollout runs on ([`Package::model`]).
pub enum Code<'a> {
    /// Already on the broker, from an earlier rollout: described again, not published again
    /// (with the machine code published for it then).
    Published {
        part: CodePart,
        artifacts: Vec<PrecompiledArtifact>,
    },
    /// A module file to publish with the model, with each `(engine, code)` artifact.
    New {
        module: &'a [u8],
        version: &'a str,
        artifacts: &'a [(String, Vec<u8>)],
    },
}

impl Package {
    /// Cuts `module` (and each `(engine, code)` artifact) into chunks and describes them.
    pub fn new(spec: &PackageSpec<'_>, module: &[u8], artifacts: &[(String, Vec<u8>)]) -> Package {
        let encoding = encoding(spec);
        let (stored, mut chunks) = cut(module, spec.chunk_size.max(1), encoding);
        let module_digests = chunk_digests(&chunks);
        let described = cut_artifacts(spec, artifacts, &mut chunks);
        let manifest = describe(spec, module, stored, module_digests, described);
        Package { manifest, chunks }
    }

    /// A model rollout: `model` (an encoded `GuestModel`) served by `code`'s module. Only the
    /// model's chunks are new when the code was published before.
    pub fn model(spec: &PackageSpec<'_>, model: &[u8], code: Code<'_>) -> Package {
        let encoding = encoding(spec);
        let chunk_size = spec.chunk_size.max(1);
        let (stored, mut chunks) = cut(model, chunk_size, encoding);
        let model_digests = chunk_digests(&chunks);
        let (part, described) = match code {
            Code::Published { part, artifacts } => (part, artifacts),
            Code::New {
                module,
                version,
                artifacts,
            } => {
                let (code_stored, code_chunks) = cut(module, chunk_size, encoding);
                let part = CodePart {
                    sha256: sha256_hex(module),
                    size: module.len() as u64,
                    chunk_count: code_chunks.len() as u32,
                    stored_size: code_stored,
                    chunk_sha256: chunk_digests(&code_chunks),
                    version: version.to_string(),
                };
                chunks.extend(code_chunks);
                (part, cut_artifacts(spec, artifacts, &mut chunks))
            }
        };
        let mut manifest = describe(spec, model, stored, model_digests, described);
        manifest.code = Some(part);
        Package { manifest, chunks }
    }
}

fn encoding(spec: &PackageSpec<'_>) -> &'static str {
    if spec.compress {
        DEFLATE
    } else {
        ""
    }
}

/// Cuts each `(engine, code)` artifact into chunks appended to `chunks`, and describes them.
fn cut_artifacts(
    spec: &PackageSpec<'_>,
    artifacts: &[(String, Vec<u8>)],
    chunks: &mut Vec<ModuleChunk>,
) -> Vec<PrecompiledArtifact> {
    let mut described = Vec::new();
    for (engine, code) in artifacts {
        let (artifact_stored, artifact_chunks) = cut(code, spec.chunk_size.max(1), encoding(spec));
        described.push(PrecompiledArtifact {
            engine: engine.clone(),
            sha256: sha256_hex(code),
            size: code.len() as u64,
            chunk_count: artifact_chunks.len() as u32,
            stored_size: artifact_stored,
            chunk_sha256: chunk_digests(&artifact_chunks),
        });
        chunks.extend(artifact_chunks);
    }
    described
}

/// The unsigned manifest of the blob `main` (stored in `stored` bytes whose chunks hash to
/// `digests`) and its artifacts.
fn describe(
    spec: &PackageSpec<'_>,
    main: &[u8],
    stored: u64,
    digests: Vec<String>,
    artifacts: Vec<PrecompiledArtifact>,
) -> ModuleManifest {
    let chunk_size = spec.chunk_size.max(1);
    ModuleManifest {
        name: spec.name.to_string(),
        version: spec.version.to_string(),
        sha256: sha256_hex(main),
        size: main.len() as u64,
        chunk_size,
        chunk_count: chunk_count(stored, chunk_size),
        target_tiers: spec.target_tiers.iter().map(|t| *t as i32).collect(),
        target_nodes: spec.target_nodes.clone(),
        key_id: String::new(),
        signature: Vec::new(),
        published_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default(),
        force: spec.force,
        artifacts,
        encoding: encoding(spec).to_string(),
        stored_size: stored,
        chunk_sha256: digests,
        code: None,
    }
}

/// The code a manifest's module runs: its own file, or a model rollout's code part. What a
/// later model rollout of the same code describes again ([`Code::Published`]).
pub fn code_of(manifest: &ModuleManifest) -> CodePart {
    match &manifest.code {
        Some(code) => code.clone(),
        None => CodePart {
            sha256: manifest.sha256.clone(),
            size: manifest.size,
            chunk_count: manifest.chunk_count,
            stored_size: manifest.stored_size,
            chunk_sha256: manifest.chunk_sha256.clone(),
            version: manifest.version.clone(),
        },
    }
}

/// Encodes `blob` as `encoding` says and cuts it into chunks of `chunk_size` bytes, each named
/// by the digest of the decoded blob; returns the stored size and the chunks.
pub fn cut(blob: &[u8], chunk_size: u32, encoding: &str) -> (u64, Vec<ModuleChunk>) {
    let sha256 = sha256_hex(blob);
    let stored = encode(blob, encoding);
    let count = chunk_count(stored.len() as u64, chunk_size);
    let chunks = stored
        .chunks(chunk_size.max(1) as usize)
        .enumerate()
        .map(|(index, data)| ModuleChunk {
            sha256: sha256.clone(),
            index: index as u32,
            count,
            data: data.to_vec(),
        })
        .collect();
    (stored.len() as u64, chunks)
}

/// The digest of each chunk's stored bytes, for the signed manifest: what lets a node tell one
/// bad chunk (dropped and asked for again) from bad signed bytes (refused for good).
pub fn chunk_digests(chunks: &[ModuleChunk]) -> Vec<String> {
    chunks.iter().map(|c| sha256_hex(&c.data)).collect()
}

/// `blob` as stored in chunks under `encoding`.
fn encode<'a>(blob: &'a [u8], encoding: &str) -> std::borrow::Cow<'a, [u8]> {
    if encoding != DEFLATE {
        return blob.into();
    }
    use std::io::Write;
    // The fastest level: it already gets most of the gain on weights and machine code.
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    match encoder.write_all(blob).and_then(|_| encoder.finish()) {
        Ok(stored) => stored.into(),
        // Writing into a Vec cannot fail; should it, the caller's digest check catches it.
        Err(_) => Vec::new().into(),
    }
}

/// Why stored chunks do not give back the blob the manifest describes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the chunks do not inflate: {0}")]
    Inflate(String),
    #[error("the chunks inflate past the announced {0} bytes")]
    Bomb(u64),
    #[error("unknown encoding {0:?} (this node knows \"\" and \"deflate\")")]
    Encoding(String),
}

/// Decodes a stored blob, refusing to produce more than `size` bytes (a compression bomb).
pub fn decode(stored: Vec<u8>, encoding: &str, size: u64) -> Result<Vec<u8>, DecodeError> {
    match encoding {
        "" => Ok(stored),
        DEFLATE => {
            use std::io::Read;
            // Capacity bounded by what can be true of the input, not only by the announced size:
            // a signed manifest announcing 1 GiB over a few bytes of deflate must not allocate
            // 1 GiB up front (the weights and code of a real module inflate about 3x).
            let likely = (stored.len() as u64).saturating_mul(4);
            let mut decoded = Vec::with_capacity(size.min(likely).min(MAX_MODULE_SIZE) as usize);
            flate2::read::DeflateDecoder::new(stored.as_slice())
                .take(size + 1)
                .read_to_end(&mut decoded)
                .map_err(|e| DecodeError::Inflate(e.to_string()))?;
            if decoded.len() as u64 > size {
                return Err(DecodeError::Bomb(size));
            }
            Ok(decoded)
        }
        other => Err(DecodeError::Encoding(other.to_string())),
    }
}

/// Bytes a blob of `size` bytes takes in its chunks, given its `stored_size` field.
pub fn stored_size(size: u64, stored_size: u64) -> u64 {
    if stored_size == 0 {
        size
    } else {
        stored_size
    }
}

/// Chunks needed for `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u32) -> u32 {
    size.div_ceil(u64::from(chunk_size.max(1))) as u32
}

/// Expected length of chunk `index` of a blob of `size` bytes.
pub fn chunk_len(size: u64, chunk_size: u32, index: u32) -> u64 {
    let start = u64::from(index) * u64::from(chunk_size);
    size.saturating_sub(start).min(u64::from(chunk_size))
}

/// Whether a manifest is meant for the node `node` of tier `tier`.
pub fn is_target(manifest: &ModuleManifest, tier: Tier, node: &str) -> bool {
    let tier_ok =
        manifest.target_tiers.is_empty() || manifest.target_tiers.contains(&(tier as i32));
    let node_ok =
        manifest.target_nodes.is_empty() || manifest.target_nodes.iter().any(|n| n == node);
    tier_ok && node_ok
}

/// Describes the targets of a manifest for logs and errors.
pub fn describe_targets(manifest: &ModuleManifest) -> String {
    let tiers: Vec<&str> = manifest
        .target_tiers
        .iter()
        .map(|t| Tier::try_from(*t).map(|t| t.name()).unwrap_or("unknown"))
        .collect();
    match (tiers.is_empty(), manifest.target_nodes.is_empty()) {
        (true, true) => "every node".into(),
        (false, true) => format!("tier {}", tiers.join(",")),
        (true, false) => format!("node {}", manifest.target_nodes.join(",")),
        (false, false) => format!(
            "node {} of tier {}",
            manifest.target_nodes.join(","),
            tiers.join(",")
        ),
    }
}

/// Why a manifest describes nothing a node can fetch and name a file after.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "{what} {value:?} must be 1-64 characters of A-Z a-z 0-9 . _ - + (not starting with .)"
    )]
    Name { what: &'static str, value: String },
    #[error("{0:?} is not a lower-case hex sha256")]
    Digest(String),
    #[error("module size {0} is outside 1..={MAX_MODULE_SIZE} bytes")]
    Size(u64),
    #[error("chunk size {0} is outside 1..={MAX_CHUNK_SIZE} bytes")]
    ChunkSize(u32),
    #[error("{0} chunks announced, more than the {MAX_CHUNKS} a node fetches")]
    TooManyChunks(u64),
    #[error("{what} lists {listed} chunk digests for {chunks} chunks")]
    ChunkDigests {
        what: String,
        listed: usize,
        chunks: u32,
    },
    #[error("unknown encoding {0:?}")]
    Encoding(String),
    #[error("{announced} chunks announced, but {stored} bytes in chunks of {chunk_size} make {expected}")]
    ChunkCount {
        announced: u32,
        stored: u64,
        chunk_size: u32,
        expected: u32,
    },
    #[error("precompiled artifact {0} has an inconsistent size or chunk count")]
    Artifact(String),
    #[error("the code of model rollout {0} has an inconsistent size or chunk count")]
    Code(String),
}

/// Checks that a manifest describes something a node can fetch and name a file after.
pub fn check_manifest(manifest: &ModuleManifest) -> Result<(), ManifestError> {
    check_name("name", &manifest.name)?;
    check_name("version", &manifest.version)?;
    check_digest(&manifest.sha256)?;
    if manifest.size == 0 || manifest.size > MAX_MODULE_SIZE {
        return Err(ManifestError::Size(manifest.size));
    }
    if manifest.chunk_size == 0 || manifest.chunk_size > MAX_CHUNK_SIZE {
        return Err(ManifestError::ChunkSize(manifest.chunk_size));
    }
    if !matches!(manifest.encoding.as_str(), "" | DEFLATE) {
        return Err(ManifestError::Encoding(manifest.encoding.clone()));
    }
    let stored = stored_size(manifest.size, manifest.stored_size);
    let expected = chunk_count(stored, manifest.chunk_size);
    if manifest.chunk_count != expected || stored > MAX_MODULE_SIZE {
        return Err(ManifestError::ChunkCount {
            announced: manifest.chunk_count,
            stored,
            chunk_size: manifest.chunk_size,
            expected,
        });
    }
    check_chunk_digests("the module", &manifest.chunk_sha256, manifest.chunk_count)?;
    // Counted in u64 over the module and every artifact: the bound is on the sum, before any
    // fetch allocates a slot per chunk.
    let mut total = u64::from(manifest.chunk_count);
    if let Some(code) = &manifest.code {
        check_digest(&code.sha256)?;
        check_name("code version", &code.version)?;
        let stored = stored_size(code.size, code.stored_size);
        if code.size == 0
            || code.size > MAX_MODULE_SIZE
            || stored > MAX_MODULE_SIZE
            || code.chunk_count != chunk_count(stored, manifest.chunk_size)
        {
            return Err(ManifestError::Code(code.sha256.clone()));
        }
        check_chunk_digests(
            &format!("code {}", code.sha256),
            &code.chunk_sha256,
            code.chunk_count,
        )?;
        total += u64::from(code.chunk_count);
    }
    for artifact in &manifest.artifacts {
        check_digest(&artifact.sha256)?;
        let stored = stored_size(artifact.size, artifact.stored_size);
        if artifact.size > MAX_MODULE_SIZE
            || stored > MAX_MODULE_SIZE
            || artifact.chunk_count != chunk_count(stored, manifest.chunk_size)
        {
            return Err(ManifestError::Artifact(artifact.sha256.clone()));
        }
        check_chunk_digests(
            &format!("artifact {}", artifact.sha256),
            &artifact.chunk_sha256,
            artifact.chunk_count,
        )?;
        total += u64::from(artifact.chunk_count);
    }
    if total > u64::from(MAX_CHUNKS) {
        return Err(ManifestError::TooManyChunks(total));
    }
    Ok(())
}

/// Names and versions become file names and topic levels: keep them to a safe alphabet.
fn check_name(what: &'static str, value: &str) -> Result<(), ManifestError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && !value.starts_with('.')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'));
    if ok {
        Ok(())
    } else {
        Err(ManifestError::Name {
            what,
            value: value.to_string(),
        })
    }
}

/// Per-chunk digests are optional (older manifests have none), but when present there is one
/// well-formed digest per chunk.
fn check_chunk_digests(what: &str, digests: &[String], chunks: u32) -> Result<(), ManifestError> {
    if digests.is_empty() {
        return Ok(());
    }
    if digests.len() != chunks as usize {
        return Err(ManifestError::ChunkDigests {
            what: what.to_string(),
            listed: digests.len(),
            chunks,
        });
    }
    digests.iter().try_for_each(|d| check_digest(d))
}

fn check_digest(digest: &str) -> Result<(), ManifestError> {
    if is_sha256_hex(digest) {
        Ok(())
    } else {
        Err(ManifestError::Digest(digest.to_string()))
    }
}

/// Names the module a manifest describes.
pub fn module_ref(manifest: &ModuleManifest) -> ModuleRef {
    ModuleRef {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        sha256: manifest.sha256.clone(),
        code_sha256: code_of(manifest).sha256,
        model_sha256: String::new(),
    }
}

/// `name@version`, as logs, messages and job pins write a module.
pub fn label(module: &ModuleRef) -> String {
    format!("{}@{}", module.name, module.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_blob_exactly() {
        let blob: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let (stored, chunks) = cut(&blob, 300, "");
        assert_eq!((stored, chunks.len()), (1000, 4));
        assert_eq!(chunk_count(1000, 300), 4);
        assert_eq!(chunk_len(1000, 300, 3), 100);
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(joined, blob);
        assert!(chunks
            .iter()
            .all(|c| c.sha256 == sha256_hex(&blob) && c.count == 4));
    }

    #[test]
    fn compressed_blobs_round_trip_and_bombs_stop_at_the_announced_size() {
        let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
        let (stored, chunks) = cut(&blob, 1000, DEFLATE);
        assert!(stored < 10_000, "{stored}");
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(decode(joined.clone(), DEFLATE, 100_000).unwrap(), blob);
        assert_eq!(
            decode(joined, DEFLATE, 99_999),
            Err(DecodeError::Bomb(99_999))
        );
    }

    #[test]
    fn manifests_with_unsafe_names_or_wrong_counts_are_refused() {
        let spec = PackageSpec {
            name: "mobilenet",
            version: "1.0.0",
            chunk_size: 300,
            target_tiers: vec![Tier::Edge],
            target_nodes: vec![],
            force: false,
            compress: false,
        };
        let package = Package::new(&spec, &[0u8; 1000], &[]);
        check_manifest(&package.manifest).unwrap();
        assert!(is_target(&package.manifest, Tier::Edge, "e1"));
        assert!(!is_target(&package.manifest, Tier::Device, "d1"));

        let mut bad = package.manifest.clone();
        bad.name = "../etc".into();
        assert!(matches!(
            check_manifest(&bad),
            Err(ManifestError::Name { what: "name", .. })
        ));
        let mut bad = package.manifest.clone();
        bad.chunk_count = 3;
        assert!(matches!(
            check_manifest(&bad),
            Err(ManifestError::ChunkCount { announced: 3, .. })
        ));
        let mut bad = package.manifest.clone();
        bad.chunk_sha256.pop();
        assert!(matches!(
            check_manifest(&bad),
            Err(ManifestError::ChunkDigests {
                listed: 3,
                chunks: 4,
                ..
            })
        ));
    }

    #[test]
    fn the_publisher_signs_a_digest_per_chunk() {
        let spec = PackageSpec {
            name: "m",
            version: "1.0.0",
            chunk_size: 300,
            target_tiers: vec![],
            target_nodes: vec![],
            force: false,
            compress: false,
        };
        let code = vec![7u8; 700];
        let package = Package::new(&spec, &[1u8; 1000], &[("e".into(), code)]);
        assert_eq!(package.manifest.chunk_sha256.len(), 4);
        assert_eq!(package.manifest.artifacts[0].chunk_sha256.len(), 3);
        for (chunk, digest) in package.chunks.iter().zip(&package.manifest.chunk_sha256) {
            assert_eq!(&sha256_hex(&chunk.data), digest);
        }
    }

    #[test]
    fn a_model_rollout_publishes_its_code_only_when_the_code_is_new() {
        let spec = PackageSpec {
            name: "m",
            version: "1.1.0",
            chunk_size: 300,
            target_tiers: vec![],
            target_nodes: vec![],
            force: false,
            compress: false,
        };
        let module = vec![3u8; 1000];
        let artifacts = [("e".to_string(), vec![7u8; 700])];
        let new = Package::model(
            &spec,
            &[5u8; 400],
            Code::New {
                module: &module,
                version: "1.0.0",
                artifacts: &artifacts,
            },
        );
        check_manifest(&new.manifest).unwrap();
        let code = new.manifest.code.clone().unwrap();
        assert_eq!(
            (code.sha256.as_str(), code.chunk_count),
            (sha256_hex(&module).as_str(), 4)
        );
        assert_eq!(new.manifest.sha256, sha256_hex(&[5u8; 400]));
        assert_eq!(new.chunks.len(), 2 + 4 + 3, "model, code, artifact");
        assert_eq!(module_ref(&new.manifest).code_sha256, code.sha256);

        // The same code again: described from the manifest before, not cut again.
        let again = Package::model(
            &spec,
            &[6u8; 400],
            Code::Published {
                part: code_of(&new.manifest),
                artifacts: new.manifest.artifacts.clone(),
            },
        );
        check_manifest(&again.manifest).unwrap();
        assert_eq!(again.chunks.len(), 2, "the model's chunks alone");
        assert_eq!(again.manifest.code, new.manifest.code);
        assert_eq!(again.manifest.artifacts, new.manifest.artifacts);
        // A module rollout's own code is its file.
        let plain = Package::new(&spec, &module, &[]);
        assert_eq!(code_of(&plain.manifest).sha256, plain.manifest.sha256);

        // A code part whose count does not fit its size is refused.
        let mut bad = again.manifest.clone();
        if let Some(code) = bad.code.as_mut() {
            code.chunk_count += 1;
        }
        assert!(matches!(check_manifest(&bad), Err(ManifestError::Code(_))));
    }

    #[test]
    fn a_manifest_announcing_huge_counts_is_refused_before_anything_is_allocated() {
        // Signed or not, chunk size 1 and a 1 GiB module would be 2^30 chunk slots.
        let manifest = ModuleManifest {
            name: "m".into(),
            version: "1.0.0".into(),
            sha256: "ab".repeat(32),
            size: MAX_MODULE_SIZE,
            chunk_size: 1,
            chunk_count: MAX_MODULE_SIZE as u32,
            ..Default::default()
        };
        assert_eq!(
            check_manifest(&manifest),
            Err(ManifestError::TooManyChunks(MAX_MODULE_SIZE))
        );
        let mut huge_chunks = manifest.clone();
        huge_chunks.chunk_size = u32::MAX;
        huge_chunks.chunk_count = 1;
        assert_eq!(
            check_manifest(&huge_chunks),
            Err(ManifestError::ChunkSize(u32::MAX))
        );
        let err = check_manifest(&manifest).unwrap_err().to_string();
        assert!(err.contains("more than the 65536"), "{err}");
    }
}
