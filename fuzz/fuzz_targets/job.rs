//! A protobuf `Job` from `isomesh/jobs/...`, as the node turns it into a request.
#![no_main]

use isomesh_mesh::request::{from_job, JobIds};
use isomesh_mesh::topics::Topics;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ids = JobIds::new("f1");
    let topics = Topics::new("isomesh");
    let _ = from_job(data, &ids, &topics, "f1");
});
