//! The connection to the broker, driven by a task of its own.
//!
//! rumqttc's `EventLoop::poll` is not cancel-safe while it connects: dropped between the TCP
//! connect and the CONNACK, as any other branch of a `tokio::select!` will drop it, it throws
//! away a connection the broker has already accepted, and the next poll connects again. A node
//! whose loop also ticks timers therefore came up as a burst of connections with one client id,
//! each taking the persistent session over from the last; rmqtt refused one of them outright,
//! and QoS 1 jobs queued for the session went missing in runs with that churn.
//!
//! So a [`Link`] owns the `EventLoop` in a task that always polls it to completion, pauses
//! before connecting again after an error (1 s; 5 s after a refusal, which retrying at once
//! will not change), and hands every event over a channel, whose receiving end is cancel-safe.
//! [`Link::close`] ends it the way the broker needs: what is in flight acknowledged first, then
//! the DISCONNECT, flushed.
//!
//! A connection can also hang without failing. When the broker's host vanishes (a power cut, a
//! container killed: no FIN, no RST) while the client's socket is full, rumqttc's poll waits in
//! its write until the kernel gives up on the connection, minutes later, and its keep-alive ping
//! cannot go out meanwhile (seen: a node re-seeding 29 MB of module chunks stayed silent for
//! 90 s). So a poll that has made no progress for two keep-alive periods ([`stall_limit`]) is
//! given up: the task drops the connection with `EventLoop::clean`, which keeps what was in
//! flight for the next connection, and reports it lost like any other.
//!
//! Given the members of a broker cluster ([`Link::spawn_members`]), the task also moves to the
//! next member when its own cannot be reached, as [`crate::failover::Rotation`] decides: the
//! event loop's options are swapped before it connects again, so the client, its requests and
//! its session settings stay the same.

use crate::failover::{Failure, Rotation};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// What one poll of the event loop gave.
pub type Polled = Result<Event, ConnectionError>;

/// Pause before connecting again after a lost or failed connection.
const PAUSE_AFTER_ERROR: Duration = Duration::from_secs(1);
/// Pause after the broker refused the connection (a login, a server not ready).
const PAUSE_AFTER_REFUSAL: Duration = Duration::from_secs(5);
/// Events the task may poll ahead of the reader; past that the task waits, and so does the
/// socket (TCP back-pressure), instead of buffering without bound.
const AHEAD: usize = 64;
/// How long [`Link::close`] lets the DISCONNECT take to go out.
const FLUSH_WITHIN: Duration = Duration::from_secs(3);

/// How long one poll may go without returning before the connection counts as lost: two
/// keep-alive periods, none with keep-alive off. A live connection returns from a poll at least
/// once a period (a ping, if nothing else), and a broker drops a client it has heard nothing from
/// for one and a half; past two, not even a ping got out. The longest a poll waits on its own,
/// connecting, is rumqttc's connection timeout (5 s), well under the 20 s the shortest keep-alive
/// here (the camera's, 10 s) gives.
fn stall_limit(keep_alive: Duration) -> Option<Duration> {
    (!keep_alive.is_zero()).then(|| keep_alive * 2)
}

/// The broker connection's event stream.
pub struct Link {
    events: mpsc::Receiver<Polled>,
    close: Option<oneshot::Sender<Close>>,
    task: tokio::task::JoinHandle<()>,
    /// The member the task connects to (an index into the members given).
    member: Arc<AtomicUsize>,
}

/// How to end the connection.
struct Close {
    client: AsyncClient,
    /// Up to how long to wait for what is in flight to be acknowledged.
    settle: Duration,
}

impl Link {
    /// Starts polling `eventloop` (connecting as needed) in a task of the current runtime.
    pub fn spawn(eventloop: EventLoop) -> Link {
        Link::spawn_members(eventloop, Vec::new())
    }

    /// The same, for a broker of several members: `members` holds each member's options, the
    /// first being those `eventloop` was made with; the task moves between them as
    /// [`Rotation`] says. With fewer than two it stays with the event loop's broker.
    pub fn spawn_members(eventloop: EventLoop, members: Vec<MqttOptions>) -> Link {
        let (events_tx, events) = mpsc::channel(AHEAD);
        let (close_tx, close_rx) = oneshot::channel();
        let member = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(pump(
            eventloop,
            members,
            member.clone(),
            events_tx,
            close_rx,
        ));
        Link {
            events,
            close: Some(close_tx),
            task,
            member,
        }
    }

    /// The member connected to or being connected to: an index into the members given to
    /// [`Link::spawn_members`] (0 with one broker). Read with an event, it names the member
    /// that event came from, unless the task moved on since.
    pub fn member(&self) -> usize {
        self.member.load(Ordering::Relaxed)
    }

    /// The next event or connection error. Cancel-safe: a `select!` may drop it freely.
    /// `None` once the link is closed.
    pub async fn next(&mut self) -> Option<Polled> {
        self.events.recv().await
    }

    /// Ends the connection: waits up to `settle` until nothing is in flight and nothing more
    /// goes out for a moment (a broker may drop a publish that arrives just ahead of the
    /// DISCONNECT: seen with rmqtt under load), then disconnects through `client` and polls
    /// until the DISCONNECT is out. Events meanwhile are dropped.
    pub async fn close(mut self, client: &AsyncClient, settle: Duration) {
        if let Some(close) = self.close.take() {
            let _ = close.send(Close {
                client: client.clone(),
                settle,
            });
        }
        // Nobody reads events any more: let the task's sends fail instead of waiting.
        self.events.close();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The task: poll, hand over, pause after errors (moving to another member when there are
/// several), until told to close.
async fn pump(
    mut eventloop: EventLoop,
    members: Vec<MqttOptions>,
    member: Arc<AtomicUsize>,
    events: mpsc::Sender<Polled>,
    mut close: oneshot::Receiver<Close>,
) {
    let mut rotation = Rotation::new(members.len(), PAUSE_AFTER_ERROR, PAUSE_AFTER_REFUSAL);
    loop {
        // A poll is never dropped half-way; only a close request ends the wait for it, and a
        // connection closed then is being closed anyway.
        let polled = tokio::select! {
            biased;
            request = &mut close => return finish(eventloop, request.ok()).await,
            polled = poll_unless_stalled(&mut eventloop) => polled,
        };
        let pause = match &polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                rotation.connected();
                None
            }
            Ok(_) => None,
            Err(e) => {
                let failure = match e {
                    ConnectionError::ConnectionRefused(_) => Failure::Refused,
                    _ => Failure::Lost,
                };
                let next = rotation.failed(failure);
                if next.moved {
                    if let Some(options) = members.get(next.member) {
                        let (host, port) = options.broker_address();
                        tracing::warn!(member = next.member + 1, %host, port, error = %e, "moving to the next broker member");
                        eventloop.options = options.clone();
                        member.store(next.member, Ordering::Relaxed);
                    }
                }
                (!next.pause.is_zero()).then_some(next.pause)
            }
        };
        tokio::select! {
            biased;
            request = &mut close => return finish(eventloop, request.ok()).await,
            sent = events.send(polled) => {
                if sent.is_err() {
                    // The reader is gone without closing: nothing to hand events to.
                    return;
                }
            }
        }
        if let Some(pause) = pause {
            tokio::select! {
                request = &mut close => return finish(eventloop, request.ok()).await,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// One poll, given up after [`stall_limit`]: the connection is dropped (what was in flight goes
/// out again on the next one) and reported as lost.
async fn poll_unless_stalled(eventloop: &mut EventLoop) -> Polled {
    let Some(limit) = stall_limit(eventloop.options.keep_alive()) else {
        return eventloop.poll().await;
    };
    match tokio::time::timeout(limit, eventloop.poll()).await {
        Ok(polled) => polled,
        Err(_stalled) => {
            let (host, port) = eventloop.options.broker_address();
            tracing::warn!(%host, port, stalled_s = limit.as_secs(), "no progress on the broker connection (its host may be gone); dropping it");
            eventloop.clean();
            Err(ConnectionError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no progress on the connection to {host}:{port} for {} s (its host may be gone)",
                    limit.as_secs()
                ),
            )))
        }
    }
}

/// Settles what is in flight, sends the DISCONNECT and flushes it.
async fn finish(mut eventloop: EventLoop, close: Option<Close>) {
    let Some(close) = close else { return };
    let settle = async {
        loop {
            match tokio::time::timeout(Duration::from_millis(100), eventloop.poll()).await {
                Err(_quiet) if eventloop.state.inflight() == 0 => break,
                Err(_quiet) => {}
                Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
            }
        }
    };
    let _ = tokio::time::timeout(close.settle, settle).await;
    let _ = close.client.try_disconnect();
    let flush = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(FLUSH_WITHIN, flush).await;
}
