//! MQTT 5 rules of the standard that a broker of the mesh must keep, checked on the wire: each
//! packet written and read here with rumqttc's codec over a plain TCP socket, so the test can
//! send what a client library would not (a DISCONNECT that sets a session expiry, a PUBLISH
//! that names its topic by an alias alone) and read the broker's CONNACK as it is. Run against
//! isomesh-broker and against Mosquitto, which keeps these rules; isomesh-broker keeps them
//! since `isomesh_broker::session_rules`.

use bytes::BytesMut;
use isomesh_testkit::broker::TestBroker;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, Filter, Packet, Publish, PublishProperties, Subscribe,
};
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One MQTT 5 connection, packet by packet.
struct Wire {
    stream: TcpStream,
    inbox: BytesMut,
}

impl Wire {
    /// Connects as `id` (`clean_start`, with a session expiry interval if given) and reads the
    /// CONNACK, which must accept.
    ///
    /// A "server unavailable" CONNACK is tried again, as clients do (the reason means "try
    /// later"): rmqtt's handshake answers it when its takeover of the client id's previous
    /// session fails, as when that connection's task is still ending and drops the takeover's
    /// request (its `kick`). Seen once, on a loaded machine, reconnecting right after a
    /// DISCONNECT. What these tests check comes after the CONNACK that accepts.
    async fn connect(
        port: u16,
        id: &str,
        clean_start: bool,
        expiry: Option<u32>,
    ) -> (Wire, ConnAck) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (wire, ack) = Wire::try_connect(port, id, clean_start, expiry).await;
            match ack.code {
                ConnectReturnCode::Success => return (wire, ack),
                ConnectReturnCode::ServerUnavailable if tokio::time::Instant::now() < deadline => {
                    eprintln!("{id}: server unavailable, connecting again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => panic!("{id}: no accepting CONNACK: {ack:?}"),
            }
        }
    }

    /// One CONNECT and the CONNACK it got, whatever it says.
    async fn try_connect(
        port: u16,
        id: &str,
        clean_start: bool,
        expiry: Option<u32>,
    ) -> (Wire, ConnAck) {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to the broker");
        let mut wire = Wire {
            stream,
            inbox: BytesMut::new(),
        };
        let properties = ConnectProperties {
            session_expiry_interval: expiry,
            ..ConnectProperties::new()
        };
        let connect = Connect {
            keep_alive: 30,
            client_id: id.to_string(),
            clean_start,
            properties: Some(properties),
        };
        wire.send(Packet::Connect(connect, None, None)).await;
        match wire.recv(Duration::from_secs(10)).await {
            Some(Packet::ConnAck(ack)) => (wire, ack),
            other => panic!("{id}: no CONNACK: {other:?}"),
        }
    }

    async fn send(&mut self, packet: Packet) {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, None).expect("encode a packet");
        self.stream.write_all(&buf).await.expect("send a packet");
    }

    /// The next packet within `within`; `None` when nothing came or the broker closed.
    async fn recv(&mut self, within: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match Packet::read(&mut self.inbox, None) {
                Ok(packet) => return Some(packet),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("unreadable packet from the broker: {e:?}"),
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await;
            match read {
                Ok(Ok(n)) if n > 0 => self.inbox.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// The next PUBLISH within `within`, skipping acknowledgements.
    async fn next_publish(&mut self, within: Duration) -> Option<Publish> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await? {
                Packet::Publish(publish) => return Some(publish),
                _ => continue,
            }
        }
    }

    /// Subscribes to `filter` at QoS 1 and waits for the SUBACK.
    async fn subscribe(&mut self, filter: &str) {
        let mut subscribe = Subscribe::new(Filter::new(filter, QoS::AtLeastOnce), None);
        subscribe.pkid = 1;
        self.send(Packet::Subscribe(subscribe)).await;
        loop {
            match self.recv(Duration::from_secs(10)).await {
                Some(Packet::SubAck(_)) => return,
                Some(_) => continue,
                None => panic!("no SUBACK for {filter}"),
            }
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    async fn publish(&mut self, mut publish: Publish, pkid: u16) {
        publish.qos = QoS::AtLeastOnce;
        publish.pkid = pkid;
        self.send(Packet::Publish(publish)).await;
        loop {
            match self.recv(Duration::from_secs(10)).await {
                Some(Packet::PubAck(ack)) if ack.pkid == pkid => return,
                Some(_) => continue,
                None => panic!("no PUBACK for packet {pkid}"),
            }
        }
    }

    /// Sends a DISCONNECT, with a session expiry interval if given, and waits for the close.
    async fn disconnect(mut self, expiry: Option<u32>) {
        let properties = expiry.map(|secs| DisconnectProperties {
            session_expiry_interval: Some(secs),
            reason_string: None,
            user_properties: Vec::new(),
            server_reference: None,
        });
        self.send(Packet::Disconnect(Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
            properties,
        }))
        .await;
        // The broker closes the connection (after a DISCONNECT 0x82 of its own, if it objects).
        while self.recv(Duration::from_secs(5)).await.is_some() {}
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disconnect_cannot_keep_a_session_its_connect_asked_to_end() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let (mut away, ack) = Wire::connect(port, "rules-away", false, None).await;
    assert!(!ack.session_present);
    away.subscribe("rules/away").await;
    // A protocol error (MQTT 5.0, 3.14.2.2.2): the CONNECT asked for no session after it.
    away.disconnect(Some(300)).await;
    let (mut sender, _) = Wire::connect(port, "rules-sender", true, None).await;
    sender
        .publish(
            Publish::new("rules/away", QoS::AtLeastOnce, "while away", None),
            1,
        )
        .await;
    let (mut back, ack) = Wire::connect(port, "rules-away", false, None).await;
    assert!(
        !ack.session_present,
        "the session ended at the disconnect; broker log:\n{}",
        broker.log()
    );
    assert!(
        back.next_publish(Duration::from_secs(2)).await.is_none(),
        "no message was kept for the ended session"
    );

    // The control: a session that asked for one when it connected is kept, and its message
    // queued, whatever the DISCONNECT says within the rules (a shorter interval).
    let (mut kept, _) = Wire::connect(port, "rules-kept", false, Some(300)).await;
    kept.subscribe("rules/kept").await;
    kept.disconnect(Some(60)).await;
    sender
        .publish(
            Publish::new("rules/kept", QoS::AtLeastOnce, "queued", None),
            2,
        )
        .await;
    let (mut back, ack) = Wire::connect(port, "rules-kept", false, Some(300)).await;
    assert!(ack.session_present, "the session with an expiry is kept");
    let queued = back
        .next_publish(Duration::from_secs(10))
        .await
        .expect("the message queued while away");
    assert_eq!(&queued.payload[..], b"queued");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_may_name_its_topic_by_an_alias_the_broker_offered() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let (mut subscriber, _) = Wire::connect(port, "alias-sub", true, None).await;
    subscriber.subscribe("rules/alias").await;
    let (mut publisher, ack) = Wire::connect(port, "alias-pub", true, None).await;
    let offered = ack
        .properties
        .as_ref()
        .and_then(|p| p.topic_alias_max)
        .unwrap_or(0);
    assert!(
        offered >= 1,
        "the CONNACK offers topic aliases: {:?}",
        ack.properties
    );
    let with_alias = |topic: &str, payload: &'static str| {
        let properties = PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        };
        Publish::new(topic, QoS::AtLeastOnce, payload, Some(properties))
    };
    // The first names topic and alias; the second the alias alone.
    publisher
        .publish(with_alias("rules/alias", "first"), 1)
        .await;
    publisher.publish(with_alias("", "second"), 2).await;
    let mut got = Vec::new();
    while let Some(publish) = subscriber.next_publish(Duration::from_secs(5)).await {
        assert_eq!(&publish.topic[..], b"rules/alias");
        got.push(String::from_utf8_lossy(&publish.payload).into_owned());
        if got.len() == 2 {
            break;
        }
    }
    assert_eq!(got, ["first", "second"], "broker log:\n{}", broker.log());
}
