//! The mesh's rules, without I/O: what a node decides about a job, and how it names things on
//! the broker. Everything here is plain data in, plain data out, and unit-tested in its file;
//! the node daemon (`isomesh-node`) does the sending and receiving around it.
//!
//! A job's path, as these modules see it:
//! 1. [`topics`]: where it came from (`isomesh/images/{node}`, `isomesh/jobs/...`);
//! 2. [`request`]: the message becomes a [`request::Request`] with a [`request::ReplyRoute`];
//!    [`recent`] drops a redelivered copy, [`answered`] recalls the answer for a user who asks
//!    again;
//! 3. [`offload`]: run it here or send it up, from this node's load and the tier above's, which
//!    [`peers`] keeps from the retained statuses; a job sent up waits in the [`relay`] for its
//!    answer;
//! 4. [`outcome`] and [`report`]: what running it produced becomes the one `JobResult` (and its
//!    JSON form).

pub mod answered;
pub mod offload;
pub mod outcome;
pub mod peers;
pub mod recent;
pub mod relay;
pub mod report;
pub mod request;
pub mod topics;
