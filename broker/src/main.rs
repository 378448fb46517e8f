//! `isomesh-broker`: parses flags and runs the broker until SIGTERM or Ctrl-C;
//! `isomesh-broker health` checks a running one.
//!
//! Exit codes: 0 success (broker stopped cleanly, or healthy), 1 error (cannot listen, or
//! unhealthy: the reason goes to stderr), 2 bad flags (from clap).

use anyhow::Context;
use clap::{Parser, Subcommand};
use isomesh_broker::BrokerConfig;
use std::process::ExitCode;
use std::time::Duration;

/// mimalloc: musl's allocator serialises threads that allocate at once (the Wasm compiler's).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Check that a broker accepts an MQTT session and answers a ping (exit 0) or not (exit 1).
    /// For container HEALTHCHECKs: `isomesh-broker health --broker mqtt://127.0.0.1:1883`.
    Health {
        /// Broker to check, mqtt://HOST:PORT.
        #[arg(long, env = "ISOMESH_BROKER", default_value = "mqtt://127.0.0.1:1883")]
        broker: String,
        /// Seconds to wait for each step (TCP connect, CONNACK, PINGRESP).
        #[arg(long, env = "ISOMESH_HEALTH_TIMEOUT_S", default_value_t = 5)]
        timeout_s: u64,
    },
    /// Add a user to a password file (made if missing), or change their password. The password
    /// is read from $ISOMESH_NEW_PASSWORD, else asked twice without echo at a terminal, else
    /// read from the first line of standard input. The file is Mosquitto's format: Mosquitto
    /// reads it too.
    Passwd {
        /// The password file (--password-file of the broker).
        file: std::path::PathBuf,
        /// The username; for a node, its --id.
        user: String,
        /// PBKDF2 rounds.
        #[arg(long, default_value_t = isomesh_broker::passwords::DEFAULT_ITERATIONS)]
        iterations: u32,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            // rmqtt logs every connection error at info; the mesh cares about its own events.
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,rmqtt=warn,rmqtt_net=warn")
            }),
        )
        .init();
    let flags = Flags::parse();
    let result = match flags.command {
        Some(Command::Health { broker, timeout_s }) => {
            health(&broker, Duration::from_secs(timeout_s)).await
        }
        Some(Command::Passwd {
            file,
            user,
            iterations,
        }) => passwd(&file, &user, iterations),
        None => isomesh_broker::run(flags.broker, shutdown_signal())
            .await
            .context("isomesh-broker"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn health(broker: &str, timeout: Duration) -> anyhow::Result<()> {
    let addr = isomesh_broker::health::check(broker, timeout)
        .await
        .context("isomesh-broker health: unhealthy")?;
    println!("ok: {addr} accepts MQTT sessions and answers pings");
    Ok(())
}

fn passwd(file: &std::path::Path, user: &str, iterations: u32) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let password = match std::env::var("ISOMESH_NEW_PASSWORD") {
        Ok(password) => password,
        // A person at a terminal: twice, without echo, as mosquitto_passwd asks.
        Err(_) if std::io::stdin().is_terminal() => {
            let first = rpassword::prompt_password(format!("Password for {user}: "))
                .context("reading the password from the terminal")?;
            let again = rpassword::prompt_password("Reenter password: ")
                .context("reading the password from the terminal")?;
            anyhow::ensure!(
                first == again,
                "the passwords do not match; {user} was not changed"
            );
            first
        }
        // A script: one line from standard input.
        Err(_) => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    anyhow::ensure!(
        !password.is_empty(),
        "no password: set ISOMESH_NEW_PASSWORD or pipe it in (`echo \"$PW\" | isomesh-broker passwd FILE USER`)"
    );
    isomesh_broker::passwords::set_password(file, user, &password, iterations)?;
    println!("{user} set in {}", file.display());
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM (what `docker stop` sends).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only"),
        }
    }
    if let Err(e) = ctrl_c.await {
        tracing::warn!(error = %e, "cannot watch Ctrl-C; running until killed");
        std::future::pending::<()>().await;
    }
}
