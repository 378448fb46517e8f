//! Bad input never silences a node: each malformed request gets exactly one clear error answer,
//! and the next valid photo is still classified correctly. Bad settings stop a node before it
//! starts, naming each mistake and where it is.

use isomesh_protos::{Job, JobResult};
use isomesh_testkit::broker::TestBroker;
use isomesh_testkit::mqtt::Client;
use isomesh_testkit::node::{NodeSpec, TestNode};
use isomesh_testkit::photo;
use prost::Message;
use serde_json::Value;
use std::time::Duration;

const ANSWER_WITHIN: Duration = Duration::from_secs(240);

/// Deterministic noise.
fn random_bytes(n: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_images_each_get_one_clear_error_and_the_node_keeps_serving() {
    let broker = TestBroker::start().await;
    let _node = TestNode::start(NodeSpec::with_guest("d3", "device", broker.port())).await;
    let mut client = Client::connect(broker.port(), "bad-input").await;
    client.subscribe("test/bad/replies").await;
    let banana = photo("banana.jpg");
    let jpeg = banana.bytes();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "empty image payload"),
        ("random", random_bytes(4096), "not a JPEG or PNG"),
        (
            "truncated-jpeg",
            jpeg[..jpeg.len() / 3].to_vec(),
            "cannot decode image",
        ),
        (
            "png-bomb",
            isomesh_testkit::png_declaring(30_000, 30_000),
            "image too large",
        ),
    ];
    for (name, payload, _) in &cases {
        client
            .publish_with_response_topic(
                "isomesh/images/d3",
                payload.clone(),
                "test/bad/replies",
                name.as_bytes(),
            )
            .await;
    }
    client
        .publish_with_response_topic(
            "isomesh/images/d3",
            jpeg.clone(),
            "test/bad/replies",
            b"valid",
        )
        .await;
    let replies = client.collect(cases.len() + 1, ANSWER_WITHIN).await;
    for reply in &replies {
        let name = reply
            .properties
            .as_ref()
            .and_then(|p| p.correlation_data.clone())
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .expect("correlation data");
        let result: Value = serde_json::from_slice(&reply.payload).expect("JSON result");
        if name == "valid" {
            let top1 = result["top"][0]["index"]
                .as_u64()
                .unwrap_or_else(|| panic!("banana after bad input: {result}"));
            assert!(
                banana.accepts(top1 as u32),
                "banana after bad input: expected {}: {result}",
                banana.acceptable()
            );
            continue;
        }
        let (_, _, expected) = cases.iter().find(|c| c.0 == name).expect("known case");
        let error = result["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no error in {result}"));
        assert!(
            error.contains(expected),
            "{name}: error {error:?} should mention {expected:?}"
        );
        assert_eq!(result["node"], "d3");
        assert!(result["job_id"].as_str().is_some_and(|id| !id.is_empty()));
    }
    let mut names: Vec<String> = replies
        .iter()
        .filter_map(|r| r.properties.as_ref()?.correlation_data.clone())
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(
        names.len(),
        cases.len() + 1,
        "one answer per request: {names:?}"
    );
    assert!(
        client.next(Duration::from_secs(2)).await.is_none(),
        "an extra answer arrived"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_protobuf_jobs_get_an_error_result_and_valid_jobs_still_work() {
    let broker = TestBroker::start().await;
    let _node = TestNode::start(NodeSpec::with_guest("d4", "device", broker.port())).await;
    let mut client = Client::connect(broker.port(), "bad-proto").await;
    client.subscribe("isomesh/results/d4").await;
    client.subscribe("test/proto/replies").await;

    // Wire type 7 does not exist: this cannot decode as any protobuf message.
    client
        .publish("isomesh/jobs/d4", vec![0x0f, 0xff, 0xff, 0x01])
        .await;
    let reply = client.next(ANSWER_WITHIN).await.expect("an error result");
    assert_eq!(String::from_utf8_lossy(&reply.topic), "isomesh/results/d4");
    let result = JobResult::decode(reply.payload.as_ref()).expect("a protobuf JobResult");
    assert!(
        result.error.contains("not a protobuf isomesh.v1.Job"),
        "{}",
        result.error
    );

    // A well-formed Job whose image field holds garbage: answered at its reply_to.
    let job = Job {
        job_id: "garbage-image".into(),
        image: random_bytes(100),
        reply_to: "test/proto/replies".into(),
        ..Default::default()
    };
    client.publish("isomesh/jobs/d4", job.encode_to_vec()).await;
    let reply = client.next(ANSWER_WITHIN).await.expect("an error result");
    assert_eq!(String::from_utf8_lossy(&reply.topic), "test/proto/replies");
    let result = JobResult::decode(reply.payload.as_ref()).expect("JobResult");
    assert_eq!(result.job_id, "garbage-image");
    assert!(
        result.error.contains("cannot decode image"),
        "{}",
        result.error
    );

    let pelican = photo("pelican.jpeg");
    let job = Job {
        job_id: "pelican".into(),
        image: pelican.bytes(),
        reply_to: "test/proto/replies".into(),
        ..Default::default()
    };
    client.publish("isomesh/jobs/d4", job.encode_to_vec()).await;
    let reply = client.next(ANSWER_WITHIN).await.expect("a result");
    let result = JobResult::decode(reply.payload.as_ref()).expect("JobResult");
    assert!(result.error.is_empty(), "{}", result.error);
    let top1 = result.top.first().map(|c| c.index).unwrap_or(u32::MAX);
    assert!(
        pelican.accepts(top1),
        "pelican: got {top1}, expected {}",
        pelican.acceptable()
    );
    assert_eq!(result.path, vec!["d4".to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_payloads_get_an_error_naming_the_limit() {
    let broker = TestBroker::start().await;
    let mut spec = NodeSpec::with_guest("d5", "device", broker.port());
    spec.extra_args = vec!["--max-payload-bytes".into(), "100000".into()];
    let _node = TestNode::start(spec).await;
    let mut client = Client::connect(broker.port(), "oversized").await;
    client.subscribe("isomesh/results/d5").await;
    let hot_dog = photo("hot_dog.jpg");
    assert!(hot_dog.bytes().len() > 100_000);
    client.publish("isomesh/images/d5", hot_dog.bytes()).await;
    let reply = client.next(ANSWER_WITHIN).await.expect("an error result");
    let result: Value = serde_json::from_slice(&reply.payload).unwrap();
    let error = result["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("exceeds") && error.contains("100000"),
        "{result}"
    );
    let pelican = photo("pelican.jpeg");
    client.publish("isomesh/images/d5", pelican.bytes()).await;
    let reply = client.next(ANSWER_WITHIN).await.expect("a result");
    let result: Value = serde_json::from_slice(&reply.payload).unwrap();
    let top1 = result["top"][0]["index"]
        .as_u64()
        .unwrap_or_else(|| panic!("{result}"));
    assert!(
        pelican.accepts(top1 as u32),
        "pelican: expected {}: {result}",
        pelican.acceptable()
    );
}

/// `isomesh-node` with `args` and no ISOMESH_* settings from the test's environment; returns its
/// exit code and stderr.
fn node_refuses(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let mut command = std::process::Command::new(isomesh_testkit::bin_path("isomesh-node"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ISOMESH_") {
            command.env_remove(key);
        }
    }
    let out = command.args(args).output().expect("run isomesh-node");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_settings_stop_the_node_and_each_mistake_is_named_where_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("node.toml");
    let config = |text: &str| {
        std::fs::write(&file, text).expect("write the config");
        node_refuses(&["--config".as_ref(), file.as_os_str()])
    };
    let at = |line: usize| format!("{}:{line}:", file.display());

    // Every bad line at once, each with its line and a hint.
    let (code, stderr) =
        config("id = \"c1\"\ntier = \"edge\"\nbudget_ms = 200\nworkers = { n = 2 }\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("2 bad line(s)"), "{stderr}");
    assert!(stderr.contains(&at(3)), "{stderr}");
    assert!(stderr.contains("did you mean `budget-ms`"), "{stderr}");
    assert!(stderr.contains(&at(4)), "{stderr}");

    // Not TOML at all; a file that is not there.
    let (code, stderr) = config("budget-ms = = 1\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is not valid TOML"), "{stderr}");
    let missing = dir.path().join("missing.toml");
    let (code, stderr) = node_refuses(&["--config".as_ref(), missing.as_os_str()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot read config file"), "{stderr}");

    // A tier that does not exist, from the file or a flag: the valid ones are named.
    let (code, stderr) = config("id = \"c1\"\ntier = \"fog\"\nmodules = \"m\"\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("device, edge or cloud"), "{stderr}");
    let flags = ["--id", "c1", "--tier", "fog", "--modules", "m"];
    let (code, stderr) = node_refuses(&flags.map(std::ffi::OsStr::new));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("device, edge or cloud"), "{stderr}");
}
