//! How isomesh programs reach the broker: the node daemon, the `isomesh` tool and the
//! benchmarks all connect through here.
//!
//! - [`login`]: a broker URL (`mqtt://USER:PASSWORD@HOST:PORT`, `mqtts://` for TLS) and the
//!   credentials and certificates that go with it, made into rumqttc options;
//! - [`link`]: a connection polled by a task of its own, so a caller's `select!` can never drop
//!   a connection half-way through its CONNECT;
//! - [`failover`]: which member of a broker cluster to connect to next, and when;
//! - [`connect`]: a short-lived client of the `isomesh` tool, connected or a clear error.

pub mod connect;
pub mod failover;
pub mod link;
pub mod login;
