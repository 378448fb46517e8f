//! The one integration-test binary. Each module drives real processes: `isomesh-broker` (or
//! Mosquitto, with `ISOMESH_TEST_BROKER=mosquitto`), `isomesh-node`, `isomesh`, `mosquitto_pub`.

mod answers;
mod bad_input;
mod broker;
mod classify;
mod cluster;
mod failover;
mod lifecycle;
mod metrics;
mod mixed_isa;
mod model;
mod model_rollout;
mod module_faults;
mod mqtt5;
mod offload;
mod profile;
mod rollout;
mod security;
mod trust_broker;
