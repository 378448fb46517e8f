//! Prometheus metrics (`--metrics-listen`): a real broker, real nodes and photos, and the
//! numbers scraped over TCP must match what happened: answers by outcome and place, stage
//! histograms, offloads, queue depth, the module served and its swaps, the broker link; and the
//! probes beside them (`/healthz`, `/readyz`) follow the process, the module and the link.

use isomesh_protos::{Job, JobResult};
use isomesh_testkit::broker::TestBroker;
use isomesh_testkit::metrics::{get, scrape, sum, value};
use isomesh_testkit::mqtt::Client;
use isomesh_testkit::node::{wait_statuses_published, NodeSpec, TestNode};
use isomesh_testkit::rollout::{guest_module_v2, MODULE_NAME, VERSION_2};
use prost::Message;
use std::time::Duration;

const REPLIES: &str = "test/metrics/replies";

fn job(n: usize, id: &str, budget_ms: u32) -> Vec<u8> {
    isomesh_testkit::photo_job(n, id, REPLIES, budget_ms)
}

/// A node with a metrics endpoint on a port the node picks itself (`127.0.0.1:0`, so no other
/// process can take it between picking and binding); [`TestNode::metrics_addr`] reads it back.
fn node_with_metrics<'a>(id: &'a str, tier: &'a str, port: u16, extra: &[&str]) -> NodeSpec<'a> {
    let mut spec = NodeSpec::with_guest(id, tier, port);
    spec.extra_args = vec!["--metrics-listen".into(), "127.0.0.1:0".into()];
    spec.extra_args.extend(extra.iter().map(|a| a.to_string()));
    spec
}

async fn answers(client: &mut Client, n: usize) -> Vec<JobResult> {
    let got: Vec<JobResult> = client
        .collect(n, Duration::from_secs(180))
        .await
        .iter()
        .map(|p| JobResult::decode(p.payload.as_ref()).expect("a JobResult"))
        .collect();
    assert!(
        client.next(Duration::from_secs(1)).await.is_none(),
        "an extra answer"
    );
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scrape_counts_jobs_stages_and_module_swaps() {
    let broker = TestBroker::start().await;
    let spec = node_with_metrics("m1", "edge", broker.port(), &[]);
    let node = TestNode::start(spec).await;
    let addr = node.metrics_addr();
    let fresh = scrape(&addr).expect("scrape");
    assert_eq!(
        value(&fresh, "isomesh_jobs_total{outcome=\"ok\",where=\"here\"}"),
        Some(0.0),
        "{fresh}"
    );
    assert_eq!(value(&fresh, "isomesh_module_swaps_total"), Some(0.0));
    let sha = isomesh_module::digest::sha256_hex(
        &std::fs::read(isomesh_testkit::guest_module()).unwrap(),
    );
    assert!(
        fresh.contains(&format!(
            "isomesh_module_info{{name=\"mobilenet_v2\",version=\"0.1.0\",sha256=\"{sha}\"}} 1"
        )),
        "{fresh}"
    );
    assert!(fresh.contains("isomesh_node_info{node=\"m1\",tier=\"edge\"} 1"));

    let mut client = Client::connect(broker.port(), "metrics-jobs").await;
    client.subscribe(REPLIES).await;
    // Six photos with no budget (ok), one with a 1 ms budget (late), one that is not an image.
    for n in 0..6 {
        client
            .publish("isomesh/jobs/m1", job(n, &format!("ok-{n}"), 0))
            .await;
    }
    client.publish("isomesh/jobs/m1", job(0, "late", 1)).await;
    let garbage = Job {
        job_id: "bad".into(),
        image: b"not an image".to_vec(),
        reply_to: REPLIES.into(),
        ..Default::default()
    };
    client
        .publish("isomesh/jobs/m1", garbage.encode_to_vec())
        .await;
    let results = answers(&mut client, 8).await;
    let ran: Vec<&JobResult> = results.iter().filter(|r| r.error.is_empty()).collect();
    assert_eq!(ran.len(), 7, "{results:?}");

    let text = scrape(&addr).expect("scrape");
    let jobs = |outcome: &str, place: &str| {
        value(
            &text,
            &format!("isomesh_jobs_total{{outcome=\"{outcome}\",where=\"{place}\"}}"),
        )
    };
    assert_eq!(jobs("ok", "here"), Some(6.0), "{text}");
    assert_eq!(jobs("late", "here"), Some(1.0), "{text}");
    assert_eq!(jobs("error", "here"), Some(1.0), "{text}");
    assert_eq!(
        sum(&text, "isomesh_jobs_total", &["where=\"forwarded\""]),
        0.0
    );
    assert_eq!(value(&text, "isomesh_queue_depth"), Some(0.0));
    assert_eq!(value(&text, "isomesh_forwarded_waiting"), Some(0.0));
    for stage in ["queue", "decode", "infer", "total"] {
        let count = value(
            &text,
            &format!("isomesh_job_stage_seconds_count{{stage=\"{stage}\"}}"),
        );
        assert_eq!(count, Some(7.0), "{stage}: {text}");
        let inf = value(
            &text,
            &format!("isomesh_job_stage_seconds_bucket{{stage=\"{stage}\",le=\"+Inf\"}}"),
        );
        assert_eq!(inf, Some(7.0), "{stage}");
    }
    // The histograms agree with the answers' own timings: the sum of inference times.
    let infer_sum: f64 = ran
        .iter()
        .filter_map(|r| r.timing.map(|t| t.infer_ms / 1000.0))
        .sum();
    let scraped =
        value(&text, "isomesh_job_stage_seconds_sum{stage=\"infer\"}").expect("infer sum");
    assert!(
        (scraped - infer_sum).abs() < 0.01,
        "scraped {scraped} s vs answers {infer_sum} s"
    );
    assert!(value(&text, "isomesh_service_ewma_seconds").is_some_and(|s| s > 0.0));
    // The module it started with was loaded once (and timed); the process's memory is shown.
    assert_eq!(
        value(&text, "isomesh_module_loads_total"),
        Some(1.0),
        "{text}"
    );
    assert!(
        value(&text, "isomesh_module_load_seconds").is_some_and(|s| s > 0.0),
        "{text}"
    );
    assert!(
        value(&text, "process_resident_memory_bytes").is_some_and(|b| b > (16u64 << 20) as f64),
        "{text}"
    );

    // A module dropped into the directory by hand is swapped in: one swap, the new version.
    let v2 = std::fs::read(guest_module_v2()).expect("module 0.2.0");
    let path = node.modules_dir().join("mobilenet_v2-0.2.0.wasm");
    isomesh_testkit::rollout::sign_file(&path, &v2, MODULE_NAME, VERSION_2);
    let tmp = node.modules_dir().join(".incoming.tmp");
    std::fs::write(&tmp, v2).expect("write module");
    std::fs::rename(&tmp, &path).expect("rename");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let text = scrape(&addr).expect("scrape");
        // The swap, and the board's tally of it (set just after the swap).
        if value(&text, "isomesh_module_swaps_total") == Some(1.0)
            && value(&text, "isomesh_module_loads_total") == Some(2.0)
        {
            assert!(
                text.contains("isomesh_module_info{name=\"mobilenet_v2\",version=\"0.2.0\""),
                "{text}"
            );
            // Copied in by hand: no fetch.
            assert_eq!(
                value(&text, "isomesh_rollout_fetches_total"),
                Some(0.0),
                "{text}"
            );
            assert!(
                !text.contains("version=\"0.1.0\""),
                "one module served at a time: {text}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no swap within 180 s:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Anything but GET /metrics is refused.
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(&addr).expect("connect");
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn offloads_are_counted_where_they_leave_and_where_they_run() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let device = node_with_metrics("m2d", "device", port, &["--offload", "always-up"]);
    let edge = node_with_metrics("m2e", "edge", port, &[]);
    let nodes = [TestNode::spawn(&device), TestNode::spawn(&edge)];
    for node in &nodes {
        node.wait_ready(port).await;
    }
    let (device_addr, edge_addr) = (nodes[0].metrics_addr(), nodes[1].metrics_addr());
    // The device has been sent the edge node's status before the jobs below.
    wait_statuses_published(port, &["m2d", "m2e"], Duration::from_secs(30)).await;
    let mut client = Client::connect(port, "metrics-offload").await;
    client.subscribe(REPLIES).await;
    for n in 0..4 {
        client
            .publish("isomesh/jobs/m2d", job(n, &format!("up-{n}"), 5000))
            .await;
    }
    let results = answers(&mut client, 4).await;
    assert!(
        results
            .iter()
            .all(|r| r.node == "m2e" && r.error.is_empty()),
        "{results:?}"
    );
    let device = scrape(&device_addr).expect("scrape the device");
    assert_eq!(
        value(&device, "isomesh_offloads_total{to=\"edge\"}"),
        Some(4.0),
        "{device}"
    );
    assert_eq!(
        value(&device, "isomesh_offloads_total{to=\"cloud\"}"),
        Some(0.0)
    );
    // Each decision is counted once, by its reason: the device's policy sent all four up.
    assert_eq!(
        value(&device, "isomesh_placements_total{reason=\"always_up\"}"),
        Some(4.0),
        "{device}"
    );
    assert_eq!(sum(&device, "isomesh_placements_total", &[]), 4.0);
    assert_eq!(
        sum(&device, "isomesh_jobs_total", &["where=\"forwarded\""]),
        4.0,
        "{device}"
    );
    assert_eq!(sum(&device, "isomesh_jobs_total", &["where=\"here\""]), 0.0);
    // Stages are the device's own: no job ran there, but each had a total time there.
    assert_eq!(
        value(&device, "isomesh_job_stage_seconds_count{stage=\"infer\"}"),
        Some(0.0)
    );
    assert_eq!(
        value(&device, "isomesh_job_stage_seconds_count{stage=\"total\"}"),
        Some(4.0)
    );
    let edge = scrape(&edge_addr).expect("scrape the edge node");
    assert_eq!(
        sum(&edge, "isomesh_jobs_total", &["where=\"here\""]),
        4.0,
        "{edge}"
    );
    assert_eq!(sum(&edge, "isomesh_offloads_total", &[]), 0.0);
    // The edge has no tier above online: every job stayed there for that reason.
    assert_eq!(
        value(&edge, "isomesh_placements_total{reason=\"no_parent\"}"),
        Some(4.0),
        "{edge}"
    );
}

/// Polls `GET path` on `addr` until its status code is `code`; returns that answer's body.
async fn wait_for_answer(addr: &str, path: &str, code: u16) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let answer = get(addr, path);
        match &answer {
            Ok((got, body)) if *got == code => return body.clone(),
            _ if tokio::time::Instant::now() > deadline => {
                panic!("GET {path} never answered {code}; last: {answer:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `isomesh-node --check-ready` (a container's health check) against the node serving on `addr`
/// (`None`: no --metrics-listen); returns whether it exited 0, and what it printed.
fn check_ready(addr: Option<&str>) -> (bool, String) {
    let mut command = std::process::Command::new(isomesh_testkit::bin_path("isomesh-node"));
    // The node's own settings (in a container: its environment), of which it reads only
    // --metrics-listen.
    command.args([
        "--check-ready",
        "--id",
        "probe",
        "--tier",
        "edge",
        "--modules",
        ".",
    ]);
    command.env_remove("ISOMESH_METRICS_LISTEN");
    if let Some(addr) = addr {
        command.args(["--metrics-listen", addr]);
    }
    let out = command.output().expect("isomesh-node --check-ready");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_follows_the_module_and_the_broker_link_and_healthz_the_process() {
    let mut broker = TestBroker::start().await;
    let port = broker.port();
    let node = TestNode::start(node_with_metrics("m-ready", "edge", port, &[])).await;
    let addr = node.metrics_addr();
    assert_eq!(
        get(&addr, "/healthz").expect("GET /healthz"),
        (200, "ok\n".into())
    );
    let ready = wait_for_answer(&addr, "/readyz", 200).await;
    assert_eq!(ready, "ready: serving mobilenet_v2@0.1.0, connected\n");
    let (ok, said) = check_ready(Some(&addr));
    assert!(
        ok && said.contains("ready: serving mobilenet_v2@0.1.0"),
        "{said}"
    );
    let (ok, said) = check_ready(None);
    assert!(!ok && said.contains("no --metrics-listen"), "{said}");

    // The broker dies: not ready (still alive), and ready again once it is back.
    broker.kill();
    let why = wait_for_answer(&addr, "/readyz", 503).await;
    assert!(why.contains("not connected to the broker"), "{why}");
    assert!(!why.contains("module"), "{why}");
    let (ok, said) = check_ready(Some(&addr));
    assert!(
        !ok && said.contains("not connected to the broker"),
        "{said}"
    );
    assert_eq!(get(&addr, "/healthz").expect("GET /healthz").0, 200);
    let down = scrape(&addr).expect("scrape");
    assert_eq!(
        value(&down, "isomesh_broker_connected"),
        Some(0.0),
        "{down}"
    );
    broker.start_again().await;
    wait_for_answer(&addr, "/readyz", 200).await;
    let up = scrape(&addr).expect("scrape");
    assert_eq!(value(&up, "isomesh_broker_connected"), Some(1.0), "{up}");
    assert!(
        value(&up, "isomesh_broker_connects_total").is_some_and(|n| n >= 2.0),
        "a reconnect is counted: {up}"
    );

    // A node with no module yet is alive but not ready, and says why.
    let empty = TestNode::spawn(&NodeSpec {
        modules: Vec::new(),
        ..node_with_metrics("m-empty", "edge", port, &[])
    });
    empty
        .wait_for_log("serving Prometheus metrics", Duration::from_secs(60))
        .await;
    let addr = empty.metrics_addr();
    assert_eq!(get(&addr, "/healthz").expect("GET /healthz").0, 200);
    let why = wait_for_answer(&addr, "/readyz", 503).await;
    assert!(why.contains("no self-tested module"), "{why}");
    assert_eq!(get(&addr, "/nothing").expect("GET /nothing").0, 404);
}
