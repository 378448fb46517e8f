//! Model rollouts (`isomesh rollout MODULE --model M.onnx --labels L.txt --version V`): a new
//! model served by code the nodes have already. The publisher finds the code on the broker (from
//! an earlier rollout signed by its key) and publishes only the model; every node builds the
//! model's plan beside the one serving and swaps, compiling nothing, while jobs flow; a model
//! that does not fit its labels is refused and the old one serves; a node that joins later gets
//! the code and the model; a restart serves the model from disk; and a rollout of new code
//! with the same model brings both. A user's own model, of other classes and another input
//! layout, serves through a rollout and answers with its own labels, as the same model run
//! natively does.

use isomesh_guest::means_model;
use isomesh_guest::preprocess::{self, Input, InputSpec, Layout};
use isomesh_testkit::broker::TestBroker;
use isomesh_testkit::mqtt::Client;
use isomesh_testkit::node::{rejected_with, serves, wait_status, NodeSpec, TestNode};
use isomesh_testkit::rollout::{self, guest_module_v2, test_key, MODULE_NAME, VERSION_1};
use isomesh_testkit::{guest_module, isomesh, photos, workspace_root};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Generous: the code rollout at the end compiles the classifier at the publisher (~15 s).
const CONVERGE_WITHIN: Duration = Duration::from_secs(240);
/// The nodes: a device, an edge and a cloud node.
const IDS: [&str; 3] = ["mrd", "mre", "mrc"];
/// The version the model rollout is served as.
const MODEL_VERSION: &str = "0.3.0";
/// The version of the rollout of new code with the same model.
const CODE_AND_MODEL_VERSION: &str = "0.4.0";

fn model_file(name: &str) -> PathBuf {
    workspace_root().join("models/files").join(name)
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `isomesh rollout CODE --model ONNX --labels LABELS --version VERSION` of the MobileNetV2
/// model, signed by the test key (which signed the modules the nodes start with), waiting for
/// every node.
fn model_rollout_args(port: u16, code: &Path, labels: &Path, version: &str) -> Vec<String> {
    let onnx = model_file("mobilenet_v2_1.0_224_dequant.onnx");
    rollout_of(port, code, &onnx, labels, version)
}

/// [`model_rollout_args`] of any model `onnx`.
fn rollout_of(port: u16, code: &Path, onnx: &Path, labels: &Path, version: &str) -> Vec<String> {
    [
        "rollout",
        &code.display().to_string(),
        "--model",
        &onnx.display().to_string(),
        "--labels",
        &labels.display().to_string(),
        "--version",
        version,
        "--key",
        &test_key().secret_path.display().to_string(),
        "--broker",
        &format!("mqtt://127.0.0.1:{port}"),
        "--wait",
        "--timeout-s",
        &CONVERGE_WITHIN.as_secs().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Waits until the broker holds a manifest for the module (the nodes publish the one they
/// serve again when it holds none, a few seconds after they connect).
async fn wait_retained_manifest(port: u16) {
    let mut client = Client::connect(port, "mr-manifest").await;
    client
        .subscribe(&format!("isomesh/modules/{MODULE_NAME}/manifest"))
        .await;
    let got = client.next(Duration::from_secs(60)).await;
    assert!(
        got.is_some_and(|m| !m.payload.is_empty()),
        "no node published its module's manifest again"
    );
}

/// Starts a node `id` with an empty module directory, waits until it serves the model rollout
/// (fetching the code with the model) and returns it with its answer to a photo, which must
/// name `onnx`.
async fn join_late(port: u16, id: &str, onnx: &[u8]) -> (TestNode, Value) {
    let mut spec = NodeSpec::with_guest(id, "cloud", port);
    spec.modules.clear();
    let node = TestNode::spawn(&spec);
    wait_status(port, id, CONVERGE_WITHIN, |s| serves(s, MODEL_VERSION)).await;
    assert!(
        node.log()
            .contains("fetching a model rollout and the code it runs on"),
        "{}",
        node.log()
    );
    let answer = isomesh_testkit::node::classify_photo(port, id, Duration::from_secs(60)).await;
    assert_eq!(
        answer["module"]["model_sha256"],
        hex_sha256(onnx),
        "{answer}"
    );
    (node, answer)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_rollout_swaps_the_model_on_every_node_compiling_nothing_and_losing_no_job() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let mut nodes = Vec::new();
    for (id, tier) in IDS.into_iter().zip(["device", "edge", "cloud"]) {
        nodes.push(TestNode::start(NodeSpec::with_guest(id, tier, port)).await);
    }
    wait_retained_manifest(port).await;
    let code = std::fs::read(guest_module()).expect("guest module");
    let onnx = std::fs::read(model_file("mobilenet_v2_1.0_224_dequant.onnx")).expect("model");

    // A steady stream of photos to the device node while the rollout runs.
    let mut client = Client::connect(port, "mr-load").await;
    client.subscribe("test/mr").await;
    let photos = photos();
    let rollout_done = std::sync::Arc::new(tokio::sync::Notify::new());
    let load = rollout::stream_photos_during(
        &client,
        "isomesh/images/mrd",
        "test/mr",
        rollout_done.clone(),
    );
    let labels = model_file("imagenet_labels.txt");
    let (status, output) = isomesh(&model_rollout_args(
        port,
        &guest_module(),
        &labels,
        MODEL_VERSION,
    ))
    .await;
    rollout_done.notify_one();
    assert_eq!(status, 0, "model rollout failed:\n{output}");
    assert!(
        output.contains("on the broker already: not published again"),
        "the publisher published the code again:\n{output}"
    );
    assert!(
        !output.contains("compiling"),
        "the publisher compiled:\n{output}"
    );
    for node in &nodes {
        let log = node.log();
        assert!(
            log.contains("the model alone, nothing to compile")
                && log.contains("a model for the code served now: building its plan"),
            "a node fetched or compiled more than the model:\n{log}"
        );
    }

    // Every job answered once, none an error, versions switching once.
    let sent = load.await.expect("load generator");
    let replies = client.collect(sent, Duration::from_secs(240)).await;
    let mut by_job: HashMap<usize, Value> = HashMap::new();
    for reply in replies {
        let correlation = reply
            .properties
            .as_ref()
            .and_then(|p| p.correlation_data.as_ref())
            .expect("correlation");
        let n: usize = String::from_utf8_lossy(correlation)
            .parse()
            .expect("job number");
        let result: Value = serde_json::from_slice(&reply.payload).expect("JSON");
        assert!(result.get("error").is_none(), "job {n} failed: {result}");
        let top1 = result["top"][0]["index"].as_u64().expect("top-1") as u32;
        assert!(photos[n % photos.len()].accepts(top1), "job {n}: {result}");
        assert!(by_job.insert(n, result).is_none(), "job {n} answered twice");
    }
    assert_eq!(by_job.len(), sent);
    let versions: Vec<&str> = (0..sent)
        .map(|n| by_job[&n]["module"]["version"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(versions.first(), Some(&VERSION_1), "{versions:?}");
    assert_eq!(versions.last(), Some(&MODEL_VERSION), "{versions:?}");
    let first_new = versions.iter().position(|v| *v == MODEL_VERSION);
    assert!(
        versions[first_new.unwrap_or(sent)..]
            .iter()
            .all(|v| *v == MODEL_VERSION),
        "{versions:?}"
    );
    // The answers name the code and the model apart.
    let last = &by_job[&(sent - 1)]["module"];
    assert_eq!(last["code_sha256"], hex_sha256(&code), "{last}");
    assert_eq!(last["model_sha256"], hex_sha256(&onnx), "{last}");
    assert_ne!(last["sha256"], last["code_sha256"], "{last}");

    // A node that joins later with an empty module directory gets the code and the model.
    let (_late, _) = join_late(port, "mrlate", &onnx).await;

    // A restart serves the model from disk, its code kept beside it.
    nodes[0].restart();
    wait_status(port, "mrd", CONVERGE_WITHIN, |s| serves(s, MODEL_VERSION)).await;

    // A model that does not fit its labels: refused with the reason, the model before serves.
    let dir = tempfile::tempdir().expect("tempdir");
    let three = dir.path().join("three.txt");
    std::fs::write(&three, "cat\ndog\nbird\n").expect("labels");
    let (status, output) =
        isomesh(&model_rollout_args(port, &guest_module(), &three, "0.3.1")).await;
    assert_ne!(
        status, 0,
        "a model with 3 labels for 1000 outputs was served:\n{output}"
    );
    for (id, node) in IDS.iter().zip(&nodes) {
        let status = wait_status(port, id, CONVERGE_WITHIN, |s| rejected_with(s, "load")).await;
        assert!(serves(&status, MODEL_VERSION), "{status:?}\n{}", node.log());
    }
    let answer = isomesh_testkit::node::classify_photo(port, "mrd", Duration::from_secs(60)).await;
    assert_eq!(answer["module"]["version"], MODEL_VERSION, "{answer}");

    // New code with the same model: both published, every node fetches the code.
    let (status, output) = isomesh(&model_rollout_args(
        port,
        &guest_module_v2(),
        &labels,
        CODE_AND_MODEL_VERSION,
    ))
    .await;
    assert_eq!(status, 0, "code and model rollout failed:\n{output}");
    assert!(output.contains("published with it"), "{output}");
    let code_v2 = std::fs::read(guest_module_v2()).expect("module 0.2.0");
    for id in ["mrd", "mre", "mrc", "mrlate"] {
        let answer = isomesh_testkit::node::classify_photo(port, id, Duration::from_secs(60)).await;
        assert_eq!(
            answer["module"]["version"], CODE_AND_MODEL_VERSION,
            "{answer}"
        );
        assert_eq!(
            answer["module"]["code_sha256"],
            hex_sha256(&code_v2),
            "{answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_users_model_of_other_classes_serves_through_a_rollout_with_its_own_labels() {
    let mut broker = TestBroker::start().await;
    let port = broker.port();
    let node = TestNode::start(NodeSpec::with_guest("umd", "device", port)).await;
    wait_retained_manifest(port).await;

    // The user's model: a real ONNX classifier of three colours (the guest's `means_model`,
    // whose tests check it through tract): it scores each colour by the mean of that channel,
    // taking raw pixels channels last, 64 pixels a side (not MobileNetV2's layout or side).
    let spec = InputSpec {
        layout: Layout::NhwcU8,
        side: 64,
    };
    let onnx = means_model::onnx(spec);
    let labels: Vec<String> = means_model::LABELS.map(String::from).to_vec();
    let dir = tempfile::tempdir().expect("tempdir");
    let (onnx_path, labels_path) = (
        dir.path().join("colours.onnx"),
        dir.path().join("colours.txt"),
    );
    std::fs::write(&onnx_path, &onnx).expect("model");
    std::fs::write(&labels_path, labels.join("\n") + "\n").expect("labels");
    let mut args = rollout_of(
        port,
        &guest_module(),
        &onnx_path,
        &labels_path,
        MODEL_VERSION,
    );
    args.extend(["--input-layout", "nhwc-u8", "--input-side", "64"].map(String::from));
    let (status, output) = isomesh(&args).await;
    assert_eq!(status, 0, "the rollout of a user's model failed:\n{output}");
    assert!(
        node.log().contains("answer shape and determinism only"),
        "the node did not say its self-test could not check a known photo:\n{}",
        node.log()
    );

    // Every photo: the answer the model must give, worked out here from the photo's pixels as
    // the node's preprocessing hands them to the model, named by the model's labels.
    let mut client = Client::connect(port, "um-photos").await;
    let photos = photos();
    let replies = client
        .ask_each(
            "isomesh/images/umd",
            "test/um",
            photos.iter().map(|p| p.bytes()).collect(),
            Duration::from_secs(60),
        )
        .await;
    for (photo, reply) in photos.iter().zip(replies) {
        let result: Value = serde_json::from_slice(&reply.payload).expect("JSON");
        assert!(result.get("error").is_none(), "{}: {result}", photo.file);
        assert_eq!(result["module"]["version"], MODEL_VERSION, "{result}");
        assert_eq!(
            result["module"]["model_sha256"],
            hex_sha256(&onnx),
            "{result}"
        );
        // By class, not by rank: two channels of a grey photo can score within rounding of
        // each other.
        let expected = colour_scores(&photo.bytes(), spec);
        let top = result["top"].as_array().expect("top");
        assert_eq!(top.len(), 3, "{result}");
        for (index, prob) in expected.iter().enumerate() {
            let got = top
                .iter()
                .find(|t| t["index"] == index)
                .unwrap_or_else(|| panic!("{}: class {index} missing: {result}", photo.file));
            assert_eq!(got["label"], labels[index], "{}: {result}", photo.file);
            let got_prob = got["prob"].as_f64().expect("prob");
            assert!(
                (got_prob - prob).abs() < 1e-3,
                "{}: {result}, expected {expected:?}",
                photo.file
            );
        }
    }

    // A broker restarted without its retained messages: the node publishes the model rollout
    // again (the model file, its code and the code's machine code), and a node that joins then
    // with an empty directory gets all of it and serves the user's model.
    broker.restart().await;
    let (_late, answer) = join_late(port, "umlate", &onnx).await;
    let top = answer["top"].as_array().expect("top");
    assert!(
        top.len() == 3 && top.iter().all(|t| labels.iter().any(|l| t["label"] == *l)),
        "{answer}"
    );
    drop(node);
}

/// The colour model's probabilities for an image: the softmax of each channel's mean pixel
/// (0 to 1) over the model's input, as the node's preprocessing makes it.
fn colour_scores(image: &[u8], spec: InputSpec) -> [f64; 3] {
    let Ok(Input::U8(pixels)) = preprocess::image_to(image, spec) else {
        panic!("the photo does not decode to raw pixels");
    };
    let mut sums = [0f64; 3];
    for (i, value) in pixels.iter().enumerate() {
        sums[i % 3] += f64::from(*value) / 255.0;
    }
    let means = sums.map(|sum| sum / (pixels.len() / 3) as f64);
    let total: f64 = means.iter().map(|m| m.exp()).sum();
    means.map(|m| m.exp() / total)
}
