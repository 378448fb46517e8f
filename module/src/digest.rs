//! Content addresses: modules, precompiled artifacts and chunks are named by the sha256 of their
//! bytes, in lower-case hex, everywhere (file names, topics, manifests, statuses).

use sha2::{Digest, Sha256};

/// The four bytes every WebAssembly binary starts with.
pub const WASM_MAGIC: &[u8; 4] = b"\0asm";

/// Hex sha256 of `bytes`, as used for module identities.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Whether `bytes` look like a WebAssembly binary (they start with `\0asm`).
pub fn is_wasm(bytes: &[u8]) -> bool {
    bytes.starts_with(WASM_MAGIC)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string, or `None` if it is not hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether `digest` is a lower-case hex sha256.
pub fn is_sha256_hex(digest: &str) -> bool {
    digest.len() == 64
        && digest
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

/// The first 12 hex digits of a digest, as logs and messages show it.
pub fn short(digest: &str) -> &str {
    &digest[..12.min(digest.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_digests_are_recognised() {
        assert_eq!(unhex(&hex(&[0, 1, 0xfe])), Some(vec![0, 1, 0xfe]));
        assert_eq!(unhex("abc"), None);
        let digest = sha256_hex(b"abc");
        assert!(is_sha256_hex(&digest));
        assert!(!is_sha256_hex(&digest.to_uppercase()));
        assert_eq!(short(&digest), "ba7816bf8f01");
        assert!(is_wasm(b"\0asm\x01\0\0\0") && !is_wasm(b"\x7fELF"));
    }
}
