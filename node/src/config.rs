//! `isomesh-node`'s settings: flags, `ISOMESH_*` environment variables and an optional TOML file.
//!
//! Precedence: flag > environment variable > config file > default. The file is applied by
//! [`apply_config_file`] before the flags are parsed: each of its keys (`broker = "..."`,
//! `budget-ms = 200`, ...) becomes the matching `ISOMESH_*` variable unless that is already set,
//! so every setting has exactly one parser.

use crate::offload::Policy;
use isomesh_protos::Tier;
use std::path::PathBuf;
use std::time::Duration;

/// Settings of one node.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeConfig {
    /// Node id: names its topics (`isomesh/images/{id}`) and appears in results.
    #[arg(long, env = "ISOMESH_ID")]
    pub id: String,

    /// Tier of this node: device, edge or cloud.
    #[arg(long, env = "ISOMESH_TIER", value_parser = parse_tier)]
    pub tier: Tier,

    /// Broker URL, mqtt://HOST:PORT.
    #[arg(long, env = "ISOMESH_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,

    /// Username to log in to the broker with [default: the node id, when a password is given].
    /// A login in the --broker URL wins.
    #[arg(long, env = "ISOMESH_USERNAME")]
    pub username: Option<String>,

    /// Password to log in to the broker with; better given as $ISOMESH_PASSWORD (or in the
    /// --config file) than on the command line, where `ps` shows it.
    #[arg(long, env = "ISOMESH_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,

    /// CA certificates (PEM) that sign the broker's TLS certificate; for an mqtts:// --broker.
    #[arg(long, env = "ISOMESH_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// This node's TLS client certificate (PEM), for a broker that asks for one.
    #[arg(long, env = "ISOMESH_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,

    /// The private key (PEM) of --cert-file.
    #[arg(long, env = "ISOMESH_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,

    /// Directory of classifier modules (.wasm); the newest good one is served.
    #[arg(long, env = "ISOMESH_MODULES")]
    pub modules: PathBuf,

    /// Default latency budget of a job in ms, when the job names none (0 = none).
    #[arg(long, env = "ISOMESH_BUDGET_MS", default_value_t = 0)]
    pub budget_ms: u32,

    /// Where jobs run: `budget` forwards a job up when this node would miss its budget and the
    /// tier above would not; `local-only` never forwards; `always-up` forwards every job while a
    /// tier above is online. Jobs pinned to a module this node lacks go up under every policy.
    #[arg(long, env = "ISOMESH_OFFLOAD", value_enum, default_value_t = Policy::Budget)]
    pub offload: Policy,

    /// Most times a job may be forwarded; a job that has made this many hops runs where it is.
    #[arg(long, env = "ISOMESH_MAX_HOPS", default_value_t = 3)]
    pub max_hops: u32,

    /// How long past its remaining budget a forwarded job may take before this node stops
    /// waiting and runs it itself, ms.
    #[arg(long, env = "ISOMESH_OFFLOAD_GRACE_MS", default_value_t = 2000)]
    pub offload_grace_ms: u64,

    /// Jobs (QoS 1 messages) the broker may hand this node before it has answered earlier ones:
    /// the MQTT 5 Receive Maximum. Beyond it the broker holds jobs back (back-pressure), and a
    /// tier's shared jobs go to its other nodes.
    #[arg(long, env = "ISOMESH_RECEIVE_MAXIMUM", default_value_t = 64)]
    pub receive_maximum: u16,

    /// Jobs waiting or running here at most. QoS 1 jobs are held back by the broker (see
    /// --receive-maximum); this bounds what QoS 0 senders can pile up: past it a job that would
    /// run here gets an "overloaded" error answer.
    #[arg(long, env = "ISOMESH_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,

    /// Worker threads, each with its own Wasm instance.
    #[arg(long, env = "ISOMESH_WORKERS", default_value_t = 1)]
    pub workers: usize,

    /// Compiled-module cache shared by the nodes of a host [default: MODULES/.cache].
    #[arg(long, env = "ISOMESH_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Topic prefix.
    #[arg(long, env = "ISOMESH_PREFIX", default_value = "isomesh")]
    pub prefix: String,

    /// Memory limit of one Wasm instance, MiB.
    #[arg(long, env = "ISOMESH_MEMORY_LIMIT_MB", default_value_t = 768)]
    pub memory_limit_mb: usize,

    /// Deadline of one guest call, ms; a call past it is interrupted and fails its job.
    #[arg(long, env = "ISOMESH_CALL_TIMEOUT_MS", default_value_t = 10_000)]
    pub call_timeout_ms: u64,

    /// Largest image accepted, bytes; larger payloads get an error answer.
    #[arg(long, env = "ISOMESH_MAX_PAYLOAD_BYTES", default_value_t = 16 << 20)]
    pub max_payload_bytes: usize,

    /// Seconds between status reports.
    #[arg(long, env = "ISOMESH_STATUS_INTERVAL_S", default_value_t = 5)]
    pub status_interval_s: u64,

    /// Public key file (from `isomesh keygen`) whose signed rollouts this node installs; repeat
    /// the flag or separate files with commas. With none, the node ignores rollouts.
    #[arg(
        long = "trusted-key",
        env = "ISOMESH_TRUSTED_KEYS",
        value_delimiter = ','
    )]
    pub trusted_keys: Vec<PathBuf>,

    /// Run modules that carry no valid signature by a --trusted-key (each load logs a warning).
    /// For development only: without it, a module file copied into the module directory runs
    /// only with a signed manifest beside it (`isomesh sign`).
    #[arg(long, env = "ISOMESH_ALLOW_UNSIGNED")]
    pub allow_unsigned: bool,

    /// A rollout whose chunks stop arriving for this long is abandoned and reported, s.
    #[arg(long, env = "ISOMESH_FETCH_TIMEOUT_S", default_value_t = 60)]
    pub fetch_timeout_s: u64,

    /// Module files kept in the module directory; older ones are deleted after a swap.
    #[arg(long, env = "ISOMESH_KEEP_MODULES", default_value_t = 3)]
    pub keep_modules: usize,

    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. `0.0.0.0:9100`; off by
    /// default. Port 0 picks a free port (logged).
    #[arg(long, env = "ISOMESH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// How long the broker keeps this node's session (and its unanswered jobs) while it is away, s.
    #[arg(long, env = "ISOMESH_SESSION_EXPIRY_S", default_value_t = 3600)]
    pub session_expiry_s: u32,
}

impl NodeConfig {
    /// Where compiled modules are cached.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| self.modules.join(".cache"))
    }

    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    pub fn offload_grace(&self) -> Duration {
        Duration::from_millis(self.offload_grace_ms)
    }
}

/// Parses a tier name, naming the valid ones on error.
pub fn parse_tier(name: &str) -> Result<Tier, String> {
    Tier::from_name(name).ok_or_else(|| format!("unknown tier {name:?}: use device, edge or cloud"))
}

/// Errors reading a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config file {path}: key {key:?} must be a string, number or boolean")]
    Value { path: PathBuf, key: String },
}

/// Exports each `key = value` of a TOML file as `ISOMESH_KEY` unless that variable is set.
/// Call before parsing flags, while the process is still single-threaded.
pub fn apply_config_file(path: &std::path::Path) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = text.parse().map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })?;
    for (key, value) in table {
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                return Err(ConfigError::Value {
                    path: path.to_owned(),
                    key,
                })
            }
        };
        let var = format!("ISOMESH_{}", key.to_uppercase().replace('-', "_"));
        if std::env::var_os(&var).is_none() {
            // SAFETY: called before any thread is spawned (see the doc comment).
            unsafe { std::env::set_var(var, text) };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_tiers_are_named_in_the_error() {
        assert_eq!(parse_tier("cloud"), Ok(Tier::Cloud));
        let err = parse_tier("fog").unwrap_err();
        assert!(err.contains("fog") && err.contains("device, edge or cloud"));
    }
}
