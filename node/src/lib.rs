//! isomesh node: the daemon every tier runs, and the library behind the `isomesh` tool.
//!
//! A job's path through a node:
//! 1. [`node`] receives an MQTT message and turns it into a [`request`];
//! 2. the [`scheduler`] queues it and a worker runs it on the current module from [`modules`];
//! 3. the worker calls the guest through the [`sandbox`] (wasmtime, deadline, memory cap);
//! 4. [`report`] turns the outcome into the one answer, published to the request's reply route.
//!
//! [`topics`] holds the MQTT topic layout, [`config`] the node's settings, [`selftest`] the check a
//! module must pass before serving, and [`cli`] the subcommands of `isomesh`.

pub mod cli;
pub mod config;
pub mod modules;
pub mod node;
pub mod report;
pub mod request;
pub mod sandbox;
pub mod scheduler;
pub mod selftest;
pub mod topics;
