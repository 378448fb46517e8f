//! isomesh node: the daemon every tier runs, and the library behind the `isomesh` tool.
//!
//! A job's path through a node:
//! 1. [`node`] receives an MQTT message and turns it into a [`request`];
//! 2. the [`scheduler`] queues it and a worker runs it on the current module from [`modules`];
//! 3. the worker calls the guest through the [`sandbox`] (wasmtime, deadline, memory cap);
//! 4. [`report`] turns the outcome into the one answer, published to the request's reply route.
//!
//! Or the job goes up a tier: the [`offload`] policy weighs the job's budget against this node's
//! load and the tier above's (from [`peers`]' statuses); a forwarded job stays owned by this node
//! in the [`relay`] until its answer comes back, or it runs here after all.
//!
//! A module's path onto a node (a rollout):
//! 1. `isomesh rollout` cuts the module into chunks and signs a manifest ([`package`], [`signing`]);
//! 2. the node's [`rollout`] agent checks the manifest, [`fetch`]es the chunks and writes the file;
//! 3. the [`watcher`] (or the agent directly) hands the file to the [`modules`] manager, which
//!    checks its signature again ([`trust`]: also for files copied in by hand), then compiles,
//!    self-tests and swaps it in without stopping any job.
//!
//! Around the job flow: [`answered`] keeps recent answers for users who ask again (after a
//! broker lost one), and [`metrics`] counts jobs, stages, offloads and swaps for Prometheus.
//!
//! [`topics`] holds the MQTT topic layout, [`login`] the broker URL and credentials, [`link`]
//! the connection to the broker (polled by a task of its own), [`config`]
//! the node's settings, [`selftest`] the check a module must pass before serving, and [`cli`]
//! the subcommands of `isomesh`.

pub mod answered;
pub mod cli;
pub mod config;
pub mod fetch;
pub mod link;
pub mod login;
pub mod metrics;
pub mod modules;
pub mod node;
pub mod offload;
pub mod package;
pub mod peers;
pub mod relay;
pub mod report;
pub mod request;
pub mod rollout;
pub mod sandbox;
pub mod scheduler;
pub mod selftest;
pub mod signing;
pub mod topics;
pub mod trust;
pub mod watcher;
