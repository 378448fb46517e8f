//! The classify flow end to end: real broker, real node, real module, real photos, three kinds of
//! client (rumqttc MQTT 5 with a response topic, `mosquitto_pub -f` over MQTT 3.1.1, and the
//! `isomesh classify` CLI with protobuf jobs). Every answer must match onnxruntime's top-1.

use isomesh_testkit::broker::TestBroker;
use isomesh_testkit::mqtt::Client;
use isomesh_testkit::node::{NodeSpec, TestNode};
use isomesh_testkit::{bin_path, photos};
use serde_json::Value;
use std::time::Duration;

const ANSWER_WITHIN: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread")]
async fn photos_published_raw_with_a_response_topic_match_the_reference() {
    let broker = TestBroker::start().await;
    let _node = TestNode::start(NodeSpec::with_guest("d1", "device", broker.port())).await;
    let mut client = Client::connect(broker.port(), "raw-v5").await;
    let photos = photos();
    let replies = client
        .ask_each(
            "isomesh/images/d1",
            "test/raw/replies",
            photos.iter().map(|p| p.bytes()).collect(),
            ANSWER_WITHIN,
        )
        .await;
    for (photo, reply) in photos.iter().zip(replies) {
        let result = classified(photo, &reply.payload);
        assert_eq!(result["node"], "d1");
        assert_eq!(result["tier"], "device");
        assert_eq!(result["module"]["name"], "mobilenet_v2");
        assert_eq!(result["module"]["sha256"].as_str().map(str::len), Some(64));
        assert_eq!(result["path"], serde_json::json!(["d1"]));
        assert_eq!(result["top"].as_array().map(Vec::len), Some(5));
        for key in ["queue", "decode", "infer", "total"] {
            assert!(
                result["timing_ms"][key].as_f64().is_some(),
                "timing_ms.{key} in {result}"
            );
        }
        assert!(result["timing_ms"]["infer"].as_f64().unwrap() > 0.0);
    }
    assert!(
        client.next(Duration::from_secs(2)).await.is_none(),
        "an extra answer arrived"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mosquitto_pub_f_over_mqtt311_gets_json_on_the_results_topic() {
    let broker = TestBroker::start().await;
    let _node = TestNode::start(NodeSpec::with_guest("d2", "device", broker.port())).await;
    let mut client = Client::connect(broker.port(), "results-watch").await;
    client.subscribe("isomesh/results/d2").await;
    for photo in photos() {
        let status = tokio::process::Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &broker.port().to_string(),
                "-q",
                "1",
            ])
            .args(["-t", "isomesh/images/d2", "-f"])
            .arg(&photo.path)
            .status()
            .await
            .expect("mosquitto_pub (Debian package mosquitto-clients) runs");
        assert!(status.success(), "mosquitto_pub failed for {}", photo.file);
        let reply = client
            .next(ANSWER_WITHIN)
            .await
            .expect("a result on isomesh/results/d2");
        classified(&photo, &reply.payload);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_classifies_every_photo_with_protobuf_jobs() {
    let broker = TestBroker::start().await;
    let _node = TestNode::start(NodeSpec::with_guest("e1", "edge", broker.port())).await;
    let photos = photos();
    let output = tokio::process::Command::new(bin_path("isomesh"))
        .args([
            "classify",
            "--broker",
            &format!("mqtt://127.0.0.1:{}", broker.port()),
        ])
        .args(["--node", "e1", "--json", "--timeout-s", "240"])
        .args(photos.iter().map(|p| &p.path))
        .output()
        .await
        .expect("isomesh runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "isomesh classify failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), photos.len(), "{stdout}");
    for photo in &photos {
        let result = lines
            .iter()
            .find(|r| r["file"].as_str() == Some(photo.path.to_str().unwrap()))
            .unwrap_or_else(|| panic!("no line for {}", photo.file));
        let top1 = result["top"][0]["index"]
            .as_u64()
            .unwrap_or_else(|| panic!("{result}")) as u32;
        assert!(photo.accepts(top1), "{}: got {top1}: {result}", photo.file);
        assert_eq!(result["node"], "e1");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_exits_1_with_the_error_when_a_job_fails() {
    let broker = TestBroker::start().await;
    let _node = TestNode::start(NodeSpec::with_guest("e2", "edge", broker.port())).await;
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.jpg");
    std::fs::write(&junk, b"definitely not a jpeg").unwrap();
    let output = tokio::process::Command::new(bin_path("isomesh"))
        .args([
            "classify",
            "--broker",
            &format!("mqtt://127.0.0.1:{}", broker.port()),
        ])
        .args(["--node", "e2", "--timeout-s", "120"])
        .arg(&junk)
        .output()
        .await
        .expect("isomesh runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("cannot decode image"), "{stdout}");
}

/// The JSON answer to `photo`, whose top-1 must be the photo's expected class.
fn classified(photo: &isomesh_testkit::Photo, payload: &[u8]) -> Value {
    let result: Value = serde_json::from_slice(payload).expect("JSON result");
    let top1 = result["top"][0]["index"]
        .as_u64()
        .unwrap_or_else(|| panic!("{}: {result}", photo.file)) as u32;
    assert!(
        photo.accepts(top1),
        "{}: got {top1}, expected {}: {result}",
        photo.file,
        photo.acceptable()
    );
    result
}
