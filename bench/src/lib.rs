//! `isomesh bench`: the paper's evaluation and ours, each a subcommand writing JSON that
//! `scripts/bench_report.py` turns into `docs/benchmarks.md`.
//!
//! - [`infer`]: the sandbox against the same classifier linked natively (this is the only crate
//!   that links tract natively, and only with its `native-baseline` feature) and against onnxruntime; the call overhead; compile and load
//!   times; memory.
//! - [`swap`]: a rollout under load against restarting nodes on the new module.
//! - [`offload`]: the offload policies under Poisson load, device to cloud, under CPU quotas.
//! - [`mesh`]: latency, throughput and scaling through a broker, and node memory.
//!
//! They start real brokers and nodes with [`isomesh_testkit::harness`]; [`common`] holds their
//! photos, statistics and MQTT client.

pub mod common;
pub mod infer;
pub mod mesh;
pub mod offload;
pub mod swap;

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Inference latency in Wasm vs native, call overhead, compile and load times, memory.
    Infer(infer::InferArgs),
    /// A rollout under load vs restarting a node on the new module.
    Swap(swap::SwapArgs),
    /// Deadline hits and latency of the offload policies under Poisson load, device to cloud.
    Offload(offload::OffloadArgs),
    /// End-to-end latency, throughput and scaling through a broker for 1, 2, 4 nodes, on
    /// isomesh-broker and Mosquitto; node memory per worker instance.
    Mesh(mesh::MeshArgs),
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Infer(args) => infer::infer(args),
        BenchCommand::Swap(args) => tokio::runtime::Runtime::new()?.block_on(swap::swap(args)),
        BenchCommand::Offload(args) => {
            tokio::runtime::Runtime::new()?.block_on(offload::offload(args))
        }
        BenchCommand::Mesh(args) => tokio::runtime::Runtime::new()?.block_on(mesh::mesh(args)),
    }
}
