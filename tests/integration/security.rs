//! Security: which modules a node runs, what a running module may do, and who may use the broker.
//!
//! Module trust does not rest on the broker or the disk: a file in the module directory runs
//! only with a manifest signed by a trusted key beside it, unless the node was started with
//! `--allow-unsigned`. The sandbox's limits are public in every status. The broker asks for a
//! login and enforces the roles of deploy/acl.conf; the same files configure Mosquitto.

use isomesh_module::signing::SecretKey;
use isomesh_protos::rollout_state::Phase;
use isomesh_protos::NodeStatus;
use isomesh_testkit::accounts::{login, puback_reason, readable_by_all, Accounts, PASSWORD};
use isomesh_testkit::broker::{BrokerKind, Tls};
use isomesh_testkit::mqtt::Client;
use isomesh_testkit::node::{
    classify_photo, rejected, rejected_with, serves, swapped_in, wait_status, wait_status_as,
    ModuleFile, NodeSpec, TestNode,
};
use isomesh_testkit::rollout::{self, guest_module_v2, MODULE_NAME, VERSION_1, VERSION_2};
use isomesh_testkit::{broker::TestBroker, photos};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(240);

/// Whether `status` says a module file was refused as untrusted, for a reason mentioning
/// `words` (the code is the same for every trust failure; the words tell them apart).
fn untrusted_because(status: &NodeStatus, words: &str) -> bool {
    rejected_with(status, "untrusted") && rejected(status).is_some_and(|r| r.contains(words))
}

/// Writes `bytes` as module file `name` into `dir` in one step (as a rollout does).
fn drop_in(dir: &std::path::Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).expect("write module");
    std::fs::rename(&tmp, dir.join(name)).expect("rename module");
}

#[tokio::test(flavor = "multi_thread")]
async fn modules_copied_in_without_a_trusted_signature_never_run() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let node = TestNode::start(NodeSpec::with_guest("s1", "edge", port)).await;
    let dir = node.modules_dir();
    let v2 = std::fs::read(guest_module_v2()).expect("module 0.2.0");

    // Unsigned: refused, with a reason that says what to do; 0.1.0 keeps serving.
    drop_in(&dir, "mobilenet_v2-0.2.0.wasm", &v2);
    let status = wait_status(port, "s1", WITHIN, |s| untrusted_because(s, "unsigned")).await;
    assert!(serves(&status, VERSION_1), "{status:?}");
    let reason = status.rollout.map(|r| r.reason).unwrap_or_default();
    assert!(reason.contains("isomesh sign"), "{reason}");

    // Signed by a key the node does not trust, as a forger with broker or disk access would.
    let forger = SecretKey::generate().expect("key");
    let path = dir.join("mobilenet_v2-0.2.0.wasm");
    isomesh_module::trust::write_signed_manifest(&path, &v2, MODULE_NAME, VERSION_2, &forger)
        .expect("forged manifest");
    drop_in(&dir, "mobilenet_v2-0.2.0.wasm", &v2);
    wait_status(port, "s1", WITHIN, |s| {
        untrusted_because(s, "does not trust") && serves(s, VERSION_1)
    })
    .await;

    // A true signature for other bytes: the file was swapped after signing.
    rollout::sign_file(&path, b"\0asm other bytes", MODULE_NAME, VERSION_2);
    drop_in(&dir, "mobilenet_v2-0.2.0.wasm", &v2);
    wait_status(port, "s1", WITHIN, |s| {
        untrusted_because(s, "not for this file") && serves(s, VERSION_1)
    })
    .await;
    let answer = classify_photo(port, "s1", WITHIN).await;
    assert_eq!(answer["module"]["version"], VERSION_1, "{answer}");

    // Signed by the trusted key: swapped in.
    rollout::sign_file(&path, &v2, MODULE_NAME, VERSION_2);
    drop_in(&dir, "mobilenet_v2-0.2.0.wasm", &v2);
    wait_status(port, "s1", WITHIN, |s| {
        serves(s, VERSION_2) && swapped_in(s, VERSION_2)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsigned_module_runs_only_with_allow_unsigned_and_a_warning() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let unsigned = || {
        let bytes = std::fs::read(isomesh_testkit::guest_module()).expect("guest module");
        vec![ModuleFile::unsigned("mobilenet_v2.wasm", bytes)]
    };

    // Without the flag the node starts, serves no module, and answers jobs with an error.
    let strict = TestNode::spawn(&NodeSpec {
        id: "s2",
        tier: "device",
        broker_port: port,
        modules: unsigned(),
        extra_args: Vec::new(),
    });
    let status = wait_status(port, "s2", WITHIN, |s| s.online).await;
    assert!(status.module.is_none(), "{status:?}");
    let answer = classify_photo(port, "s2", WITHIN).await;
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("no classifier module")),
        "{answer}"
    );
    // Only the log says why: a file refused at start-up leaves no rollout state.
    let log = strict.log();
    assert!(
        log.contains("module refused") && log.contains("unsigned"),
        "{log}"
    );
    assert!(!status.sandbox.expect("limits").allow_unsigned);

    // With it the same file serves, every load is logged, and the status says so.
    let lax = TestNode::start(NodeSpec {
        id: "s3",
        tier: "device",
        broker_port: port,
        modules: unsigned(),
        extra_args: vec!["--allow-unsigned".into()],
    })
    .await;
    let status = wait_status(port, "s3", WITHIN, |s| serves(s, VERSION_1)).await;
    assert!(status.sandbox.expect("limits").allow_unsigned);
    let answer = classify_photo(port, "s3", WITHIN).await;
    assert!(answer["top"][0]["index"].is_u64(), "{answer}");
    // The warning on every load is the promise itself: only the log can show it.
    let log = lax.log();
    assert!(
        log.contains("running a module without a valid signature because of --allow-unsigned"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn statuses_show_the_sandbox_limits_the_node_was_given() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let mut spec = NodeSpec::with_guest("s4", "cloud", port);
    spec.extra_args = [
        "--memory-limit-mb",
        "512",
        "--call-timeout-ms",
        "4000",
        "--max-payload-bytes",
        "2000000",
    ]
    .map(String::from)
    .to_vec();
    let _node = TestNode::start(spec).await;
    let status = wait_status(port, "s4", WITHIN, |s| serves(s, VERSION_1)).await;
    let limits = status.sandbox.expect("limits in the status");
    assert_eq!(limits.memory_limit_bytes, 512 << 20);
    assert_eq!(limits.call_timeout_ms, 4000);
    assert_eq!(limits.max_payload_bytes, 2_000_000);
    assert_eq!(
        (limits.max_instances, limits.max_memories, limits.max_tables),
        (1, 1, 1)
    );
    assert!(!limits.wasi.is_empty());
    assert!(
        !limits
            .wasi
            .iter()
            .any(|c| c.contains("file") || c.contains("socket")),
        "{:?}",
        limits.wasi
    );

    // `isomesh status --json` shows them too.
    let out = std::process::Command::new(isomesh_testkit::bin_path("isomesh"))
        .args(["status", "--broker", &broker.url(), "--json"])
        .output()
        .expect("isomesh status");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("\"s4\""))
        .unwrap_or_else(|| panic!("s4 in {text}"));
    let json: Value = serde_json::from_str(line).expect("JSON line");
    assert_eq!(
        json["sandbox"]["memory_limit_bytes"],
        512u64 << 20,
        "{json}"
    );
    assert_eq!(json["sandbox"]["allow_unsigned"], false, "{json}");
}

// ---------------------------------------------------------------------------------------------
// The broker: logins and roles (deploy/acl.conf), on isomesh-broker and on Mosquitto alike.
// ---------------------------------------------------------------------------------------------

/// Runs `isomesh-broker passwd FILE USER` on a terminal of its own (`script` gives it a pty),
/// typing each of `typed` after the next prompt shows; returns (exit code, what it printed).
async fn passwd_at_a_terminal(file: &std::path::Path, user: &str, typed: &[&str]) -> (i32, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let command = format!(
        "{} passwd {} {user} --iterations 1000",
        isomesh_testkit::bin_path("isomesh-broker").display(),
        file.display()
    );
    let mut child = tokio::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("ISOMESH_NEW_PASSWORD")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut printed = String::new();
    let mut buf = [0u8; 256];
    for (n, line) in typed.iter().enumerate() {
        // The n+1-th prompt (each ends in ": "), then the line.
        while printed.matches("assword").count() <= n {
            let read = tokio::time::timeout(WITHIN, stdout.read(&mut buf))
                .await
                .expect("a prompt")
                .expect("read");
            assert!(read > 0, "no prompt {}; printed: {printed:?}", n + 1);
            printed.push_str(&String::from_utf8_lossy(&buf[..read]));
        }
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("type");
    }
    drop(stdin);
    stdout.read_to_string(&mut printed).await.expect("read");
    let status = child.wait().await.expect("script");
    (status.code().unwrap_or(-1), printed)
}

#[tokio::test(flavor = "multi_thread")]
async fn passwd_at_a_terminal_asks_twice_and_the_account_logs_in() {
    let accounts = Accounts::new(&[], &[]);
    let file = &accounts.access.password_file;

    // Two different passwords: refused, nothing written.
    let (code, printed) = passwd_at_a_terminal(file, "operator", &["one pass", "another"]).await;
    assert_ne!(code, 0, "{printed}");
    assert!(printed.contains("do not match"), "{printed}");
    assert!(!file.exists(), "written although the passwords differ");

    // The same twice: the account is made. (Whether the terminal echoed it is not checked: a
    // line typed in the instant between the prompt and rpassword turning echo off would be
    // echoed, so such a check could fail on a busy machine for no fault of the code.)
    let typed = "typed at a terminal";
    let (code, printed) = passwd_at_a_terminal(file, "operator", &[typed, typed]).await;
    assert_eq!(code, 0, "{printed}");
    assert!(printed.contains("Password for operator:"), "{printed}");
    assert!(printed.contains("Reenter password:"), "{printed}");
    readable_by_all(accounts.dir.path());

    // Either broker takes the account (the file is Mosquitto's format).
    let broker = TestBroker::start_secured(accounts.access.clone()).await;
    Client::try_connect(broker.port(), "operator:p", Some(("operator", typed)))
        .await
        .expect("the account made at the terminal logs in");
    let wrong =
        Client::try_connect(broker.port(), "operator:q", Some(("operator", PASSWORD))).await;
    assert!(wrong.is_err(), "a wrong password logged in");
}

#[tokio::test(flavor = "multi_thread")]
async fn logins_are_required_and_refusals_say_why() {
    let accounts = Accounts::new(&["d1", "e1", "camera", "rollout"], &["operator"]);
    let broker = TestBroker::start_secured(accounts.access.clone()).await;
    let port = broker.port();
    let refused = |r: Result<Client, String>| match r {
        Ok(_) => panic!("the broker let the client in"),
        Err(reason) => reason,
    };
    let anonymous = refused(Client::try_connect(port, "anon", None).await);
    assert!(
        anonymous.contains("NotAuthorized") || anonymous.contains("BadUserNamePassword"),
        "{anonymous}"
    );
    let wrong = refused(Client::try_connect(port, "wrong", Some(("d1", "hunter2"))).await);
    assert!(
        wrong.contains("BadUserNamePassword") || wrong.contains("NotAuthorized"),
        "{wrong}"
    );
    let stranger = refused(Client::try_connect(port, "who", Some(("mallory", PASSWORD))).await);
    assert!(
        stranger.contains("BadUserNamePassword") || stranger.contains("NotAuthorized"),
        "{stranger}"
    );
    // Both tools' hashes log in.
    login(port, "ok-1", "d1").await;
    login(port, "ok-2", "operator").await;
    // Only the broker's log says why it refused each (the CONNACKs above carry a code).
    if broker.kind == BrokerKind::Isomesh {
        let log = broker.log();
        assert!(
            log.contains("no username, and anonymous access is off"),
            "{log}"
        );
        assert!(
            log.contains("bad username or password") && log.contains("mallory"),
            "{log}"
        );
    }

    // The CLI: a login in the URL or in $ISOMESH_USERNAME/$ISOMESH_PASSWORD; none gets a hint.
    let out = status_command(&broker.url(), NO_ENV);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ISOMESH_PASSWORD"), "{stderr}");
    let out = status_command(
        &broker.url(),
        &[
            ("ISOMESH_USERNAME", "operator"),
            ("ISOMESH_PASSWORD", PASSWORD),
        ],
    );
    logged_in_and_saw_no_node(&out);
    let out = status_command(
        &format!("mqtt://operator:{PASSWORD}@127.0.0.1:{port}"),
        NO_ENV,
    );
    logged_in_and_saw_no_node(&out);
}

/// `isomesh status` got in (no error, exit 2) and, with no node running, answered "not every
/// node is online" (exit 1) because it saw none.
fn logged_in_and_saw_no_node(out: &std::process::Output) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no node status on"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_keep_modules_and_jobs_out_of_reach_and_nodes_serve_on() {
    let accounts = Accounts::new(&["d1", "e1", "camera", "rollout"], &["operator"]);
    let broker = TestBroker::start_secured(accounts.access.clone()).await;
    let port = broker.port();
    let node_password = ["--password".to_string(), PASSWORD.to_string()];
    let edge = TestNode::spawn(&NodeSpec {
        extra_args: node_password.to_vec(),
        ..NodeSpec::with_guest("e1", "edge", port)
    });
    wait_status_as(port, Some(("operator", PASSWORD)), "e1", WITHIN, |s| {
        s.online && s.module.is_some()
    })
    .await;

    // A device account announces a module: refused, and nothing is retained for nodes to see.
    let mut device = login(port, "d1-forger", "d1").await;
    let forged = rollout::package(
        &std::fs::read(guest_module_v2()).expect("v2"),
        MODULE_NAME,
        "9.9.9",
        &[],
    );
    device
        .client
        .publish(
            "isomesh/modules/mobilenet_v2/manifest",
            QoS::AtLeastOnce,
            true,
            prost::Message::encode_to_vec(&forged.manifest),
        )
        .await
        .expect("publish");
    assert_eq!(
        puback_reason(device.next_ack(Duration::from_secs(10)).await),
        PubAckReason::NotAuthorized
    );
    let mut operator = login(port, "op-modules", "operator").await;
    operator.subscribe("isomesh/modules/#").await;
    assert!(
        operator.next(Duration::from_secs(2)).await.is_none(),
        "a refused manifest was retained"
    );

    // A camera account tries to join the edge tier's job queue: isomesh-broker refuses the
    // subscription. (Mosquitto's acl_file grants every subscription and filters deliveries, so
    // there the camera would get its share of the jobs, and drop them: see docs/security.md.)
    let mut thief = login(port, "camera-thief", "camera").await;
    if broker.kind == BrokerKind::Isomesh {
        thief
            .client
            .subscribe("$share/edge/isomesh/jobs/tier/edge", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        match thief.next_ack(Duration::from_secs(10)).await {
            Some(Packet::SubAck(ack)) => {
                assert_eq!(ack.return_codes, vec![SubscribeReasonCode::NotAuthorized])
            }
            other => panic!("expected a SUBACK, got {other:?}"),
        }
    }
    let mut camera = login(port, "camera-1", "camera").await;
    camera.subscribe("isomesh/results/cam").await;
    for n in 0..4 {
        camera
            .publish(
                "isomesh/jobs/tier/edge",
                isomesh_testkit::photo_job(n, &format!("tier-{n}"), "isomesh/results/cam", 0),
            )
            .await;
    }
    let answers = camera.collect(4, WITHIN).await;
    let mut ids: Vec<String> = answers
        .iter()
        .map(|a| {
            let result: isomesh_protos::JobResult =
                prost::Message::decode(a.payload.as_ref()).expect("JobResult");
            assert!(result.error.is_empty(), "{result:?}");
            assert_eq!(result.node, "e1");
            result.job_id
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["tier-0", "tier-1", "tier-2", "tier-3"]);
    assert!(
        camera.next(Duration::from_secs(2)).await.is_none(),
        "a job was answered twice"
    );
    assert!(
        thief.next(Duration::from_millis(100)).await.is_none(),
        "the camera got a job"
    );

    // The rollout account may roll out; the node swaps to it.
    let rollout_client = login(port, "rollout-1", "rollout").await;
    let mut package = rollout::package(
        &std::fs::read(guest_module_v2()).expect("v2"),
        MODULE_NAME,
        VERSION_2,
        &[],
    );
    rollout::test_key().secret.sign(&mut package.manifest);
    rollout::publish(&rollout_client, &package).await;
    wait_status_as(port, Some(("operator", PASSWORD)), "e1", WITHIN, |s| {
        serves(s, VERSION_2)
    })
    .await;
    // A refused subscription of the node shows only in its log (it would miss that topic).
    let log = edge.log();
    assert!(!log.contains("refused a subscription"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_a_wrong_password_says_so_and_stays_out() {
    let accounts = Accounts::new(&["d1", "e1", "camera", "rollout"], &["operator"]);
    let broker = TestBroker::start_secured(accounts.access.clone()).await;
    let node = TestNode::spawn(&NodeSpec {
        extra_args: vec!["--password".into(), "not it".into()],
        ..NodeSpec::with_guest("e1", "edge", broker.port())
    });
    // Only the node's log can say why it stays out (it publishes nothing).
    node.wait_for_log("the broker refused this node's login", WITHIN)
        .await;
    assert!(!node.log().contains("not it"), "the password was logged");
    let mut operator = login(broker.port(), "op", "operator").await;
    operator.subscribe("isomesh/status/e1").await;
    assert!(operator.next(Duration::from_secs(2)).await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_64_mib_payload_is_refused_and_the_node_keeps_serving() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let _node = TestNode::start(NodeSpec::with_guest("s5", "device", port)).await;
    let mut client = Client::connect(port, "s5-results").await;
    client.subscribe("isomesh/results/s5").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("64mib.jpg");
    let mut bytes = photos()[0].bytes();
    bytes.resize(64 << 20, 0);
    std::fs::write(&big, bytes).expect("write");
    // MQTT 3.1.1 has no packet-size negotiation: the client sends it whole.
    let out = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-V",
            "mqttv311",
            "-q",
            "1",
        ])
        .args(["-t", "isomesh/images/s5", "-f"])
        .arg(&big)
        .output()
        .await
        .expect("mosquitto_pub");
    match broker.kind {
        // isomesh-broker refuses packets over its 16 MiB limit and closes that connection.
        BrokerKind::Isomesh => {
            assert!(!out.status.success(), "{out:?}");
            assert!(client.next(Duration::from_secs(3)).await.is_none());
        }
        // The test Mosquitto has no size limit of its own, but the node's MQTT 5 Maximum
        // Packet Size (its --max-payload-bytes, 16 MiB, plus 1 MiB) makes it drop the packet
        // instead of handing the node 64 MiB (a_payload_a_little_too_large_gets_an_error_answer
        // shows the near misses that do arrive).
        BrokerKind::Mosquitto => {
            assert!(out.status.success(), "{out:?}");
            assert!(client.next(Duration::from_secs(3)).await.is_none());
        }
    }
    // The node serves on, and every job gets exactly one answer.
    client
        .publish("isomesh/images/s5", photos()[0].bytes())
        .await;
    let reply = client.next(WITHIN).await.expect("an answer");
    let answer: Value = serde_json::from_slice(&reply.payload).expect("JSON");
    let top1 = answer["top"][0]["index"].as_u64().expect("a label") as u32;
    assert!(photos()[0].accepts(top1), "{answer}");
    assert!(client.next(Duration::from_secs(2)).await.is_none());
}

// ---------------------------------------------------------------------------------------------
// TLS: the broker's TLS listener, nodes and the CLI over mqtts://, certificates refused.
// ---------------------------------------------------------------------------------------------

/// Test certificates from `scripts/test_certs.py` (a CA, server, expired, self-signed, client).
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("python3")
            .arg(isomesh_testkit::workspace_root().join("scripts/test_certs.py"))
            .arg(dir.path())
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "scripts/test_certs.py (pip install cryptography): {out:?}"
        );
        readable_by_all(dir.path());
        Certs { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    /// A TLS listener serving `stem`.pem/.key, asking for client certificates or not.
    fn listener(&self, stem: &str, require_client_certificate: bool) -> Tls {
        Tls {
            cert: self.dir.path().join(format!("{stem}.pem")),
            key: self.dir.path().join(format!("{stem}.key")),
            ca: self.dir.path().join("ca.pem"),
            require_client_certificate,
        }
    }
}

/// No variables for [`status_command`].
const NO_ENV: &[(&str, &str)] = &[];

/// `isomesh status` against `url`, with only the login and TLS variables of `env`; its output.
fn status_command<V: AsRef<std::ffi::OsStr>>(url: &str, env: &[(&str, V)]) -> std::process::Output {
    let mut command = std::process::Command::new(isomesh_testkit::bin_path("isomesh"));
    command.args(["status", "--broker", url]);
    for var in [
        "ISOMESH_USERNAME",
        "ISOMESH_PASSWORD",
        "ISOMESH_CA_FILE",
        "ISOMESH_CERT_FILE",
        "ISOMESH_KEY_FILE",
    ] {
        command.env_remove(var);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("isomesh status")
}

fn failed_saying(out: &std::process::Output, words: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        words.iter().any(|w| stderr.contains(&w.to_lowercase())),
        "expected one of {words:?} in: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_and_the_cli_work_over_tls_and_plain_clients_cannot_use_its_port() {
    let certs = Certs::new();
    let broker = TestBroker::start_tls(certs.listener("server", false)).await;
    let ca = ("ISOMESH_CA_FILE", certs.path("ca.pem"));
    let mut spec = NodeSpec::with_guest("t1", "edge", broker.port());
    spec.extra_args = vec![
        "--broker".into(),
        broker.tls_url(),
        "--ca-file".into(),
        certs.path("ca.pem"),
    ];
    let node = TestNode::start(spec).await;
    // Its only broker URL is mqtts://; the log line names the URL it connected to. Its status can
    // reach the broker before that line is written (the MQTT link runs on its own task), so wait.
    node.wait_for_log("mqtts://127.0.0.1", WITHIN).await;

    // A photo classified end to end over TLS, by the CLI.
    let photo = &photos()[0];
    let out = std::process::Command::new(isomesh_testkit::bin_path("isomesh"))
        .args([
            "classify",
            "--json",
            "--node",
            "t1",
            "--broker",
            &broker.tls_url(),
        ])
        .arg(&photo.path)
        .env(ca.0, &ca.1)
        .output()
        .expect("isomesh classify");
    assert!(out.status.success(), "{out:?}");
    let answer: Value = serde_json::from_slice(&out.stdout).expect("a JSON line");
    let top1 = answer["top"][0]["index"].as_u64().expect("a label") as u32;
    assert!(photo.accepts(top1), "{answer}");
    assert_eq!(answer["node"], "t1");

    // Plain MQTT to the TLS port gets nowhere; mqtts:// without the CA, or with a CA that did
    // not sign the broker's certificate, says why.
    let plain = status_command(&format!("mqtt://127.0.0.1:{}", broker.tls_port()), NO_ENV);
    assert_eq!(plain.status.code(), Some(2), "{plain:?}");
    failed_saying(&status_command(&broker.tls_url(), NO_ENV), &["--ca-file"]);
    failed_saying(
        &status_command(
            &broker.tls_url(),
            &[("ISOMESH_CA_FILE", certs.path("selfsigned.pem"))],
        ),
        &["UnknownIssuer", "invalid peer certificate"],
    );
    assert!(status_command(&broker.tls_url(), std::slice::from_ref(&ca))
        .status
        .success());
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_and_self_signed_broker_certificates_are_refused() {
    let certs = Certs::new();
    let ca = ("ISOMESH_CA_FILE", certs.path("ca.pem"));
    let expired = TestBroker::start_tls(certs.listener("expired", false)).await;
    failed_saying(
        &status_command(&expired.tls_url(), std::slice::from_ref(&ca)),
        &["Expired"],
    );
    let selfsigned = TestBroker::start_tls(certs.listener("selfsigned", false)).await;
    failed_saying(
        &status_command(&selfsigned.tls_url(), std::slice::from_ref(&ca)),
        &["UnknownIssuer"],
    );
    // A node pointed at it never comes online, and says why.
    let node = TestNode::spawn(&NodeSpec {
        extra_args: vec![
            "--broker".into(),
            selfsigned.tls_url(),
            "--ca-file".into(),
            certs.path("ca.pem"),
        ],
        ..NodeSpec::with_guest("t2", "edge", selfsigned.port())
    });
    // Only the node's log can say why it never comes online.
    node.wait_for_log("UnknownIssuer", WITHIN).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_that_asks_for_client_certificates_gets_them_or_refuses() {
    let certs = Certs::new();
    let broker = TestBroker::start_tls(certs.listener("server", true)).await;
    let ca = ("ISOMESH_CA_FILE", certs.path("ca.pem"));
    let without = status_command(&broker.tls_url(), std::slice::from_ref(&ca));
    assert_eq!(without.status.code(), Some(2), "{without:?}");
    let with = status_command(
        &broker.tls_url(),
        &[
            ca.clone(),
            ("ISOMESH_CERT_FILE", certs.path("client.pem")),
            ("ISOMESH_KEY_FILE", certs.path("client.key")),
        ],
    );
    logged_in_and_saw_no_node(&with);
    // A node with its certificate serves.
    let mut spec = NodeSpec::with_guest("t3", "device", broker.port());
    spec.extra_args = [
        "--broker",
        &broker.tls_url(),
        "--ca-file",
        &certs.path("ca.pem"),
        "--cert-file",
        &certs.path("client.pem"),
        "--key-file",
        &certs.path("client.key"),
    ]
    .map(String::from)
    .to_vec();
    let _node = TestNode::start(spec).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payload_a_little_too_large_gets_an_error_answer() {
    // The node's packet limit is max(--max-payload-bytes, 4 MiB chunks) + 1 MiB = 5 MiB here:
    // a 2 MiB image reaches it (on both brokers) and is refused in words.
    let broker = TestBroker::start().await;
    let port = broker.port();
    let _node = TestNode::start(NodeSpec {
        extra_args: vec!["--max-payload-bytes".into(), (1u32 << 20).to_string()],
        ..NodeSpec::with_guest("s8", "device", port)
    })
    .await;
    let mut client = Client::connect(port, "s8-results").await;
    client.subscribe("isomesh/results/s8").await;
    let mut bytes = photos()[0].bytes();
    bytes.resize(2 << 20, 0);
    client.publish("isomesh/images/s8", bytes).await;
    let reply = client.next(WITHIN).await.expect("an error answer");
    let answer: Value = serde_json::from_slice(&reply.payload).expect("JSON");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.contains("exceeds"), "{answer}");
    // And it serves on.
    client
        .publish("isomesh/images/s8", photos()[0].bytes())
        .await;
    let reply = client.next(WITHIN).await.expect("an answer");
    let answer: Value = serde_json::from_slice(&reply.payload).expect("JSON");
    let top1 = answer["top"][0]["index"].as_u64().expect("a label") as u32;
    assert!(photos()[0].accepts(top1), "{answer}");
}

/// The first cached `.cwasm` in `dir`.
fn cached_code(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .expect("cache dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("a .cwasm in the cache")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compiling_node_takes_jobs_and_its_cached_code_runs_only_with_its_own_mac() {
    // A cache of its own (the shared test cache is used by nodes running at the same time), so
    // this test compiles the module twice: once at first, once after the tampering.
    let broker = TestBroker::start().await;
    let port = broker.port();
    let scratch = tempfile::tempdir().expect("tempdir");
    let cache = scratch.path().join("cache");
    let mut node = TestNode::spawn(&NodeSpec {
        extra_args: vec!["--cache-dir".into(), cache.display().to_string()],
        ..NodeSpec::with_guest("s9", "edge", port)
    });
    let correct = |answer: &Value| {
        let top1 = answer["top"][0]["index"].as_u64().unwrap_or(u64::MAX) as u32;
        photos()[0].accepts(top1)
    };

    // While it compiles (10-20 s) the node is online, says it is loading, and a photo sent to it
    // is not lost: it waits in the node for the module and gets its answer.
    let loading = wait_status(port, "s9", WITHIN, |s| {
        s.online
            && s.rollout
                .as_ref()
                .is_some_and(|r| r.phase == Phase::Loading as i32)
    })
    .await;
    assert!(loading.module.is_none(), "{loading:?}");
    let answer = classify_photo(port, "s9", WITHIN).await;
    assert!(correct(&answer), "{answer}");
    node.wait_for_log("from_cache=false", WITHIN).await;
    assert!(
        scratch.path().join("cache.cache-key").is_file(),
        "the key sits beside the cache"
    );

    // Restarted: the code this node wrote is loaded, not compiled again.
    node.restart();
    node.wait_for_log("compiled code reused from the cache (MAC checked)", WITHIN)
        .await;
    node.wait_for_log_times("module loaded", 2, WITHIN).await;
    assert!(node.log().contains("from_cache=true"), "{}", node.log());
    let answer = classify_photo(port, "s9", WITHIN).await;
    assert!(correct(&answer), "{answer}");

    // One byte of the machine code changed behind the node's back: refused, logged, compiled
    // again, and the answers are still right.
    node.terminate();
    let file = cached_code(&cache);
    let mut code = std::fs::read(&file).expect("cwasm");
    let middle = code.len() / 2;
    code[middle] ^= 0x01;
    std::fs::write(&file, &code).expect("tamper");
    node.start_again();
    node.wait_for_log("compiled-code cache entry refused", WITHIN)
        .await;
    node.wait_for_log_times("module loaded", 3, WITHIN).await;
    let log = node.log();
    assert!(log.contains("MAC does not match"), "{log}");
    assert_eq!(log.matches("from_cache=false").count(), 2, "{log}");
    let answer = classify_photo(port, "s9", WITHIN).await;
    assert!(correct(&answer), "{answer}");
    // The refused file was replaced by code the node compiled and MAC-ed itself.
    assert_ne!(std::fs::read(&file).expect("cwasm"), code);
}
