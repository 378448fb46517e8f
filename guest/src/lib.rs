//! The isomesh classifier module: MobileNetV2 (ImageNet-1k) run by tract.
//!
//! Built for `wasm32-wasip1` with `simd128`, this crate is the ONE `.wasm` file every tier runs;
//! the model and its labels are embedded, so the module is self-contained and its sha256 names
//! exactly what a node serves. Built natively, the same code is the baseline `isomesh bench`
//! compares the sandbox against, and what the unit tests below run on the real photos.
//!
//! - [`preprocess`]: image bytes -> normalised NCHW tensor (decode limits stop decompression bombs).
//! - [`classifier`]: the tract plan, softmax and top-k; the embedded model, or any ONNX image
//!   classifier the host hands in (`isomesh_load_model`).
//! - [`means_model`]: a tiny real ONNX classifier (a colour per channel) for the tests.
//! - `abi` (wasm32 only): the exported functions the host calls, documented in
//!   `protos/proto/isomesh.proto`.

#[cfg(feature = "model")]
pub mod classifier;
pub mod means_model;
pub mod preprocess;

#[cfg(all(target_arch = "wasm32", feature = "model"))]
mod abi;

/// The `isomesh-module` custom section: name and version, readable without running the module
/// (`isomesh_module::identity`).
#[cfg(target_arch = "wasm32")]
mod identity {
    include!(concat!(env!("OUT_DIR"), "/identity.rs"));
}
#[cfg(target_arch = "wasm32")]
#[used]
#[link_section = "isomesh-module"]
static IDENTITY_SECTION: [u8; identity::IDENTITY.len()] = identity::IDENTITY;

#[cfg(feature = "model")]
pub use classifier::{Classification, Classifier};

/// Module name reported in every result (set in `build.rs`, which also writes it into the
/// module's `isomesh-module` section).
pub const MODULE_NAME: &str = env!("ISOMESH_MODULE_NAME");
/// Module version, `$ISOMESH_MODULE_VERSION` at build time or the crate version.
pub const MODULE_VERSION: &str = env!("ISOMESH_MODULE_VERSION");
/// Hex sha256 of the embedded model file.
pub const MODEL_SHA256: &str = env!("ISOMESH_MODEL_SHA256");

/// Why a classification failed. Each kind maps onto `GuestError.Kind` of the ABI.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The payload was empty.
    EmptyInput,
    /// Not a JPEG or PNG, or corrupt.
    BadImage(String),
    /// The image declares more pixels or memory than the module accepts.
    ImageTooLarge(String),
    /// The model failed to load or run.
    Model(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::EmptyInput => write!(f, "empty image payload: send JPEG or PNG bytes"),
            Error::BadImage(why) => write!(f, "cannot decode image (JPEG or PNG expected): {why}"),
            Error::ImageTooLarge(why) => write!(f, "image too large: {why}"),
            Error::Model(why) => write!(f, "model error: {why}"),
        }
    }
}

impl std::error::Error for Error {}
