//! The functions a host calls on the module (ABI version 1, documented in
//! `protos/proto/isomesh.proto`). Buffers cross the boundary as `(ptr << 32) | len`; every
//! message is protobuf, so neither side hand-writes a layout.

use crate::preprocess::{self, InputSpec};
use crate::{Classification, Classifier, Error, MODEL_SHA256, MODULE_NAME, MODULE_VERSION};
use isomesh_protos::{guest_error::Kind, guest_outcome::Outcome};
use isomesh_protos::{GuestClassification, GuestError, GuestInfo, GuestModel, GuestOpTime};
use isomesh_protos::{GuestOutcome, GuestScore, GUEST_ABI_VERSION};
use prost::Message;
use std::alloc::{alloc, dealloc, Layout};
use std::cell::RefCell;
use std::rc::Rc;

/// The model this instance serves and its sha256: the embedded one, built on first use, until
/// the host hands it another (`isomesh_load_model`). A Wasm instance has one thread.
struct Serving {
    classifier: Classifier,
    model_sha256: String,
}

thread_local! {
    static SERVING: RefCell<Option<Rc<Serving>>> = const { RefCell::new(None) };
}

extern "C" {
    fn __wasm_call_ctors();
}

/// Runs the constructors (tract registers its ops through them) once. Exporting it stops the
/// linker from wrapping every other export in a constructor call.
#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: the host calls `_initialize` exactly once, before any other export.
    unsafe { __wasm_call_ctors() }
}

#[no_mangle]
pub extern "C" fn isomesh_abi_version() -> u32 {
    GUEST_ABI_VERSION
}

#[no_mangle]
pub extern "C" fn isomesh_alloc(len: u32) -> *mut u8 {
    match Layout::array::<u8>(len as usize) {
        Ok(layout) if len > 0 => unsafe { alloc(layout) },
        _ => std::ptr::NonNull::dangling().as_ptr(),
    }
}

/// # Safety
/// `ptr` and `len` must come from `isomesh_alloc` or a packed return value of this module.
#[no_mangle]
pub unsafe extern "C" fn isomesh_free(ptr: *mut u8, len: u32) {
    if len > 0 {
        if let Ok(layout) = Layout::array::<u8>(len as usize) {
            dealloc(ptr, layout)
        }
    }
}

/// Describes the model served: the embedded one (without building its plan) until the host
/// hands in another.
#[no_mangle]
pub extern "C" fn isomesh_info() -> u64 {
    let (model_sha256, side, labels) = match SERVING.with(|s| s.borrow().clone()) {
        Some(serving) => (
            serving.model_sha256.clone(),
            serving.classifier.input().side,
            serving.classifier.labels().to_vec(),
        ),
        None => (
            MODEL_SHA256.into(),
            preprocess::INPUT_SIDE,
            crate::classifier::labels().map(String::from).collect(),
        ),
    };
    let info = GuestInfo {
        abi_version: GUEST_ABI_VERSION,
        name: MODULE_NAME.into(),
        version: MODULE_VERSION.into(),
        model_sha256,
        input_width: side,
        input_height: side,
        labels,
    };
    hand_out(info.encode_to_vec())
}

#[no_mangle]
pub extern "C" fn isomesh_load() -> u64 {
    let outcome = match loaded() {
        Ok(_) => Outcome::Classification(GuestClassification::default()),
        Err(e) => Outcome::Error(to_guest_error(e)),
    };
    hand_out_outcome(outcome)
}

/// Builds the plan of the model in the buffer (an encoded `GuestModel`) and serves it from then
/// on. On any error the model served before stays. Optional in the ABI: a model rollout needs
/// it, a module that lacks it serves only its embedded model.
///
/// # Safety
/// `ptr`/`len` must be a buffer from `isomesh_alloc`; this call takes ownership of it.
#[no_mangle]
pub unsafe extern "C" fn isomesh_load_model(ptr: *mut u8, len: u32) -> u64 {
    let bytes = take_buffer(ptr, len);
    let outcome = match swap_in_model(&bytes) {
        Ok(()) => Outcome::Classification(GuestClassification::default()),
        Err(e) => Outcome::Error(to_guest_error(e)),
    };
    drop(bytes);
    hand_out_outcome(outcome)
}

fn swap_in_model(bytes: &[u8]) -> Result<(), Error> {
    let model = GuestModel::decode(bytes)
        .map_err(|e| Error::Model(format!("the host sent a garbled GuestModel: {e}")))?;
    let input = InputSpec::from_guest(model.input.as_ref());
    let classifier = Classifier::from_onnx(&model.onnx, model.labels, input)?;
    let serving = Serving {
        classifier,
        model_sha256: model.sha256,
    };
    SERVING.with(|s| *s.borrow_mut() = Some(Rc::new(serving)));
    Ok(())
}

/// # Safety
/// `ptr`/`len` must be a buffer from `isomesh_alloc`; this call takes ownership of it.
#[no_mangle]
pub unsafe extern "C" fn isomesh_classify(ptr: *mut u8, len: u32, top_k: u32) -> u64 {
    answer_image(ptr, len, |image| {
        let answer = loaded()?
            .classifier
            .classify(image, top_k.max(1) as usize)?;
        Ok(to_guest_classification(answer))
    })
}

/// `isomesh_classify`, with the answer's `ops` saying where the inference's time went, by kind of
/// operation (`Classifier::profile`). Optional in the ABI: `isomesh bench infer` calls it.
///
/// # Safety
/// As for `isomesh_classify`.
#[no_mangle]
pub unsafe extern "C" fn isomesh_profile(ptr: *mut u8, len: u32, top_k: u32) -> u64 {
    answer_image(ptr, len, |image| {
        let (answer, ops) = loaded()?.classifier.profile(image, top_k.max(1) as usize)?;
        Ok(GuestClassification {
            ops: ops
                .into_iter()
                .map(|t| GuestOpTime {
                    op: t.op,
                    nodes: t.nodes,
                    ns: t.ns,
                })
                .collect(),
            ..to_guest_classification(answer)
        })
    })
}

/// Decodes and resizes the image only (no inference): the middle rung of the call-overhead
/// benchmark, between an empty call and a classification. Optional in the ABI.
///
/// # Safety
/// As for `isomesh_classify`.
#[no_mangle]
pub unsafe extern "C" fn isomesh_preprocess(ptr: *mut u8, len: u32) -> u64 {
    // The input of the model served (one handed in may take another side or layout), without
    // building the embedded model's plan for it.
    let spec = SERVING
        .with(|s| {
            s.borrow()
                .as_ref()
                .map(|serving| serving.classifier.input())
        })
        .unwrap_or(InputSpec::IMAGENET_224);
    answer_image(ptr, len, |image| {
        let started = std::time::Instant::now();
        // Held past the clock, as a classification holds it: freeing it is not decoding.
        let _input = preprocess::image_to(image, spec)?;
        Ok(GuestClassification {
            decode_us: started.elapsed().as_micros() as u64,
            ..GuestClassification::default()
        })
    })
}

/// What every export that takes an image does around its work: takes the buffer the host filled,
/// runs `work` on it, frees the image before the answer is encoded, and hands the outcome out.
///
/// # Safety
/// As for `take_buffer`.
unsafe fn answer_image(
    ptr: *mut u8,
    len: u32,
    work: impl FnOnce(&[u8]) -> Result<GuestClassification, Error>,
) -> u64 {
    let image = take_buffer(ptr, len);
    let result = work(&image);
    drop(image);
    hand_out_outcome(match result {
        Ok(answer) => Outcome::Classification(answer),
        Err(e) => Outcome::Error(to_guest_error(e)),
    })
}

/// The model served, building the embedded one's plan on first use.
fn loaded() -> Result<Rc<Serving>, Error> {
    if let Some(serving) = SERVING.with(|s| s.borrow().clone()) {
        return Ok(serving);
    }
    let serving = Rc::new(Serving {
        classifier: Classifier::load()?,
        model_sha256: MODEL_SHA256.into(),
    });
    SERVING.with(|s| *s.borrow_mut() = Some(serving.clone()));
    Ok(serving)
}

fn to_guest_classification(answer: Classification) -> GuestClassification {
    GuestClassification {
        top: answer
            .top
            .into_iter()
            .map(|(index, prob)| GuestScore { index, prob })
            .collect(),
        decode_us: answer.decode_us,
        infer_us: answer.infer_us,
        ops: Vec::new(),
    }
}

fn to_guest_error(error: Error) -> GuestError {
    let kind = match error {
        Error::EmptyInput => Kind::EmptyInput,
        Error::BadImage(_) => Kind::BadImage,
        Error::ImageTooLarge(_) => Kind::ImageTooLarge,
        Error::Model(_) => Kind::Model,
    };
    GuestError {
        kind: kind as i32,
        message: error.to_string(),
    }
}

/// Takes ownership of a buffer (an image, a model) the host filled after `isomesh_alloc`.
///
/// # Safety
/// `ptr`/`len` must be a buffer from `isomesh_alloc`, not used again by the caller.
unsafe fn take_buffer(ptr: *mut u8, len: u32) -> Vec<u8> {
    if len == 0 {
        Vec::new()
    } else {
        Vec::from_raw_parts(ptr, len as usize, len as usize)
    }
}

/// Hands a call's outcome to the host.
fn hand_out_outcome(outcome: Outcome) -> u64 {
    hand_out(
        GuestOutcome {
            outcome: Some(outcome),
        }
        .encode_to_vec(),
    )
}

/// Leaks `bytes` to the host as `(ptr << 32) | len`; the host returns it with `isomesh_free`.
fn hand_out(bytes: Vec<u8>) -> u64 {
    let bytes = bytes.into_boxed_slice();
    let len = bytes.len() as u64;
    let ptr = Box::into_raw(bytes) as *mut u8 as usize as u64;
    (ptr << 32) | len
}
