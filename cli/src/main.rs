//! `isomesh`: the operator's tool. Exit codes: 0 success, 1 some job failed or got no answer,
//! 2 the command itself failed (bad flags, broker unreachable, unreadable file).

mod camera;
mod classify;
mod common;
mod compile;
mod follow;
mod progress;
mod rollout;
mod sign;
mod status;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// mimalloc: musl's allocator serialises threads that allocate at once (the Wasm compiler's).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "isomesh",
    version,
    about = "Use an isomesh mesh: classify, roll out modules, status, bench"
)]
struct Flags {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Classify images on a node or a tier and print the answers.
    Classify(classify::ClassifyArgs),
    /// Publish a signed module to the mesh; nodes swap it in without restarting.
    Rollout(rollout::RolloutArgs),
    /// Make an ed25519 key pair for signing rollouts.
    Keygen(rollout::KeygenArgs),
    /// Sign a module file copied onto nodes by hand (nodes run only signed modules).
    Sign(sign::SignArgs),
    /// Send the photos of a folder to the mesh at a steady rate and print where each ran.
    Camera(camera::CameraArgs),
    /// Compile a module into a node's compiled-module cache (what `make images` bakes in).
    Compile(compile::CompileArgs),
    /// Show every node's status; exit 0 when every node shown is online, 1 when one is not.
    Status(status::StatusArgs),
    /// Measure the sandbox, the model and the mesh (`isomesh bench --help`): runs
    /// `isomesh-bench` from beside `isomesh`, the one binary that links tract natively.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let flags = Flags::parse();
    let result = match flags.command {
        Command::Bench { args } => bench(args),
        Command::Classify(args) => on_runtime(classify::run(args)),
        Command::Camera(args) => on_runtime(camera::run(args)),
        Command::Compile(args) => compile::run(args).map(|()| true),
        Command::Rollout(args) => on_runtime(rollout::rollout(args)),
        Command::Keygen(args) => rollout::keygen(args).map(|()| true),
        Command::Sign(args) => sign::run(args).map(|()| true),
        Command::Status(args) => on_runtime(status::run(args)),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("isomesh: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `isomesh bench ARGS`: `isomesh-bench ARGS`, a binary of its own so that `isomesh` (which the
/// container images ship) links no native inference engine.
fn bench(args: Vec<std::ffi::OsString>) -> anyhow::Result<bool> {
    use anyhow::Context;
    let exe = std::env::current_exe()?.with_file_name("isomesh-bench");
    anyhow::ensure!(
        exe.is_file(),
        "{} is missing: `isomesh bench` runs it (`make build` puts it beside isomesh)",
        exe.display()
    );
    let status = std::process::Command::new(&exe)
        .args(args)
        .status()
        .with_context(|| format!("running {}", exe.display()))?;
    // It printed its own error; exit as it did.
    match status.code() {
        Some(0) => Ok(true),
        code => std::process::exit(code.unwrap_or(2)),
    }
}

/// Runs an async subcommand on a fresh tokio runtime.
fn on_runtime(
    command: impl std::future::Future<Output = anyhow::Result<bool>>,
) -> anyhow::Result<bool> {
    tokio::runtime::Runtime::new()?.block_on(command)
}
