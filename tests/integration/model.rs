//! A model handed to the module's code in place of the one it embeds (`isomesh_load_model`):
//! `isomesh bench infer --model` serves an ONNX file and its labels, as a user brings them, with
//! the module's compiled code, and refuses a model that does not fit its labels. The model here is
//! the real MobileNetV2 ONNX file the module embeds, read from `models/files/` like a user's own;
//! the guest's unit tests (`make guest-test`) serve a model of other classes and layouts.

use isomesh_testkit::{bin_path, guest_module, photos, shared_cache_dir, workspace_root};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

fn model_file(name: &str) -> PathBuf {
    workspace_root().join("models/files").join(name)
}

/// `isomesh bench infer --model ONNX --labels LABELS` on every photo; the exit status, stderr
/// and the report.
fn bench_with_model(labels: &std::path::Path) -> (bool, String, Option<Value>) {
    let out = tempfile::tempdir().expect("temp dir");
    let report = out.path().join("infer.json");
    let output = std::process::Command::new(bin_path("isomesh"))
        .args(["bench", "infer", "--iterations", "1", "--module"])
        .arg(guest_module())
        .arg("--cache-dir")
        .arg(shared_cache_dir())
        .arg("--model")
        .arg(model_file("mobilenet_v2_1.0_224_dequant.onnx"))
        .arg("--labels")
        .arg(labels)
        .arg("--out")
        .arg(&report)
        .args(photos().iter().map(|p| p.path.clone()))
        .output()
        .expect("isomesh runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = std::fs::read(&report)
        .ok()
        .map(|bytes| serde_json::from_slice(&bytes).expect("JSON"));
    (output.status.success(), stderr, report)
}

#[test]
fn the_modules_code_serves_a_model_handed_to_it_and_refuses_one_that_does_not_fit() {
    let (ok, stderr, report) = bench_with_model(&model_file("imagenet_labels.txt"));
    assert!(ok, "isomesh bench infer --model failed:\n{stderr}");
    let report = report.expect("a report");
    let model = &report["model"];
    let onnx = std::fs::read(model_file("mobilenet_v2_1.0_224_dequant.onnx")).expect("model");
    assert_eq!(model["sha256"], hex(&Sha256::digest(&onnx)));
    assert_eq!(model["classes"], 1000);
    assert_eq!(model["input_layout"], "nchw-f32-imagenet");
    assert!(model["swap_in_ms"].as_f64().unwrap_or(0.0) > 0.0, "{model}");
    // ImageNet labels: the self-test recognised its known photo through the handed-in model.
    assert!(
        model["self_test"]
            .as_str()
            .is_some_and(|s| s.contains("known photo recognised")),
        "{model}"
    );
    // Every photo answered as onnxruntime answers it, by the labels handed in.
    let labels = std::fs::read_to_string(model_file("imagenet_labels.txt")).expect("labels");
    let labels: Vec<&str> = labels.lines().collect();
    let top1 = report["top1"].as_array().expect("top1");
    let photos = photos();
    assert_eq!(top1.len(), photos.len());
    for (photo, answer) in photos.iter().zip(top1) {
        let index = labels.iter().position(|l| answer == *l);
        assert!(
            index.is_some_and(|i| photo.accepts(i as u32)),
            "{}: {answer}, expected {}",
            photo.file,
            photo.acceptable()
        );
    }

    // Three labels for a model of 1000 outputs: refused, and it says why.
    let dir = tempfile::tempdir().expect("temp dir");
    let three = dir.path().join("labels.txt");
    std::fs::write(&three, "red\ngreen\nblue\n").expect("labels");
    let (ok, stderr, _) = bench_with_model(&three);
    assert!(!ok, "a model with 3 labels for 1000 outputs was served");
    assert!(
        stderr.contains("scores 1000 classes but 3 labels came with it"),
        "{stderr}"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
