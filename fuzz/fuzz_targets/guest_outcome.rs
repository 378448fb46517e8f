//! What a guest returns through the ABI: `GuestInfo` and `GuestOutcome` buffers, decoded by the
//! host. A hostile module controls these bytes completely.
#![no_main]

use isomesh_protos::{GuestInfo, GuestOutcome};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let _ = GuestInfo::decode(data);
    if let Ok(outcome) = GuestOutcome::decode(data) {
        let _ = format!("{outcome:?}");
    }
});
