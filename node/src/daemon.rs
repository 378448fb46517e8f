//! A running node: builds every part from its settings and wires them to the broker.
//!
//! [`run`] is what `isomesh-node` calls: it opens the module directory, reads the trusted keys,
//! builds the sandbox, starts the scheduler's workers, the module manager (which first loads the
//! newest good module) and the directory watcher, the metrics endpoint on a listener the caller
//! bound, and the rollout agent, then hands everything to the [`crate::event_loop`] until
//! `shutdown` completes, and finally lets the workers finish. The node connects while its first
//! module compiles, so jobs sent to it meanwhile reach it and wait for the module.

use crate::config::NodeConfig;
use crate::event_loop::{self, LoopSettings};
use crate::executor::RolloutExecutor;
use crate::jobs::{InFlight, JobContext, JobSettings, Sessions};
use crate::manager::ModuleManager;
use crate::metrics::Metrics;
use crate::scheduler::Scheduler;
use crate::slot::{ModuleSlot, RolloutBoard};
use crate::status::StatusReporter;
use isomesh_mesh::answered::Answered;
use isomesh_mesh::relay::Relay;
use isomesh_mesh::report::Responder;
use isomesh_mesh::topics::Topics;
use isomesh_module::agent::{AgentConfig, RolloutAgent};
use isomesh_module::signing::TrustedKeys;
use isomesh_module::store::ModuleStore;
use isomesh_module::trust::ModuleTrust;
use isomesh_mqtt::login::{BrokerAddress, Login, LoginError};
use isomesh_protos::NodeStatus;
use isomesh_sandbox::{Sandbox, SandboxConfig};
use prost::Message;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, MqttOptions};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Why a node could not run.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Broker(#[from] LoginError),
    #[error(transparent)]
    Sandbox(#[from] isomesh_sandbox::LoadError),
    #[error("cannot start worker threads: {0}")]
    Workers(std::io::Error),
    #[error("module directory {path} is not usable: {source}")]
    ModuleDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    TrustedKey(#[from] isomesh_module::signing::SigningError),
    #[error("cannot watch the module directory {path}: {source}")]
    Watch {
        path: std::path::PathBuf,
        source: notify::Error,
    },
    #[error("the compiled-code cache key {} (--cache-key) must not lie inside {}: whoever writes that directory could swap it", .key.display(), .dir.display())]
    CacheKeyPlace {
        key: std::path::PathBuf,
        dir: std::path::PathBuf,
    },
    #[error("cannot serve metrics on {addr} (--metrics-listen): {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
}

/// Where the cache key is, refusing a place inside the module or cache directory: whoever may
/// write those could then swap the key together with the machine code it vouches for.
fn cache_key_file(config: &NodeConfig) -> Result<std::path::PathBuf, NodeError> {
    let path = config
        .cache_key_file()
        .map_err(isomesh_sandbox::LoadError::from)?;
    // The key file may not exist yet: compare the directory it goes in.
    let resolve = |p: &std::path::Path| p.canonicalize().unwrap_or_else(|_| p.to_owned());
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let place = resolve(parent);
    for dir in [config.modules.clone(), config.cache_dir()] {
        if place.starts_with(resolve(&dir)) {
            return Err(NodeError::CacheKeyPlace {
                key: path,
                dir: dir.clone(),
            });
        }
    }
    Ok(path)
}

/// Binds `--metrics-listen`, if given, so a wrong address stops the start instead of a later
/// scrape; give the listener to [`run`]. Port 0 picks a free port (logged).
pub async fn bind_metrics(config: &NodeConfig) -> Result<Option<TcpListener>, NodeError> {
    match &config.metrics_listen {
        Some(addr) => crate::metrics::bind(addr)
            .await
            .map(Some)
            .map_err(|source| NodeError::Metrics {
                addr: addr.clone(),
                source,
            }),
        None => Ok(None),
    }
}

/// Runs a node until `shutdown` completes, then drains and returns. `metrics` is the bound
/// listener of `--metrics-listen` ([`bind_metrics`]), if any.
pub async fn run(
    config: NodeConfig,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let members = BrokerAddress::parse_members(&config.broker)?;
    let store = ModuleStore::open(&config.modules).map_err(|source| NodeError::ModuleDir {
        path: config.modules.clone(),
        source,
    })?;
    let trusted = TrustedKeys::read(&config.trusted_keys)?;
    let trust = ModuleTrust::new(trusted.clone(), config.allow_unsigned);
    if config.allow_unsigned {
        tracing::warn!(
            "--allow-unsigned: this node runs modules nobody signed; never use it in production"
        );
    } else if trusted.is_empty() {
        tracing::warn!("no --trusted-key given: this node installs no rollouts and runs no module (give it the public key of `isomesh keygen`)");
    }
    let cache_key_file = cache_key_file(&config)?;
    let sandbox = Arc::new(Sandbox::new(SandboxConfig {
        memory_limit_bytes: config.memory_limit_mb << 20,
        call_timeout: config.call_timeout(),
        cache_dir: Some(config.cache_dir()),
        cache_key_file: Some(cache_key_file),
    })?);
    let slot = Arc::new(ModuleSlot::default());
    // The module manager loads the first module while the node connects; workers wait for it.
    slot.begin_start();
    let scheduler = Scheduler::start(config.workers, sandbox.clone(), slot.clone())
        .map_err(NodeError::Workers)?;
    let board = Arc::new(RolloutBoard::default());
    // Files found by the directory watcher (or written by a rollout) go to the manager thread.
    let (found_tx, found_rx) = std::sync::mpsc::channel();
    let (considered_tx, considered_rx) = tokio::sync::mpsc::unbounded_channel();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    ModuleManager {
        sandbox: sandbox.clone(),
        slot: slot.clone(),
        board: board.clone(),
        store: store.clone(),
        trust,
        workers: config.workers,
        keep: config.keep_modules,
    }
    .spawn(found_rx, considered_tx, started_tx)
    .map_err(NodeError::Workers)?;
    let _watch = crate::watcher::watch(&config.modules, found_tx.clone()).map_err(|source| {
        NodeError::Watch {
            path: config.modules.clone(),
            source,
        }
    })?;
    let topics = Topics::new(config.prefix.clone());
    let responder = Responder {
        node: config.id.clone(),
        tier: config.tier,
        arch: isomesh_sandbox::target::host_arch(),
    };
    let relay = Arc::new(Relay::default());
    let metrics = Arc::new(Metrics::new(
        &config.id,
        config.tier,
        scheduler.load(),
        slot.clone(),
        board.clone(),
        relay.clone(),
    ));
    let _metrics_server = metrics_listener.map(|listener| {
        AbortOnDrop(tokio::spawn(crate::metrics::serve(
            listener,
            metrics.clone(),
        )))
    });
    let limits = isomesh_protos::SandboxLimits {
        max_payload_bytes: config.max_payload_bytes as u64,
        allow_unsigned: config.allow_unsigned,
        ..sandbox.limits()
    };
    // One set of options per member of the broker (usually one); the link moves between them.
    let member_options = members
        .iter()
        .map(|member| mqtt_options(&config, &topics, member))
        .collect::<Result<Vec<_>, _>>()?;
    let (client, eventloop) = AsyncClient::new(member_options[0].clone(), 256);
    let agent = RolloutAgent::new(
        AgentConfig {
            node: config.id.clone(),
            tier: config.tier,
            topics: topics.clone(),
            trusted,
            engines: sandbox.engine_ids(),
            give_up_after: Duration::from_secs(config.fetch_timeout_s.max(1)),
        },
        store.rejected(),
    );
    let rollouts = RolloutExecutor {
        agent,
        sandbox: sandbox.clone(),
        store,
        slot: slot.clone(),
        board: board.clone(),
        client: client.clone(),
        topics: topics.clone(),
        found: found_tx,
        considered: considered_rx,
        failed: tokio::sync::mpsc::unbounded_channel(),
    };
    let status = StatusReporter {
        responder: responder.clone(),
        topics: topics.clone(),
        client: client.clone(),
        load: scheduler.load(),
        slot: slot.clone(),
        board,
        limits,
        target: sandbox.target(),
        engines: sandbox.engine_ids(),
        budget_ms: config.budget_ms,
        workers: config.workers,
        started: Instant::now(),
        published: std::cell::Cell::new(Instant::now()),
    };
    let settings = LoopSettings {
        members: members.iter().map(BrokerAddress::display).collect(),
        member_options,
        status_interval_s: config.status_interval_s,
    };
    let ctx = Arc::new(JobContext {
        responder,
        topics,
        client,
        scheduler,
        slot,
        relay,
        answered: Answered::default(),
        in_flight: InFlight::default(),
        sessions: Sessions::default(),
        metrics,
        settings: JobSettings {
            budget_ms: config.budget_ms,
            max_payload_bytes: config.max_payload_bytes,
            offload: config.offload,
            plan_share: config.plan_share,
            max_hops: config.max_hops,
            max_queue: config.max_queue,
            workers: config.workers,
            offload_grace: config.offload_grace(),
        },
    });
    event_loop::run(
        ctx.clone(),
        status,
        rollouts,
        settings,
        eventloop,
        started_rx,
        shutdown,
    )
    .await;
    let _ = tokio::task::spawn_blocking(move || ctx.scheduler.shutdown()).await;
    tracing::info!("node stopped");
    Ok(())
}

/// Stops a background task when the node stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn mqtt_options(
    config: &NodeConfig,
    topics: &Topics,
    broker: &BrokerAddress,
) -> Result<MqttOptions, NodeError> {
    let login = Login {
        username: config.username.clone(),
        password: config.password.clone(),
        ca_file: config.ca_file.clone(),
        cert_file: config.cert_file.clone(),
        key_file: config.key_file.clone(),
    };
    let mut options = broker.options(
        &format!("isomesh-node-{}", config.id),
        &login,
        Some(&config.id),
    )?;
    options
        .set_keep_alive(Duration::from_secs(15))
        // A persistent session: jobs not yet acknowledged survive a crash of this node.
        .set_clean_start(false)
        .set_session_expiry_interval(Some(config.session_expiry_s))
        .set_manual_acks(true)
        // Back-pressure: the broker holds further jobs until earlier ones are answered.
        .set_receive_maximum(Some(config.receive_maximum.max(1)))
        // Sized for the largest image or module chunk plus 1 MiB (`NodeConfig::mqtt_packet_limit`),
        // not hundreds of MiB: whatever this allows, a peer may make the node buffer. An image a
        // little over --max-payload-bytes still arrives and gets an error answer; the broker
        // drops (MQTT 5) what exceeds the limit itself.
        .set_max_packet_size(Some(config.mqtt_packet_limit()))
        .set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
            topics.status(&config.id),
            NodeStatus {
                node_id: config.id.clone(),
                tier: config.tier as i32,
                online: false,
                ..Default::default()
            }
            .encode_to_vec(),
            QoS::AtLeastOnce,
            true,
            None,
        ));
    Ok(options)
}
