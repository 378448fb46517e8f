//! The job pipeline of a node: from an accepted MQTT message to its one answer.
//!
//! The event loop calls [`accept`] for every job message, in arrival order: it reads the request,
//! drops a redelivered copy (or sends the kept answer again to a user who asks again), refuses an
//! oversized image or an overloaded queue with an error answer, and asks the offload policy
//! where the job runs, queueing it here at once so the next decision sees it. Then a task per job
//! runs [`serve`]: it waits for the outcome here or the answer from the tier above (the job stays
//! owned by this node in the relay, and runs here after all when no answer comes in time),
//! publishes the one answer, and only then acknowledges the message. A node that dies before
//! answering therefore leaves the job unacknowledged in its persistent session, and the broker
//! hands it over again when the node is back.

use crate::metrics::Metrics;
use crate::replies::{publish_reply, send_reply};
use crate::scheduler::Scheduler;
use crate::slot::ModuleSlot;
use isomesh_mesh::answered::Answered;
use isomesh_mesh::offload::{self, remaining_budget, Decision, Policy, Situation};
use isomesh_mesh::outcome::{JobFailure, Outcome};
use isomesh_mesh::peers::Peers;
use isomesh_mesh::recent::RecentIds;
use isomesh_mesh::relay::{Delivery, Relay};
use isomesh_mesh::report::{self, Responder};
use isomesh_mesh::request::{self, JobIds, Request};
use isomesh_mesh::topics::Topics;
use isomesh_protos::{hop, Job, JobResult, Tier};
use prost::Message;
use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use std::sync::Arc;
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
    pub max_hops: u32,
    /// Jobs in the node at most before a job that would run here is refused.
    pub max_queue: usize,
    pub workers: usize,
    /// How long past its remaining budget a forwarded job may take before it runs here.
    pub offload_grace: Duration,
}

/// A request and how it will be served, decided as it arrived.
pub struct Accepted {
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
        hops: job.hops,
        max_hops: ctx.settings.max_hops,
        local: offload::Load {
            in_system: load.in_system(),
            workers: ctx.settings.workers,
            ewma_ms,
            deviation_ms: load.deviation_ms(),
        },
        parent: peers.parent(ctx.responder.tier, ctx.relay.outstanding()),
        cannot_serve: module.is_none_or(|m| !m.matches(&job.module_version)),
    }
}

/// Turns a publish into a request, or answers it at once when it cannot be one. `None` means
/// nothing is left to do but acknowledge it.
pub fn accept(
    ctx: &Arc<JobContext>,
    ids: &JobIds,
    recent: &mut RecentIds,
    peers: &Peers,
    publish: &Publish,
) -> Option<Accepted> {
    let at = Instant::now();
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
                ctx.metrics.answered(&result);
                send_reply(&ctx.client, &unreadable.reply, &result);
                return None;
            }
        }
    };
    if !recent.insert(&request.job.job_id) {
        // A new publish (no DUP flag) of a job answered before: the user asks again, having
        // lost the answer (a broker restarted); see `answered`.
        if let Some(mut result) = (!publish.dup)
            .then(|| ctx.answered.get(&request.job.job_id))
            .flatten()
        {
            tracing::info!(job_id = %request.job.job_id, "job asked again; sending its answer again");
            result.correlation = request.job.correlation.clone();
            send_reply(&ctx.client, &request.reply, &result);
            return None;
        }
        tracing::info!(job_id = %request.job.job_id, "duplicate delivery of a job already taken; ignored");
        return None;
    }
    if request.job.image.len() > ctx.settings.max_payload_bytes {
        let message = format!(
            "image of {} bytes exceeds this node's limit of {} bytes (--max-payload-bytes)",
            request.job.image.len(),
            ctx.settings.max_payload_bytes
        );
        reject(ctx, &request, message);
        return None;
    }
    if request.job.budget_ms == 0 {
        request.job.budget_ms = ctx.settings.budget_ms;
    }
    let situation = situation(ctx, peers, &request.job);
    let plan = match offload::decide(ctx.settings.offload, &situation) {
        Decision::Run(_) if situation.local.in_system >= ctx.settings.max_queue => {
            let message = format!(
                "node {node} is overloaded: {} jobs are queued (--max-queue); send the job again \
                 later or to its tier",
                situation.local.in_system
            );
            reject(ctx, &request, message);
            return None;
        }
        Decision::Run(reason) => {
            tracing::debug!(job_id = %request.job.job_id, reason = reason.describe(), "running the job here");
            // Queued now, not in the task, so the next job's decision sees this one in the queue.
            let job = &mut request.job;
            let image = std::mem::take(&mut job.image);
            Plan::Run(
                ctx.scheduler
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
fn reject(ctx: &JobContext, request: &Request, message: String) {
    let result = report::rejection(&ctx.responder, &request.job, message);
    ctx.metrics.answered(&result);
    send_reply(&ctx.client, &request.reply, &result);
}

/// Runs one request to its single answer, here or above, then acknowledges the message that
/// carried it.
pub async fn serve(ctx: Arc<JobContext>, accepted: Accepted, publish: Publish) {
    let Accepted { request, plan, at } = accepted;
    let result = match plan {
        Plan::Run(outcome) => run_here(&ctx, &request.job, outcome, at, hop::Action::Ran).await,
        Plan::Forward(tier) => {
            ctx.metrics.offloaded(tier);
            forward(&ctx, &request.job, tier, at).await
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
    publish_reply(&ctx.client, &request.reply, &result).await;
    ctx.metrics.answered(&result);
    ctx.answered.insert(&result);
    if let Err(e) = ctx.client.ack(&publish).await {
        tracing::warn!(error = %e, "cannot acknowledge a job message");
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
async fn forward(ctx: &JobContext, job: &Job, tier: Tier, accepted: Instant) -> JobResult {
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
    let mut awaited = ctx.relay.expect(&job.job_id);
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

/// Hands a result from the tier above to the forwarded job waiting for it.
pub fn take_relayed(ctx: &JobContext, payload: &[u8]) {
    match JobResult::decode(payload) {
        Ok(result) => {
            let (job_id, node) = (result.job_id.clone(), result.node.clone());
            if ctx.relay.deliver(result) == Delivery::Unclaimed {
                tracing::info!(%job_id, from = %node, "answer from above for a job already answered; dropped");
            }
        }
        Err(e) => tracing::warn!(error = %e, "unreadable result on the relay topic; dropped"),
    }
}
