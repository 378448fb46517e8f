//! Modules as signed, content-addressed rollouts, from the publisher's key to a file a node may
//! run. No sockets here: the node and the `isomesh` tool do the publishing and subscribing.
//!
//! The path of a rollout through these modules:
//! 1. [`package`]: `isomesh rollout` cuts the module (and precompiled machine code) into chunks
//!    named by [`digest`], and describes them in a manifest that [`signing`] signs;
//! 2. [`agent`]: on a node, the rollout agent checks each manifest (target, signature, form,
//!    [`version`], and its [`history`] against rollbacks and replays) and [`fetch`]es its
//!    chunks; every refusal is a [`rejection::Rejection`];
//! 3. [`store`]: the checked bytes are written into the module directory, whose layout only the
//!    store knows;
//! 4. [`trust`]: before any file of that directory is compiled (rolled out or copied in by hand),
//!    the signed manifest beside it must name its sha256; once compiled, it must pass the
//!    [`selftest`] before it serves.
//!
//! A [`model`] is the other part a module's code may serve: an ONNX classifier, its labels and
//! its input, handed to code the node already has.

pub mod agent;
pub mod digest;
pub mod fetch;
pub mod history;
pub mod identity;
pub mod model;
pub mod package;
pub mod rejection;
pub mod selftest;
pub mod signing;
pub mod store;
pub mod trust;
pub mod version;
