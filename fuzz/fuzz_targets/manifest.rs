//! A retained `ModuleManifest` from `isomesh/modules/{name}/manifest`: decoded, checked for sense
//! and for a signature by a trusted key, as a node's rollout agent does.
#![no_main]

use isomesh_module::package::{check_manifest, describe_targets, is_target};
use isomesh_module::signing::{SecretKey, TrustedKeys};
use isomesh_protos::{ModuleManifest, Tier};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::sync::OnceLock;

fn trusted() -> &'static TrustedKeys {
    static KEYS: OnceLock<TrustedKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut keys = TrustedKeys::default();
        if let Ok(key) = SecretKey::generate() {
            keys.add(key.public());
        }
        keys
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = ModuleManifest::decode(data) else {
        return;
    };
    let _ = check_manifest(&manifest);
    let _ = trusted().verify(&manifest);
    let _ = is_target(&manifest, Tier::Edge, "e1");
    let _ = describe_targets(&manifest);
});
