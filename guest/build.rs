//! Finds the model and labels to embed, checks them, and hands their paths and digest to the crate.
//!
//! The files come from `models/fetch.sh` (into `models/files/`) or from `$ISOMESH_MODEL_DIR`.
//! A missing or wrong file stops the build with the command that fixes it.

use sha2::{Digest, Sha256};
use std::path::PathBuf;

const MODEL_FILE: &str = "mobilenet_v2_1.0_224_dequant.onnx";
const MODEL_SHA256: &str = "cde6cc693aa5bb2d5f3bd04c6475d0a3f9504b27ec975d465d1c1355e9964c31";
const LABELS_FILE: &str = "imagenet_labels.txt";
/// The module's name: in every result, its status and its signed manifest.
const MODULE_NAME: &str = "mobilenet_v2";

fn main() {
    println!("cargo:rerun-if-env-changed=ISOMESH_MODEL_DIR");
    println!("cargo:rerun-if-env-changed=ISOMESH_MODULE_VERSION");
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = match std::env::var_os("ISOMESH_MODEL_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => manifest_dir.join("../models/files"),
    };
    let model = dir.join(MODEL_FILE);
    let labels = dir.join(LABELS_FILE);
    for file in [&model, &labels] {
        println!("cargo:rerun-if-changed={}", file.display());
        if !file.is_file() {
            panic!(
                "\n\nisomesh-guest: {} is missing.\nRun ./models/fetch.sh from the repository root \
                 (it copies the file from $ISOMESH_MODELS or ../shared/models, or downloads it), \
                 or set ISOMESH_MODEL_DIR to a folder that holds it.\n\n",
                file.display()
            );
        }
    }
    let bytes =
        std::fs::read(&model).unwrap_or_else(|e| panic!("reading {}: {e}", model.display()));
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest != MODEL_SHA256 {
        panic!(
            "\n\nisomesh-guest: {} has sha256 {digest}, expected {MODEL_SHA256}.\n\
             Delete it and run ./models/fetch.sh again.\n\n",
            model.display()
        );
    }
    let version = std::env::var("ISOMESH_MODULE_VERSION")
        .unwrap_or_else(|_| std::env::var("CARGO_PKG_VERSION").unwrap_or_default());
    println!("cargo:rustc-env=ISOMESH_MODEL_PATH={}", model.display());
    println!("cargo:rustc-env=ISOMESH_LABELS_PATH={}", labels.display());
    println!("cargo:rustc-env=ISOMESH_MODEL_SHA256={digest}");
    println!("cargo:rustc-env=ISOMESH_MODULE_VERSION={version}");
    println!("cargo:rustc-env=ISOMESH_MODULE_NAME={MODULE_NAME}");
    write_identity_section(&version);
}

/// The module's name and version as a custom section (`isomesh-module`, text:
/// `name=...\nversion=...\n`), so `isomesh sign` and `isomesh rollout` can read them without
/// compiling the module. A static array of the exact length, put in that section by
/// `#[link_section]` in `src/identity.rs`.
fn write_identity_section(version: &str) {
    let text = format!("name={MODULE_NAME}\nversion={version}\n");
    let bytes: Vec<String> = text.bytes().map(|b| b.to_string()).collect();
    let code = format!(
        "pub static IDENTITY: [u8; {}] = [{}];\n",
        text.len(),
        bytes.join(", ")
    );
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("identity.rs"), code).expect("writing identity.rs to OUT_DIR");
}
