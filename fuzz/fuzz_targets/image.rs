//! Image decoding and resizing, as the guest does it for every payload of `isomesh/images/...`
//! (here natively: the same code the sandbox runs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = isomesh_guest::preprocess::image_to_input(data);
});
