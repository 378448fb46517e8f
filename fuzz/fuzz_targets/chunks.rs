//! Chunk reassembly: `ModuleChunk`s from `isomesh/modules/blobs/...` (which anyone allowed to
//! publish there can forge) fed to the fetch of a real, small rollout. The first input byte picks
//! the rollout (odd: deflated chunks, even: plain ones); the rest is a sequence of chunk messages,
//! each prefixed by its length (u16, little-endian).
#![no_main]

use isomesh_module::fetch::Fetch;
use isomesh_module::package::{Package, PackageSpec};
use isomesh_protos::{ModuleChunk, ModuleManifest};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::sync::OnceLock;

/// The manifest of a 3000-byte module (byte i is i * 7 % 251) cut into 1024-byte chunks,
/// deflated or not; `scripts/fuzz_seeds.py` writes the plain rollout's chunks as seeds.
fn manifest(compress: bool) -> ModuleManifest {
    static PLAIN: OnceLock<ModuleManifest> = OnceLock::new();
    static DEFLATED: OnceLock<ModuleManifest> = OnceLock::new();
    let cell = if compress { &DEFLATED } else { &PLAIN };
    cell.get_or_init(|| {
        let module: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let spec = PackageSpec {
            name: "fuzz",
            version: "1",
            chunk_size: 1024,
            target_tiers: Vec::new(),
            target_nodes: Vec::new(),
            force: false,
            compress,
        };
        Package::new(&spec, &module, &[]).manifest
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let now = std::time::Instant::now();
    let mut fetch = Fetch::new(manifest(mode & 1 == 1), None, now);
    let _ = fetch.next_requests(now);
    while rest.len() >= 2 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        rest = &rest[2..];
        let (message, tail) = rest.split_at(len.min(rest.len()));
        rest = tail;
        if let Ok(chunk) = ModuleChunk::decode(message) {
            let _ = fetch.take(chunk, now);
        }
    }
    let _ = fetch.missing();
    if fetch.is_complete() {
        let _ = fetch.finish();
    }
});
