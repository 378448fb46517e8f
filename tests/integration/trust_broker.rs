//! The broker's side of issue 17's trust holes: what an account may do beyond its ACL's topic
//! rules. A Last Will is checked as a publish at CONNECT; a client id belongs to one account; a
//! retained message may sit only where the mesh keeps them; a status may claim only the tier
//! its account serves; the password and ACL files reload on SIGHUP.
//!
//! Accounts and roles come from deploy/acl.conf, as in the security tests. Checks Mosquitto has
//! too (wills against the ACL) run on both brokers; isomesh-broker's own rules live in
//! `isomesh_broker_only` (docs/security.md's Mosquitto recipe says what Mosquitto offers instead).

use isomesh_protos::{NodeStatus, Tier};
use isomesh_testkit::accounts::{login, Accounts, PASSWORD};
use isomesh_testkit::broker::TestBroker;
use isomesh_testkit::mqtt::Client;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(240);
const MANIFEST: &str = "isomesh/modules/mobilenet_v2/manifest";

/// An MQTT 5 connection made by hand, to give it a will; the event loop runs until dropped.
struct Raw {
    _client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects `id` (logged in as `login`, if any) with `will`; the CONNACK's refusal otherwise.
async fn connect_with_will(
    port: u16,
    id: &str,
    login: Option<(&str, &str)>,
    will: Option<LastWill>,
) -> Result<Raw, String> {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    if let Some(will) = will {
        options.set_last_will(will);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let connack = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return Err(format!("refused: {code:?}"))
                }
                Err(e) => return Err(format!("connection error: {e}")),
            }
        }
    })
    .await
    .expect("a CONNACK within 20 s");
    connack?;
    let task = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    Ok(Raw {
        _client: client,
        task,
    })
}

fn status(node: &str, tier: Tier, online: bool) -> Vec<u8> {
    prost::Message::encode_to_vec(&NodeStatus {
        node_id: node.into(),
        tier: tier as i32,
        online,
        ..Default::default()
    })
}

fn will(topic: &str, payload: Vec<u8>) -> LastWill {
    LastWill::new(topic, payload, QoS::AtLeastOnce, true, None)
}

fn refused(result: Result<Raw, String>) -> String {
    match result {
        Ok(_) => panic!("the broker accepted the CONNECT"),
        Err(reason) => reason,
    }
}

/// Waits until `broker` has logged `needle` (a condition, not a sleep).
async fn wait_for_log(broker: &TestBroker, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = broker.log();
        if log.contains(needle) {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker never logged {needle:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// isomesh-broker refuses the CONNECT of a will the account may not publish (0x87), as the
/// brief asked. Mosquitto 2.0.11 was seen to accept that CONNECT and drop the will when it
/// fires (its ACL checks the will's publish then): the retained manifest survives either way.
#[tokio::test(flavor = "multi_thread")]
async fn a_will_the_account_may_not_publish_never_reaches_retained_messages() {
    let accounts = Accounts::new(&["d1", "rollout", "operator"], &[]);
    let broker = TestBroker::start_secured(accounts.access.clone()).await;
    let port = broker.port();
    let rollout = login(port, "1", "rollout").await;
    rollout
        .publish_retained(MANIFEST, b"manifest v1".to_vec())
        .await;
    let mut reader = login(port, "reader", "operator").await;
    reader.subscribe("isomesh/status/d1").await;

    // A stolen device account tries to wipe the retained manifest through its will.
    let wiper = connect_with_will(
        port,
        "d1:wiper",
        Some(("d1", PASSWORD)),
        Some(will(MANIFEST, Vec::new())),
    )
    .await;
    match broker.kind {
        isomesh_testkit::broker::BrokerKind::Isomesh => {
            let reason = refused(wiper);
            assert!(reason.contains("NotAuthorized"), "{reason}");
            let log = wait_for_log(&broker, "its Last Will is refused").await;
            assert!(log.contains("d1:wiper") && log.contains(MANIFEST), "{log}");
        }
        // Gone without a DISCONNECT: the will fires (and must be dropped).
        isomesh_testkit::broker::BrokerKind::Mosquitto => drop(wiper.expect("CONNACK")),
    }

    // A node's own offline status as its will still works: connected, then gone without a
    // DISCONNECT, its will is published. (On Mosquitto it also marks that the wiper's will,
    // which fired first, has been handled.)
    let node = connect_with_will(
        port,
        "isomesh-node-d1",
        Some(("d1", PASSWORD)),
        Some(will("isomesh/status/d1", status("d1", Tier::Device, false))),
    )
    .await
    .expect("a node's own status will is accepted");
    drop(node);
    let offline = reader.next(WITHIN).await.expect("the will");
    let offline: NodeStatus = prost::Message::decode(offline.payload.as_ref()).expect("status");
    assert!(
        !offline.online && offline.tier() == Tier::Device,
        "{offline:?}"
    );

    // The manifest is still there for any fresh subscriber.
    let mut fresh = login(port, "fresh", "operator").await;
    fresh.subscribe(MANIFEST).await;
    let kept = fresh.next(Duration::from_secs(20)).await.expect("retained");
    assert_eq!(kept.payload.as_ref(), b"manifest v1");
    drop(rollout);
}

mod isomesh_broker_only {
    //! isomesh-broker's own rules. Mosquitto has no client-id ownership (see docs/security.md's
    //! recipe: `use_username_as_clientid`), no retained-place rule and no status check.

    use super::*;
    use isomesh_testkit::accounts::puback_reason;
    use isomesh_testkit::node::{wait_status_as, NodeSpec, TestNode};

    #[tokio::test(flavor = "multi_thread")]
    async fn accounts_cannot_pose_as_other_clients_or_tiers() {
        let accounts = Accounts::new(&["d1", "d2", "camera", "operator"], &[]);
        let broker = TestBroker::start_secured(accounts.access.clone()).await;
        let port = broker.port();
        let operator = Some(("operator", PASSWORD));
        let _d1 = TestNode::spawn(&NodeSpec {
            extra_args: vec!["--password".into(), PASSWORD.into()],
            ..NodeSpec::with_guest("d1", "device", port)
        });
        wait_status_as(port, operator, "d1", WITHIN, |s| {
            s.online && s.module.is_some()
        })
        .await;

        // d2's account takes d1's client id (and so its session): refused.
        let thief = Client::try_connect(port, "isomesh-node-d1", Some(("d2", PASSWORD))).await;
        let reason = thief.err().expect("d2 took isomesh-node-d1");
        assert!(reason.contains("NotAuthorized"), "{reason}");
        let log = wait_for_log(&broker, "client id isomesh-node-d1 belongs to account d1").await;
        assert!(log.contains("d2"), "{log}");
        // The camera account may use only `camera:...`.
        for id in ["operator:x", "isomesh-node-d1", "isomesh-classify-1"] {
            let reason = Client::try_connect(port, id, Some(("camera", PASSWORD)))
                .await
                .err()
                .unwrap_or_else(|| panic!("camera connected as {id}"));
            assert!(reason.contains("NotAuthorized"), "{id}: {reason}");
        }
        let mut camera = login(port, "x", "camera").await;

        // d1 was not disturbed: still online, and it answers a job.
        wait_status_as(port, operator, "d1", WITHIN, |s| s.online).await;
        camera.subscribe("isomesh/results/cam-x").await;
        camera
            .publish(
                "isomesh/jobs/d1",
                isomesh_testkit::photo_job(0, "after-thief", "isomesh/results/cam-x", 0),
            )
            .await;
        let answer = camera.next(WITHIN).await.expect("d1 answers");
        let answer: isomesh_protos::JobResult =
            prost::Message::decode(answer.payload.as_ref()).expect("JobResult");
        assert!(answer.error.is_empty() && answer.node == "d1", "{answer:?}");

        // d1's account claims to be a cloud node: refused; a device claim passes.
        let mut liar = login(port, "liar", "d1").await;
        liar.client
            .publish(
                "isomesh/status/d1",
                QoS::AtLeastOnce,
                false,
                status("d1", Tier::Cloud, true),
            )
            .await
            .expect("publish");
        assert_eq!(
            puback_reason(liar.next_ack(Duration::from_secs(10)).await),
            PubAckReason::NotAuthorized
        );
        wait_for_log(&broker, "a status claiming tier cloud").await;
        // ... and the same claim as a will is refused with the CONNECT.
        let reason = refused(
            connect_with_will(
                port,
                "d1:liar-will",
                Some(("d1", PASSWORD)),
                Some(will("isomesh/status/d1", status("d1", Tier::Cloud, false))),
            )
            .await,
        );
        assert!(reason.contains("NotAuthorized"), "{reason}");
        let status = wait_status_as(port, operator, "d1", WITHIN, |s| s.online).await;
        assert_eq!(status.tier(), Tier::Device, "{status:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn retained_messages_only_where_the_mesh_keeps_them() {
        let accounts = Accounts::new(&["camera", "operator"], &[]);
        let broker = TestBroker::start_secured(accounts.access.clone()).await;
        let port = broker.port();
        let mut camera = login(port, "retainer", "camera").await;
        let photo = isomesh_testkit::photos()[0].bytes();
        camera
            .client
            .publish("isomesh/images/d1", QoS::AtLeastOnce, true, photo.clone())
            .await
            .expect("publish");
        assert_eq!(
            puback_reason(camera.next_ack(Duration::from_secs(10)).await),
            PubAckReason::NotAuthorized
        );
        let log = wait_for_log(&broker, "not authorized to retain a message").await;
        assert!(log.contains("camera:retainer"), "{log}");
        // The same photo, not retained, is accepted: the rule is about retaining.
        camera
            .client
            .publish("isomesh/images/d1", QoS::AtLeastOnce, false, photo)
            .await
            .expect("publish");
        assert_eq!(
            puback_reason(camera.next_ack(Duration::from_secs(10)).await),
            PubAckReason::Success
        );
        let mut fresh = login(port, "fresh", "operator").await;
        fresh.subscribe("isomesh/images/#").await;
        assert!(
            fresh.next(Duration::from_secs(2)).await.is_none(),
            "a refused retained photo was kept"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sighup_reloads_the_accounts_and_a_bad_file_keeps_the_old_ones() {
        let accounts = Accounts::new(&["d1", "camera"], &[]);
        let broker = TestBroker::start_secured(accounts.access.clone()).await;
        let port = broker.port();
        login(port, "before", "camera").await;
        let hup = || {
            let out = std::process::Command::new("kill")
                .args(["-HUP", &broker.pid().to_string()])
                .output()
                .expect("kill -HUP");
            assert!(out.status.success(), "{out:?}");
        };

        // camera's account removed from the file, then SIGHUP.
        let file = &accounts.access.password_file;
        let text = std::fs::read_to_string(file).expect("passwd");
        let without_camera: String = text
            .lines()
            .filter(|l| !l.starts_with("camera:"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(file, &without_camera).expect("write passwd");
        hup();
        wait_for_log(&broker, "reloaded the password and ACL files").await;
        let reason = Client::try_connect(port, "camera:after", Some(("camera", PASSWORD)))
            .await
            .err()
            .expect("a removed account still connects");
        assert!(reason.contains("BadUserNamePassword"), "{reason}");
        login(port, "after", "d1").await;

        // A broken file: logged with its line, and the accounts in force stay.
        std::fs::write(file, format!("{without_camera}mallory:hunter2\n")).expect("write");
        hup();
        let log = wait_for_log(&broker, "cannot reload").await;
        assert!(log.contains("plain-text"), "{log}");
        login(port, "after-bad", "d1").await;
        let _ = &accounts.dir;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_acl_without_passwords_warns_and_still_checks_wills() {
        let dir = tempfile::tempdir().expect("tempdir");
        let acl_file = isomesh_testkit::workspace_root().join("deploy/acl.conf");
        let log_file = dir.path().join("broker.log");
        let port = isomesh_testkit::free_port();
        let mut broker = std::process::Command::new(isomesh_testkit::bin_path("isomesh-broker"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--allow-anonymous",
            ])
            .arg("--acl-file")
            .arg(&acl_file)
            .stderr(std::fs::File::create(&log_file).expect("log"))
            .spawn()
            .expect("isomesh-broker");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let log = loop {
            let log = std::fs::read_to_string(&log_file).unwrap_or_default();
            if log.contains("isomesh-broker serving") {
                break log;
            }
            assert!(tokio::time::Instant::now() < deadline, "{log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            log.contains("usernames are whatever clients claim"),
            "{log}"
        );
        // An anonymous client, and one claiming the d1 username, may not will a module away.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let anonymous = loop {
            match connect_with_will(port, "anon-wiper", None, Some(will(MANIFEST, Vec::new())))
                .await
            {
                Err(e) if e.starts_with("connection error") => {
                    assert!(tokio::time::Instant::now() < deadline, "{e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other,
            }
        };
        let reason = refused(anonymous);
        assert!(reason.contains("NotAuthorized"), "{reason}");
        let reason = refused(
            connect_with_will(
                port,
                "d1:wiper",
                Some(("d1", "")),
                Some(will(MANIFEST, Vec::new())),
            )
            .await,
        );
        assert!(reason.contains("NotAuthorized"), "{reason}");
        // Without a will, the anonymous client gets in.
        connect_with_will(port, "anon-reader", None, None)
            .await
            .expect("anonymous access is on");
        let _ = broker.kill();
        let _ = broker.wait();
    }
}
