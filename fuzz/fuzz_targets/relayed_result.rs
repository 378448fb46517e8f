//! A `JobResult` from `isomesh/relay/{node}` (the tier above's answer to a forwarded job), as the
//! forwarding node extends and renders it for its user; also a `NodeStatus` from
//! `isomesh/status/+`, which offload decisions read.
#![no_main]

use isomesh_mesh::report::{relayed, to_json};
use isomesh_protos::{Hop, JobResult, NodeStatus};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(result) = JobResult::decode(data) {
        let result = relayed(result, Hop::default());
        let _ = to_json(&result).to_string();
    }
    let _ = NodeStatus::decode(data);
});
