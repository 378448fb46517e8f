//! A running node: wires the sandbox, module manager and scheduler to the broker.
//!
//! [`run`] owns the MQTT event loop (as rumqttc's `EventLoop` owns connection state): incoming
//! publishes become requests, each request becomes a task that waits for the scheduler's outcome,
//! publishes the one answer, and only then acknowledges the MQTT message. A node that dies
//! before answering therefore leaves the job unacknowledged in its persistent session, and the
//! broker hands it over again when the node is back.
//!
//! Shutdown (SIGTERM, Ctrl-C, or the caller's future): leave the tier's shared subscription, answer
//! every job already accepted, publish an offline status, disconnect. Jobs addressed to the node
//! itself wait in its persistent session for its return.

use crate::answered::Answered;
use crate::config::NodeConfig;
use crate::link::Link;
use crate::login::{BrokerAddress, Login};
use crate::metrics::Metrics;
use crate::modules::{self, Considered, ModuleManager, ModuleSlot, RolloutBoard};
use crate::offload::{self, Decision, Situation};
use crate::package;
use crate::peers::Peers;
use crate::relay::{Delivery, Relay};
use crate::report::{self, Responder};
use crate::request::{self, JobIds, ReplyRoute, Request};
use crate::rollout::{self, Action, AgentConfig, Reseed, RolloutAgent};
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::scheduler::{JobFailure, Outcome, Scheduler};
use crate::signing::TrustedKeys;
use crate::topics::Topics;
use crate::trust::ModuleTrust;
use isomesh_protos::{hop, Job, JobResult, ModuleRef, NodeStatus, Tier};
use prost::Message;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Packet, PubAckReason, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// Largest MQTT packet this node accepts; bigger images get an error answer, not silence.
const MQTT_PACKET_LIMIT: u32 = 256 << 20;

/// Job ids remembered to drop redelivered duplicates.
const RECENT_JOB_IDS: usize = 4096;

/// Why a node could not run.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::LoadError),
    #[error("cannot start worker threads: {0}")]
    Workers(std::io::Error),
    #[error("module directory {path} is not usable: {source}")]
    ModuleDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    TrustedKey(#[from] crate::signing::SigningError),
    #[error("cannot watch the module directory {path}: {source}")]
    Watch {
        path: std::path::PathBuf,
        source: notify::Error,
    },
    #[error("cannot serve metrics on {addr} (--metrics-listen): {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
}

/// What every request task needs.
struct Shared {
    responder: Responder,
    topics: Topics,
    client: AsyncClient,
    scheduler: Scheduler,
    slot: Arc<ModuleSlot>,
    /// Forwarded jobs waiting for their answer from above.
    relay: Arc<Relay>,
    /// Answers given lately, for users who ask again.
    answered: Answered,
    /// Counters served on `--metrics-listen`.
    metrics: Arc<Metrics>,
    /// What modules may do here, as statuses publish it.
    limits: isomesh_protos::SandboxLimits,
    config: NodeConfig,
}

/// Runs a node until `shutdown` completes, then drains and returns.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    let broker = BrokerAddress::parse(&config.broker).map_err(NodeError::Config)?;
    std::fs::create_dir_all(&config.modules).map_err(|source| NodeError::ModuleDir {
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
    let sandbox = Arc::new(Sandbox::new(SandboxConfig {
        memory_limit_bytes: config.memory_limit_mb << 20,
        call_timeout: config.call_timeout(),
        cache_dir: Some(config.cache_dir()),
    })?);
    let slot = Arc::new(ModuleSlot::default());
    let loading = {
        let (sandbox, trust, dir) = (sandbox.clone(), trust.clone(), config.modules.clone());
        tokio::task::spawn_blocking(move || modules::load_newest(&sandbox, &trust, &dir))
    };
    match loading.await {
        Ok(Some(module)) => slot.install(module),
        _ => tracing::warn!(
            dir = %config.modules.display(),
            "no usable classifier module yet; jobs get an error answer until one is installed"
        ),
    }
    let scheduler = Scheduler::start(config.workers, sandbox.clone(), slot.clone())
        .map_err(NodeError::Workers)?;
    let board = Arc::new(RolloutBoard::default());
    // Files found by the directory watcher (or written by a rollout) go to the manager thread.
    let (found_tx, found_rx) = std::sync::mpsc::channel();
    let (considered_tx, considered_rx) = tokio::sync::mpsc::unbounded_channel();
    ModuleManager {
        sandbox: sandbox.clone(),
        slot: slot.clone(),
        board: board.clone(),
        dir: config.modules.clone(),
        trust,
        workers: config.workers,
        keep: config.keep_modules,
    }
    .spawn(found_rx, considered_tx)
    .map_err(NodeError::Workers)?;
    let _watch = crate::watcher::watch(&config.modules, found_tx.clone()).map_err(|source| {
        NodeError::Watch {
            path: config.modules.clone(),
            source,
        }
    })?;
    let topics = Topics::new(config.prefix.clone());
    let agent = RolloutAgent::new(
        AgentConfig {
            node: config.id.clone(),
            tier: config.tier,
            topics: topics.clone(),
            trusted,
            dir: config.modules.clone(),
            give_up_after: Duration::from_secs(config.fetch_timeout_s.max(1)),
        },
        sandbox.clone(),
        slot.clone(),
        board.clone(),
    );
    let rollouts = Rollouts {
        agent,
        sandbox: sandbox.clone(),
        found: found_tx,
        considered: considered_rx,
        finished: tokio::sync::mpsc::unbounded_channel(),
    };
    let responder = Responder {
        node: config.id.clone(),
        tier: config.tier,
    };
    let relay = Arc::new(Relay::default());
    let metrics = Arc::new(Metrics::new(
        &config.id,
        config.tier,
        scheduler.load(),
        slot.clone(),
        relay.clone(),
    ));
    // Bound before connecting, so a wrong address stops the start instead of a later scrape.
    let _metrics_server = match &config.metrics_listen {
        Some(addr) => {
            let listener =
                crate::metrics::bind(addr)
                    .await
                    .map_err(|source| NodeError::Metrics {
                        addr: addr.clone(),
                        source,
                    })?;
            Some(AbortOnDrop(tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
            ))))
        }
        None => None,
    };
    let limits = isomesh_protos::SandboxLimits {
        max_payload_bytes: config.max_payload_bytes as u64,
        allow_unsigned: config.allow_unsigned,
        ..sandbox.limits()
    };
    let (client, eventloop) = AsyncClient::new(mqtt_options(&config, &topics, &broker)?, 256);
    let shared = Arc::new(Shared {
        responder,
        topics,
        client,
        scheduler,
        slot,
        relay,
        answered: Answered::default(),
        metrics,
        limits,
        config,
    });
    let status = StatusReporter {
        shared: shared.clone(),
        board,
        started: Instant::now(),
        published: std::cell::Cell::new(Instant::now()),
    };
    event_loop(shared.clone(), status, rollouts, eventloop, shutdown).await;
    let scheduler_done = {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || shared.scheduler.shutdown())
    };
    let _ = scheduler_done.await;
    tracing::info!("node stopped");
    Ok(())
}

/// A broker URL fit for logs: without its password.
fn redacted(url: &str) -> String {
    BrokerAddress::parse(url).map_or_else(|_| url.to_string(), |a| a.display())
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
    let mut options = broker
        .options(
            &format!("isomesh-node-{}", config.id),
            &login,
            Some(&config.id),
        )
        .map_err(NodeError::Config)?;
    options
        .set_keep_alive(Duration::from_secs(15))
        // A persistent session: jobs not yet acknowledged survive a crash of this node.
        .set_clean_start(false)
        .set_session_expiry_interval(Some(config.session_expiry_s))
        .set_manual_acks(true)
        // Back-pressure: the broker holds further jobs until earlier ones are answered.
        .set_receive_maximum(Some(config.receive_maximum.max(1)))
        // Far above --max-payload-bytes: an MQTT 5 broker silently drops what exceeds the
        // client's packet limit, and an oversized image must get an error answer instead.
        .set_max_packet_size(Some(MQTT_PACKET_LIMIT))
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

/// The rollout side of the event loop: the agent and the channels of its background work.
struct Rollouts {
    agent: RolloutAgent,
    sandbox: Arc<Sandbox>,
    /// To the module manager: a module file to consider.
    found: std::sync::mpsc::Sender<std::path::PathBuf>,
    /// From the module manager: a file was served or rejected.
    considered: tokio::sync::mpsc::UnboundedReceiver<Considered>,
    /// From install tasks: a fetched module could not be written.
    finished: (
        tokio::sync::mpsc::UnboundedSender<InstallFailure>,
        tokio::sync::mpsc::UnboundedReceiver<InstallFailure>,
    ),
}

/// A fetched module that could not be installed, and why.
type InstallFailure = (ModuleRef, String);

impl Rollouts {
    /// Carries out what the agent asked for.
    fn apply(&self, shared: &Arc<Shared>, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Subscribe(topic) => {
                    if let Err(e) = shared.client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                        tracing::warn!(%topic, error = %e, "cannot subscribe to a module chunk");
                    }
                }
                Action::Unsubscribe(topic) => {
                    let _ = shared.client.try_unsubscribe(topic);
                }
                Action::Install(fetch) => {
                    let module = rollout::module_ref(&fetch.manifest);
                    let failed_module = module.clone();
                    let (sandbox, dir) = (self.sandbox.clone(), shared.config.modules.clone());
                    let (found, finished) = (self.found.clone(), self.finished.0.clone());
                    // A thread of its own: it runs at background priority.
                    let spawned = std::thread::Builder::new()
                        .name("module-install".into())
                        .spawn(move || {
                            modules::background_priority();
                            match rollout::install(*fetch, &dir, &sandbox) {
                                // Straight to the manager: no need to wait for the watcher's event.
                                Ok(path) => {
                                    let _ = found.send(path);
                                }
                                Err(reason) => {
                                    let _ = finished.send((module, reason));
                                }
                            }
                        });
                    if let Err(e) = spawned {
                        let reason = format!("cannot start a thread to install the module: {e}");
                        let _ = self.finished.0.send((failed_module, reason));
                    }
                }
                Action::Reseed(reseed) => {
                    tokio::spawn(reseed_module(shared.clone(), *reseed));
                }
            }
        }
    }
}

/// Publishes a module's chunks (and its precompiled artifact's), then its manifest, retained.
async fn reseed_module(shared: Arc<Shared>, reseed: Reseed) {
    let manifest = reseed.manifest;
    let read = |path: std::path::PathBuf| tokio::fs::read(path);
    let module = match read(reseed.module.clone()).await {
        Ok(bytes) if crate::sandbox::sha256_hex(&bytes) == manifest.sha256 => bytes,
        _ => {
            tracing::warn!(file = %reseed.module.display(), "module file changed; not re-seeding it");
            return;
        }
    };
    let mut blobs = vec![module];
    if let Some((artifact, path)) = reseed.artifact {
        // The cache may hold code compiled here rather than the published artifact: only the
        // published bytes match the manifest.
        if let Ok(code) = read(path).await {
            if crate::sandbox::sha256_hex(&code) == artifact.sha256 {
                blobs.push(code);
            }
        }
    }
    let started = Instant::now();
    let mut chunks = 0;
    for blob in &blobs {
        let (_, pieces) = package::cut(blob, manifest.chunk_size, &manifest.encoding);
        for chunk in pieces {
            let topic = shared.topics.chunk(&chunk.sha256, chunk.index);
            chunks += 1;
            if let Err(e) = shared
                .client
                .publish(topic, QoS::AtLeastOnce, true, chunk.encode_to_vec())
                .await
            {
                tracing::error!(error = %e, "re-seeding stopped: cannot publish a chunk");
                return;
            }
        }
    }
    let topic = shared.topics.manifest(&manifest.name);
    match shared
        .client
        .publish(topic, QoS::AtLeastOnce, true, manifest.encode_to_vec())
        .await
    {
        Ok(()) => tracing::info!(
            module = %format!("{}@{}", manifest.name, manifest.version),
            chunks,
            ms = started.elapsed().as_millis() as u64,
            "module re-seeded on the broker"
        ),
        Err(e) => tracing::error!(error = %e, "re-seeding stopped: cannot publish the manifest"),
    }
}

async fn event_loop(
    shared: Arc<Shared>,
    status: StatusReporter,
    mut rollouts: Rollouts,
    eventloop: EventLoop,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut link = Link::spawn(eventloop);
    let ids = JobIds::new(&shared.responder.node);
    let mut recent = RecentIds::default();
    let mut peers = Peers::new(Duration::from_secs(
        (3 * shared.config.status_interval_s).max(15),
    ));
    let relay_topic = shared.topics.relay(&shared.responder.node);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut status_tick =
        tokio::time::interval(Duration::from_secs(shared.config.status_interval_s.max(1)));
    let mut rollout_tick = tokio::time::interval(Duration::from_millis(250));
    let mut draining = false;
    loop {
        tokio::select! {
            _ = &mut shutdown, if !draining => {
                draining = true;
                tracing::info!(pending = tasks.len(), "shutting down: answering accepted jobs first");
                // The tier's other nodes take its shared jobs from now on. Jobs addressed to this
                // node stay subscribed: the broker keeps them in this node's session until it is
                // back (a restart, an update), and messages that arrive now are left unacknowledged
                // for the same reason.
                let _ = shared
                    .client
                    .try_unsubscribe(shared.topics.shared_tier_jobs(shared.responder.tier));
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {
                // Keep the retained load figures fresh while jobs flow, at most once a second,
                // and always when the last job is done so an idle node does not show a queue.
                if tasks.is_empty() || status.last_published().elapsed() >= Duration::from_secs(1) {
                    status.publish(true);
                }
            }
            _ = status_tick.tick() => status.publish(true),
            _ = status.board.changed.notified() => status.publish(!draining),
            _ = rollout_tick.tick(), if !draining => {
                let actions = rollouts.agent.on_tick();
                rollouts.apply(&shared, actions);
            }
            Some(considered) = rollouts.considered.recv() => match considered {
                Considered::Served(module) => rollouts.agent.install_finished(
                    ModuleRef { name: module.info.name.clone(), version: module.info.version.clone(), sha256: module.sha256.clone() },
                    None,
                ),
                Considered::Rejected { module, .. } => rollouts.agent.install_finished(module, None),
                Considered::Skipped => {}
            },
            Some((module, reason)) = rollouts.finished.1.recv() => {
                rollouts.agent.install_finished(module, Some(reason));
            }
            Some(event) = link.next() => match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    tracing::info!(broker = %redacted(&shared.config.broker), session_present = ack.session_present, "connected");
                    if !draining {
                        for (filter, qos) in subscriptions(&shared) {
                            if let Err(e) = shared.client.try_subscribe(filter.clone(), qos) {
                                tracing::error!(%filter, error = %e, "cannot subscribe");
                            }
                        }
                        let actions = rollouts.agent.on_connected();
                        rollouts.apply(&shared, actions);
                    }
                    status.publish(true);
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) if ack.reason == PubAckReason::NotAuthorized => {
                    tracing::warn!(reason = ?ack.properties.and_then(|p| p.reason_string), "the broker's ACL refused a publish of this node (an answer to a reply topic outside isomesh/results/, isomesh/replies/ or isomesh/relay/, or a module republished without the rollout role)");
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) if ack.return_codes.contains(&SubscribeReasonCode::NotAuthorized) => {
                    tracing::error!(codes = ?ack.return_codes, "the broker's ACL refused a subscription of this node: give its account the node role (deploy/acl.conf)");
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                    // Answers from above and the mesh's statuses count while draining too: jobs
                    // forwarded before the shutdown are still waiting for them.
                    if topic == relay_topic {
                        take_relayed(&shared, &publish.payload);
                        continue;
                    }
                    if let Some(node) = shared.topics.status_of(&topic) {
                        peers.heard(node, read_status(node, &publish.payload));
                        continue;
                    }
                    if draining {
                        // Not acknowledged: the broker keeps it for this node's next session.
                        continue;
                    }
                    if shared.topics.is_module_topic(&topic) {
                        // Retained: nothing is lost by acknowledging before handling.
                        let _ = shared.client.try_ack(&publish);
                        let actions = rollouts.agent.on_publish(&topic, &publish.payload);
                        rollouts.apply(&shared, actions);
                        continue;
                    }
                    if let Some(accepted) = accept(&shared, &ids, &mut recent, &peers, &publish) {
                        tasks.spawn(serve(shared.clone(), accepted, publish));
                    } else {
                        let _ = shared.client.try_ack(&publish);
                    }
                }
                Ok(_) => {}
                // The link pauses before it connects again; jobs keep running meanwhile.
                Err(rumqttc::v5::ConnectionError::ConnectionRefused(
                    code @ (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized),
                )) => {
                    tracing::error!(broker = %redacted(&shared.config.broker), ?code, "the broker refused this node's login: check --username/--password ($ISOMESH_USERNAME/$ISOMESH_PASSWORD) against the broker's password file; retrying in 5 s");
                }
                Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                    tracing::error!(broker = %redacted(&shared.config.broker), ?code, "the broker refused this node's connection; retrying in 5 s");
                }
                Err(e) => {
                    tracing::warn!(broker = %redacted(&shared.config.broker), error = %e, "broker connection lost; retrying in 1 s");
                }
            }
        }
        if draining && tasks.is_empty() {
            break;
        }
    }
    status.publish(false);
    // Every answer and the offline status acknowledged, then the DISCONNECT.
    link.close(&shared.client, Duration::from_secs(5)).await;
}

fn subscriptions(shared: &Shared) -> Vec<(String, QoS)> {
    let node = &shared.responder.node;
    vec![
        (shared.topics.images(node), QoS::AtLeastOnce),
        (shared.topics.jobs(node), QoS::AtLeastOnce),
        (
            shared.topics.shared_tier_jobs(shared.responder.tier),
            QoS::AtLeastOnce,
        ),
        (shared.topics.all_manifests(), QoS::AtLeastOnce),
        // QoS 0 on purpose. Results from above must not wait behind the jobs that occupy this
        // node's Receive Maximum (those jobs wait for these very results); and one lost result
        // costs a run here after the grace period, never the job.
        (shared.topics.relay(node), QoS::AtMostOnce),
        (shared.topics.all_status(), QoS::AtMostOnce),
    ]
}

/// Hands a result from the tier above to the forwarded job waiting for it.
fn take_relayed(shared: &Shared, payload: &[u8]) {
    match JobResult::decode(payload) {
        Ok(result) => {
            let (job_id, node) = (result.job_id.clone(), result.node.clone());
            if shared.relay.deliver(result) == Delivery::Unclaimed {
                tracing::info!(%job_id, from = %node, "answer from above for a job already answered; dropped");
            }
        }
        Err(e) => tracing::warn!(error = %e, "unreadable result on the relay topic; dropped"),
    }
}

/// A node's status, or `None` for a cleared (or unreadable) one.
fn read_status(node: &str, payload: &[u8]) -> Option<NodeStatus> {
    if payload.is_empty() {
        return None;
    }
    NodeStatus::decode(payload)
        .map_err(
            |e| tracing::warn!(%node, error = %e, "unreadable node status; ignoring that node"),
        )
        .ok()
}

/// A request and how it will be served, decided as it arrived.
struct Accepted {
    request: Request,
    plan: Plan,
    at: Instant,
}

enum Plan {
    /// Queued here; the receiver yields the outcome.
    Run(oneshot::Receiver<Outcome>),
    /// To be published to this tier's shared job topic.
    Forward(Tier),
}

/// What the offload policy needs to know about `job` here and now.
fn situation(shared: &Shared, peers: &Peers, job: &Job) -> Situation {
    let load = shared.scheduler.load();
    let module = shared.slot.current();
    // Until a job has run here, the self-test's timing stands in for the service time.
    let ewma_ms = match load.ewma_ms() {
        ewma if ewma > 0.0 => ewma,
        _ => module
            .as_ref()
            .map(|m| m.self_test_service.as_secs_f64() * 1000.0)
            .unwrap_or(0.0),
    };
    Situation {
        budget_ms: job.budget_ms,
        hops: job.hops,
        max_hops: shared.config.max_hops,
        local: offload::Load {
            in_system: load.in_system(),
            workers: shared.config.workers,
            ewma_ms,
            deviation_ms: load.deviation_ms(),
        },
        parent: peers.parent(shared.responder.tier, shared.relay.outstanding()),
        cannot_serve: module.is_none_or(|m| !m.matches(&job.module_version)),
    }
}

/// Turns a publish into a request, or answers it at once when it cannot be one. `None` means
/// nothing is left to do but acknowledge it.
fn accept(
    shared: &Arc<Shared>,
    ids: &JobIds,
    recent: &mut RecentIds,
    peers: &Peers,
    publish: &Publish,
) -> Option<Accepted> {
    let at = Instant::now();
    let topic = String::from_utf8_lossy(&publish.topic);
    let node = &shared.responder.node;
    let props = publish.properties.as_ref();
    let mut request = if topic == shared.topics.images(node) {
        request::from_image(
            publish.payload.clone(),
            props.and_then(|p| p.response_topic.clone()),
            props.and_then(|p| p.correlation_data.clone()),
            ids,
            &shared.topics,
            node,
        )
    } else {
        match request::from_job(&publish.payload, ids, &shared.topics, node) {
            Ok(request) => request,
            Err(unreadable) => {
                tracing::warn!(%topic, error = %unreadable.message, "unreadable job");
                let result =
                    report::rejection(&shared.responder, &unreadable.job, unreadable.message);
                shared.metrics.answered(&result);
                send_reply(&shared.client, &unreadable.reply, &result);
                return None;
            }
        }
    };
    if !recent.insert(&request.job.job_id) {
        // A new publish (no DUP flag) of a job answered before: the user asks again, having
        // lost the answer (a broker restarted); see `answered`.
        if let Some(mut result) = (!publish.dup)
            .then(|| shared.answered.get(&request.job.job_id))
            .flatten()
        {
            tracing::info!(job_id = %request.job.job_id, "job asked again; sending its answer again");
            result.correlation = request.job.correlation.clone();
            send_reply(&shared.client, &request.reply, &result);
            return None;
        }
        tracing::info!(job_id = %request.job.job_id, "duplicate delivery of a job already taken; ignored");
        return None;
    }
    if request.job.image.len() > shared.config.max_payload_bytes {
        let message = format!(
            "image of {} bytes exceeds this node's limit of {} bytes (--max-payload-bytes)",
            request.job.image.len(),
            shared.config.max_payload_bytes
        );
        reject(shared, &request, message);
        return None;
    }
    if request.job.budget_ms == 0 {
        request.job.budget_ms = shared.config.budget_ms;
    }
    let situation = situation(shared, peers, &request.job);
    let plan = match offload::decide(shared.config.offload, &situation) {
        Decision::Run(_) if situation.local.in_system >= shared.config.max_queue => {
            let message = format!(
                "node {node} is overloaded: {} jobs are queued (--max-queue); send the job again \
                 later or to its tier",
                situation.local.in_system
            );
            reject(shared, &request, message);
            return None;
        }
        Decision::Run(reason) => {
            tracing::debug!(job_id = %request.job.job_id, reason = reason.describe(), "running the job here");
            // Queued now, not in the task, so the next job's decision sees this one in the queue.
            let job = &mut request.job;
            let image = std::mem::take(&mut job.image);
            Plan::Run(
                shared
                    .scheduler
                    .submit(image, job.top_k, job.module_version.clone()),
            )
        }
        Decision::Forward(tier, reason) => {
            tracing::info!(
                job_id = %request.job.job_id,
                to = tier.name(),
                reason = reason.describe(),
                budget_ms = request.job.budget_ms,
                estimate_ms = situation.local.estimate_ms().unwrap_or_default(),
                "forwarding the job up"
            );
            Plan::Forward(tier)
        }
    };
    Some(Accepted { request, plan, at })
}

/// Answers `request` with an error at once, from the event loop.
fn reject(shared: &Shared, request: &Request, message: String) {
    let result = report::rejection(&shared.responder, &request.job, message);
    shared.metrics.answered(&result);
    send_reply(&shared.client, &request.reply, &result);
}

/// Runs one request to its single answer, here or above, then acknowledges the message that
/// carried it.
async fn serve(shared: Arc<Shared>, accepted: Accepted, publish: Publish) {
    let Accepted { request, plan, at } = accepted;
    let result = match plan {
        Plan::Run(outcome) => run_here(&shared, &request.job, outcome, at, hop::Action::Ran).await,
        Plan::Forward(tier) => {
            shared.metrics.offloaded(tier);
            forward(&shared, &request.job, tier, at).await
        }
    };
    if result.error.is_empty() {
        tracing::info!(
            job_id = %result.job_id,
            ran_on = %result.node,
            top1 = %result.top.first().map(|c| c.label.as_str()).unwrap_or(""),
            ms = result.timing.map(|t| t.total_ms).unwrap_or_default(),
            deadline_met = result.deadline_met,
            "classified"
        );
    } else {
        tracing::warn!(job_id = %result.job_id, node = %result.node, error = %result.error, "job failed");
    }
    publish_reply(&shared.client, &request.reply, &result).await;
    shared.metrics.answered(&result);
    shared.answered.insert(&result);
    if let Err(e) = shared.client.ack(&publish).await {
        tracing::warn!(error = %e, "cannot acknowledge a job message");
    }
}

/// Waits for a job queued here and makes its answer.
async fn run_here(
    shared: &Shared,
    job: &Job,
    outcome: oneshot::Receiver<Outcome>,
    accepted: Instant,
    action: hop::Action,
) -> JobResult {
    let outcome = outcome.await.unwrap_or_else(|_| {
        Err(JobFailure {
            message: "the worker running this job stopped before answering".into(),
            module: None,
        })
    });
    let total = accepted.elapsed();
    let mut result = report::job_result(&shared.responder, job, &outcome, total);
    result.hops.push(report::hop(
        &shared.responder,
        action,
        total,
        total,
        job.budget_ms,
    ));
    result
}

/// Publishes `job` to `tier` and waits for its answer; runs it here if none comes within its
/// remaining budget plus `--offload-grace-ms`, and then takes whichever answer is first.
async fn forward(shared: &Shared, job: &Job, tier: Tier, accepted: Instant) -> JobResult {
    let me = &shared.responder.node;
    let mut up = job.clone();
    up.hops += 1;
    up.path.push(me.clone());
    up.reply_to = shared.topics.relay(me);
    let remaining = remaining_budget(job.budget_ms, accepted.elapsed());
    // The tier above gets what is left once the trip there and back is paid for.
    let transit = shared.relay.transit_ms(tier) as u32;
    up.budget_ms = match remaining {
        0 => 0,
        left => left.saturating_sub(transit).max(1),
    };
    let mut awaited = shared.relay.expect(&job.job_id);
    let sent = shared
        .client
        .publish(
            shared.topics.tier_jobs(tier),
            QoS::AtLeastOnce,
            false,
            up.encode_to_vec(),
        )
        .await;
    let held = accepted.elapsed();
    let mut above_open = true;
    match sent {
        Ok(()) => {
            let patience = Duration::from_millis(remaining.into()) + shared.config.offload_grace();
            match tokio::time::timeout(patience, &mut awaited.result).await {
                Ok(Ok(result)) => {
                    if let Some(above) = result.hops.first() {
                        let above = Duration::from_secs_f64(above.total_ms.max(0.0) / 1000.0);
                        shared
                            .relay
                            .record_transit(tier, accepted.elapsed() - held, above);
                    }
                    let this = report::hop(
                        &shared.responder,
                        hop::Action::Forwarded,
                        held,
                        accepted.elapsed(),
                        job.budget_ms,
                    );
                    return report::relayed(result, this);
                }
                Ok(Err(_)) => above_open = false,
                Err(_) => {}
            }
            tracing::warn!(
                job_id = %job.job_id,
                tier = tier.name(),
                waited_ms = patience.as_millis() as u64,
                "no answer from the tier above in time; running the job here"
            );
        }
        Err(e) => {
            above_open = false;
            tracing::warn!(job_id = %job.job_id, error = %e, "cannot forward the job; running it here");
        }
    }
    let outcome = shared
        .scheduler
        .submit(job.image.clone(), job.top_k, job.module_version.clone());
    let here = run_here(shared, job, outcome, accepted, hop::Action::Fallback);
    tokio::pin!(here);
    // A late answer from above still counts if it beats the run here.
    tokio::select! {
        Ok(result) = &mut awaited.result, if above_open => {
            let this = report::hop(&shared.responder, hop::Action::Forwarded, held, accepted.elapsed(), job.budget_ms);
            report::relayed(result, this)
        }
        result = &mut here => result,
    }
}

/// What is left of a budget after `spent` here; a job with a budget keeps one (1 ms at least),
/// so it is still judged against a deadline above.
fn remaining_budget(budget_ms: u32, spent: Duration) -> u32 {
    if budget_ms == 0 {
        return 0;
    }
    let spent = u32::try_from(spent.as_millis()).unwrap_or(u32::MAX);
    budget_ms.saturating_sub(spent).max(1)
}

fn encode_reply(route: &ReplyRoute, result: &JobResult) -> (Vec<u8>, Option<PublishProperties>) {
    match route {
        ReplyRoute::Json { .. } => {
            let props = (!result.correlation.is_empty()).then(|| PublishProperties {
                correlation_data: Some(result.correlation.clone().into()),
                content_type: Some("application/json".into()),
                ..Default::default()
            });
            (report::to_json(result).to_string().into_bytes(), props)
        }
        ReplyRoute::Proto { .. } => (result.encode_to_vec(), None),
    }
}

async fn publish_reply(client: &AsyncClient, route: &ReplyRoute, result: &JobResult) {
    let (payload, props) = encode_reply(route, result);
    let sent = match props {
        Some(props) => {
            client
                .publish_with_properties(route.topic(), QoS::AtLeastOnce, false, payload, props)
                .await
        }
        None => {
            client
                .publish(route.topic(), QoS::AtLeastOnce, false, payload)
                .await
        }
    };
    if let Err(e) = sent {
        tracing::error!(topic = route.topic(), error = %e, "cannot publish a result");
    }
}

/// Like [`publish_reply`] but from the event loop itself, which must never wait on its own queue.
fn send_reply(client: &AsyncClient, route: &ReplyRoute, result: &JobResult) {
    let (payload, props) = encode_reply(route, result);
    let sent = match props {
        Some(props) => client.try_publish_with_properties(
            route.topic(),
            QoS::AtLeastOnce,
            false,
            payload,
            props,
        ),
        None => client.try_publish(route.topic(), QoS::AtLeastOnce, false, payload),
    };
    if let Err(e) = sent {
        tracing::error!(topic = route.topic(), error = %e, "cannot publish an error result");
    }
}

/// Publishes this node's retained status.
struct StatusReporter {
    shared: Arc<Shared>,
    board: Arc<RolloutBoard>,
    started: Instant,
    /// When the last status went out.
    published: std::cell::Cell<Instant>,
}

impl StatusReporter {
    fn last_published(&self) -> Instant {
        self.published.get()
    }

    fn publish(&self, online: bool) {
        self.published.set(Instant::now());
        let load = self.shared.scheduler.load();
        let module = self.shared.slot.current().map(|m| ModuleRef {
            name: m.info.name.clone(),
            version: m.info.version.clone(),
            sha256: m.sha256.clone(),
        });
        let status = NodeStatus {
            node_id: self.shared.responder.node.clone(),
            tier: self.shared.responder.tier as i32,
            online,
            module,
            queue_len: load.in_system() as u32,
            ewma_ms: load.ewma_ms(),
            jobs_done: load.done(),
            jobs_failed: load.failed(),
            uptime_s: self.started.elapsed().as_secs(),
            budget_ms: self.shared.config.budget_ms,
            workers: self.shared.config.workers as u32,
            rollout: self.board.get(),
            sandbox: Some(self.shared.limits.clone()),
        };
        let topic = self.shared.topics.status(&self.shared.responder.node);
        if let Err(e) =
            self.shared
                .client
                .try_publish(topic, QoS::AtLeastOnce, true, status.encode_to_vec())
        {
            tracing::debug!(error = %e, "status not published");
        }
    }
}

/// The last [`RECENT_JOB_IDS`] job ids taken, to recognise redeliveries.
#[derive(Default)]
struct RecentIds {
    order: VecDeque<String>,
    seen: HashSet<String>,
}

impl RecentIds {
    /// `false` if `id` was already taken.
    fn insert(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        self.seen.insert(id.to_string());
        self.order.push_back(id.to_string());
        if self.order.len() > RECENT_JOB_IDS {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}
