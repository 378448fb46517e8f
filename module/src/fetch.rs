//! Reassembling a module from its retained chunks.
//!
//! A [`Fetch`] is pure state, driven by the node's MQTT loop: it says which chunks to ask for
//! (subscribing to a chunk's topic makes the broker hand over its retained message), takes the
//! chunks as they come, in any order and any number of times, and finally checks size and
//! sha256. It asks for a window of chunks at a time rather than for all of them: a broker may
//! hand a subscriber only so many retained messages at once (rumqttd 0.20.0 stops at 100), and a
//! window also bounds how much arrives before it is stored. Chunks still missing after a quiet
//! spell are asked for again.

//!
//! A manifest that lists a digest per chunk (`chunk_sha256`, signed with the rest) lets the fetch
//! check every chunk as it arrives: one whose bytes do not match is dropped and asked for again,
//! and never condemns the module. When every chunk matched and the whole still fails its check,
//! the signed bytes themselves are bad ([`Fetch::chunks_verified`]).
//!
//! Time comes in from the caller (`now`), as everywhere in the rollout agent: the tests drive a
//! fetch through retries and stalls without waiting.

use crate::digest::{is_wasm, sha256_hex};
use crate::package::{chunk_len, decode, stored_size, DecodeError, MAX_CHUNKS};
use isomesh_protos::{ModuleChunk, ModuleManifest, PrecompiledArtifact};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Why a complete fetch does not give the bytes its signed manifest describes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("reassembled {got} bytes, the manifest says {expected}")]
    Size { got: u64, expected: u64 },
    #[error("sha256 mismatch: the chunks hash to {got}, the manifest says {expected}")]
    Digest { got: String, expected: String },
    #[error("not a WebAssembly module (it does not start with \\0asm)")]
    NotWasm,
    #[error("the model file of a model rollout is not an encoded ModelFile: {0}")]
    NotModel(String),
}

/// Chunks asked for at once.
pub const WINDOW: usize = 16;
/// Quiet spell after which missing chunks are asked for again.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);

/// One blob being collected: the module itself or a precompiled artifact.
#[derive(Debug)]
struct Blob {
    /// Digest and size of the decoded blob.
    sha256: String,
    size: u64,
    /// Size as stored in the chunks, and how it is encoded there.
    stored: u64,
    encoding: String,
    chunks: Vec<Option<Vec<u8>>>,
    /// The signed digest of each stored chunk; empty when the manifest has none.
    digests: Vec<String>,
    received: u32,
    /// The last malformed chunk seen, for the error if the blob never completes.
    last_problem: Option<String>,
}

impl Blob {
    fn new(
        sha256: &str,
        size: u64,
        stored: u64,
        encoding: &str,
        count: u32,
        digests: &[String],
    ) -> Blob {
        // `check_manifest` refuses more chunks than this before a fetch starts; the bound here
        // keeps a fetch made from an unchecked manifest from allocating billions of slots (its
        // chunks then fail the count check and the fetch stalls).
        let count = count.min(MAX_CHUNKS);
        let digests = if digests.len() == count as usize {
            digests.to_vec()
        } else {
            Vec::new()
        };
        Blob {
            sha256: sha256.to_string(),
            size,
            stored: stored_size(size, stored),
            encoding: encoding.to_string(),
            chunks: vec![None; count as usize],
            digests,
            received: 0,
            last_problem: None,
        }
    }

    fn complete(&self) -> bool {
        self.received as usize == self.chunks.len()
    }

    fn assemble(&self) -> Result<Vec<u8>, TransferError> {
        let mut stored = Vec::with_capacity(self.stored as usize);
        for chunk in self.chunks.iter().flatten() {
            stored.extend_from_slice(chunk);
        }
        let bytes = decode(stored, &self.encoding, self.size)?;
        if bytes.len() as u64 != self.size {
            return Err(TransferError::Size {
                got: bytes.len() as u64,
                expected: self.size,
            });
        }
        let digest = sha256_hex(&bytes);
        if digest != self.sha256 {
            return Err(TransferError::Digest {
                got: digest,
                expected: self.sha256.clone(),
            });
        }
        Ok(bytes)
    }
}

/// A chunk (by blob digest and index) to ask the broker for.
pub type ChunkRef = (String, u32);

/// What became of one incoming chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Stored; its subscription can go.
    Stored,
    /// Already had it (a re-request or a duplicate publish).
    Duplicate,
    /// Not part of this fetch (an old rollout's chunk still subscribed somewhere).
    Foreign,
    /// Part of this fetch but malformed; kept missing.
    Malformed(String),
    /// Of the right shape, but its bytes do not hash to the chunk's signed digest: dropped, kept
    /// missing, and asked for again.
    Corrupt(String),
}

/// The bytes a finished fetch produced, checked against the manifest.
#[derive(Debug)]
pub struct Fetched {
    pub module: Vec<u8>,
    /// A model rollout's model file, decoded from `module` (checking it is one), so that the
    /// node need not decode its 14 MB again.
    pub model: Option<isomesh_protos::ModelFile>,
    /// The precompiled artifact for this node's engine, when the manifest had one and it arrived.
    pub artifact: Option<(PrecompiledArtifact, Vec<u8>)>,
    /// A model rollout's code, when this node did not have it already.
    pub code: Option<Vec<u8>>,
}

/// Collecting the chunks of one manifest.
#[derive(Debug)]
pub struct Fetch {
    pub manifest: ModuleManifest,
    module: Blob,
    artifact: Option<(PrecompiledArtifact, Blob)>,
    /// A model rollout's code, unless the node has it ([`Fetch::code_at_hand`]).
    code: Option<Blob>,
    /// Chunks asked for and not yet received.
    outstanding: BTreeSet<ChunkRef>,
    pub started: Instant,
    last_progress: Instant,
    last_request: Instant,
}

impl Fetch {
    /// Starts collecting `manifest`'s module, and `artifact` if this node's engine can use it.
    pub fn new(
        manifest: ModuleManifest,
        artifact: Option<PrecompiledArtifact>,
        now: Instant,
    ) -> Fetch {
        let encoding = manifest.encoding.clone();
        let module = Blob::new(
            &manifest.sha256,
            manifest.size,
            manifest.stored_size,
            &encoding,
            manifest.chunk_count,
            &manifest.chunk_sha256,
        );
        let artifact = artifact.map(|a| {
            let blob = Blob::new(
                &a.sha256,
                a.size,
                a.stored_size,
                &encoding,
                a.chunk_count,
                &a.chunk_sha256,
            );
            (a, blob)
        });
        let code = manifest.code.as_ref().map(|c| {
            Blob::new(
                &c.sha256,
                c.size,
                c.stored_size,
                &encoding,
                c.chunk_count,
                &c.chunk_sha256,
            )
        });
        Fetch {
            manifest,
            module,
            artifact,
            code,
            outstanding: BTreeSet::new(),
            started: now,
            last_progress: now,
            last_request: now,
        }
    }

    fn blobs(&self) -> impl Iterator<Item = &Blob> {
        // The artifact first: with it the node serves without compiling.
        self.artifact
            .as_ref()
            .map(|(_, b)| b)
            .into_iter()
            .chain(self.code.as_ref())
            .chain(std::iter::once(&self.module))
    }

    fn blob_mut(&mut self, sha256: &str) -> Option<&mut Blob> {
        if self.module.sha256 == sha256 {
            return Some(&mut self.module);
        }
        if let Some(code) = self.code.as_mut().filter(|c| c.sha256 == sha256) {
            return Some(code);
        }
        match &mut self.artifact {
            Some((_, blob)) if blob.sha256 == sha256 => Some(blob),
            _ => None,
        }
    }

    /// The node has a model rollout's code already: only the model is fetched (and no machine
    /// code: the node's cache holds the code's). Call before the first requests.
    pub fn code_at_hand(&mut self) {
        self.code = None;
        self.artifact = None;
    }

    /// Chunks to ask for now, topping the window up.
    pub fn next_requests(&mut self, now: Instant) -> Vec<ChunkRef> {
        let mut wanted = Vec::new();
        let room = WINDOW.saturating_sub(self.outstanding.len());
        'blobs: for blob in self.blobs() {
            for (index, chunk) in blob.chunks.iter().enumerate() {
                if wanted.len() >= room {
                    break 'blobs;
                }
                let key = (blob.sha256.clone(), index as u32);
                if chunk.is_none() && !self.outstanding.contains(&key) {
                    wanted.push(key);
                }
            }
        }
        self.outstanding.extend(wanted.iter().cloned());
        if !wanted.is_empty() {
            self.last_request = now;
        }
        wanted
    }

    /// Takes one chunk off the wire.
    pub fn take(&mut self, chunk: ModuleChunk, now: Instant) -> Taken {
        let manifest_chunk_size = self.manifest.chunk_size;
        let Some(blob) = self.blob_mut(&chunk.sha256) else {
            return Taken::Foreign;
        };
        let count = blob.chunks.len() as u32;
        let problem = if chunk.count != count {
            Some(format!(
                "chunk {} says the blob has {} chunks, the manifest says {count}",
                chunk.index, chunk.count
            ))
        } else if chunk.index >= count {
            Some(format!(
                "chunk index {} is past {count} chunks",
                chunk.index
            ))
        } else {
            let expected = chunk_len(blob.stored, manifest_chunk_size, chunk.index);
            (chunk.data.len() as u64 != expected).then(|| {
                format!(
                    "chunk {} holds {} bytes, {expected} expected",
                    chunk.index,
                    chunk.data.len()
                )
            })
        };
        if let Some(problem) = problem {
            blob.last_problem = Some(problem.clone());
            return Taken::Malformed(problem);
        }
        if blob.chunks[chunk.index as usize].is_some() {
            return Taken::Duplicate;
        }
        if let Some(signed) = blob.digests.get(chunk.index as usize) {
            let got = sha256_hex(&chunk.data);
            if &got != signed {
                let problem = format!(
                    "chunk {} hashes to {}, its signed digest is {}",
                    chunk.index,
                    crate::digest::short(&got),
                    crate::digest::short(signed)
                );
                blob.last_problem = Some(problem.clone());
                return Taken::Corrupt(problem);
            }
        }
        let slot = &mut blob.chunks[chunk.index as usize];
        *slot = Some(chunk.data);
        blob.received += 1;
        self.outstanding.remove(&(chunk.sha256, chunk.index));
        self.last_progress = now;
        Taken::Stored
    }

    /// Chunks received and expected, over the module and the artifact.
    pub fn progress(&self) -> (u32, u32) {
        self.blobs().fold((0, 0), |(done, all), blob| {
            (done + blob.received, all + blob.chunks.len() as u32)
        })
    }

    /// Whether every chunk needed is in: the module's, and the artifact's unless it was dropped.
    pub fn is_complete(&self) -> bool {
        self.blobs().all(Blob::complete)
    }

    /// The chunks to ask for again, if nothing arrived for [`RETRY_AFTER`].
    pub fn retry(&mut self, now: Instant) -> Vec<ChunkRef> {
        let quiet = now.saturating_duration_since(self.last_progress.max(self.last_request));
        if quiet < RETRY_AFTER || self.outstanding.is_empty() {
            return Vec::new();
        }
        self.last_request = now;
        self.outstanding.iter().cloned().collect()
    }

    /// How long nothing has arrived.
    pub fn stalled_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_progress)
    }

    /// Gives up on the precompiled artifact (its chunks are gone, say after a broker restart
    /// re-seeded by nodes of another engine); the node compiles the module itself. Returns the
    /// subscriptions to drop.
    pub fn drop_artifact(&mut self, now: Instant) -> Vec<ChunkRef> {
        let Some((_, blob)) = self.artifact.take() else {
            return Vec::new();
        };
        let dropped: Vec<ChunkRef> = self
            .outstanding
            .iter()
            .filter(|(sha, _)| *sha == blob.sha256)
            .cloned()
            .collect();
        for key in &dropped {
            self.outstanding.remove(key);
        }
        self.last_progress = now;
        dropped
    }

    /// Whether every chunk of the module was checked against a signed per-chunk digest: then a
    /// failure of the whole is the signed bytes' fault, not the transport's.
    pub fn chunks_verified(&self) -> bool {
        !self.module.digests.is_empty()
    }

    /// Whether only the artifact is holding the fetch up.
    pub fn only_artifact_missing(&self) -> bool {
        self.module.complete()
            && self.code.as_ref().is_none_or(Blob::complete)
            && self.artifact.as_ref().is_some_and(|(_, b)| !b.complete())
    }

    /// Every subscription this fetch still holds.
    pub fn outstanding(&self) -> Vec<ChunkRef> {
        self.outstanding.iter().cloned().collect()
    }

    /// Why the fetch is not complete, for a rejection after it stalled.
    pub fn missing(&self) -> String {
        let mut parts = Vec::new();
        for blob in self.blobs() {
            let missing: Vec<usize> = blob
                .chunks
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_none())
                .map(|(i, _)| i)
                .collect();
            if missing.is_empty() {
                continue;
            }
            let shown: Vec<String> = missing.iter().take(8).map(|i| i.to_string()).collect();
            let more = if missing.len() > 8 { ", ..." } else { "" };
            let mut part = format!(
                "{} of {} chunks of {} never arrived (chunks {}{more})",
                missing.len(),
                blob.chunks.len(),
                &blob.sha256[..12.min(blob.sha256.len())],
                shown.join(", ")
            );
            if let Some(problem) = &blob.last_problem {
                part.push_str(&format!("; malformed: {problem}"));
            }
            parts.push(part);
        }
        parts.join("; ")
    }

    /// The checked bytes: decoded, of the signed size and sha256, and WebAssembly. Call once
    /// [`Fetch::is_complete`]; slow for a large module (inflating, hashing), so off the loop.
    pub fn finish(self) -> Result<Fetched, TransferError> {
        let module = self.module.assemble()?;
        let code = match &self.code {
            Some(blob) => Some(blob.assemble()?),
            None => None,
        };
        let model = if self.manifest.code.is_some() {
            use prost::Message;
            let file = isomesh_protos::ModelFile::decode(module.as_slice())
                .map_err(|e| TransferError::NotModel(e.to_string()))?;
            if file.model.is_none() {
                return Err(TransferError::NotModel("it holds no model".into()));
            }
            if code.as_deref().is_some_and(|c| !is_wasm(c)) {
                return Err(TransferError::NotWasm);
            }
            Some(file)
        } else if !is_wasm(&module) {
            return Err(TransferError::NotWasm);
        } else {
            None
        };
        let artifact = match self.artifact {
            Some((described, blob)) => match blob.assemble() {
                Ok(bytes) => Some((described, bytes)),
                Err(e) => {
                    // The module is fine; compiling it locally is the fallback.
                    tracing::warn!(error = %e, "precompiled artifact unusable; compiling the module instead");
                    None
                }
            },
            None => None,
        };
        Ok(Fetched {
            module,
            model,
            artifact,
            code,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::{Package, PackageSpec};

    /// A "module" of `size` bytes: the Wasm magic, then pseudo-random (incompressible) bytes,
    /// in 100-byte chunks.
    fn package(size: usize, compress: bool) -> Package {
        let spec = PackageSpec {
            name: "m",
            version: "1",
            chunk_size: 100,
            target_tiers: vec![],
            target_nodes: vec![],
            force: false,
            compress,
        };
        let mut state = 12345u32;
        let mut blob = b"\0asm".to_vec();
        blob.extend((4..size).map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (state >> 16) as u8
        }));
        Package::new(&spec, &blob, &[])
    }

    #[test]
    fn chunks_in_any_order_with_duplicates_reassemble_in_windows() {
        let now = Instant::now();
        let package = package(2050, true);
        let mut fetch = Fetch::new(package.manifest.clone(), None, now);
        assert_eq!(
            fetch.next_requests(now).len(),
            WINDOW.min(package.chunks.len())
        );
        // Reversed, so most arrive outside the window asked for: they still count.
        for chunk in package.chunks.iter().rev() {
            assert_eq!(fetch.take(chunk.clone(), now), Taken::Stored);
        }
        assert_eq!(fetch.take(package.chunks[3].clone(), now), Taken::Duplicate);
        assert!(fetch.is_complete());
        let all = package.chunks.len() as u32;
        assert_eq!(fetch.progress(), (all, all));
        let fetched = fetch.finish().unwrap();
        assert_eq!(fetched.module.len(), 2050);
    }

    #[test]
    fn missing_chunks_are_asked_for_again_after_a_quiet_spell() {
        let start = Instant::now();
        let package = package(250, false);
        let mut fetch = Fetch::new(package.manifest.clone(), None, start);
        let asked = fetch.next_requests(start);
        assert_eq!(asked.len(), 3);
        assert!(fetch.retry(start + RETRY_AFTER / 2).is_empty());
        fetch.take(package.chunks[0].clone(), start);
        let again = fetch.retry(start + RETRY_AFTER);
        assert_eq!(again, asked[1..].to_vec());
        assert_eq!(fetch.stalled_for(start + RETRY_AFTER), RETRY_AFTER);
    }

    #[test]
    fn malformed_chunks_stay_missing_and_are_named() {
        let now = Instant::now();
        let package = package(250, false);
        let mut fetch = Fetch::new(package.manifest.clone(), None, now);
        let mut short = package.chunks[1].clone();
        short.data.truncate(10);
        assert!(matches!(fetch.take(short, now), Taken::Malformed(_)));
        fetch.take(package.chunks[0].clone(), now);
        assert!(!fetch.is_complete());
        let missing = fetch.missing();
        assert!(
            missing.contains("chunks 1, 2") && missing.contains("10 bytes"),
            "{missing}"
        );
    }

    #[test]
    fn a_chunk_that_fails_its_signed_digest_is_dropped_and_asked_for_again() {
        let start = Instant::now();
        let package = package(250, false);
        assert_eq!(package.manifest.chunk_sha256.len(), 3);
        let mut fetch = Fetch::new(package.manifest.clone(), None, start);
        fetch.next_requests(start);
        let mut forged = package.chunks[1].clone();
        forged.data[5] ^= 1;
        assert!(matches!(fetch.take(forged, start), Taken::Corrupt(_)));
        assert_eq!(fetch.take(package.chunks[0].clone(), start), Taken::Stored);
        assert_eq!(fetch.take(package.chunks[2].clone(), start), Taken::Stored);
        assert!(!fetch.is_complete());
        // Still outstanding: asked for again after a quiet spell.
        let again = fetch.retry(start + RETRY_AFTER);
        assert_eq!(again, vec![(package.manifest.sha256.clone(), 1)]);
        assert!(
            fetch.missing().contains("signed digest"),
            "{}",
            fetch.missing()
        );
        assert_eq!(fetch.take(package.chunks[1].clone(), start), Taken::Stored);
        assert!(fetch.chunks_verified());
        assert_eq!(fetch.finish().unwrap().module.len(), 250);
    }

    #[test]
    fn a_manifest_without_chunk_digests_still_fetches_by_the_whole_digest() {
        let now = Instant::now();
        let package = package(250, false);
        let mut legacy = package.manifest.clone();
        legacy.chunk_sha256.clear();
        let mut fetch = Fetch::new(legacy, None, now);
        let mut forged = package.chunks[1].clone();
        forged.data[5] ^= 1;
        for chunk in [&package.chunks[0], &forged, &package.chunks[2]] {
            assert_eq!(fetch.take(chunk.clone(), now), Taken::Stored);
        }
        assert!(!fetch.chunks_verified());
        assert!(matches!(fetch.finish(), Err(TransferError::Digest { .. })));
    }

    #[test]
    fn a_fetch_of_an_unchecked_manifest_never_allocates_past_the_chunk_bound() {
        let now = Instant::now();
        let manifest = ModuleManifest {
            sha256: "ab".repeat(32),
            size: 1 << 30,
            chunk_size: 1,
            chunk_count: u32::MAX,
            ..Default::default()
        };
        let fetch = Fetch::new(manifest, None, now);
        assert_eq!(fetch.progress(), (0, MAX_CHUNKS));
    }

    #[test]
    fn a_blob_with_the_wrong_bytes_fails_its_sha256() {
        let now = Instant::now();
        let package = package(250, false);
        let mut forged = package.manifest.clone();
        forged.sha256 = sha256_hex(b"something else");
        let mut fetch = Fetch::new(forged.clone(), None, now);
        for mut chunk in package.chunks.clone() {
            chunk.sha256 = forged.sha256.clone();
            assert_eq!(fetch.take(chunk, now), Taken::Stored);
        }
        assert!(matches!(fetch.finish(), Err(TransferError::Digest { .. })));
    }
}
