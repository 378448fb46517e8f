//! Broker tests: the flows the mesh relies on, with real clients (rumqttc over MQTT 3.1.1 and 5,
//! `mosquitto_sub`/`mosquitto_pub`), against `isomesh-broker` and Mosquitto alike
//! (`ISOMESH_TEST_BROKER=mosquitto`). Every wait is generous and bounded; nothing asserts speed.

use isomesh_testkit::bin_path;
use isomesh_testkit::broker::{BrokerKind, TestBroker};
use isomesh_testkit::mqtt::Client;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

const WITHIN: Duration = Duration::from_secs(60);

/// An MQTT 3.1.1 client (rumqttc v4) whose incoming publishes arrive on a channel.
struct Client311 {
    client: rumqttc::AsyncClient,
    incoming: mpsc::UnboundedReceiver<rumqttc::Publish>,
    subacks: mpsc::UnboundedReceiver<rumqttc::SubAck>,
    task: tokio::task::JoinHandle<()>,
}

impl Client311 {
    async fn connect(port: u16, id: &str, manual_acks: bool) -> Client311 {
        Client311::connect_with(port, id, manual_acks, Duration::from_secs(30), None).await
    }

    /// `keep_alive` zero means the client never pings (allowed by MQTT, refused by some brokers);
    /// `will` is a `(topic, payload)` Last Will at QoS 1.
    async fn connect_with(
        port: u16,
        id: &str,
        manual_acks: bool,
        keep_alive: Duration,
        will: Option<(&str, &str)>,
    ) -> Client311 {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options
            .set_keep_alive(keep_alive)
            .set_max_packet_size(64 << 20, 64 << 20)
            .set_manual_acks(manual_acks);
        if let Some((topic, payload)) = will {
            options.set_last_will(rumqttc::LastWill::new(
                topic,
                payload.as_bytes().to_vec(),
                rumqttc::QoS::AtLeastOnce,
                false,
            ));
        }
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
        let (tx, incoming) = mpsc::unbounded_channel();
        let (subacks_tx, subacks) = mpsc::unbounded_channel();
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
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack))) => {
                        let _ = subacks_tx.send(ack);
                    }
                    Ok(_) => {}
                    // A pause before polling again (which reconnects), not a wait for anything.
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(20), ready)
            .await
            .unwrap_or_else(|_| panic!("{id}: no CONNACK within 20 s"))
            .expect("event loop alive");
        Client311 {
            client,
            incoming,
            subacks,
            task,
        }
    }

    /// Subscribes at QoS 1 and returns once the broker's SUBACK grants it.
    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let ack = tokio::time::timeout(Duration::from_secs(30), self.subacks.recv())
            .await
            .unwrap_or_else(|_| panic!("no SUBACK for {filter:?} within 30 s"))
            .expect("event loop alive");
        assert!(
            matches!(
                ack.return_codes.as_slice(),
                [rumqttc::SubscribeReasonCode::Success(_)]
            ),
            "the broker refused the subscription to {filter:?}: {ack:?}"
        );
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

/// `len` bytes that differ with `seed`, so a swapped or truncated payload is noticed.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// `mosquitto_pub`/`mosquitto_sub` arguments reaching the test broker over MQTT 3.1.1.
fn cli_args(broker: &TestBroker) -> Vec<String> {
    [
        "-h",
        broker.host(),
        "-p",
        &broker.port().to_string(),
        "-V",
        "mqttv311",
    ]
    .map(String::from)
    .to_vec()
}

/// `mosquitto_sub -d` over MQTT 3.1.1: its debug lines on stdout say when the broker has
/// acknowledged its subscription; the other lines are the messages it got.
struct MosquittoSub {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    /// Every stdout line read so far.
    seen: Vec<String>,
}

impl MosquittoSub {
    fn spawn(broker: &TestBroker, args: &[&str]) -> MosquittoSub {
        // Line-buffered: into a pipe, mosquitto_sub would hold its lines (the SUBACK among them)
        // until it exits.
        let mut child = tokio::process::Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(cli_args(broker))
            .arg("-d")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub runs (Debian package mosquitto-clients)");
        let stdout = child.stdout.take().expect("mosquitto_sub's stdout");
        MosquittoSub {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
            seen: Vec::new(),
        }
    }

    /// Waits until it has received the broker's SUBACK (so it is connected and subscribed).
    async fn wait_subscribed(&mut self) {
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.next_line()).await {
                Ok(Ok(Some(line))) => {
                    let subscribed = line.contains("received SUBACK");
                    self.seen.push(line);
                    if subscribed {
                        return;
                    }
                }
                other => panic!(
                    "mosquitto_sub got no SUBACK within {WITHIN:?} ({other:?}); it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for it to exit: its exit status, the messages it printed (not its debug lines)
    /// and its stderr.
    async fn finish(mut self) -> (std::process::ExitStatus, Vec<String>, String) {
        while let Ok(Some(line)) = self.lines.next_line().await {
            self.seen.push(line);
        }
        let out = self
            .child
            .wait_with_output()
            .await
            .expect("mosquitto_sub ends");
        let messages = self
            .seen
            .into_iter()
            .filter(|l| !l.starts_with("Client ") && !l.starts_with("Subscribed (mid"))
            .collect();
        (
            out.status,
            messages,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_311_subscriber_gets_v5_publishes_with_properties_and_311_clients_still_connect() {
    let broker = TestBroker::start().await;
    let mut sub = MosquittoSub::spawn(
        &broker,
        &["-q", "1", "-C", "1", "-W", "60", "-t", "props/topic"],
    );
    sub.wait_subscribed().await;
    // A v5 subscriber too: the properties must reach it intact.
    let mut v5_sub = Client::connect(broker.port(), "props-v5-sub").await;
    v5_sub.subscribe("props/topic").await;
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
        .expect("v5 publish queued");
    let (status, messages, stderr) = sub.finish().await;
    assert!(
        status.success(),
        "the 3.1.1 mosquitto_sub got nothing ({status}): {stderr}"
    );
    assert_eq!(messages, ["with props"]);
    let got = v5_sub
        .next(WITHIN)
        .await
        .expect("the v5 subscriber gets it");
    let props = got.properties.expect("properties reach the v5 subscriber");
    assert_eq!(props.response_topic.as_deref(), Some("props/reply"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"c1"[..]));
    assert!(
        props.user_properties.contains(&("k".into(), "v".into())),
        "user property lost: {:?}",
        props.user_properties
    );
    // New 3.1.1 clients are still welcome.
    for n in 0..3 {
        let out = tokio::process::Command::new("mosquitto_pub")
            .args(cli_args(&broker))
            .args(["-q", "1", "-t", "after", "-m", &n.to_string()])
            .output()
            .await
            .expect("mosquitto_pub runs");
        assert!(
            out.status.success(),
            "a 3.1.1 client was refused after a v5 publish with properties: {}",
            String::from_utf8_lossy(&out.stderr)
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
        .expect("3.1.1 publish queued");
    new.publish("both/to311", b"from 5".to_vec()).await;
    let got5 = new.next(WITHIN).await.expect("v5 receives from 3.1.1");
    assert_eq!(&got5.payload[..], b"from 3.1.1");
    let got311 = old.next(WITHIN).await.expect("3.1.1 receives from v5");
    assert_eq!(&got311.payload[..], b"from 5");
}

#[tokio::test(flavor = "multi_thread")]
async fn keepalive_zero_is_accepted() {
    let broker = TestBroker::start().await;
    let mut quiet =
        Client311::connect_with(broker.port(), "ka0", false, Duration::ZERO, None).await;
    quiet.subscribe("ka0/in").await;
    let publisher = Client::connect(broker.port(), "ka0-pub").await;
    publisher.publish("ka0/in", b"still here".to_vec()).await;
    let got = quiet
        .next(WITHIN)
        .await
        .expect("a keepalive-0 client is served");
    assert_eq!(&got.payload[..], b"still here");
}

#[tokio::test(flavor = "multi_thread")]
async fn all_150_retained_256k_messages_reach_a_qos1_wildcard_subscriber() {
    let broker = TestBroker::start().await;
    let publisher = Client::connect(broker.port(), "retain-pub").await;
    let count = 150;
    let size = 256 << 10;
    for n in 0..count {
        publisher
            .client
            .publish(
                format!("retained150/{n}"),
                QoS5::AtLeastOnce,
                true,
                pattern(size, n as u8),
            )
            .await
            .expect("retained publish queued");
    }
    // The publisher's queue drains asynchronously: a late subscriber to the last topic tells
    // when the whole set has landed.
    let mut marker = Client::connect(broker.port(), "retain-marker").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        marker
            .subscribe(&format!("retained150/{}", count - 1))
            .await;
        if marker.next(Duration::from_secs(2)).await.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the last retained message never landed; broker log:\n{}",
            broker.log()
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
        let n: usize = topic
            .strip_prefix("retained150/")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected topic {topic:?}"));
        assert!(message.retain, "{topic} arrived without the retain flag");
        assert_eq!(message.payload.len(), size, "{topic} truncated");
        assert!(
            message.payload[..] == pattern(size, n as u8)[..],
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
        .expect("3.1.1 publish queued");
    let got = new.next(WITHIN).await.expect("5 MB from 3.1.1 to 5");
    assert!(
        got.payload[..] == payload[..],
        "5 MB payload corrupted (3.1.1 -> 5): {} bytes arrived",
        got.payload.len()
    );
    new.publish("big/to311", payload.clone()).await;
    let got = old.next(WITHIN).await.expect("5 MB from 5 to 3.1.1");
    assert!(
        got.payload[..] == payload[..],
        "5 MB payload corrupted (5 -> 3.1.1): {} bytes arrived",
        got.payload.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_will_of_a_killed_client_is_published() {
    let broker = TestBroker::start().await;
    let mut watcher = Client::connect(broker.port(), "will-watcher").await;
    watcher.subscribe("wills/dying").await;
    let mut doomed = MosquittoSub::spawn(
        &broker,
        &[
            "-i",
            "will-doomed",
            "-t",
            "wills/unused",
            "--will-topic",
            "wills/dying",
            "--will-payload",
            "gone",
            "--will-qos",
            "1",
        ],
    );
    // Connected (its SUBACK came) and alive: no will yet, also for a while after.
    doomed.wait_subscribed().await;
    assert!(
        watcher.next(Duration::from_millis(1500)).await.is_none(),
        "will published while its client was alive"
    );
    assert!(
        doomed.child.try_wait().ok().flatten().is_none(),
        "mosquitto_sub exited early"
    );
    // SIGKILL: the TCP connection drops without DISCONNECT.
    doomed.child.kill().await.expect("kill mosquitto_sub");
    let will = watcher.next(WITHIN).await.expect("the will is published");
    assert_eq!(&will.payload[..], b"gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_subscription_splits_work_and_survives_a_killed_member() {
    let broker = TestBroker::start().await;
    // Member A never acknowledges, then dies with messages unacknowledged; its will tells when
    // the broker has noticed.
    let mut a = Client311::connect_with(
        broker.port(),
        "share-a",
        true,
        Duration::from_secs(30),
        Some(("share/a-died", "a")),
    )
    .await;
    let mut a_died = Client::connect(broker.port(), "share-a-watch").await;
    a_died.subscribe("share/a-died").await;
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
        "work not split: a got {}, b got {}",
        to_a.len(),
        to_b.len()
    );
    assert!(
        to_a.is_disjoint(&to_b),
        "an item went to both members: {:?}",
        to_a.intersection(&to_b).collect::<Vec<_>>()
    );
    assert_eq!(
        to_a.len() + to_b.len(),
        first,
        "every item reaches exactly one member"
    );

    a.kill();
    // New items only once the broker has handled A's death (it publishes the will then).
    let will = a_died
        .next(WITHIN)
        .await
        .expect("the broker notices the killed member (its will)");
    assert_eq!(&will.payload[..], b"a");
    for n in first..first + 10 {
        publisher.publish("work/items", format!("item-{n}")).await;
    }
    // The broker may hand A's unacknowledged items to B again: only the new ones are counted.
    let mut later = HashSet::new();
    while later.len() < 10 {
        let p = b
            .next(WITHIN)
            .await
            .unwrap_or_else(|| panic!("the surviving member got {} of 10 new items", later.len()));
        let item = String::from_utf8_lossy(&p.payload).into_owned();
        let n: usize = item
            .strip_prefix("item-")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected payload {item:?}"));
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

/// Tests of `isomesh-broker` itself, meaningless on Mosquitto. The Mosquitto run filters them out
/// by this module's name (`cargo test ... --test integration -- --skip isomesh_broker_only`), so
/// they are reported there as filtered out, never as passed.
mod isomesh_broker_only {
    use super::*;

    /// An `isomesh-broker` for the test; panics when the suite is meant for Mosquitto, so a run
    /// that forgot the `--skip` fails instead of counting this test as passed on Mosquitto.
    async fn isomesh_broker() -> TestBroker {
        assert_eq!(
            BrokerKind::from_env(),
            BrokerKind::Isomesh,
            "an isomesh-broker-only test in a Mosquitto run: pass `--skip isomesh_broker_only`"
        );
        TestBroker::start_kind(BrokerKind::Isomesh).await
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_health_check_tells_a_live_broker_from_a_closed_port() {
        let broker = isomesh_broker().await;
        let healthy = tokio::process::Command::new(bin_path("isomesh-broker"))
            .args(["health", "--broker", &broker.url()])
            .output()
            .await
            .expect("isomesh-broker health runs");
        assert!(
            healthy.status.success(),
            "healthy broker reported sick: {}",
            String::from_utf8_lossy(&healthy.stderr)
        );
        let closed = isomesh_testkit::free_port();
        let sick = tokio::process::Command::new(bin_path("isomesh-broker"))
            .args([
                "health",
                "--timeout-s",
                "10",
                "--broker",
                &format!("mqtt://127.0.0.1:{closed}"),
            ])
            .output()
            .await
            .expect("isomesh-broker health runs");
        assert_eq!(sick.status.code(), Some(1), "exit code on a closed port");
        let said = String::from_utf8_lossy(&sick.stderr);
        assert!(
            said.contains(&format!("127.0.0.1:{closed}")) && said.contains("cannot reach"),
            "the error should name the unreachable address: {said}"
        );
    }

    /// Scrapes `addr` until `ready` holds for the page (panics with the last page after
    /// [`WITHIN`]).
    async fn wait_for_page(addr: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            let page = isomesh_testkit::metrics::scrape(addr).unwrap_or_else(|e| e.to_string());
            if ready(&page) {
                return page;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the broker's metrics never showed {what} within {WITHIN:?}; the last page:\n{page}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Publishes `payload(i)` retained at QoS 1 on `m/0` to `m/4`.
    async fn publish_retained(publisher: &Client311, payload: impl Fn(u8) -> Vec<u8>) {
        for i in 0..5u8 {
            publisher
                .client
                .publish(
                    format!("m/{i}"),
                    rumqttc::QoS::AtLeastOnce,
                    true,
                    payload(i),
                )
                .await
                .expect("publish");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_metrics_page_counts_clients_messages_queues_and_retained_bytes() {
        use isomesh_testkit::metrics::value;
        assert_eq!(
            BrokerKind::from_env(),
            BrokerKind::Isomesh,
            "pass `--skip isomesh_broker_only`"
        );
        let broker = TestBroker::start_with_metrics().await;
        let addr = broker.metrics_addr();
        let gauge = |page: &str, name: &str| value(page, name).unwrap_or(-1.0);

        // A persistent session whose client goes away: what it misses waits in its queue.
        let mut away = MosquittoSub::spawn(&broker, &["-c", "-i", "away", "-q", "1", "-t", "m/#"]);
        away.wait_subscribed().await;
        away.child.start_kill().expect("kill mosquitto_sub");
        let _ = away.child.wait().await;
        let mut watcher = Client311::connect(broker.port(), "watcher", false).await;
        watcher.subscribe("m/#").await;
        let publisher = Client311::connect(broker.port(), "publisher", false).await;
        wait_for_page(&addr, "2 connections and 3 sessions", |page| {
            gauge(page, "isomesh_broker_connections") == 2.0
                && gauge(page, "isomesh_broker_sessions") == 3.0
        })
        .await;

        // Five retained messages of 1 000 bytes: the watcher gets them, the queue of the
        // session that is away holds them, the retained store keeps them.
        publish_retained(&publisher, |i| pattern(1_000, i)).await;
        for i in 0..5 {
            watcher
                .next(WITHIN)
                .await
                .unwrap_or_else(|| panic!("the watcher got {i} of 5 messages"));
        }
        let page = wait_for_page(
            &addr,
            "5 messages received, delivered, queued and retained",
            |page| {
                gauge(page, "isomesh_broker_messages_received_total") >= 5.0
                    && gauge(page, "isomesh_broker_messages_delivered_total") >= 5.0
                    && gauge(page, "isomesh_broker_queued_messages") == 5.0
                    && gauge(page, "isomesh_broker_retained_messages") == 5.0
                    && gauge(page, "isomesh_broker_retained_bytes") == 5_000.0
            },
        )
        .await;
        assert_eq!(
            gauge(&page, "isomesh_broker_connects_total{result=\"accepted\"}"),
            3.0,
            "{page}"
        );
        assert_eq!(
            gauge(
                &page,
                "isomesh_broker_messages_dropped_total{reason=\"queue_full\"}"
            ),
            0.0,
            "{page}"
        );
        assert!(
            gauge(&page, "process_resident_memory_bytes") > 0.0,
            "{page}"
        );

        // The retained messages cleared (empty payloads): their bytes are gone from the page.
        publish_retained(&publisher, |_| Vec::new()).await;
        wait_for_page(&addr, "no retained message left", |page| {
            gauge(page, "isomesh_broker_retained_messages") == 0.0
                && gauge(page, "isomesh_broker_retained_bytes") == 0.0
        })
        .await;
        let (health, _) = isomesh_testkit::metrics::get(&addr, "/healthz").expect("GET /healthz");
        assert_eq!(health, 200);
        let (missing, body) =
            isomesh_testkit::metrics::get(&addr, "/nothing").expect("GET /nothing");
        assert_eq!(missing, 404, "{body}");
    }
}
