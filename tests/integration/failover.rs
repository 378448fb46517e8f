//! Past one broker: a node and a camera given the members of a broker (`--broker URL,URL`) move
//! to the next member when theirs is killed, and every job is still answered exactly once.
//!
//! The two members here are two separate brokers of the kind under test (isomesh-broker, or
//! Mosquitto with `ISOMESH_TEST_BROKER=mosquitto`), not one cluster: they share no session,
//! subscription or retained message. So this checks the clients' side alone, which must not
//! depend on any one broker: they move, subscribe again and publish their status again on the
//! member they reach, and the camera, which owns its jobs end to end, asks again for what the
//! dead member took with it. Its metrics say which member it is on and how often it moved.
//!
//! A member whose host vanishes (no FIN, no RST) while a client's socket to it is full must not
//! hold the client either: the client gives its connection up when a poll has made no progress
//! for two keep-alive periods, and moves on.

use isomesh_testkit::broker::TestBroker;
use isomesh_testkit::camera::Camera;
use isomesh_testkit::metrics::{scrape, value};
use isomesh_testkit::node::{wait_status, NodeSpec, TestNode};
use isomesh_testkit::vanishing::VanishingHost;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn a_node_and_a_camera_move_to_the_next_member_when_theirs_is_killed_and_no_job_is_lost() {
    let mut first = TestBroker::start().await;
    let second = TestBroker::start().await;
    let members = format!("{},{}", first.url(), second.url());
    // Ready means online on the first member, the one it connects to while that one is up.
    let node = TestNode::start(NodeSpec::with_guest_and_args(
        "fo1",
        "edge",
        first.port(),
        &["--broker", &members, "--metrics-listen", "127.0.0.1:0"],
    ))
    .await;
    let camera = Camera::start(
        &members,
        &[
            "--node",
            "fo1",
            "--rate",
            "5",
            "--count",
            "30",
            // Jobs unanswered 6 s after the camera moved (and those it sent in the first 3 s
            // after, which may have reached the new member before the node did) go out again.
            "--ask-again-after-s",
            "6",
        ],
    );
    // Under the stream: the node has answered a few through the first member.
    node.wait_for_log_times("classified", 5, Duration::from_secs(120))
        .await;
    let killed = Instant::now();
    first.kill();
    let status = wait_status(second.port(), "fo1", Duration::from_secs(60), |s| {
        s.online && s.module.is_some()
    })
    .await;
    eprintln!(
        "fo1 online with {:?} on the second member {} ms after the first was killed",
        status.module.as_ref().map(|m| &m.version),
        killed.elapsed().as_millis()
    );
    let seen = camera.finish();
    seen.assert_exactly_one_correct_answer_each();
    assert!(
        seen.summary["reconnects"].as_u64().is_some_and(|n| n >= 1),
        "the camera moved: {}\n{}",
        seen.summary,
        seen.log
    );
    assert!(
        seen.log
            .contains(&format!("reconnected to {}", second.url())),
        "the camera names the member it moved to:\n{}",
        seen.log
    );
    let log = node.log();
    assert!(
        log.contains("moving to the next broker member"),
        "the node says it moved:\n{log}"
    );
    let metrics = scrape(&node.metrics_addr()).expect("scrape the node");
    assert_eq!(
        value(&metrics, "isomesh_broker_member"),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        value(&metrics, "isomesh_broker_member_changes_total"),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_camera_whose_member_vanishes_mid_burst_gives_it_up_and_moves_on() {
    let broker = TestBroker::start().await;
    let _node = TestNode::start(NodeSpec::with_guest("fo-burst", "edge", broker.port())).await;
    // The camera's first member is the same broker behind a host that vanishes once about ten
    // photos have gone through it; its second, the broker itself.
    let host = VanishingHost::start(broker.port(), 1 << 20).await;
    let members = format!("{},{}", host.url(), broker.url());
    let started = Instant::now();
    // 100 photos (about 10 MB) in 2 s: after the host vanishes, the rest fill the camera's
    // socket, and its poll waits in a write that never ends.
    let camera = Camera::start(
        &members,
        &[
            "--node",
            "fo-burst",
            "--rate",
            "50",
            "--count",
            "100",
            "--ask-again-after-s",
            "3",
            "--timeout-s",
            "90",
        ],
    );
    let seen = camera.finish();
    eprintln!(
        "camera done {} ms after it started: {}",
        started.elapsed().as_millis(),
        seen.summary
    );
    assert!(
        host.has_vanished(),
        "the camera's first member never vanished"
    );
    seen.assert_exactly_one_correct_answer_each();
    assert!(
        seen.log.contains("no progress on the connection"),
        "the camera gave its stalled connection up:\n{}",
        seen.log
    );
    assert!(
        seen.log
            .contains(&format!("reconnected to {}", broker.url())),
        "the camera moved to its second member:\n{}",
        seen.log
    );
}
