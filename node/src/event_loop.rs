//! The node's event loop: one task owns the broker connection's events (polled by the
//! [`Link`]), the timers and the channels of the background work, and hands each event to the
//! part of the node it belongs to: job messages to [`crate::jobs`], module messages and rollout
//! results to the [`RolloutExecutor`], statuses of other nodes to [`Peers`], answers from above to
//! the relay.
//!
//! Start: the node connects while the module manager loads its first module. Until then it
//! subscribes only to what is addressed to it (its jobs wait for the module, see
//! [`crate::slot::ModuleSlot::wait_started`]), to answers from above and to the mesh's statuses;
//! the tier's shared jobs (other nodes of the tier serve them meanwhile) and the rollout
//! announcements (the agent must know what the node serves first) follow once it is loaded.
//!
//! Shutdown (the caller's future): leave the tier's shared subscription, answer every job already
//! accepted, publish an offline status, disconnect. Jobs addressed to the node itself wait in its
//! persistent session for its return.

use crate::executor::RolloutExecutor;
use crate::jobs::{self, JobContext, Taken};
use crate::status::{read_status, StatusReporter};
use isomesh_mesh::peers::Peers;
use isomesh_mesh::recent::RecentIds;
use isomesh_mesh::request::JobIds;
use isomesh_module::agent::Event as RolloutEvent;
use isomesh_mqtt::link::Link;
use isomesh_sandbox::LoadedModule;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Event, EventLoop, MqttOptions};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// How often the rollout agent is given the time (retries, stalls, re-seeding).
const ROLLOUT_TICK: Duration = Duration::from_millis(250);

/// What the loop needs besides the job pipeline.
pub struct LoopSettings {
    /// The broker's members (usually one), for logs: their URLs without passwords.
    pub members: Vec<String>,
    /// The options to connect to each member with, in the same order.
    pub member_options: Vec<MqttOptions>,
    pub status_interval_s: u64,
}

/// Runs until `shutdown` completes and every accepted job is answered.
pub async fn run(
    ctx: Arc<JobContext>,
    status: StatusReporter,
    mut rollouts: RolloutExecutor,
    settings: LoopSettings,
    eventloop: EventLoop,
    mut started: tokio::sync::oneshot::Receiver<Option<Arc<LoadedModule>>>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let members = settings.members;
    let mut link = Link::spawn_members(eventloop, settings.member_options);
    let ids = JobIds::new(&ctx.responder.node);
    let mut recent = RecentIds::default();
    let mut peers = Peers::new(Duration::from_secs(
        (3 * settings.status_interval_s).max(15),
    ));
    let relay_topic = ctx.topics.relay(&ctx.responder.node);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut status_tick =
        tokio::time::interval(Duration::from_secs(settings.status_interval_s.max(1)));
    let mut rollout_tick = tokio::time::interval(ROLLOUT_TICK);
    let mut draining = false;
    let mut starting = true;
    let mut connected = false;
    loop {
        tokio::select! {
            _ = &mut shutdown, if !draining => {
                draining = true;
                tracing::info!(pending = tasks.len(), "shutting down: answering accepted jobs first");
                ctx.metrics.draining();
                // The tier's other nodes take its shared jobs from now on. Jobs addressed to this
                // node stay subscribed: the broker keeps them in this node's session until it is
                // back (a restart, an update), and messages that arrive now are left unacknowledged
                // for the same reason.
                let _ = ctx
                    .client
                    .try_unsubscribe(ctx.topics.shared_tier_jobs(ctx.responder.tier));
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {
                // Keep the retained load figures fresh while jobs flow, at most once a second,
                // and always when the last job is done so an idle node does not show a queue.
                if tasks.is_empty() || status.last_published().elapsed() >= Duration::from_secs(1) {
                    status.publish(true);
                }
            }
            first = &mut started, if starting => {
                starting = false;
                // Already done by the manager, unless its thread died: the workers must not
                // wait for ever.
                ctx.slot.finish_start();
                if let Ok(Some(module)) = first {
                    rollouts.serving(&module);
                }
                if connected && !draining {
                    subscribe(&ctx, once_started(&ctx));
                    rollouts.handle(RolloutEvent::Connected);
                }
                status.publish(!draining);
            }
            _ = status_tick.tick() => status.publish(true),
            _ = status.board.changed.notified() => status.publish(!draining),
            _ = rollout_tick.tick(), if !draining => rollouts.handle(RolloutEvent::Tick),
            Some(considered) = rollouts.considered.recv() => rollouts.considered(considered),
            Some((module, reason)) = rollouts.failed.1.recv() => {
                rollouts.handle(RolloutEvent::InstallFailed { module, reason });
            }
            Some(event) = link.next() => {
                let broker = members.get(link.member()).map_or("", String::as_str);
                if event.is_err() {
                    // What `/readyz` and `isomesh_broker_connected` say until the next CONNACK.
                    ctx.metrics.link_down();
                    connected = false;
                }
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        tracing::info!(broker = %broker, session_present = ack.session_present, "connected");
                        if !ack.session_present {
                            ctx.sessions.renew();
                        }
                        ctx.metrics.link_up(link.member());
                        connected = true;
                        if !draining {
                            subscribe(&ctx, addressed_here(&ctx));
                            if !starting {
                                subscribe(&ctx, once_started(&ctx));
                                rollouts.handle(RolloutEvent::Connected);
                            }
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
                            jobs::take_relayed(&ctx, &publish.payload);
                            continue;
                        }
                        if let Some(node) = ctx.topics.status_of(&topic) {
                            let status = read_status(node, &publish.payload);
                            if let Some(status) = status.as_ref().filter(|_| !starting && !draining) {
                                // A peer still behind the module served here: the agent may
                                // publish it again (a cluster member that missed the rollout).
                                rollouts.handle(RolloutEvent::PeerStatus { node, status });
                            }
                            peers.heard(node, status);
                            continue;
                        }
                        if draining {
                            // Not acknowledged: the broker keeps it for this node's next session.
                            continue;
                        }
                        if ctx.topics.is_module_topic(&topic) {
                            // Retained: nothing is lost by acknowledging before handling, nor by
                            // ignoring it while starting (a session kept from before may deliver
                            // it): the subscription after the start brings it again.
                            let _ = ctx.client.try_ack(&publish);
                            if starting {
                                continue;
                            }
                            rollouts.handle(RolloutEvent::Publish { topic: &topic, payload: &publish.payload });
                            continue;
                        }
                        let message = jobs::JobMessage { publish, session: ctx.sessions.current() };
                        match jobs::accept(&ctx, &ids, &mut recent, &peers, &message) {
                            Taken::Serve(accepted) => {
                                tasks.spawn(jobs::serve(ctx.clone(), accepted, message));
                            }
                            Taken::Answer(answer) => {
                                tasks.spawn(jobs::answer_now(ctx.clone(), answer, message));
                            }
                            Taken::HeldWithRunningJob => {}
                            Taken::AlreadyAnswered => {
                                let _ = ctx.client.try_ack(&message.publish);
                            }
                        }
                    }
                    Ok(_) => {}
                    // The link pauses before it connects again; jobs keep running meanwhile.
                    Err(rumqttc::v5::ConnectionError::ConnectionRefused(
                        code @ (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized),
                    )) => {
                        tracing::error!(?members, ?code, "the broker refused this node's login: check --username/--password ($ISOMESH_USERNAME/$ISOMESH_PASSWORD) against the broker's password file; trying again in 5 s (at once on another member)");
                    }
                    Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                        tracing::error!(?members, ?code, "the broker refused this node's connection; trying again in 5 s (at once on another member)");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "broker connection lost; connecting again");
                    }
                }
            }
        }
        if draining && tasks.is_empty() {
            break;
        }
    }
    status.publish(false);
    // Every answer and the offline status acknowledged, then the DISCONNECT.
    link.close(&ctx.client, Duration::from_secs(5)).await;
}

fn subscribe(ctx: &JobContext, filters: Vec<(String, QoS)>) {
    for (filter, qos) in filters {
        if let Err(e) = ctx.client.try_subscribe(filter.clone(), qos) {
            tracing::error!(%filter, error = %e, "cannot subscribe");
        }
    }
}

/// What the node subscribes to from its first connection on: jobs addressed to it, answers
/// from above and the mesh's statuses.
fn addressed_here(ctx: &JobContext) -> Vec<(String, QoS)> {
    let node = &ctx.responder.node;
    vec![
        (ctx.topics.images(node), QoS::AtLeastOnce),
        (ctx.topics.jobs(node), QoS::AtLeastOnce),
        // QoS 0 on purpose. Results from above must not wait behind the jobs that occupy this
        // node's Receive Maximum (those jobs wait for these very results); and one lost result
        // costs a run here after the grace period, never the job.
        (ctx.topics.relay(node), QoS::AtMostOnce),
        (ctx.topics.all_status(), QoS::AtMostOnce),
    ]
}

/// What the node subscribes to once its first module is loaded (or none could be): its tier's
/// shared jobs and the rollout announcements.
fn once_started(ctx: &JobContext) -> Vec<(String, QoS)> {
    vec![
        (
            ctx.topics.shared_tier_jobs(ctx.responder.tier),
            QoS::AtLeastOnce,
        ),
        (ctx.topics.all_manifests(), QoS::AtLeastOnce),
    ]
}
