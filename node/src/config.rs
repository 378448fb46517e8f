//! `isomesh-node`'s settings: flags, `ISOMESH_*` environment variables and an optional TOML file.
//!
//! Precedence: flag > environment variable > config file > default. The file is applied by
//! [`apply_config_file`] before the flags are parsed: each of its keys is a flag's long name
//! (`broker = "..."`, `budget-ms = 200`, `trusted-key = ["a.pub", "b.pub"]`) and becomes that
//! flag's environment variable unless the variable is already set, so every setting has exactly
//! one parser. A key that is no flag, or a value that is no string, number, boolean or list of
//! them, is an error naming the file, the line and the key, with the nearest flag's name; every
//! bad line is reported at once, and nothing is applied from a file with one.

use isomesh_mesh::offload::Policy;
use isomesh_mesh::topics::parse_tier;
use isomesh_protos::Tier;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The largest module chunk a node must receive; `isomesh rollout --chunk-size` refuses more
/// (the default chunk is 256 KiB).
pub const LARGEST_MODULE_CHUNK: usize = 4 << 20;

/// Settings of one node.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeConfig {
    /// Node id: names its topics (`isomesh/images/{id}`) and appears in results.
    #[arg(long, env = "ISOMESH_ID")]
    pub id: String,

    /// Tier of this node: device, edge or cloud.
    #[arg(long, env = "ISOMESH_TIER", value_parser = parse_tier)]
    pub tier: Tier,

    /// Broker URL, mqtt://HOST:PORT; or the members of a clustered broker, URL,URL,...: the node
    /// connects to the first and moves to the next when its member cannot be reached.
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

    /// The share of a job's budget this node plans to finish it within, from 0.1 to 1: a job it
    /// would finish later goes up (`budget` policy). The rest of the budget is headroom for what
    /// the estimate cannot foresee, above all other work taking the CPU from under a queue the
    /// node has already accepted.
    #[arg(long, env = "ISOMESH_PLAN_SHARE", default_value_t = 0.5, value_parser = plan_share)]
    pub plan_share: f64,

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

    /// Secret key (32 bytes) that MACs the compiled-module cache: machine code is loaded only
    /// with a MAC this key made, so writing the cache or the module directory does not run native
    /// code. Created (mode 0600) if missing; must not lie inside the module or cache directory.
    /// Nodes sharing a --cache-dir share it [default: CACHE_DIR.cache-key beside an explicit
    /// --cache-dir, else MODULES.cache-key beside the module directory].
    #[arg(long, env = "ISOMESH_CACHE_KEY")]
    pub cache_key: Option<PathBuf>,

    /// Topic prefix.
    #[arg(long, env = "ISOMESH_PREFIX", default_value = "isomesh")]
    pub prefix: String,

    /// Memory limit of one Wasm instance, MiB.
    #[arg(long, env = "ISOMESH_MEMORY_LIMIT_MB", default_value_t = 768)]
    pub memory_limit_mb: usize,

    /// Deadline of one guest call, ms; a call past it is interrupted and fails its job.
    #[arg(long, env = "ISOMESH_CALL_TIMEOUT_MS", default_value_t = 10_000)]
    pub call_timeout_ms: u64,

    /// Largest image accepted, bytes; larger payloads get an error answer. It also sizes the
    /// largest MQTT packet the node accepts (MQTT 5 Maximum Packet Size): this or a module chunk,
    /// (at most 4 MiB) whichever is larger, plus 1 MiB for the job's other fields; the broker drops bigger
    /// packets instead of delivering them, so an image that much too large gets no answer.
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

    /// Where the key that MACs the compiled-module cache is (see `--cache-key`).
    pub fn cache_key_file(&self) -> Result<PathBuf, isomesh_sandbox::CacheKeyError> {
        use isomesh_sandbox::CacheKey;
        match (&self.cache_key, &self.cache_dir) {
            (Some(key), _) => Ok(key.clone()),
            (None, Some(dir)) => {
                // A cache inside the module directory gets the module directory's key, which
                // lies outside both.
                let beside = CacheKey::beside(dir)?;
                let modules = self
                    .modules
                    .canonicalize()
                    .unwrap_or_else(|_| self.modules.clone());
                if beside.starts_with(&modules) {
                    CacheKey::beside(&self.modules)
                } else {
                    Ok(beside)
                }
            }
            (None, None) => CacheKey::beside(&self.modules),
        }
    }

    /// The largest MQTT packet this node must receive: an image of `--max-payload-bytes` or a
    /// module chunk, whichever is larger, with headroom for topic, properties and the job's
    /// other fields.
    pub fn mqtt_packet_limit(&self) -> u32 {
        const HEADROOM: usize = 1 << 20;
        let largest = self.max_payload_bytes.max(LARGEST_MODULE_CHUNK);
        u32::try_from(largest.saturating_add(HEADROOM)).unwrap_or(u32::MAX)
    }

    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    pub fn offload_grace(&self) -> Duration {
        Duration::from_millis(self.offload_grace_ms)
    }
}

/// `--plan-share`: a share of the budget, from 0.1 (plan to finish in a tenth of it) to 1 (plan
/// to use all of it).
fn plan_share(text: &str) -> Result<f64, String> {
    let share: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number; give a share such as 0.5"))?;
    if (0.1..=1.0).contains(&share) {
        Ok(share)
    } else {
        Err(format!(
            "{share} is not a share from 0.1 to 1 (0.5 plans to finish a job in half its budget)"
        ))
    }
}

/// Errors reading a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {} is not valid TOML: {source}", .path.display())]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config file {} has {} bad line(s):\n{}", .path.display(), .lines.len(), .lines.iter().map(|l| format!("  {}:{l}", .path.display())).collect::<Vec<_>>().join("\n"))]
    Lines { path: PathBuf, lines: Vec<BadLine> },
}

/// One line of a config file that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}: {problem}")]
pub struct BadLine {
    pub line: usize,
    pub key: String,
    pub problem: String,
}

/// Each flag's long name and the environment variable it reads.
fn flag_variables() -> BTreeMap<String, String> {
    use clap::Args;
    let command = NodeConfig::augment_args(clap::Command::new("isomesh-node"));
    command
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let env = arg.get_env()?.to_str()?;
            Some((long.to_string(), env.to_string()))
        })
        .collect()
}

/// A config file's settings as `(environment variable, value)`, or every line that is wrong.
pub type Settings = Result<Vec<(String, String)>, Vec<BadLine>>;

/// The settings of a config file's text; `Err` when it is not TOML at all.
pub fn read_config(text: &str) -> Result<Settings, toml::de::Error> {
    let table: BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>> = toml::from_str(text)?;
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let flags = flag_variables();
    let mut settings = Vec::new();
    let mut bad = Vec::new();
    for (key, value) in table {
        let line = line_of(key.span().start);
        let key = key.into_inner();
        let Some(variable) = flags.get(&key) else {
            let nearest = flags
                .keys()
                .min_by_key(|flag| strsim::levenshtein(flag, &key))
                .map(|flag| format!(" (did you mean `{flag}`?)"))
                .unwrap_or_default();
            bad.push(BadLine {
                line,
                problem: format!("unknown key `{key}`{nearest}; keys are the flags of `isomesh-node --help` without their dashes"),
                key,
            });
            continue;
        };
        match setting(value.get_ref()) {
            Some(text) => settings.push((variable.clone(), text)),
            None => bad.push(BadLine {
                line,
                problem: format!("`{key}` must be a string, number, boolean or a list of them"),
                key,
            }),
        }
    }
    Ok(if bad.is_empty() {
        Ok(settings)
    } else {
        Err(bad)
    })
}

/// A TOML value as the flag's environment variable takes it (lists comma-separated).
fn setting(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Array(items) => items
            .iter()
            .map(|item| match item {
                toml::Value::Array(_) | toml::Value::Table(_) => None,
                scalar => setting(scalar),
            })
            .collect::<Option<Vec<_>>>()
            .map(|items| items.join(",")),
        _ => None,
    }
}

/// Exports each setting of a TOML file as its flag's environment variable unless that variable
/// is set. Call before parsing flags, while the process is still single-threaded.
pub fn apply_config_file(path: &Path) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let settings = read_config(&text)
        .map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?
        .map_err(|lines| ConfigError::Lines {
            path: path.to_owned(),
            lines,
        })?;
    for (variable, value) in settings {
        if std::env::var_os(&variable).is_none() {
            // SAFETY: called before any thread is spawned (see the doc comment).
            unsafe { std::env::set_var(variable, value) };
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

    #[test]
    fn a_plan_share_is_a_number_from_a_tenth_to_one() {
        assert_eq!(plan_share("0.5"), Ok(0.5));
        assert_eq!(plan_share("1"), Ok(1.0));
        let err = plan_share("half").unwrap_err();
        assert!(err.contains("`half` is not a number"), "{err}");
        let err = plan_share("1.5").unwrap_err();
        assert!(err.contains("from 0.1 to 1"), "{err}");
        assert!(plan_share("NaN").is_err());
    }

    #[test]
    fn config_keys_are_flags_and_map_to_the_flags_variables() {
        let text = "budget-ms = 200\ntrusted-key = [\"a.pub\", \"b.pub\"]\nallow-unsigned = true\n";
        let settings = read_config(text).unwrap().unwrap();
        assert_eq!(
            settings,
            vec![
                ("ISOMESH_ALLOW_UNSIGNED".to_string(), "true".to_string()),
                ("ISOMESH_BUDGET_MS".to_string(), "200".to_string()),
                // The flag reads ISOMESH_TRUSTED_KEYS, not ISOMESH_TRUSTED_KEY.
                (
                    "ISOMESH_TRUSTED_KEYS".to_string(),
                    "a.pub,b.pub".to_string()
                ),
            ]
        );
    }

    #[test]
    fn every_bad_line_is_reported_with_its_line_key_and_nearest_flag() {
        let text = "id = \"d1\"\n\nbudget_ms = 200\nworkers = { n = 2 }\n";
        let bad = read_config(text).unwrap().unwrap_err();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert_eq!((bad[0].line, bad[0].key.as_str()), (3, "budget_ms"));
        assert!(
            bad[0].problem.contains("did you mean `budget-ms`"),
            "{}",
            bad[0]
        );
        assert_eq!((bad[1].line, bad[1].key.as_str()), (4, "workers"));
        assert!(read_config("budget-ms = ").is_err(), "not TOML");
    }
}
