//! Broker tests: the flows the mesh relies on, with real clients (rumqttc over MQTT 3.1.1 and 5,
//! `mosquitto_sub`/`mosquitto_pub`), against `isomesh-broker` and Mosquitto alike.

use isomesh_tests::bin_path;
use isomesh_tests::broker::TestBroker;
use isomesh_tests::mqtt::Client;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;
use tokio::sync::mpsc;

const WITHIN: Duration = Duration::from_secs(60);

/// An MQTT 3.1.1 client (rumqttc v4) whose incoming publishes arrive on a channel.
struct Client311 {
    client: rumqttc::AsyncClient,
    incoming: mpsc::UnboundedReceiver<rumqttc::Publish>,
    task: tokio::task::JoinHandle<()>,
}

impl Client311 {
    async fn connect(port: u16, id: &str, manual_acks: bool) -> Client311 {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(64 << 20, 64 << 20)
            .set_manual_acks(manual_acks);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
        let (tx, incoming) = mpsc::unbounded_channel();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(20), ready)
            .await
            .expect("CONNACK")
            .expect("event loop");
        Client311 {
            client,
            incoming,
            task,
        }
    }

    async fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    async fn next(&mut self, within: Duration) -> Option<rumqttc::Publish> {
        tokio::time::timeout(within, self.incoming.recv())
            .await
            .ok()
            .flatten()
    }

    /// Drops the TCP connection without DISCONNECT, like a crashed process.
    fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for Client311 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_311_subscriber_gets_v5_publishes_with_properties_and_311_clients_still_connect() {
    let broker = TestBroker::start().await;
    let port = broker.port().to_string();
    let sub = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv311",
            "-q",
            "1",
            "-C",
            "1",
            "-W",
            "60",
        ])
        .args(["-t", "props/topic"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub runs");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v5 = Client::connect(broker.port(), "props-v5").await;
    let props = PublishProperties {
        response_topic: Some("props/reply".into()),
        correlation_data: Some(b"c1".to_vec().into()),
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    v5.client
        .publish_with_properties(
            "props/topic",
            QoS5::AtLeastOnce,
            false,
            b"with props".to_vec(),
            props,
        )
        .await
        .unwrap();
    let out = sub.wait_with_output().await.unwrap();
    assert!(out.status.success(), "mosquitto_sub got nothing");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "with props");
    // New 3.1.1 clients are still welcome.
    for n in 0..3 {
        let status = tokio::process::Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                "mqttv311",
                "-t",
                "after",
                "-m",
                &n.to_string(),
            ])
            .status()
            .await
            .unwrap();
        assert!(
            status.success(),
            "a 3.1.1 client was refused after a v5 publish with properties"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mqtt_311_and_5_clients_exchange_messages_both_ways_on_one_port() {
    let broker = TestBroker::start().await;
    let mut old = Client311::connect(broker.port(), "both-311", false).await;
    let mut new = Client::connect(broker.port(), "both-5").await;
    old.subscribe("both/to311").await;
    new.subscribe("both/to5").await;
    old.client
        .publish(
            "both/to5",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"from 3.1.1".to_vec(),
        )
        .await
        .unwrap();
    new.publish("both/to311", b"from 5".to_vec()).await;
    let got5 = new.next(WITHIN).await.expect("v5 receives from 3.1.1");
    assert_eq!(&got5.payload[..], b"from 3.1.1");
    let got311 = old.next(WITHIN).await.expect("3.1.1 receives from v5");
    assert_eq!(&got311.payload[..], b"from 5");
}

#[tokio::test(flavor = "multi_thread")]
async fn all_150_retained_256k_messages_reach_a_qos1_wildcard_subscriber() {
    let broker = TestBroker::start().await;
    let publisher = Client::connect(broker.port(), "retain-pub").await;
    let count = 150;
    for n in 0..count {
        publisher
            .client
            .publish(
                format!("retained150/{n}"),
                QoS5::AtLeastOnce,
                true,
                pattern(256 << 10, n as u8),
            )
            .await
            .unwrap();
    }
    // A late subscriber sees that the retained set is complete.
    let mut marker = Client::connect(broker.port(), "retain-marker").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        marker
            .subscribe(&format!("retained150/{}", count - 1))
            .await;
        if marker.next(Duration::from_secs(2)).await.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the last retained message never landed"
        );
    }
    let mut subscriber = Client::connect(broker.port(), "retain-sub").await;
    subscriber.subscribe("retained150/+").await;
    let mut topics = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while topics.len() < count {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(message) = subscriber.next(left).await else {
            panic!("only {} of {count} retained messages arrived", topics.len());
        };
        let topic = String::from_utf8_lossy(&message.topic).into_owned();
        let n: usize = topic.rsplit('/').next().unwrap().parse().unwrap();
        assert_eq!(message.payload.len(), 256 << 10, "{topic}");
        assert_eq!(
            &message.payload[..],
            &pattern(256 << 10, n as u8)[..],
            "{topic} corrupted"
        );
        topics.insert(topic);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_5_mb_payload_passes_both_ways() {
    let broker = TestBroker::start().await;
    let mut old = Client311::connect(broker.port(), "big-311", false).await;
    let mut new = Client::connect(broker.port(), "big-5").await;
    old.subscribe("big/to311").await;
    new.subscribe("big/to5").await;
    let payload = pattern(5_000_000, 7);
    old.client
        .publish("big/to5", rumqttc::QoS::AtLeastOnce, false, payload.clone())
        .await
        .unwrap();
    let got = new.next(WITHIN).await.expect("5 MB from 3.1.1 to 5");
    assert!(
        got.payload[..] == payload[..],
        "5 MB payload corrupted (3.1.1 -> 5)"
    );
    new.publish("big/to311", payload.clone()).await;
    let got = old.next(WITHIN).await.expect("5 MB from 5 to 3.1.1");
    assert!(
        got.payload[..] == payload[..],
        "5 MB payload corrupted (5 -> 3.1.1)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_will_of_a_killed_client_is_published() {
    let broker = TestBroker::start().await;
    let mut watcher = Client::connect(broker.port(), "will-watcher").await;
    watcher.subscribe("wills/dying").await;
    let mut doomed = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port().to_string(),
            "-t",
            "wills/unused",
        ])
        .args([
            "--will-topic",
            "wills/dying",
            "--will-payload",
            "gone",
            "--will-qos",
            "1",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("mosquitto_sub runs");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        watcher.next(Duration::from_millis(500)).await.is_none(),
        "will published too early"
    );
    doomed.kill().await.unwrap();
    let will = watcher.next(WITHIN).await.expect("the will is published");
    assert_eq!(&will.payload[..], b"gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_subscription_splits_work_and_survives_a_killed_member() {
    let broker = TestBroker::start().await;
    // Member A never acknowledges, then dies with messages unacknowledged.
    let mut a = Client311::connect(broker.port(), "share-a", true).await;
    let mut b = Client311::connect(broker.port(), "share-b", false).await;
    a.subscribe("$share/workers/work/items").await;
    b.subscribe("$share/workers/work/items").await;
    let publisher = Client::connect(broker.port(), "share-pub").await;
    let first = 40;
    for n in 0..first {
        publisher.publish("work/items", format!("item-{n}")).await;
    }
    let (mut to_a, mut to_b) = (HashSet::new(), HashSet::new());
    let deadline = tokio::time::Instant::now() + WITHIN;
    while to_a.len() + to_b.len() < first && tokio::time::Instant::now() < deadline {
        tokio::select! {
            Some(p) = a.incoming.recv() => { to_a.insert(p.payload.to_vec()); }
            Some(p) = b.incoming.recv() => { to_b.insert(p.payload.to_vec()); }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    assert!(
        !to_a.is_empty() && !to_b.is_empty(),
        "work not split: a {} b {}",
        to_a.len(),
        to_b.len()
    );
    assert_eq!(
        to_a.union(&to_b).count(),
        first,
        "every item reaches one member"
    );

    a.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in first..first + 10 {
        publisher.publish("work/items", format!("item-{n}")).await;
    }
    let mut later = HashSet::new();
    while later.len() < 10 {
        let p = b
            .next(WITHIN)
            .await
            .expect("the surviving member gets the new work");
        let item = String::from_utf8_lossy(&p.payload).into_owned();
        let n: usize = item.trim_start_matches("item-").parse().unwrap();
        if n >= first {
            later.insert(n);
        }
    }
    // The broker still serves new clients.
    let mut fresh = Client::connect(broker.port(), "share-fresh").await;
    fresh.subscribe("after/kill").await;
    publisher.publish("after/kill", b"alive".to_vec()).await;
    assert!(
        fresh.next(WITHIN).await.is_some(),
        "broker stopped serving after a member died"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_health_check_tells_a_live_broker_from_a_closed_port() {
    let broker = TestBroker::start().await;
    let healthy = tokio::process::Command::new(bin_path("isomesh-broker"))
        .args(["health", "--broker", &broker.url()])
        .output()
        .await
        .unwrap();
    assert!(
        healthy.status.success(),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    let closed = isomesh_tests::free_port();
    let sick = tokio::process::Command::new(bin_path("isomesh-broker"))
        .args([
            "health",
            "--timeout-s",
            "3",
            "--broker",
            &format!("mqtt://127.0.0.1:{closed}"),
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(sick.status.code(), Some(1));
    let said = String::from_utf8_lossy(&sick.stderr);
    assert!(
        said.contains(&closed.to_string()),
        "the error names the address: {said}"
    );
}
