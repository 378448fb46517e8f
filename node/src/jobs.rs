//! The job pipeline of a node: from an accepted MQTT message to its one answer.
//!
//! The event loop calls [`accept`] for every job message, in arrival order: it reads the request,
//! recognises a copy of a job taken already (see [`Taken`]), refuses an oversized image or an
//! overloaded queue with an error answer, and asks the offload policy where the job runs,
//! queueing it here at once so the next decision sees it. Then a task per job runs [`serve`]: it
//! waits for the outcome here or the answer from the tier above (the job stays owned by this node
//! in the relay, and runs here after all when no answer comes in time), publishes the one answer,
//! and only then acknowledges the message. Error answers go the same way ([`answer_now`]), and a
//! redelivered copy of a job still running is acknowledged only with that job's answer. A node
//! that dies before answering therefore leaves every copy of the job unacknowledged in its
//! persistent session, and the broker hands it over again when the node is back.
//!
//! A job is known by its reply topic and id ([`Request::key`]): ids are the sender's choice, so
//! two senders may pick the same one, and each must get the answer to its own job.

use crate::metrics::Metrics;
use crate::replies::publish_reply;
use crate::scheduler::Scheduler;
use crate::slot::ModuleSlot;
use isomesh_mesh::answered::Answered;
use isomesh_mesh::offload::{self, remaining_budget, Decision, Policy, Reason, Situation};
use isomesh_mesh::outcome::{JobFailure, Outcome};
use isomesh_mesh::peers::Peers;
use isomesh_mesh::recent::RecentIds;
use isomesh_mesh::relay::{Awaited, Delivery, Relay, TOKEN_BYTES};
use isomesh_mesh::report::{self, Responder};
use isomesh_mesh::request::{self, JobIds, ReplyRoute, Request};
use isomesh_mesh::topics::Topics;
use isomesh_protos::{hop, Job, JobResult, Tier};
use prost::Message;
use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What the job pipeline needs: shared by the event loop and every job task.
pub struct JobContext {
    /// Who answers: copied into every result.
    pub responder: Responder,
    pub topics: Topics,
    /// The broker connection; the link task polls its event loop.
    pub client: AsyncClient,
    /// The queue and the workers that run jobs here.
    pub scheduler: Scheduler,
    /// The module the next job runs on.
    pub slot: Arc<ModuleSlot>,
    /// Forwarded jobs waiting for their answer from above.
    pub relay: Arc<Relay>,
    /// Answers given lately, for users who ask again.
    pub answered: Answered,
    /// Jobs taken and not answered yet, with the copies of them that arrived meanwhile.
    pub in_flight: InFlight,
    /// The broker session job messages arrive in.
    pub sessions: Sessions,
    /// Counters served on `--metrics-listen`.
    pub metrics: Arc<Metrics>,
    pub settings: JobSettings,
}

/// The node settings that shape how jobs are taken and placed.
#[derive(Debug, Clone)]
pub struct JobSettings {
    /// Budget of a job that names none, ms (0 = none).
    pub budget_ms: u32,
    pub max_payload_bytes: usize,
    pub offload: Policy,
    /// The share of a job's budget this node plans to finish it within (`--plan-share`).
    pub plan_share: f64,
    pub max_hops: u32,
    /// Jobs in the node at most before a job that would run here is refused.
    pub max_queue: usize,
    pub workers: usize,
    /// How long past its remaining budget a forwarded job may take before it runs here.
    pub offload_grace: Duration,
}

/// A job message as it arrived, with the broker session it arrived in: its acknowledgement
/// means something only in that session. After the node moves to a broker (a cluster's other
/// member, or one restarted without persistence) that does not have its session, a PUBACK with
/// the old packet id would acknowledge whatever the new session numbered so, maybe a job not
/// yet answered. The job is still answered; the sender, who owns it end to end, is the one who
/// asks again for what that broker lost.
#[derive(Debug, Clone)]
pub struct JobMessage {
    pub publish: Publish,
    pub session: u64,
}

/// The broker sessions this node has had: a new number each time the broker starts one afresh
/// (a CONNACK without `session_present`).
#[derive(Default)]
pub struct Sessions(std::sync::atomic::AtomicU64);

impl Sessions {
    /// The session messages arrive in now.
    pub fn current(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The broker started a new session: messages of the earlier ones are not to be
    /// acknowledged any more.
    pub fn renew(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Acknowledges `message` if its session is still the broker's.
async fn ack(ctx: &JobContext, message: &JobMessage) {
    if message.session != ctx.sessions.current() {
        tracing::info!(
            pkid = message.publish.pkid,
            "not acknowledging a job of an earlier broker session (the broker now holds a new one)"
        );
        return;
    }
    if let Err(e) = ctx.client.ack(&message.publish).await {
        tracing::warn!(error = %e, "cannot acknowledge a job message");
    }
}

/// Jobs taken and not answered yet, by [`Request::key`], each with the redelivered copies of it
/// that arrived meanwhile: those are acknowledged together with the job, once it is answered,
/// so a node that dies first leaves them all to the broker.
#[derive(Default)]
pub struct InFlight(Mutex<HashMap<String, Vec<JobMessage>>>);

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<JobMessage>>> {
        // Each operation is one call on the map: a panicking holder leaves it consistent.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn start(&self, key: &str) {
        self.lock().insert(key.to_string(), Vec::new());
    }

    /// Holds `copy` back if its job is still running; `false` if it is not.
    fn hold_copy(&self, key: &str, copy: &JobMessage) -> bool {
        match self.lock().get_mut(key) {
            Some(copies) => {
                copies.push(copy.clone());
                true
            }
            None => false,
        }
    }

    /// The job is answered: the copies held back, to acknowledge.
    fn finish(&self, key: &str) -> Vec<JobMessage> {
        self.lock().remove(key).unwrap_or_default()
    }
}

/// What [`accept`] made of a job message.
pub enum Taken {
    /// A job to serve: a task runs [`serve`], which answers it and then acknowledges.
    Serve(Box<Accepted>),
    /// An answer due at once (an error, or the answer given before to a user who asks again): a
    /// task runs [`answer_now`], which publishes it and then acknowledges.
    Answer(Box<Answer>),
    /// A copy of a job still running here: acknowledged with it, once it is answered.
    HeldWithRunningJob,
    /// A redelivered copy of a job answered already: nothing to do but acknowledge it.
    AlreadyAnswered,
}

/// A request and how it will be served, decided as it arrived.
pub struct Accepted {
    request: Request,
    key: String,
    plan: Plan,
    at: Instant,
}

/// An answer to send without running anything.
pub struct Answer {
    reply: ReplyRoute,
    result: JobResult,
    /// The job's key, when it has one, so a user who asks again gets this answer again.
    key: Option<String>,
}

enum Plan {
    /// Queued here; the receiver yields the outcome.
    Run(oneshot::Receiver<Outcome>),
    /// To be published to this tier's shared job topic; the relay already waits for its answer.
    Forward(Tier, Awaited),
}

/// What the offload policy needs to know about `job` here and now.
fn situation(ctx: &JobContext, peers: &Peers, job: &Job) -> Situation {
    let load = ctx.scheduler.load();
    let module = ctx.slot.current();
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
        plan_share: ctx.settings.plan_share,
        hops: job.hops,
        max_hops: ctx.settings.max_hops,
        local: offload::Load {
            in_system: load.in_system(),
            workers: ctx.settings.workers,
            ewma_ms,
            deviation_ms: load.deviation_ms(),
        },
        parent: peers.parent(ctx.responder.tier, ctx.relay.outstanding()),
        // A node still loading its first module will serve the job once it is in (its workers
        // hold it meanwhile, and its service time is unknown, so a budget cannot send it up);
        // only a job pinned to a module goes up, since what the node will serve is not known.
        cannot_serve: if ctx.slot.is_starting() {
            !job.module_version.is_empty()
        } else {
            module.is_none_or(|m| !m.matches(&job.module_version))
        },
    }
}

/// Turns a publish into a request to serve, or an answer to give at once, or recognises a copy
/// of a job taken already.
pub fn accept(
    ctx: &Arc<JobContext>,
    ids: &JobIds,
    recent: &mut RecentIds,
    peers: &Peers,
    message: &JobMessage,
) -> Taken {
    let at = Instant::now();
    let publish = &message.publish;
    let topic = String::from_utf8_lossy(&publish.topic);
    let node = &ctx.responder.node;
    let props = publish.properties.as_ref();
    let mut request = if topic == ctx.topics.images(node) {
        request::from_image(
            publish.payload.clone(),
            props.and_then(|p| p.response_topic.clone()),
            props.and_then(|p| p.correlation_data.clone()),
            ids,
            &ctx.topics,
            node,
        )
    } else {
        match request::from_job(&publish.payload, ids, &ctx.topics, node) {
            Ok(request) => request,
            Err(unreadable) => {
                tracing::warn!(%topic, error = %unreadable.message, "unreadable job");
                let result = report::rejection(&ctx.responder, &unreadable.job, unreadable.message);
                return Taken::Answer(Box::new(Answer {
                    reply: unreadable.reply,
                    result,
                    key: None,
                }));
            }
        }
    };
    let key = request.key();
    if !recent.insert(&key) {
        if ctx.in_flight.hold_copy(&key, message) {
            tracing::info!(job_id = %request.job.job_id, "another copy of a job running here; acknowledged with its answer");
            return Taken::HeldWithRunningJob;
        }
        // A new publish (no DUP flag) of a job answered before: the user asks again, having
        // lost the answer (a broker restarted); see `answered`.
        if let Some(mut result) = (!publish.dup).then(|| ctx.answered.get(&key)).flatten() {
            tracing::info!(job_id = %request.job.job_id, "job asked again; sending its answer again");
            result.correlation = request.job.correlation.clone();
            result.relay_token = request.job.relay_token.clone();
            return Taken::Answer(Box::new(Answer {
                reply: request.reply,
                result,
                key: None,
            }));
        }
        tracing::info!(job_id = %request.job.job_id, "duplicate delivery of a job already answered; ignored");
        return Taken::AlreadyAnswered;
    }
    if request.job.image.len() > ctx.settings.max_payload_bytes {
        let message = format!(
            "image of {} bytes exceeds this node's limit of {} bytes (--max-payload-bytes)",
            request.job.image.len(),
            ctx.settings.max_payload_bytes
        );
        return reject(ctx, request, key, message);
    }
    if request.job.budget_ms == 0 {
        request.job.budget_ms = ctx.settings.budget_ms;
    }
    let situation = situation(ctx, peers, &request.job);
    let decision = match offload::decide(ctx.settings.offload, &situation) {
        // Each forwarded job holds its image here until answered: with the tier above slow or
        // gone (and `always-up`), they would pile up without end.
        Decision::Forward(..) if ctx.relay.outstanding() >= ctx.settings.max_queue => {
            tracing::warn!(
                job_id = %request.job.job_id,
                awaiting = ctx.relay.outstanding(),
                "too many forwarded jobs await their answers (--max-queue); running this one here"
            );
            Decision::Run(Reason::ForwardLimit)
        }
        decision => decision,
    };
    ctx.metrics.placed(match decision {
        Decision::Run(reason) | Decision::Forward(_, reason) => reason,
    });
    let plan = match decision {
        Decision::Forward(tier, reason) => match relay_token() {
            Ok(token) => {
                tracing::info!(
                    job_id = %request.job.job_id,
                    to = tier.name(),
                    reason = reason.describe(),
                    budget_ms = request.job.budget_ms,
                    estimate_ms = situation.local.estimate_ms().unwrap_or_default(),
                    "forwarding the job up"
                );
                // The wait starts now, not in the job's task, so the next job's decision counts
                // this one among those awaiting answers.
                Plan::Forward(tier, ctx.relay.expect(&request.job.job_id, token))
            }
            Err(e) => {
                tracing::error!(job_id = %request.job.job_id, error = %e, "no random bytes for a relay token; running the job here");
                match queue_here(ctx, &mut request, &situation, reason) {
                    Ok(plan) => plan,
                    Err(message) => return reject(ctx, request, key, message),
                }
            }
        },
        Decision::Run(reason) => match queue_here(ctx, &mut request, &situation, reason) {
            Ok(plan) => plan,
            Err(message) => return reject(ctx, request, key, message),
        },
    };
    ctx.in_flight.start(&key);
    Taken::Serve(Box::new(Accepted {
        request,
        key,
        plan,
        at,
    }))
}

/// Queues `request` here, or says why it cannot be: the node already holds `--max-queue` jobs.
fn queue_here(
    ctx: &JobContext,
    request: &mut Request,
    situation: &Situation,
    reason: Reason,
) -> Result<Plan, String> {
    if situation.local.in_system >= ctx.settings.max_queue {
        return Err(format!(
            "node {} is overloaded: {} jobs are queued (--max-queue); send the job again later or \
             to its tier",
            ctx.responder.node, situation.local.in_system
        ));
    }
    tracing::debug!(job_id = %request.job.job_id, reason = reason.describe(), "running the job here");
    // Queued now, not in the task, so the next job's decision sees this one in the queue.
    let job = &mut request.job;
    let image = std::mem::take(&mut job.image);
    Ok(Plan::Run(ctx.scheduler.submit(
        image,
        job.top_k,
        job.module_version.clone(),
    )))
}

/// The error answer to `request`, to send at once.
fn reject(ctx: &JobContext, request: Request, key: String, message: String) -> Taken {
    let result = report::rejection(&ctx.responder, &request.job, message);
    Taken::Answer(Box::new(Answer {
        reply: request.reply,
        result,
        key: Some(key),
    }))
}

/// Publishes an answer given without running anything, then acknowledges the message.
pub async fn answer_now(ctx: Arc<JobContext>, answer: Box<Answer>, message: JobMessage) {
    let Answer { reply, result, key } = *answer;
    publish_reply(&ctx.client, &reply, &result).await;
    ctx.metrics.answered(&result);
    if let Some(key) = key {
        ctx.answered.insert(&key, &result);
    }
    ack(&ctx, &message).await;
}

/// Runs one request to its single answer, here or above, then acknowledges the message that
/// carried it (and the copies of it that arrived meanwhile).
pub async fn serve(ctx: Arc<JobContext>, accepted: Box<Accepted>, message: JobMessage) {
    let Accepted {
        request,
        key,
        plan,
        at,
    } = *accepted;
    let mut result = match plan {
        Plan::Run(outcome) => run_here(&ctx, &request.job, outcome, at, hop::Action::Ran).await,
        Plan::Forward(tier, awaited) => {
            ctx.metrics.offloaded(tier);
            forward(&ctx, &request.job, tier, awaited, at).await
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
    // An answer relayed from above carries the token of the copy this node sent up; the one
    // this job came with (if a node below forwarded it) is the one its sender checks.
    result.relay_token = request.job.relay_token.clone();
    publish_reply(&ctx.client, &request.reply, &result).await;
    ctx.metrics.answered(&result);
    // Remembered before the copies are let go, so a copy arriving in between finds the answer.
    ctx.answered.insert(&key, &result);
    for copy in ctx.in_flight.finish(&key).iter().chain([&message]) {
        ack(&ctx, copy).await;
    }
}

/// Waits for a job queued here and makes its answer.
async fn run_here(
    ctx: &JobContext,
    job: &Job,
    outcome: oneshot::Receiver<Outcome>,
    accepted: Instant,
    action: hop::Action,
) -> JobResult {
    let outcome = outcome.await.unwrap_or_else(|_| {
        Err(JobFailure::new(
            "the worker running this job stopped before answering",
        ))
    });
    let total = accepted.elapsed();
    let mut result = report::job_result(&ctx.responder, job, &outcome, total);
    result.hops.push(report::hop(
        &ctx.responder,
        action,
        total,
        total,
        job.budget_ms,
    ));
    result
}

/// Publishes `job` to `tier` and waits for its answer; runs it here if none comes within its
/// remaining budget plus `--offload-grace-ms`, and then takes whichever answer is first.
async fn forward(
    ctx: &JobContext,
    job: &Job,
    tier: Tier,
    mut awaited: Awaited,
    accepted: Instant,
) -> JobResult {
    let me = &ctx.responder.node;
    let mut up = job.clone();
    up.hops += 1;
    up.path.push(me.clone());
    up.reply_to = ctx.topics.relay(me);
    let remaining = remaining_budget(job.budget_ms, accepted.elapsed());
    // The tier above gets what is left once the trip there and back is paid for.
    let transit = ctx.relay.transit_ms(tier) as u32;
    up.budget_ms = match remaining {
        0 => 0,
        left => left.saturating_sub(transit).max(1),
    };
    up.relay_token = awaited.token().to_vec();
    let sent = ctx
        .client
        .publish(
            ctx.topics.tier_jobs(tier),
            QoS::AtLeastOnce,
            false,
            up.encode_to_vec(),
        )
        .await;
    let held = accepted.elapsed();
    let mut above_open = true;
    match sent {
        Ok(()) => {
            let patience = Duration::from_millis(remaining.into()) + ctx.settings.offload_grace;
            match tokio::time::timeout(patience, &mut awaited.result).await {
                Ok(Ok(result)) => {
                    if let Some(above) = result.hops.first() {
                        let above = Duration::from_secs_f64(above.total_ms.max(0.0) / 1000.0);
                        ctx.relay
                            .record_transit(tier, accepted.elapsed() - held, above);
                    }
                    let this = report::hop(
                        &ctx.responder,
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
    let outcome = ctx
        .scheduler
        .submit(job.image.clone(), job.top_k, job.module_version.clone());
    let here = run_here(ctx, job, outcome, accepted, hop::Action::Fallback);
    tokio::pin!(here);
    // A late answer from above still counts if it beats the run here.
    tokio::select! {
        Ok(result) = &mut awaited.result, if above_open => {
            let this = report::hop(&ctx.responder, hop::Action::Forwarded, held, accepted.elapsed(), job.budget_ms);
            report::relayed(result, this)
        }
        result = &mut here => result,
    }
}

/// A fresh secret for one forwarded copy of a job (see [`Relay`]).
fn relay_token() -> Result<[u8; TOKEN_BYTES], getrandom::Error> {
    let mut token = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut token)?;
    Ok(token)
}

/// Hands a result from the tier above to the forwarded job waiting for it.
pub fn take_relayed(ctx: &JobContext, payload: &[u8]) {
    match JobResult::decode(payload) {
        Ok(result) => {
            let (job_id, node) = (result.job_id.clone(), result.node.clone());
            match ctx.relay.deliver(result) {
                Delivery::Taken => {}
                Delivery::Unclaimed => {
                    tracing::info!(%job_id, from = %node, "answer on the relay topic that no forwarded job awaits (answered already, or without its relay token); dropped");
                }
                Delivery::WrongJob => {
                    tracing::warn!(%job_id, from = %node, "answer on the relay topic with the token of another job; dropped");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "unreadable result on the relay topic; dropped"),
    }
}
