//! `isomesh bench infer` as the judge of the sandbox's speed: the real module, run by the real
//! binary on a real photo, says where its inference time goes (the guest's `isomesh_profile`), and
//! times another build of the module beside it (`--variant`). No broker is involved.

use isomesh_testkit::{bin_path, guest_module, photos, shared_cache_dir};
use serde_json::Value;

#[test]
fn bench_infer_profiles_the_module_by_operation_and_times_a_variant_beside_it() {
    let out = tempfile::tempdir().expect("temp dir");
    let report = out.path().join("infer.json");
    let photo = photos()
        .into_iter()
        .find(|p| p.file == "banana.jpg")
        .expect("banana.jpg among the photos");
    let status = std::process::Command::new(bin_path("isomesh"))
        .args(["bench", "infer", "--iterations", "1", "--module"])
        .arg(guest_module())
        .arg("--cache-dir")
        .arg(shared_cache_dir())
        .arg("--variant")
        .arg(format!("same={}", guest_module().display()))
        .arg("--out")
        .arg(&report)
        .arg(&photo.path)
        .status()
        .expect("isomesh runs");
    assert!(status.success(), "isomesh bench infer failed: {status}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&report).expect("the report")).expect("JSON");

    // MobileNetV2's convolutions are matrix products: tract runs its 1x1 convolutions and the
    // classifier as `OptMatMul` nodes, its 3x3 depthwise convolutions as `DepthWiseConv`.
    let profile = report["profile"].as_array().expect("a profile");
    let op = |name: &str| {
        profile
            .iter()
            .find(|o| o["op"] == name)
            .unwrap_or_else(|| panic!("no {name} in the profile: {profile:?}"))
    };
    assert!(op("OptMatMul")["nodes"].as_u64().unwrap_or(0) >= 30);
    assert_eq!(op("DepthWiseConv")["nodes"], 17);
    let profiled_ms: f64 = profile
        .iter()
        .map(|o| o["wasm_ms"].as_f64().expect("wasm_ms"))
        .sum();
    assert!(profiled_ms > 0.0, "no time profiled: {profile:?}");
    let ranked: Vec<f64> = profile
        .iter()
        .filter_map(|o| o["wasm_ms"].as_f64())
        .collect();
    assert!(
        ranked.windows(2).all(|w| w[0] >= w[1]),
        "the profile is not ranked by Wasm time: {ranked:?}"
    );

    let variants = report["variants"].as_array().expect("variants");
    assert_eq!(variants.len(), 1, "{variants:?}");
    assert_eq!(variants[0]["label"], "same");
    assert_eq!(variants[0]["sha256"], report["module"]["sha256"]);
    assert_eq!(variants[0]["top1_agrees_with_module"], 1);
    assert!(variants[0]["infer_ms"]["median"].as_f64().unwrap_or(0.0) > 0.0);
}
