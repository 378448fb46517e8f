//! Rollouts: `isomesh rollout` reaches every targeted node over retained topics and each swaps the
//! new module in while jobs flow, losing none; nodes that join later or restart converge; a broker
//! that forgets its retained messages is re-seeded by the nodes; and every bad rollout (forged,
//! foreign, corrupt, incomplete, not Wasm, failing its self-test, a downgrade) is rejected with a
//! reason while the old module keeps serving.

use isomesh_module::signing::SecretKey;
use isomesh_protos::NodeStatus;
use isomesh_protos::Tier;
use isomesh_testkit::broker::TestBroker;
use isomesh_testkit::faults::{fault_module, Fault};
use isomesh_testkit::mqtt::Client;
use isomesh_testkit::node::{
    classify_photo, rejected, rejected_with, rejection, serves, swapped_in, wait_status,
    ModuleFile, NodeSpec, TestNode,
};
use isomesh_testkit::rollout::{self, guest_module_v2, Keys, MODULE_NAME, VERSION_1, VERSION_2};
use isomesh_testkit::{isomesh, photos};
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

/// Generous: a cold compile of the classifier takes ~15 s, more with both cores busy.
const CONVERGE_WITHIN: Duration = Duration::from_secs(240);

fn node_with_keys<'a>(id: &'a str, tier: &'a str, port: u16, keys: &Keys) -> NodeSpec<'a> {
    let mut spec = NodeSpec::with_guest(id, tier, port);
    spec.extra_args = keys.node_args();
    spec
}

/// Classifies one photo on `node` and checks the answer against the reference.
async fn classify_ok(port: u16, node: &str) -> Value {
    let photo = &photos()[0];
    let result = classify_photo(port, node, Duration::from_secs(120)).await;
    let top1 = result["top"][0]["index"]
        .as_u64()
        .unwrap_or_else(|| panic!("{result}"));
    assert!(photo.accepts(top1 as u32), "{}: {result}", photo.file);
    result
}

/// `isomesh rollout` of `module` as `version`, signed by `keys`, waiting for every node.
fn rollout_args(
    broker: &TestBroker,
    keys: &Keys,
    module: &std::path::Path,
    version: &str,
) -> Vec<String> {
    rollout::rollout_args(&broker.url(), keys, module, version, CONVERGE_WITHIN)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_reaches_every_node_while_jobs_flow_and_loses_none() {
    let broker = TestBroker::start().await;
    let keys = Keys::new();
    let mut d1 = TestNode::start(node_with_keys("r1d", "device", broker.port(), &keys)).await;
    let _e1 = TestNode::start(node_with_keys("r1e", "edge", broker.port(), &keys)).await;

    // A steady stream of photos to the device node while the rollout runs.
    let mut client = Client::connect(broker.port(), "r1-load").await;
    client.subscribe("test/r1").await;
    let photos = photos();
    let rollout_done = std::sync::Arc::new(tokio::sync::Notify::new());
    let load = rollout::stream_photos_during(
        &client,
        "isomesh/images/r1d",
        "test/r1",
        rollout_done.clone(),
    );
    let (code, output) =
        isomesh(&rollout_args(&broker, &keys, &guest_module_v2(), VERSION_2)).await;
    rollout_done.notify_one();
    assert_eq!(
        code,
        0,
        "rollout --wait failed:\n{output}\nnode log:\n{}",
        d1.log()
    );
    assert!(
        output.contains("r1d") && output.contains("r1e") && output.contains("serving"),
        "{output}"
    );
    // While it waited it said each node's progress as it happened (stderr), not only the final
    // table (stdout, where the tier column follows the node).
    for node in ["r1d", "r1e"] {
        let line = format!("{node:<12} serving {MODULE_NAME}@{VERSION_2}");
        assert!(output.contains(&line), "no `{line}` line in:\n{output}");
    }
    let sent = load.await.expect("load generator");
    let replies = client.collect(sent, Duration::from_secs(240)).await;
    // Exactly one answer per job, none an error, and the later ones from the new module.
    let mut by_job: HashMap<String, Value> = HashMap::new();
    for reply in replies {
        let correlation = String::from_utf8_lossy(
            reply
                .properties
                .as_ref()
                .and_then(|p| p.correlation_data.as_ref())
                .expect("correlation"),
        )
        .into_owned();
        let result: Value = serde_json::from_slice(&reply.payload).expect("JSON");
        assert!(
            result.get("error").is_none(),
            "job {correlation} failed: {result}"
        );
        let n: usize = correlation.parse().expect("job number");
        let top1 = result["top"][0]["index"].as_u64().expect("top-1") as u32;
        assert!(photos[n % photos.len()].accepts(top1), "job {n}: {result}");
        assert!(
            by_job.insert(correlation, result).is_none(),
            "a job was answered twice"
        );
    }
    assert_eq!(by_job.len(), sent);
    assert!(
        client.next(Duration::from_secs(2)).await.is_none(),
        "no extra answers"
    );
    let versions: Vec<&str> = (0..sent)
        .map(|n| {
            by_job[&n.to_string()]["module"]["version"]
                .as_str()
                .unwrap_or("")
        })
        .collect();
    assert_eq!(versions.first(), Some(&VERSION_1), "{versions:?}");
    assert_eq!(versions.last(), Some(&VERSION_2), "{versions:?}");
    // Once swapped, never back.
    let first_v2 = versions
        .iter()
        .position(|v| *v == VERSION_2)
        .unwrap_or(sent);
    assert!(
        versions[first_v2..].iter().all(|v| *v == VERSION_2),
        "{versions:?}"
    );

    // A node that joins later, with an empty module directory, gets the module from the retained topics.
    let mut late = NodeSpec::with_guest("r1late", "cloud", broker.port());
    late.modules.clear();
    late.extra_args = keys.node_args();
    let late = TestNode::spawn(&late);
    let status = wait_status(broker.port(), "r1late", CONVERGE_WITHIN, |s| {
        serves(s, VERSION_2)
    })
    .await;
    assert_eq!(
        status.module.expect("module").name,
        MODULE_NAME,
        "{}",
        late.log()
    );
    classify_ok(broker.port(), "r1late").await;

    // A restart serves the newest good module from disk.
    d1.restart();
    wait_status(broker.port(), "r1d", CONVERGE_WITHIN, |s| {
        serves(s, VERSION_2)
    })
    .await;
    let result = classify_ok(broker.port(), "r1d").await;
    assert_eq!(result["module"]["version"], VERSION_2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_for_one_tier_leaves_the_other_tiers_alone() {
    let broker = TestBroker::start().await;
    let keys = Keys::new();
    let device = TestNode::start(node_with_keys("r2d", "device", broker.port(), &keys)).await;
    let _edge = TestNode::start(node_with_keys("r2e", "edge", broker.port(), &keys)).await;
    let mut args = rollout_args(&broker, &keys, &guest_module_v2(), VERSION_2);
    // Without precompiled code: the edge node compiles the module itself.
    args.extend(["--tier".into(), "edge".into(), "--no-precompile".into()]);
    let (code, output) = isomesh(&args).await;
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("r2e") && !output.contains("r2d"),
        "{output}"
    );
    wait_status(broker.port(), "r2e", Duration::from_secs(10), |s| {
        serves(s, VERSION_2)
    })
    .await;
    // Only the device's log says it heard the manifest and left it alone (its status keeps no
    // rollout at all).
    device
        .wait_for_log("manifest is not for this node", CONVERGE_WITHIN)
        .await;
    let device_status =
        wait_status(broker.port(), "r2d", Duration::from_secs(10), |s| s.online).await;
    assert!(serves(&device_status, VERSION_1), "{device_status:?}");
    assert!(device_status.rollout.is_none(), "{device_status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_copied_in_by_hand_is_swapped_in_once_complete() {
    let broker = TestBroker::start().await;
    let node = TestNode::start(NodeSpec::with_guest("r3", "edge", broker.port())).await;
    let v2 = std::fs::read(guest_module_v2()).unwrap();
    // Written in two halves with a pause, as a slow copy would: the half must never be loaded.
    // Its signed manifest comes first: nodes run only signed modules. `isomesh sign` takes the
    // name and version from the module's own section, and refuses flags that contradict it.
    let path = node.modules_dir().join("copied.wasm");
    let staging = tempfile::tempdir().unwrap();
    let staged = staging.path().join("copied.wasm");
    std::fs::write(&staged, &v2).unwrap();
    let key = rollout::test_key().secret_path.display().to_string();
    let sign = |extra: &[&str]| {
        let mut args = vec!["sign".to_string(), "--key".into(), key.clone()];
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push(staged.display().to_string());
        args
    };
    let (code, out) = isomesh(&sign(&["--version", VERSION_1])).await;
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains(&format!("says it is {MODULE_NAME}@{VERSION_2}")),
        "{out}"
    );
    let (code, out) = isomesh(&sign(&[])).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{MODULE_NAME}@{VERSION_2}")), "{out}");
    std::fs::copy(
        staging.path().join("copied.manifest"),
        node.modules_dir().join("copied.manifest"),
    )
    .unwrap();
    // Every status from here on: none may show the half rejected.
    let watcher = status_watcher(broker.port(), "r3").await;
    let statuses = tokio::spawn(statuses_until(watcher, "r3", |s| swapped_in(s, VERSION_2)));
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&v2[..v2.len() / 2]).unwrap();
        file.flush().unwrap();
        // The slow copy itself: the half stays on disk this long (not a wait for anything).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        file.write_all(&v2[v2.len() / 2..]).unwrap();
    }
    let seen = statuses.await.expect("status watcher");
    let status = seen.last().expect("a status");
    assert!(serves(status, VERSION_2), "{status:?}");
    assert!(
        seen.iter().all(|s| rejected(s).is_none()),
        "a half-written file was loaded: {seen:?}\n{}",
        node.log()
    );
    // A rejection shown between two status publications would not reach a status: the log
    // records every one.
    let log = node.log();
    assert!(
        !log.contains("rejected"),
        "a half-written file was loaded:\n{log}"
    );
    classify_ok(broker.port(), "r3").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_pinned_to_a_module_the_node_lacks_get_a_clear_error() {
    let broker = TestBroker::start().await;
    let _node = TestNode::start(NodeSpec::with_guest("r4", "edge", broker.port())).await;
    let image = photos()[0].path.display().to_string();
    let classify = |pin: &str| {
        vec![
            "classify".to_string(),
            image.clone(),
            "--node".into(),
            "r4".into(),
            "--module".into(),
            pin.into(),
            "--json".into(),
            "--broker".into(),
            broker.url(),
        ]
    };
    let (code, output) = isomesh(&classify(&format!("{MODULE_NAME}@9.9.9"))).await;
    assert_eq!(code, 1, "{output}");
    assert!(
        output.contains("pinned") && output.contains(VERSION_1),
        "{output}"
    );
    let (code, output) = isomesh(&classify(&format!("{MODULE_NAME}@{VERSION_1}"))).await;
    assert_eq!(code, 0, "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_re_seed_a_broker_that_lost_its_retained_messages() {
    let mut broker = TestBroker::start().await;
    let keys = Keys::new();
    let node = TestNode::start(node_with_keys("r5", "edge", broker.port(), &keys)).await;
    let (code, output) =
        isomesh(&rollout_args(&broker, &keys, &guest_module_v2(), VERSION_2)).await;
    assert_eq!(code, 0, "{output}\nthe node's log:\n{}", node.log());
    broker.restart().await;
    // The restarted broker knows nothing; the node notices and publishes the module again.
    let mut late = NodeSpec::with_guest("r5late", "device", broker.port());
    late.modules.clear();
    late.extra_args = keys.node_args();
    let late = TestNode::spawn(&late);
    wait_status(broker.port(), "r5late", CONVERGE_WITHIN, |s| {
        serves(s, VERSION_2)
    })
    .await;
    // The restarted broker holds the module's manifest again: only the node can have put it
    // there (the rollout command is gone).
    let manifest = retained_manifest(broker.port(), "r5-manifest").await;
    assert_eq!(manifest.version, VERSION_2, "{}", node.log());
    classify_ok(broker.port(), "r5late").await;
    drop(late);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_outside_a_rollout_never_writes_over_its_manifest() {
    let broker = TestBroker::start().await;
    let keys = Keys::new();
    // 0.1.0 was rolled out to every node before: the nodes find its manifest when they start,
    // so neither re-seeds one. (On an empty broker they would, 3-5 s after connecting, and a
    // re-seed that crosses the rollout below on the wire would write over it: docs/limits.md.)
    let publisher = Client::connect(broker.port(), "r6-publisher").await;
    let v1 = std::fs::read(isomesh_testkit::guest_module()).expect("module 0.1.0");
    let first = signed(&keys, rollout::package(&v1, MODULE_NAME, VERSION_1, &[]));
    rollout::publish(&publisher, &first).await;
    let mut device = TestNode::start(node_with_keys("r6d", "device", broker.port(), &keys)).await;
    let _edge = TestNode::start(node_with_keys("r6e", "edge", broker.port(), &keys)).await;
    let mut args = rollout_args(&broker, &keys, &guest_module_v2(), VERSION_2);
    args.extend(["--tier".to_string(), "edge".to_string()]);
    let (code, output) = isomesh(&args).await;
    assert_eq!(code, 0, "{output}");
    // The device reconnects; the retained manifest it finds is 0.2.0 for the edge tier, not
    // one of the module it serves.
    assert!(device.terminate(), "clean exit:\n{}", device.log());
    wait_status(broker.port(), "r6d", Duration::from_secs(10), |s| !s.online).await;
    let (mut client, retained) = watch_manifest(broker.port(), "r6-manifest").await;
    assert_eq!(retained.version, VERSION_2);
    device.start_again();
    // Its retained status says offline (above): the next online one is the new connection's.
    wait_status(broker.port(), "r6d", CONVERGE_WITHIN, |s| s.online).await;
    // Its re-seed check comes RESEED_DELAY and up to 2 s of jitter after connecting (checked
    // every 250 ms): nothing may be published on the manifest topic meanwhile, nor after.
    let window = isomesh_module::agent::RESEED_DELAY + Duration::from_secs(4);
    if let Some(publish) = client.next(window).await {
        panic!(
            "the device wrote over the edge rollout's manifest with {:?}; its log:\n{}",
            decode_manifest(&publish.payload),
            device.log()
        );
    }
    let manifest = retained_manifest(broker.port(), "r6-manifest-after").await;
    assert_eq!(
        manifest.version,
        VERSION_2,
        "the device wrote over the edge rollout; its log:\n{}",
        device.log()
    );
}

fn decode_manifest(payload: &[u8]) -> isomesh_protos::ModuleManifest {
    <isomesh_protos::ModuleManifest as prost::Message>::decode(payload).expect("a manifest")
}

/// The manifest of the module retained on the broker (panics if there is none).
async fn retained_manifest(port: u16, client_id: &str) -> isomesh_protos::ModuleManifest {
    watch_manifest(port, client_id).await.1
}

/// A client subscribed to the module's manifest topic, and the retained manifest it got first
/// (panics if there is none); later publishes on the topic reach the client.
async fn watch_manifest(port: u16, client_id: &str) -> (Client, isomesh_protos::ModuleManifest) {
    let mut client = Client::connect(port, client_id).await;
    client
        .subscribe(&format!("isomesh/modules/{MODULE_NAME}/manifest"))
        .await;
    let retained = client
        .next(Duration::from_secs(10))
        .await
        .expect("a retained manifest");
    assert!(retained.retain, "the manifest is not a retained message");
    let manifest = decode_manifest(&retained.payload);
    (client, manifest)
}

/// A client subscribed to `node`'s status.
async fn status_watcher(port: u16, node: &str) -> Client {
    let watcher = Client::connect(port, &format!("statuses-{node}")).await;
    watcher.subscribe(&format!("isomesh/status/{node}")).await;
    watcher
}

/// Every status `watcher` gets (the retained one first) until one satisfies `done` (the last).
async fn statuses_until(
    mut watcher: Client,
    node: &'static str,
    done: impl Fn(&NodeStatus) -> bool,
) -> Vec<NodeStatus> {
    let deadline = tokio::time::Instant::now() + CONVERGE_WITHIN;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(publish) = watcher.next(left).await else {
            panic!("{node}: condition not met within {CONVERGE_WITHIN:?}; statuses: {seen:?}");
        };
        let status =
            <NodeStatus as prost::Message>::decode(publish.payload.as_ref()).expect("NodeStatus");
        let finished = done(&status);
        seen.push(status);
        if finished {
            return seen;
        }
    }
}

/// One bad rollout against a node serving version 1: its status must say it was rejected with
/// `code` (the stable kind of refusal) and a reason that mentions `words`, and the node must keep
/// serving version 1 correctly.
async fn assert_rejected(
    id: &str,
    make: impl FnOnce(&Keys) -> isomesh_module::package::Package,
    code: &str,
    words: &str,
    extra_args: &[&str],
) {
    let broker = TestBroker::start().await;
    let keys = Keys::new();
    let mut spec = node_with_keys(id, "edge", broker.port(), &keys);
    spec.extra_args
        .extend(extra_args.iter().map(|a| a.to_string()));
    let node = TestNode::start(spec).await;
    let package = make(&keys);
    let client = Client::connect(broker.port(), &format!("{id}-publisher")).await;
    rollout::publish(&client, &package).await;
    let status = wait_status(broker.port(), id, CONVERGE_WITHIN, |s| {
        rejected(s).is_some()
    })
    .await;
    let rollout = rejection(&status).expect("a rejection");
    assert_eq!(
        rollout.code,
        code,
        "rejected as {:?} ({:?}), expected {code:?}; log:\n{}",
        rollout.code,
        rollout.reason,
        node.log()
    );
    assert!(
        rollout.reason.contains(words),
        "rejection reason {:?} should mention {words:?}",
        rollout.reason
    );
    assert!(serves(&status, VERSION_1), "{status:?}");
    let result = classify_ok(broker.port(), id).await;
    assert_eq!(result["module"]["version"], VERSION_1);
}

fn v2_bytes() -> Vec<u8> {
    std::fs::read(guest_module_v2()).expect("v2 module")
}

fn signed(
    keys: &Keys,
    mut package: isomesh_module::package::Package,
) -> isomesh_module::package::Package {
    keys.secret.sign(&mut package.manifest);
    package
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_altered_after_signing_is_rejected() {
    assert_rejected(
        "b1",
        |keys| {
            let mut package = signed(
                keys,
                rollout::package(&v2_bytes(), MODULE_NAME, VERSION_2, &[]),
            );
            package.manifest.target_nodes = vec!["b1".into()];
            package
        },
        "signature",
        "signature does not match",
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_signed_by_an_unknown_key_is_rejected() {
    assert_rejected(
        "b2",
        |_| {
            let stranger = SecretKey::generate().unwrap();
            let mut package = rollout::package(&v2_bytes(), MODULE_NAME, VERSION_2, &[]);
            stranger.sign(&mut package.manifest);
            package
        },
        "signature",
        "does not trust",
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_that_do_not_hash_to_the_manifest_are_rejected() {
    assert_rejected(
        "b3",
        |keys| {
            // The manifest names other bytes of the same size than the chunks carry.
            let v2 = v2_bytes();
            let mut other = v2.clone();
            other[100] ^= 0xff;
            let mut package = rollout::package(&v2, MODULE_NAME, VERSION_2, &[]);
            let forged = rollout::package(&other, MODULE_NAME, VERSION_2, &[]);
            package.manifest.sha256 = forged.manifest.sha256.clone();
            for chunk in &mut package.chunks {
                chunk.sha256 = forged.manifest.sha256.clone();
            }
            signed(keys, package)
        },
        "transfer",
        "sha256 mismatch",
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_with_a_missing_chunk_is_abandoned_with_the_chunk_named() {
    assert_rejected(
        "b4",
        |keys| {
            let mut package = signed(
                keys,
                rollout::package(&v2_bytes(), MODULE_NAME, VERSION_2, &[]),
            );
            package.chunks.remove(7);
            package
        },
        "stalled",
        "chunks 7",
        &["--fetch-timeout-s", "4"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_module_is_rejected() {
    assert_rejected(
        "b5",
        |keys| {
            let v2 = v2_bytes();
            signed(
                keys,
                rollout::package(&v2[..v2.len() / 3], MODULE_NAME, VERSION_2, &[]),
            )
        },
        "load",
        "does not compile",
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_is_not_wasm_is_rejected() {
    assert_rejected(
        "b6",
        |keys| {
            signed(
                keys,
                rollout::package(b"#!/bin/sh\nrm -rf /\n", MODULE_NAME, VERSION_2, &[]),
            )
        },
        "not-wasm",
        "not a WebAssembly module",
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasm_module_without_the_classifier_exports_is_rejected() {
    assert_rejected(
        "b7",
        |keys| {
            let empty = wat::parse_str("(module (memory (export \"memory\") 1))").unwrap();
            signed(keys, rollout::package(&empty, MODULE_NAME, VERSION_2, &[]))
        },
        "load",
        "does not fit the isomesh guest ABI",
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_whose_self_test_traps_is_rejected() {
    assert_rejected(
        "b8",
        |keys| {
            signed(
                keys,
                rollout::package(&fault_module(Fault::AlwaysTrap), "faulty", "t1", &[]),
            )
        },
        "load",
        "failed its self-test",
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_whose_self_test_loops_is_rejected() {
    assert_rejected(
        "b9",
        |keys| {
            signed(
                keys,
                rollout::package(&fault_module(Fault::AlwaysLoop), "faulty", "t1", &[]),
            )
        },
        "load",
        "deadline",
        &["--call-timeout-ms", "1500"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_that_misreads_the_known_photo_is_rejected() {
    assert_rejected(
        "b13",
        |keys| {
            let module = fault_module(Fault::MissesThePhoto);
            signed(keys, rollout::package(&module, "faulty", "t1", &[]))
        },
        "load",
        "known photo of a pelican came out as \"a\"",
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_whose_name_does_not_match_the_module_is_rejected() {
    assert_rejected(
        "b10",
        |keys| {
            signed(
                keys,
                rollout::package(&v2_bytes(), MODULE_NAME, "7.0.0", &[]),
            )
        },
        "mislabelled",
        "says it is",
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_for_another_tier_is_ignored() {
    let broker = TestBroker::start().await;
    let keys = Keys::new();
    let node = TestNode::start(node_with_keys("b11", "edge", broker.port(), &keys)).await;
    let client = Client::connect(broker.port(), "b11-publisher").await;
    let package = signed(
        &keys,
        rollout::package(&v2_bytes(), MODULE_NAME, VERSION_2, &[Tier::Cloud]),
    );
    rollout::publish(&client, &package).await;
    // Only the log says the node heard the manifest and ignored it: its status keeps no rollout.
    node.wait_for_log("manifest is not for this node", CONVERGE_WITHIN)
        .await;
    let status = wait_status(broker.port(), "b11", Duration::from_secs(10), |s| s.online).await;
    assert!(
        serves(&status, VERSION_1) && status.rollout.is_none(),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_version_is_refused_unless_forced() {
    let broker = TestBroker::start().await;
    let keys = Keys::new();
    // The node serves version 2; a replayed manifest of version 1 arrives.
    let mut spec = node_with_keys("b12", "edge", broker.port(), &keys);
    spec.modules = vec![ModuleFile::guest_v2()];
    let _node = TestNode::start(spec).await;
    let v1 = std::fs::read(isomesh_testkit::guest_module()).unwrap();
    let client = Client::connect(broker.port(), "b12-publisher").await;
    let old = signed(&keys, rollout::package(&v1, MODULE_NAME, VERSION_1, &[]));
    rollout::publish(&client, &old).await;
    let status = wait_status(broker.port(), "b12", CONVERGE_WITHIN, |s| {
        rejected(s).is_some()
    })
    .await;
    assert!(rejected_with(&status, "downgrade"), "{status:?}");
    assert!(
        rejected(&status)
            .unwrap_or_default()
            .contains("downgrade refused"),
        "{status:?}"
    );
    assert!(serves(&status, VERSION_2), "{status:?}");
    // The same module, deliberately forced.
    let mut forced = rollout::package(&v1, MODULE_NAME, VERSION_1, &[]);
    forced.manifest.force = true;
    let forced = signed(&keys, forced);
    rollout::publish(&client, &forced).await;
    wait_status(broker.port(), "b12", CONVERGE_WITHIN, |s| {
        serves(s, VERSION_1)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_manifest_replayed_with_force_is_refused_and_nodes_keep_serving_the_new_one() {
    let broker = TestBroker::start().await;
    let keys = Keys::new();
    let node = TestNode::start(node_with_keys("r1", "edge", broker.port(), &keys)).await;
    let client = Client::connect(broker.port(), "r1-publisher").await;
    // An old, deliberate rollout of 0.1.0 with --force (the node already serves those bytes):
    // its retained manifest is what anyone allowed to read the module topics could record.
    let v1 = std::fs::read(isomesh_testkit::guest_module()).unwrap();
    let mut old = rollout::package(&v1, MODULE_NAME, VERSION_1, &[]);
    old.manifest.force = true;
    let old = signed(&keys, old);
    rollout::publish(&client, &old).await;
    let recorded = prost::Message::encode_to_vec(&old.manifest);
    // The real upgrade.
    let new = signed(
        &keys,
        rollout::package(&v2_bytes(), MODULE_NAME, VERSION_2, &[]),
    );
    assert!(new.manifest.published_at_ms > old.manifest.published_at_ms);
    rollout::publish(&client, &new).await;
    wait_status(broker.port(), "r1", CONVERGE_WITHIN, |s| {
        serves(s, VERSION_2)
    })
    .await;
    // The node's rollout agent hears of the swap a moment after the status shows it; until then
    // the old manifest names the module it serves and is merely ignored. It knows once its
    // history, kept in the module directory for restarts, names 0.2.0.
    let history = node.modules_dir().join(".history");
    let deadline = tokio::time::Instant::now() + CONVERGE_WITHIN;
    while !std::fs::read_to_string(&history).is_ok_and(|h| h.contains(VERSION_2)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no history naming {VERSION_2} in {}",
            history.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The replay: the old retained manifest's bytes, published again.
    client
        .publish_retained(&format!("isomesh/modules/{MODULE_NAME}/manifest"), recorded)
        .await;
    let status = wait_status(broker.port(), "r1", CONVERGE_WITHIN, |s| {
        rejected(s).is_some()
    })
    .await;
    assert!(
        rejected_with(&status, "replay"),
        "{status:?}\nlog:\n{}",
        node.log()
    );
    assert!(
        rejected(&status)
            .unwrap_or_default()
            .contains("is not newer than"),
        "{status:?}"
    );
    assert!(serves(&status, VERSION_2), "{status:?}");
    let result = classify_ok(broker.port(), "r1").await;
    assert_eq!(result["module"]["version"], VERSION_2);
}
