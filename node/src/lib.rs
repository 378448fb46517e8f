//! isomesh node: the daemon every tier runs (`isomesh-node`).
//!
//! A job's path through a node:
//! 1. the [`event_loop`] receives an MQTT message; [`jobs::accept`] turns it into a request and
//!    decides, with the offload policy, whether it runs here or goes up a tier;
//! 2. the [`scheduler`] queues it and a worker runs it on the module in the [`slot`], in the
//!    sandbox (`isomesh-sandbox`: wasmtime, deadline, memory cap);
//! 3. [`jobs::serve`] waits for the outcome (or the answer from above), and [`replies`] sends the
//!    one answer where the sender asked for it, before the message is acknowledged.
//!
//! A module's path onto a node (a rollout):
//! 1. the event loop hands module messages to the [`executor`], which runs the rollout agent
//!    (`isomesh-module`: a state machine without I/O) and carries out its actions;
//! 2. a finished fetch is checked and written into the module directory; the [`watcher`] reports
//!    files copied in by hand the same way;
//! 3. the module [`manager`] checks each file's signature, compiles it, runs the self-test
//!    (`isomesh-module`'s `selftest`) and swaps it into the [`slot`] without stopping any job.
//!
//! Around them: [`daemon`] builds and wires the parts, [`status`] publishes the node's retained
//! status, [`metrics`] serves Prometheus figures, [`config`] reads flags, environment and the
//! `--config` file.

pub mod config;
pub mod daemon;
pub mod event_loop;
pub mod executor;
pub mod jobs;
pub mod manager;
pub mod metrics;
pub mod replies;
pub mod scheduler;
pub mod slot;
pub mod status;
pub mod watcher;
