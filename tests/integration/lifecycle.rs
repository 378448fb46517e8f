//! A node's life: its status is retained while it runs, SIGTERM answers every accepted job before
//! it exits, a killed node is marked offline by its Last Will, and a restart serves the module from
//! the compiled-module cache instead of compiling it again; `isomesh status` shows it, filtered by
//! tier or node, and its exit code says whether every node shown is online.

use isomesh_protos::NodeStatus;
use isomesh_testkit::broker::TestBroker;
use isomesh_testkit::mqtt::Client;
use isomesh_testkit::node::{start_all, wait_status, NodeSpec, TestNode};
use isomesh_testkit::{bin_path, photos};
use prost::Message;
use std::time::Duration;

async fn next_status(watcher: &mut Client, within: Duration) -> NodeStatus {
    let publish = watcher.next(within).await.expect("a status message");
    NodeStatus::decode(publish.payload.as_ref()).expect("NodeStatus")
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_answers_every_accepted_job_then_reports_offline() {
    let broker = TestBroker::start().await;
    let mut node = TestNode::start(NodeSpec::with_guest("l1", "edge", broker.port())).await;
    let mut client = Client::connect(broker.port(), "sigterm").await;
    client.subscribe("test/sigterm").await;
    let photos = photos();
    let jobs = 12;
    for n in 0..jobs {
        let photo = &photos[n % photos.len()];
        client
            .publish_with_response_topic(
                "isomesh/images/l1",
                photo.bytes(),
                "test/sigterm",
                n.to_string().as_bytes(),
            )
            .await;
    }
    // Wait for the first answer so the node has accepted the burst, then stop it mid-queue.
    let first = client
        .next(Duration::from_secs(240))
        .await
        .expect("a first answer");
    let exited_cleanly = tokio::task::spawn_blocking(move || {
        let clean = node.terminate();
        (clean, node)
    });
    let mut answered = vec![first];
    while let Some(reply) = client.next(Duration::from_secs(20)).await {
        answered.push(reply);
    }
    let (clean, node) = exited_cleanly.await.unwrap();
    assert!(
        clean,
        "isomesh-node did not exit 0 on SIGTERM:\n{}",
        node.log()
    );
    assert_eq!(
        answered.len(),
        jobs,
        "every accepted job is answered before exit:\n{}",
        node.log()
    );
    for reply in &answered {
        let result: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        assert!(result["top"][0]["index"].is_u64(), "{result}");
    }
    let mut watcher = Client::connect(broker.port(), "sigterm-status").await;
    watcher.subscribe("isomesh/status/l1").await;
    let status = next_status(&mut watcher, Duration::from_secs(10)).await;
    assert!(
        !status.online,
        "retained status after shutdown should be offline: {status:?}"
    );
    assert_eq!(status.node_id, "l1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_node_is_marked_offline_by_its_last_will() {
    let broker = TestBroker::start().await;
    let mut node = TestNode::start(NodeSpec::with_guest("l2", "cloud", broker.port())).await;
    let mut watcher = Client::connect(broker.port(), "will-watch").await;
    watcher.subscribe("isomesh/status/l2").await;
    let status = next_status(&mut watcher, Duration::from_secs(10)).await;
    assert!(status.online && status.module.is_some(), "{status:?}");
    assert_eq!(status.tier, isomesh_protos::Tier::Cloud as i32);
    node.kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let status = next_status(&mut watcher, left).await;
        if !status.online {
            break;
        }
    }
}

/// The `module loaded` lines of a node's log, in order (one per start).
fn module_loaded_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("module loaded"))
        .collect()
}

/// The compiled code in a compiled-module cache: each `.cwasm` file and when it was written.
fn cached_code(dir: &std::path::Path) -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("read the cache dir")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "cwasm"))
        .map(|path| {
            let written = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .expect("mtime");
            (path, written)
        })
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_node_loads_the_module_from_the_cache() {
    let broker = TestBroker::start().await;
    // A cache of its own, empty: the one the other test nodes share already holds the
    // classifier's code, so it would serve from the cache at the first start too.
    let cache = tempfile::tempdir().expect("a cache dir");
    assert!(cached_code(cache.path()).is_empty());
    let mut spec = NodeSpec::with_guest("l3", "device", broker.port());
    spec.extra_args = vec!["--cache-dir".into(), cache.path().display().to_string()];
    let mut node = TestNode::start(spec).await;
    // Only the node's log says where the code came from (no status or metric does).
    let log = node.log();
    let loaded = module_loaded_lines(&log);
    assert_eq!(loaded.len(), 1, "{log}");
    assert!(
        loaded[0].contains("from_cache=false"),
        "the first start must compile: {}",
        loaded[0]
    );
    let compiled = cached_code(cache.path());
    assert_eq!(
        compiled.len(),
        1,
        "the first start writes the module's code into the cache: {compiled:?}\n{log}"
    );

    node.restart();
    node.wait_ready(broker.port()).await;
    node.wait_for_log_times("module loaded", 2, Duration::from_secs(60))
        .await;
    let log = node.log();
    let loaded = module_loaded_lines(&log);
    assert_eq!(loaded.len(), 2, "{log}");
    assert!(
        loaded[1].contains("from_cache=true"),
        "the restart must load the cached code: {}",
        loaded[1]
    );
    assert_eq!(
        cached_code(cache.path()),
        compiled,
        "the restart compiled and wrote the code again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_sent_while_a_node_restarts_are_answered_when_it_is_back() {
    let broker = TestBroker::start().await;
    let mut node = TestNode::start(NodeSpec::with_guest("l4", "edge", broker.port())).await;
    let mut client = Client::connect(broker.port(), "restart-jobs").await;
    client.subscribe("test/restart").await;
    assert!(node.terminate(), "clean exit:\n{}", node.log());
    // The node is down: its persistent session holds these for it.
    let photos = photos();
    for (n, photo) in photos.iter().enumerate().take(3) {
        client
            .publish_with_response_topic(
                "isomesh/images/l4",
                photo.bytes(),
                "test/restart",
                n.to_string().as_bytes(),
            )
            .await;
    }
    node.start_again();
    let mut replies = Vec::new();
    while replies.len() < 3 {
        match client.next(Duration::from_secs(120)).await {
            Some(reply) => replies.push(reply),
            None => panic!(
                "{} of 3 jobs answered; node log:\n{}\nbroker log:\n{}",
                replies.len(),
                node.log(),
                broker.log()
            ),
        }
    }
    for reply in replies {
        let result: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        let n: usize = String::from_utf8_lossy(
            reply
                .properties
                .as_ref()
                .and_then(|p| p.correlation_data.as_ref())
                .expect("correlation data"),
        )
        .parse()
        .unwrap();
        let top1 = result["top"][0]["index"]
            .as_u64()
            .unwrap_or_else(|| panic!("{result}"));
        assert!(photos[n].accepts(top1 as u32), "{result}");
    }
}

/// `isomesh status ARGS` against `broker`: (exit code, stdout, stderr).
async fn status_command(broker: &TestBroker, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(bin_path("isomesh"))
        .args(["status", "--broker", &broker.url()])
        .args(args)
        .output()
        .await
        .expect("run isomesh status");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The node ids of `isomesh status --json` lines, each checked to be a JSON object.
fn json_nodes(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
            value["node"].as_str().expect("a node id").to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_filters_by_tier_and_node_and_its_exit_code_says_whether_all_are_online() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let mut nodes = start_all(
        port,
        vec![
            NodeSpec::with_guest("st-d", "device", port),
            NodeSpec::with_guest("st-e", "edge", port),
        ],
    )
    .await;

    let (code, out, err) = status_command(&broker, &["--json"]).await;
    assert_eq!(code, 0, "both online: {out}{err}");
    assert_eq!(json_nodes(&out), ["st-d", "st-e"]);
    // Each status says how old it is (the nodes publish every second here).
    for line in out.lines() {
        let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        let age = value["age_s"].as_f64().unwrap_or(f64::NAN);
        assert!((0.0..60.0).contains(&age), "{line}");
    }
    let (code, out, err) = status_command(&broker, &["--json", "--tier", "edge"]).await;
    assert_eq!((code, json_nodes(&out)), (0, vec!["st-e".into()]), "{err}");
    let (code, out, err) = status_command(&broker, &["--json", "--node", "st-d"]).await;
    assert_eq!((code, json_nodes(&out)), (0, vec!["st-d".into()]), "{err}");
    let (code, out, err) = status_command(&broker, &["--node", "nobody"]).await;
    assert_eq!(code, 1, "no node matched, yet it exited {code}: {out}");
    assert!(err.contains("no node status matched"), "{err}");
    let (code, _, err) = status_command(&broker, &["--tier", "fog"]).await;
    assert_eq!(code, 2, "an unknown tier is a usage error");
    assert!(err.contains("fog"), "{err}");

    // `--watch --json` is a stream of JSON lines with no terminal control codes: read until both
    // nodes have been printed, then stop it.
    let mut watch = tokio::process::Command::new(bin_path("isomesh"))
        .args(["status", "--broker", &broker.url(), "--watch", "--json"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run isomesh status --watch");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        watch.stdout.take().expect("stdout"),
    ));
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("a status line within 30 s")
            .expect("read stdout")
            .expect("isomesh status --watch ended");
        assert!(!line.contains('\x1b'), "a control code in JSON: {line:?}");
        seen.extend(json_nodes(&line));
    }
    let _ = watch.kill().await;

    // The edge node dies; its Last Will marks it offline, and status says so in its exit code.
    nodes[1].kill();
    wait_status(port, "st-e", Duration::from_secs(60), |s| !s.online).await;
    let (code, out, err) = status_command(&broker, &[]).await;
    assert_eq!(code, 1, "st-e is offline, yet status exited {code}:\n{out}");
    assert!(err.contains("1 of 2 nodes offline: st-e"), "{err}");
    assert!(out.contains("offline"), "{out}");
    // The table's SEEN column: `-` for the Last Will (no time of its own), an age for st-d.
    let seen_of = |node: &str| {
        let header: Vec<&str> = out
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let column = header
            .iter()
            .position(|h| *h == "SEEN")
            .expect("a SEEN column");
        out.lines()
            .find(|l| l.starts_with(node))
            .and_then(|l| l.split_whitespace().nth(column).map(str::to_string))
            .unwrap_or_else(|| panic!("no row for {node}:\n{out}"))
    };
    assert_eq!(seen_of("st-e"), "-", "{out}");
    assert!(seen_of("st-d").ends_with('s'), "{out}");
    let (code, _, err) = status_command(&broker, &["--node", "st-d"]).await;
    assert_eq!(code, 0, "st-d alone is online: {err}");
}
