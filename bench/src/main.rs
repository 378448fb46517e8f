//! `isomesh-bench`: the benchmarks, run as `isomesh bench ...` (which starts this binary from
//! beside `isomesh`). Exit codes: 0 done, 2 the benchmark could not run.

use clap::Parser;
use std::process::ExitCode;

/// mimalloc, as in the other binaries: the native baseline allocates per operator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measure the sandbox, the model and the mesh; JSON for `make report`.
#[derive(Debug, Parser)]
#[command(name = "isomesh bench", bin_name = "isomesh bench", version)]
struct Flags {
    #[command(subcommand)]
    command: isomesh_bench::BenchCommand,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match isomesh_bench::run(Flags::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isomesh bench: {e:#}");
            ExitCode::from(2)
        }
    }
}
