//! `isomesh-node`: the daemon every tier runs. Parses settings, then hands over to
//! `isomesh_node::daemon::run` until SIGTERM or Ctrl-C.

use clap::Parser;
use isomesh_node::config::{apply_config_file, NodeConfig};
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc: musl's allocator serialises threads that allocate at once (the Wasm compiler's).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An isomesh node: classifies images from MQTT in a sandboxed Wasm module.
#[derive(Debug, Parser)]
#[command(name = "isomesh-node", version)]
struct Flags {
    /// TOML file with defaults for any flag below (`budget-ms = 200`); flags and env win.
    #[arg(long, env = "ISOMESH_CONFIG")]
    config: Option<PathBuf>,
    /// Do not run a node: ask the one running with these settings whether it is ready (GET
    /// /readyz on --metrics-listen) and exit 0 if so, 1 if not. A container health check.
    #[arg(long)]
    check_ready: bool,
    #[command(flatten)]
    node: NodeConfig,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Some(path) = config_file_argument() {
        if let Err(e) = apply_config_file(&path) {
            eprintln!("isomesh-node: {e}");
            return ExitCode::from(2);
        }
    }
    let flags = Flags::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("isomesh-node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if flags.check_ready {
        let answer = runtime.block_on(isomesh_node::metrics::probe_ready(
            flags.node.metrics_listen.as_deref(),
        ));
        return match answer {
            Ok(body) => {
                println!("{body}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("isomesh-node: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let node = async {
        let metrics = isomesh_node::daemon::bind_metrics(&flags.node).await?;
        isomesh_node::daemon::run(flags.node, metrics, shutdown_signal()).await
    };
    match runtime.block_on(node) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isomesh-node: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--config FILE`, `--config=FILE` or `$ISOMESH_CONFIG`, found before clap parses the rest.
fn config_file_argument() -> Option<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(value) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            return Some(PathBuf::from(value));
        }
    }
    std::env::var_os("ISOMESH_CONFIG").map(PathBuf::from)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
