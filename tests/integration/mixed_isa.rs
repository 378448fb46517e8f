//! One mesh, two ISAs: the aarch64 `isomesh-node` (what a Raspberry Pi runs) under qemu beside
//! x86_64 nodes on one broker ([`isomesh_testkit::arm64`]).
//!
//! - It serves the very same signed `.wasm` and answers every photo with the x86_64 node's top-1,
//!   its probabilities within [`PROBABILITY_TOLERANCE`] of theirs.
//! - A rollout with `--target aarch64-unknown-linux-musl` brings it machine code compiled on the
//!   publisher's x86_64 machine: it serves the new version without compiling. Without that code
//!   it compiles the module itself and still converges.
//! - Over its budget it offloads to an x86_64 edge node; the answer's hops name both ISAs.
//! - Bad input gets one clear error each, and an aarch64 edge node killed while holding jobs
//!   costs no job.
//!
//! Emulation makes the aarch64 node slow, so these tests wait longer and never time anything;
//! `isomesh bench swap --arm64` measures it (an emulated figure, not a board's).

use isomesh_protos::{hop, Job, JobResult, NodeStatus};
use isomesh_testkit::arm64::TARGET;
use isomesh_testkit::broker::TestBroker;
use isomesh_testkit::faults::{fault_module_as, Fault};
use isomesh_testkit::mqtt::Client;
use isomesh_testkit::node::{serves, wait_status, wait_statuses_published, NodeSpec, TestNode};
use isomesh_testkit::rollout::{
    guest_module_v2, rollout_args, Keys, MODULE_NAME, VERSION_1, VERSION_2,
};
use isomesh_testkit::{assert_answers_photo, guest_module, isomesh, photos};
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// How far apart the two ISAs' probabilities may be. Relaxed SIMD lets each engine fuse a
/// multiply-add or not (aarch64 always does, x86_64 when it has FMA), which moves the last bits of
/// every dot product; over MobileNetV2's 53 layers that stays far below this.
const PROBABILITY_TOLERANCE: f32 = 1e-3;
/// An emulated node classifies in ~4 s instead of tens of milliseconds (measured here).
const ANSWERS_WITHIN: Duration = Duration::from_secs(300);
/// A rollout the aarch64 node compiles itself (a small module: seconds even under emulation).
const COMPILE_WITHIN: Duration = Duration::from_secs(300);
const X86_TARGET: &str = "x86_64-unknown-linux-musl";
/// An emulated call is slower than a native one: a generous call deadline for aarch64 nodes.
const ARM_ARGS: [&str; 2] = ["--call-timeout-ms", "120000"];

fn job(n: usize, id: &str, reply_to: &str, budget_ms: u32) -> Vec<u8> {
    isomesh_testkit::photo_job(n, id, reply_to, budget_ms)
}

fn decode(payload: &[u8]) -> JobResult {
    JobResult::decode(payload).expect("a JobResult")
}

/// Collects `n` answers by job id; panics on a second answer to any job.
async fn answers(client: &mut Client, n: usize) -> HashMap<String, JobResult> {
    let mut results = HashMap::new();
    for reply in client.collect(n, ANSWERS_WITHIN).await {
        let result = decode(&reply.payload);
        let id = result.job_id.clone();
        if let Some(first) = results.insert(id.clone(), result) {
            panic!("job {id} answered twice; first answer: {first:?}");
        }
    }
    results
}

/// Each hop as (node, action, arch).
fn hops(result: &JobResult) -> Vec<(String, hop::Action, String)> {
    result
        .hops
        .iter()
        .map(|h| {
            let action = hop::Action::try_from(h.action).unwrap_or(hop::Action::Unspecified);
            (h.node.clone(), action, h.arch.clone())
        })
        .collect()
}

/// The `module loaded` / `module swapped in` lines of a node's log.
fn load_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("module loaded") || l.contains("module swapped in"))
        .collect()
}

fn sha256_of(path: &std::path::Path) -> String {
    isomesh_module::digest::sha256_hex(&std::fs::read(path).expect("module file"))
}

async fn status(port: u16, node: &str) -> NodeStatus {
    wait_status(port, node, ANSWERS_WITHIN, |s| {
        s.online && s.module.is_some()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_arm64_node_serves_the_same_module_and_answers_every_photo_as_x86_64_does() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let x86 = TestNode::spawn(&NodeSpec::with_guest("m1x", "device", port));
    let arm = TestNode::start_arm64(NodeSpec::with_guest_and_args(
        "m1a", "device", port, &ARM_ARGS,
    ))
    .await;
    x86.wait_ready(port).await;

    // The very same signed module, on two targets; the aarch64 node did not compile it.
    let (x86_status, arm_status) = (status(port, "m1x").await, status(port, "m1a").await);
    let module = sha256_of(&guest_module());
    for status in [&x86_status, &arm_status] {
        let served = status.module.as_ref().expect("a module");
        assert_eq!(served.sha256, module, "{}: {status:?}", status.node_id);
        assert_eq!(served.version, VERSION_1);
    }
    assert_eq!(arm_status.target, TARGET);
    assert_eq!(x86_status.target, X86_TARGET);
    let log = arm.log();
    assert!(
        load_lines(&log)
            .first()
            .is_some_and(|l| l.contains("from_cache=true")),
        "the aarch64 node compiled instead of loading the code made for it:\n{log}"
    );

    let mut client = Client::connect(port, "mixed-photos").await;
    client.subscribe("test/mixed/photos").await;
    let photos = photos();
    for n in 0..photos.len() {
        for node in ["m1x", "m1a"] {
            let id = format!("{node}-{n}");
            client
                .publish(
                    &format!("isomesh/jobs/{node}"),
                    job(n, &id, "test/mixed/photos", 0),
                )
                .await;
        }
    }
    let results = answers(&mut client, 2 * photos.len()).await;
    let mut widest = 0f32;
    for (n, photo) in photos.iter().enumerate() {
        let (x86, arm) = (&results[&format!("m1x-{n}")], &results[&format!("m1a-{n}")]);
        let x86_top1 = assert_answers_photo(&x86.job_id, n, x86);
        let arm_top1 = assert_answers_photo(&arm.job_id, n, arm);
        assert_eq!(arm_top1, x86_top1, "{}: the ISAs disagree", photo.file);
        assert_eq!(hops(x86)[0].2, "x86_64");
        assert_eq!(hops(arm)[0].2, "aarch64");
        // The same classes with the same probabilities, as far as both list them.
        for (a, b) in x86.top.iter().zip(&arm.top) {
            let apart = (a.prob - b.prob).abs();
            widest = widest.max(apart);
            assert!(
                apart <= PROBABILITY_TOLERANCE,
                "{}: class {} has p={} on x86_64, class {} p={} on aarch64",
                photo.file,
                a.index,
                a.prob,
                b.index,
                b.prob
            );
        }
    }
    eprintln!(
        "{} photos: same top-1 on both ISAs, probabilities at most {widest:e} apart",
        photos.len()
    );
}

/// `isomesh rollout` of `module` as 0.2.0 with `extra` flags; panics unless every node converges.
async fn rollout(
    broker: &TestBroker,
    keys: &Keys,
    module: &std::path::Path,
    within: Duration,
    extra: &[&str],
) -> String {
    let mut args = rollout_args(&broker.url(), keys, module, VERSION_2, within);
    args.extend(extra.iter().map(|a| a.to_string()));
    let (code, text) = isomesh(&args).await;
    assert_eq!(code, 0, "isomesh {args:?}:\n{text}");
    text
}

/// An aarch64 device and an x86_64 edge node trusting `keys`, both serving 0.1.0.
async fn mixed_pair(port: u16, keys: &Keys, arm: &str, x86: &str) -> (TestNode, TestNode) {
    let mut arm_args: Vec<String> = keys.node_args();
    arm_args.extend(ARM_ARGS.iter().map(|a| a.to_string()));
    let x86_node = TestNode::spawn(&NodeSpec {
        extra_args: keys.node_args(),
        ..NodeSpec::with_guest(x86, "edge", port)
    });
    let arm_node = TestNode::start_arm64(NodeSpec {
        extra_args: arm_args,
        ..NodeSpec::with_guest(arm, "device", port)
    })
    .await;
    x86_node.wait_ready(port).await;
    (arm_node, x86_node)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_brings_the_arm64_node_code_compiled_for_it_and_it_serves_without_compiling() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let keys = Keys::new();
    let (arm, _x86) = mixed_pair(port, &keys, "m2a", "m2x").await;

    let said = rollout(
        &broker,
        &keys,
        &guest_module_v2(),
        ANSWERS_WITHIN,
        &["--target", TARGET],
    )
    .await;
    assert!(said.contains("2 precompiled artifact(s)"), "{said}");
    for node in ["m2a", "m2x"] {
        let status = status(port, node).await;
        assert!(serves(&status, VERSION_2), "{status:?}");
        let served = status.module.as_ref().expect("a module");
        assert_eq!(served.sha256, sha256_of(&guest_module_v2()));
    }
    let log = arm.log();
    assert!(
        log.lines()
            .any(|l| l.contains("fetching a rolled-out module") && l.contains("precompiled=true")),
        "the aarch64 node did not find its code in the manifest:\n{log}"
    );
    let swapped = load_lines(&log)
        .into_iter()
        .find(|l| l.contains("module swapped in"))
        .unwrap_or_else(|| panic!("no swap in the log:\n{log}"));
    assert!(
        swapped.contains("from_cache=true"),
        "the aarch64 node compiled 0.2.0 instead of using the artifact: {swapped}"
    );

    // And it classifies with the new module.
    let mut client = Client::connect(port, "mixed-rollout").await;
    client.subscribe("test/mixed/rollout").await;
    client
        .publish("isomesh/jobs/m2a", job(0, "after", "test/mixed/rollout", 0))
        .await;
    let result = &answers(&mut client, 1).await["after"];
    assert_answers_photo("after", 0, result);
    assert_eq!(
        result.module.as_ref().map(|m| m.version.as_str()),
        Some(VERSION_2)
    );
}

/// The node's own compile path on aarch64. The module rolled out is a small stand-in that speaks
/// the guest ABI and passes the self-test (`fault_module_as`): compiling the real classifier under
/// emulation takes 4-9 minutes on this machine, which `isomesh bench swap --arm64
/// --no-precompile` measures, not the test suite.
#[tokio::test(flavor = "multi_thread")]
async fn without_code_for_it_in_the_rollout_the_arm64_node_compiles_and_still_converges() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let keys = Keys::new();
    let (arm, _x86) = mixed_pair(port, &keys, "m3a", "m3x").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let module = dir.path().join("stand-in-0.2.0.wasm");
    std::fs::write(
        &module,
        fault_module_as(Fault::OnMarkedInput, MODULE_NAME, VERSION_2),
    )
    .expect("write the module");

    // Code for this machine's engine only: nothing the aarch64 node can load.
    let said = rollout(&broker, &keys, &module, COMPILE_WITHIN, &[]).await;
    assert!(said.contains("1 precompiled artifact(s)"), "{said}");
    let status = status(port, "m3a").await;
    assert!(serves(&status, VERSION_2), "{status:?}");
    assert_eq!(
        status.module.as_ref().map(|m| m.sha256.clone()),
        Some(sha256_of(&module))
    );
    let log = arm.log();
    assert!(
        log.lines()
            .any(|l| l.contains("fetching a rolled-out module") && l.contains("precompiled=false")),
        "{log}"
    );
    let swapped = load_lines(&log)
        .into_iter()
        .find(|l| l.contains("module swapped in"))
        .unwrap_or_else(|| panic!("no swap in the log:\n{log}"));
    assert!(
        swapped.contains("from_cache=false"),
        "the aarch64 node had no code for 0.2.0 and must have compiled it: {swapped}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn over_its_budget_the_arm64_device_offloads_to_an_x86_64_edge() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let edge = TestNode::spawn(&NodeSpec::with_guest("m4e", "edge", port));
    let _device = TestNode::start_arm64(NodeSpec::with_guest_and_args(
        "m4a", "device", port, &ARM_ARGS,
    ))
    .await;
    edge.wait_ready(port).await;
    wait_statuses_published(port, &["m4a", "m4e"], ANSWERS_WITHIN).await;
    // One photo each, so each status carries its node's service time.
    let mut client = Client::connect(port, "mixed-offload").await;
    client.subscribe("test/mixed/offload").await;
    for node in ["m4a", "m4e"] {
        let id = format!("warm-{node}");
        client
            .publish(
                &format!("isomesh/jobs/{node}"),
                job(0, &id, "test/mixed/offload", 0),
            )
            .await;
        assert_answers_photo(&id, 0, &answers(&mut client, 1).await[&id]);
    }
    let served = |s: &NodeStatus| s.jobs_done >= 1 && s.ewma_ms > 0.0;
    let device = wait_status(port, "m4a", ANSWERS_WITHIN, served).await;
    let edge = wait_status(port, "m4e", ANSWERS_WITHIN, served).await;
    // A budget between the two nodes' service times (their geometric mean): the emulated device
    // cannot meet it, the edge can.
    assert!(
        device.ewma_ms > 4.0 * edge.ewma_ms,
        "the emulated device ({} ms a photo) is not much slower than the edge ({} ms)",
        device.ewma_ms,
        edge.ewma_ms
    );
    let budget = (device.ewma_ms * edge.ewma_ms).sqrt() as u32;

    const JOBS: usize = 4;
    for n in 0..JOBS {
        client
            .publish(
                "isomesh/jobs/m4a",
                job(n, &format!("up-{n}"), "test/mixed/offload", budget),
            )
            .await;
    }
    let results = answers(&mut client, JOBS).await;
    for n in 0..JOBS {
        let id = format!("up-{n}");
        let result = &results[&id];
        assert_answers_photo(&id, n, result);
        assert_eq!(
            hops(result),
            vec![
                ("m4a".into(), hop::Action::Forwarded, "aarch64".into()),
                ("m4e".into(), hop::Action::Ran, "x86_64".into()),
            ],
            "{id} (budget {budget} ms): {result:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_and_a_killed_arm64_node_cost_no_job() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    // Every job goes up from the x86_64 device to the edge tier, which is an aarch64 node and
    // an x86_64 one sharing the tier's jobs. The device waits 20 s for the tier's answer before
    // it runs a job itself: longer than the emulated node takes for its first ones.
    let grace = ["--offload", "always-up", "--offload-grace-ms", "20000"];
    let device = TestNode::spawn(&NodeSpec::with_guest_and_args(
        "m5d", "device", port, &grace,
    ));
    let x86_edge = TestNode::spawn(&NodeSpec::with_guest("m5e", "edge", port));
    let mut arm = TestNode::start_arm64(NodeSpec::with_guest_and_args(
        "m5a", "edge", port, &ARM_ARGS,
    ))
    .await;
    device.wait_ready(port).await;
    x86_edge.wait_ready(port).await;
    wait_statuses_published(port, &["m5d", "m5e", "m5a"], ANSWERS_WITHIN).await;

    let mut client = Client::connect(port, "mixed-bad").await;
    client.subscribe("test/mixed/bad").await;
    client.subscribe("isomesh/results/m5a").await;
    // Bad input straight to the aarch64 node: one clear error each, then a good photo.
    client
        .publish("isomesh/jobs/m5a", vec![0x0f, 0xff, 0xff, 0x01])
        .await;
    let reply = client.next(ANSWERS_WITHIN).await.expect("an error result");
    let result = decode(&reply.payload);
    assert!(
        result.error.contains("not a protobuf isomesh.v1.Job"),
        "{}",
        result.error
    );
    let garbage = Job {
        job_id: "garbage".into(),
        image: b"\xff\xd8\xff\xe0 not really a JPEG".to_vec(),
        reply_to: "test/mixed/bad".into(),
        ..Default::default()
    };
    client
        .publish("isomesh/jobs/m5a", garbage.encode_to_vec())
        .await;
    client
        .publish("isomesh/jobs/m5a", job(1, "good", "test/mixed/bad", 0))
        .await;
    let results = answers(&mut client, 2).await;
    assert!(
        results["garbage"].error.contains("cannot decode image"),
        "{:?}",
        results["garbage"]
    );
    assert_answers_photo("good", 1, &results["good"]);
    assert_eq!(hops(&results["good"])[0].2, "aarch64");

    // Jobs through the device to the edge tier; the aarch64 edge node is killed as soon as it
    // has answered one, while it holds others.
    const JOBS: usize = 16;
    for n in 0..JOBS {
        client
            .publish(
                "isomesh/jobs/m5d",
                job(n, &format!("kill-{n}"), "test/mixed/bad", 0),
            )
            .await;
    }
    let mut results: HashMap<String, JobResult> = HashMap::new();
    loop {
        let reply = client
            .next(ANSWERS_WITHIN)
            .await
            .expect("answers keep coming");
        let result = decode(&reply.payload);
        let from_arm = result.node == "m5a";
        assert!(
            results.insert(result.job_id.clone(), result).is_none(),
            "answered twice"
        );
        if from_arm {
            arm.kill();
            break;
        }
        assert!(
            results.len() < JOBS,
            "every job was answered before the aarch64 node ran one: {:?}",
            results.values().map(|r| &r.node).collect::<HashSet<_>>()
        );
    }
    for (id, result) in answers(&mut client, JOBS - results.len()).await {
        assert!(
            results.insert(id.clone(), result).is_none(),
            "{id} answered twice"
        );
    }
    for n in 0..JOBS {
        let id = format!("kill-{n}");
        assert_answers_photo(&id, n, &results[&id]);
    }
    // Back, it answers what its session still held; the device drops those second answers.
    arm.start_again();
    arm.wait_ready(port).await;
    if let Some(extra) = client.next(Duration::from_secs(5)).await {
        panic!(
            "a second answer reached the user: {:?}",
            decode(&extra.payload)
        );
    }
}
