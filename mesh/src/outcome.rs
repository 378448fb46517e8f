//! What running one job produced, as the scheduler hands it to the job's task: the module's
//! answer with where its time went, or why there is none. Every job gets exactly one.
//!
//! Modules are named by [`ModuleRef`] here, not by the loaded module itself, so the rules that
//! turn an outcome into a result ([`crate::report`]) need no sandbox to be tested.

use isomesh_protos::{ClassScore, ModuleRef};
use std::time::Duration;

/// The one outcome of a job run on this node.
pub type Outcome = Result<Answer, JobFailure>;

/// A successful classification and where its time went.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The module that answered.
    pub module: ModuleRef,
    /// The best classes, with the module's labels.
    pub top: Vec<ClassScore>,
    /// Decoding the image and running the model, as the guest measured them.
    pub decode_us: u64,
    pub infer_us: u64,
    /// From submission to a worker picking the job up.
    pub queued: Duration,
    /// The guest call itself (decode + inference + copying).
    pub service: Duration,
}

/// Why a job produced no classification, with the module it ran on when there was one.
#[derive(Debug, Clone)]
pub struct JobFailure {
    pub message: String,
    /// Boxed: a `ModuleRef` of five strings would make every `Outcome` as large.
    pub module: Option<Box<ModuleRef>>,
}

impl JobFailure {
    /// A failure before any module was involved.
    pub fn new(message: impl Into<String>) -> JobFailure {
        JobFailure {
            message: message.into(),
            module: None,
        }
    }
}
