//! `isomesh-broker`: parses flags and runs the broker until SIGTERM or Ctrl-C;
//! `isomesh-broker health` checks a running one (exit 0 healthy, 1 not).

use clap::{Parser, Subcommand};
use isomesh_broker::BrokerConfig;
use std::process::ExitCode;
use std::time::Duration;

/// The embedded MQTT 3.1.1 + 5 broker of isomesh.
#[derive(Debug, Parser)]
#[command(name = "isomesh-broker", version)]
struct Flags {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    broker: BrokerConfig,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that a broker accepts MQTT connections (exit 0) or not (exit 1).
    Health {
        /// Broker to check, mqtt://HOST:PORT.
        #[arg(long, env = "ISOMESH_BROKER", default_value = "mqtt://127.0.0.1:1883")]
        broker: String,
        /// Seconds to wait for the broker's CONNACK.
        #[arg(long, default_value_t = 5)]
        timeout_s: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,rmqtt=warn,rmqtt_net=warn")
            }),
        )
        .init();
    let flags = Flags::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("isomesh-broker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match flags.command {
        Some(Command::Health { broker, timeout_s }) => runtime.block_on(health(&broker, timeout_s)),
        None => match runtime.block_on(isomesh_broker::run(flags.broker, shutdown_signal())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("isomesh-broker: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn health(broker: &str, timeout_s: u64) -> ExitCode {
    let address = broker
        .strip_prefix("mqtt://")
        .or_else(|| broker.strip_prefix("tcp://"))
        .unwrap_or(broker);
    let (host, port) = match address.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>())) {
        Some((host, Ok(port))) if !host.is_empty() => (host, port),
        _ => {
            eprintln!("isomesh-broker health: bad broker URL {broker:?}: use mqtt://HOST:PORT");
            return ExitCode::FAILURE;
        }
    };
    match isomesh_broker::health::check(host, port, Duration::from_secs(timeout_s)).await {
        Ok(()) => {
            println!("ok: {broker} accepts MQTT connections");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("isomesh-broker health: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
