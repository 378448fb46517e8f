//! Small MQTT helpers for tests: connect, subscribe, and collect messages with a timeout.

use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties, SubAck, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use std::time::Duration;
use tokio::sync::mpsc;

/// A connected MQTT 5 client whose incoming publishes arrive on a channel.
pub struct Client {
    pub client: AsyncClient,
    pub incoming: mpsc::UnboundedReceiver<Publish>,
    /// PUBACKs and SUBACKs, to see what the broker said to a publish or subscription.
    pub acks: mpsc::UnboundedReceiver<Packet>,
    /// SUBACKs again, for [`Client::subscribe`] to wait on (a lock: it takes `&self`).
    subacks: tokio::sync::Mutex<mpsc::UnboundedReceiver<SubAck>>,
    task: tokio::task::JoinHandle<()>,
}

/// How long [`Client::subscribe`] waits for the broker's SUBACK.
const SUBACK_WITHIN: Duration = Duration::from_secs(30);

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Connects anonymously with a clean session and waits for CONNACK.
    pub async fn connect(port: u16, id: &str) -> Client {
        Client::try_connect(port, id, None)
            .await
            .unwrap_or_else(|refused| panic!("{id}: {refused}"))
    }

    /// Connects as `user` with `password`.
    pub async fn connect_as(port: u16, id: &str, user: &str, password: &str) -> Client {
        Client::try_connect(port, id, Some((user, password)))
            .await
            .unwrap_or_else(|refused| panic!("{id} as {user}: {refused}"))
    }

    /// Connects, or says why the broker refused (the CONNACK's reason, or the error that closed
    /// the connection).
    pub async fn try_connect(
        port: u16,
        id: &str,
        login: Option<(&str, &str)>,
    ) -> Result<Client, String> {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(Some(64 << 20));
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, incoming) = mpsc::unbounded_channel();
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let (subacks_tx, subacks) = mpsc::unbounded_channel();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        let _ = subacks_tx.send(ack.clone());
                        let _ = acks_tx.send(Packet::SubAck(ack));
                    }
                    Ok(Event::Incoming(ack @ Packet::PubAck(_))) => {
                        let _ = acks_tx.send(ack);
                    }
                    Ok(_) => {}
                    // A refused login ends the attempt; anything else (a broker still starting
                    // or restarting) is retried.
                    Err(ConnectionError::ConnectionRefused(code)) if ready_tx.is_some() => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(Err(format!("refused: {code:?}")));
                        }
                        return;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(20), ready)
            .await
            .expect("CONNACK within 20 s")
            .expect("event loop alive")?;
        Ok(Client {
            client,
            incoming,
            acks,
            subacks: tokio::sync::Mutex::new(subacks),
            task,
        })
    }

    /// The next PUBACK or SUBACK, or `None` after `within`.
    pub async fn next_ack(&mut self, within: Duration) -> Option<Packet> {
        tokio::time::timeout(within, self.acks.recv())
            .await
            .ok()
            .flatten()
    }

    /// Subscribes at QoS 1 and returns once the broker's SUBACK grants it (the broker installs
    /// a subscription before acknowledging it); panics if it is refused or not acknowledged.
    ///
    /// The SUBACK awaited is the next one to arrive: a subscription made directly on
    /// [`Client::client`] must have been acknowledged before this is called (its SUBACK, if
    /// still queued, is discarded first).
    pub async fn subscribe(&self, filter: &str) {
        let mut subacks = self.subacks.lock().await;
        while subacks.try_recv().is_ok() {}
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let ack = tokio::time::timeout(SUBACK_WITHIN, subacks.recv())
            .await
            .unwrap_or_else(|_| panic!("no SUBACK for {filter:?} within {SUBACK_WITHIN:?}"))
            .expect("event loop alive");
        assert!(
            matches!(
                ack.return_codes.as_slice(),
                [SubscribeReasonCode::Success(_)]
            ),
            "the broker refused the subscription to {filter:?}: {ack:?}"
        );
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
    }

    /// Publishes a retained message at QoS 1.
    pub async fn publish_retained(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload.into())
            .await
            .expect("publish");
    }

    pub async fn publish_with_response_topic(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        response: &str,
        correlation: &[u8],
    ) {
        let props = PublishProperties {
            response_topic: Some(response.to_string()),
            correlation_data: Some(correlation.to_vec().into()),
            ..Default::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.into(), props)
            .await
            .expect("publish");
    }

    /// The next message, or `None` after `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Publish> {
        tokio::time::timeout(within, self.incoming.recv())
            .await
            .ok()
            .flatten()
    }

    /// Asks `topic` once per payload (MQTT 5: response topic `reply_to`, the payload's index as
    /// correlation data) and returns the answers in the payloads' order; panics if one is
    /// missing after `within`, answered twice, or not correlated.
    pub async fn ask_each(
        &mut self,
        topic: &str,
        reply_to: &str,
        payloads: Vec<Vec<u8>>,
        within: Duration,
    ) -> Vec<Publish> {
        self.subscribe(reply_to).await;
        let count = payloads.len();
        for (n, payload) in payloads.into_iter().enumerate() {
            self.publish_with_response_topic(topic, payload, reply_to, n.to_string().as_bytes())
                .await;
        }
        let mut answers: Vec<Option<Publish>> = vec![None; count];
        for reply in self.collect(count, within).await {
            let n: usize = reply
                .properties
                .as_ref()
                .and_then(|p| p.correlation_data.as_ref())
                .and_then(|c| std::str::from_utf8(c).ok()?.parse().ok())
                .filter(|n| *n < count)
                .expect("the answer carries the request's number as correlation data");
            assert!(
                answers[n].replace(reply).is_none(),
                "request {n} answered twice"
            );
        }
        answers.into_iter().flatten().collect()
    }

    /// Exactly `n` messages (panics if fewer arrive within `within`).
    pub async fn collect(&mut self, n: usize, within: Duration) -> Vec<Publish> {
        let deadline = tokio::time::Instant::now() + within;
        let mut got = Vec::new();
        while got.len() < n {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Ok(Some(p)) => got.push(p),
                _ => panic!("expected {n} messages within {within:?}, got {}", got.len()),
            }
        }
        got
    }
}
