//! Faulty modules never take a node down: a file that is not Wasm or a module that fails its
//! self-test is rejected and the last good module serves; a module that traps or loops on one
//! job fails that job with a clear error, its instance is recycled, and the next job is answered.

use isomesh_protos::NodeStatus;
use isomesh_testkit::broker::TestBroker;
use isomesh_testkit::faults::{fault_module, Fault};
use isomesh_testkit::mqtt::Client;
use isomesh_testkit::node::{ModuleFile, NodeSpec, TestNode};
use prost::Message;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::time::Duration;

const ANSWER_WITHIN: Duration = Duration::from_secs(120);

async fn status_of(port: u16, node: &str) -> NodeStatus {
    let mut watcher = Client::connect(port, &format!("status-{node}")).await;
    watcher.subscribe(&format!("isomesh/status/{node}")).await;
    let publish = watcher
        .next(Duration::from_secs(30))
        .await
        .expect("retained status");
    NodeStatus::decode(publish.payload.as_ref()).expect("NodeStatus")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_is_not_wasm_is_rejected_and_the_good_module_serves() {
    let broker = TestBroker::start().await;
    let good = std::fs::read(isomesh_testkit::guest_module()).unwrap();
    let mut spec = NodeSpec::with_guest("m1", "edge", broker.port());
    // Newer than the good module, so it is tried first.
    // Signed, so it gets past the signature check to the sandbox's own.
    spec.modules.push(ModuleFile::signed(
        "zz-newer.wasm",
        b"MZ\x90\x00 this is not wasm".to_vec(),
        "junk",
        "1",
    ));
    let node = TestNode::start(spec).await;
    let status = status_of(broker.port(), "m1").await;
    let module = status.module.expect("a module is served");
    assert_eq!(module.sha256, format!("{:x}", Sha256::digest(&good)));
    // Only the log says why: a file refused at start-up leaves no rollout state.
    let log = node.log();
    assert!(
        log.contains("is not a WebAssembly module"),
        "the rejection is logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_that_loops_in_its_self_test_is_rejected() {
    let broker = TestBroker::start().await;
    let good = std::fs::read(isomesh_testkit::guest_module()).unwrap();
    let mut spec = NodeSpec::with_guest("m2", "edge", broker.port());
    spec.modules.push(ModuleFile::signed(
        "zz-loops.wasm",
        fault_module(Fault::AlwaysLoop),
        "faulty",
        "t1",
    ));
    spec.extra_args = vec!["--call-timeout-ms".into(), "1500".into()];
    let node = TestNode::start(spec).await;
    let status = status_of(broker.port(), "m2").await;
    assert_eq!(
        status.module.expect("module").sha256,
        format!("{:x}", Sha256::digest(&good))
    );
    // Only the log says why: a file refused at start-up leaves no rollout state.
    let log = node.log();
    assert!(
        log.contains("failed its self-test") && log.contains("deadline"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn traps_and_endless_loops_fail_one_job_and_the_node_keeps_serving() {
    let broker = TestBroker::start().await;
    let spec = NodeSpec {
        id: "m3",
        tier: "device",
        broker_port: broker.port(),
        modules: vec![ModuleFile::signed(
            "faulty.wasm",
            fault_module(Fault::OnMarkedInput),
            "faulty",
            "t1",
        )],
        extra_args: vec!["--call-timeout-ms".into(), "1500".into()],
    };
    let _node = TestNode::start(spec).await;
    let mut client = Client::connect(broker.port(), "faults").await;
    client.subscribe("test/faults").await;
    let steps: [(&[u8], Option<&str>); 5] = [
        (b"\x01ok", None),
        (b"\xfftrap", Some("trapped")),
        (b"\x01ok", None),
        (b"\xfeloop", Some("deadline")),
        (b"\x01ok", None),
    ];
    for (n, (payload, expected_error)) in steps.iter().enumerate() {
        client
            .publish_with_response_topic(
                "isomesh/images/m3",
                payload.to_vec(),
                "test/faults",
                n.to_string().as_bytes(),
            )
            .await;
        let reply = client
            .next(ANSWER_WITHIN)
            .await
            .unwrap_or_else(|| panic!("no answer to step {n}"));
        let result: Value = serde_json::from_slice(&reply.payload).unwrap();
        match expected_error {
            Some(expected) => {
                let error = result["error"]
                    .as_str()
                    .unwrap_or_else(|| panic!("step {n}: {result}"));
                assert!(
                    error.contains(expected),
                    "step {n}: {error:?} should mention {expected:?}"
                );
            }
            None => {
                assert_eq!(result["top"][0]["label"], "a", "step {n}: {result}");
                assert_eq!(result["module"]["name"], "faulty");
            }
        }
    }
}
