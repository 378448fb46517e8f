//! Who may answer a job, and how many jobs a node holds for the tier above (issue 17, holes 4,
//! 5 and 11), with real nodes on a real broker.
//!
//! - An answer counts only if it comes from where the job went: a forwarded copy carries a
//!   random relay token that the answer must echo. A node or camera that knows a job's id
//!   cannot answer in the tier above's place, and a camera cannot aim a job's answer at a
//!   node's relay topic.
//! - A node knows a job by its reply topic and id: two senders who pick the same id each get
//!   the answer to their own photo.
//! - A node holds at most `--max-queue` forwarded jobs awaiting their answers; past that it runs
//!   jobs itself instead of piling them up for a tier that hangs.
//!
//! The tier above "hangs" by SIGSTOP: its connection and retained status stay, so the mesh
//! still counts it online and the broker still hands it the tier's jobs.

use isomesh_protos::{hop, Job, JobResult};
use isomesh_testkit::broker::TestBroker;
use isomesh_testkit::mqtt::Client;
use isomesh_testkit::node::{start_all, NodeSpec, TestNode};
use isomesh_testkit::{photo_job, photos};
use prost::Message;
use std::collections::HashMap;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(120);

fn node<'a>(id: &'a str, tier: &'a str, port: u16, args: &[&str]) -> NodeSpec<'a> {
    NodeSpec::with_guest_and_args(id, tier, port, args)
}

fn decode(payload: &[u8]) -> JobResult {
    JobResult::decode(payload).expect("a protobuf JobResult")
}

/// The class index the reference classifier gives photo `n` (as `photo_job(n, ..)` sends it).
fn assert_answers_photo(result: &JobResult, n: usize) {
    let photos = photos();
    let photo = &photos[n % photos.len()];
    assert!(
        result.error.is_empty(),
        "{}: {}",
        result.job_id,
        result.error
    );
    let top1 = result.top.first().map(|c| c.index).unwrap_or(u32::MAX);
    assert!(
        photo.accepts(top1),
        "{}: class {top1} is not {}'s ({})",
        result.job_id,
        photo.file,
        photo.acceptable()
    );
}

fn actions(result: &JobResult) -> Vec<hop::Action> {
    result
        .hops
        .iter()
        .map(|h| hop::Action::try_from(h.action).unwrap_or(hop::Action::Unspecified))
        .collect()
}

/// Two photos the reference classifier tells apart, as indices for `photo_job`.
fn two_different_photos() -> (usize, usize) {
    let photos = photos();
    let other = (1..photos.len())
        .find(|&n| !photos[0].accepts(photos[n].expected))
        .expect("two photos of different classes");
    (0, other)
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_tier_a_job_went_to_can_answer_it() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let grace = ["--offload", "always-up", "--offload-grace-ms", "200"];
    let nodes = start_all(
        port,
        vec![
            node("r4d", "device", port, &grace),
            node("r4e", "edge", port, &[]),
        ],
    )
    .await;
    let (device, edge) = (&nodes[0], &nodes[1]);
    let mut camera = Client::connect(port, "r4-camera").await;
    camera.subscribe("test/r4/answers").await;
    camera.subscribe("isomesh/results/r4e").await;

    // A camera aiming a job's answer at the device's relay topic gets an error, on the edge
    // node's results topic, and the device's relay is never written to.
    let aimed = Job {
        job_id: "aimed".into(),
        image: photos()[0].bytes(),
        reply_to: "isomesh/relay/r4d".into(),
        ..Default::default()
    };
    camera
        .publish("isomesh/jobs/r4e", aimed.encode_to_vec())
        .await;
    let refused = camera.next(WITHIN).await.expect("an error answer");
    assert_eq!(&*refused.topic, b"isomesh/results/r4e".as_slice());
    let refused = decode(&refused.payload);
    assert_eq!(refused.job_id, "aimed");
    assert!(refused.error.contains("relay topic"), "{}", refused.error);

    // The edge tier hangs: the device forwards a job there and waits for its answer.
    edge.pause();
    let mut spy = Client::connect(port, "r4-spy").await;
    spy.subscribe("isomesh/jobs/tier/edge").await;
    camera
        .publish(
            "isomesh/jobs/r4d",
            photo_job(0, "forged", "test/r4/answers", 3_000),
        )
        .await;
    let forwarded = spy
        .next(WITHIN)
        .await
        .expect("the job forwarded to the edge tier");
    let forwarded = Job::decode(forwarded.payload.as_ref()).expect("a Job");
    assert_eq!(forwarded.job_id, "forged");
    assert_eq!(forwarded.reply_to, "isomesh/relay/r4d");
    assert_eq!(
        forwarded.relay_token.len(),
        16,
        "a forwarded copy carries a relay token"
    );

    // Forgeries on the device's relay topic: the right job id without the token, and with a
    // token made up. The device takes neither: it runs the job itself once the budget is gone.
    for token in [Vec::new(), vec![0xAB; 16]] {
        let forged = JobResult {
            job_id: "forged".into(),
            node: "evil".into(),
            relay_token: token,
            ..Default::default()
        };
        camera
            .publish("isomesh/relay/r4d", forged.encode_to_vec())
            .await;
    }
    let answer = camera.next(WITHIN).await.expect("the device's own answer");
    assert_eq!(&*answer.topic, b"test/r4/answers".as_slice());
    let answer = decode(&answer.payload);
    assert_eq!(
        answer.node, "r4d",
        "the forged answer was taken: {answer:?}"
    );
    assert_answers_photo(&answer, 0);
    assert_eq!(
        actions(&answer),
        vec![hop::Action::Fallback],
        "{:?}",
        answer.hops
    );
    assert!(
        answer.relay_token.is_empty(),
        "a user's answer carries no token"
    );
    device
        .wait_for_log("without its relay token", Duration::from_secs(10))
        .await;

    // The edge wakes up and answers the copy it was given: too late, dropped; one answer.
    edge.resume();
    device
        .wait_for_log_times("no forwarded job awaits", 3, WITHIN)
        .await;
    if let Some(extra) = camera.next(Duration::from_secs(2)).await {
        panic!("a second answer: {:?}", decode(&extra.payload));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_senders_with_one_job_id_each_get_their_own_answer() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let _node = TestNode::start(node("r5", "device", port, &[])).await;
    let (first, second) = two_different_photos();
    let mut alice = Client::connect(port, "r5-alice").await;
    alice.subscribe("test/r5/alice").await;
    let mut bob = Client::connect(port, "r5-bob").await;
    bob.subscribe("test/r5/bob").await;

    alice
        .publish(
            "isomesh/jobs/r5",
            photo_job(first, "job-1", "test/r5/alice", 0),
        )
        .await;
    let to_alice = decode(&alice.next(WITHIN).await.expect("alice's answer").payload);
    assert_answers_photo(&to_alice, first);

    // Bob picks the same id for another photo: he gets his photo's class, not alice's answer.
    bob.publish(
        "isomesh/jobs/r5",
        photo_job(second, "job-1", "test/r5/bob", 0),
    )
    .await;
    let to_bob = decode(&bob.next(WITHIN).await.expect("bob's answer").payload);
    assert_eq!(to_bob.job_id, "job-1");
    assert_answers_photo(&to_bob, second);

    // Alice asking again (the same id and reply topic) still gets her own answer, once.
    alice
        .publish(
            "isomesh/jobs/r5",
            photo_job(first, "job-1", "test/r5/alice", 0),
        )
        .await;
    let again = decode(
        &alice
            .next(WITHIN)
            .await
            .expect("alice's answer again")
            .payload,
    );
    assert_eq!(again.top, to_alice.top);
    assert_eq!(again.node, to_alice.node);
    for client in [&mut alice, &mut bob] {
        if let Some(extra) = client.next(Duration::from_secs(2)).await {
            panic!("an extra answer: {:?}", decode(&extra.payload));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_holds_at_most_max_queue_forwarded_jobs_and_runs_the_rest() {
    let broker = TestBroker::start().await;
    let port = broker.port();
    let device_args = ["--offload", "always-up", "--max-queue", "2"];
    let nodes = start_all(
        port,
        vec![
            node("r11d", "device", port, &device_args),
            node("r11e", "edge", port, &[]),
        ],
    )
    .await;
    let (device, edge) = (&nodes[0], &nodes[1]);
    let mut camera = Client::connect(port, "r11-camera").await;
    camera.subscribe("test/r11/answers").await;

    // The edge hangs; with a budget of a minute the device would wait that long for each job it
    // forwards. Two are forwarded; the other two run on the device at once.
    edge.pause();
    const JOBS: usize = 4;
    for n in 0..JOBS {
        camera
            .publish(
                "isomesh/jobs/r11d",
                photo_job(n, &format!("held-{n}"), "test/r11/answers", 60_000),
            )
            .await;
    }
    let mut answers: HashMap<String, JobResult> = HashMap::new();
    for reply in camera.collect(2, WITHIN).await {
        let result = decode(&reply.payload);
        assert_eq!(result.node, "r11d", "{result:?}");
        assert_eq!(actions(&result), vec![hop::Action::Ran], "{result:?}");
        answers.insert(result.job_id.clone(), result);
    }
    device
        .wait_for_log(
            "too many forwarded jobs await their answers",
            Duration::from_secs(10),
        )
        .await;

    // The edge comes back and answers the two it holds: every job answered once, correctly.
    edge.resume();
    for reply in camera.collect(2, WITHIN).await {
        let result = decode(&reply.payload);
        assert_eq!(result.node, "r11e", "{result:?}");
        assert_eq!(
            actions(&result),
            vec![hop::Action::Forwarded, hop::Action::Ran],
            "{result:?}"
        );
        if let Some(first) = answers.insert(result.job_id.clone(), result) {
            panic!("{} answered twice: {first:?}", first.job_id);
        }
    }
    for n in 0..JOBS {
        assert_answers_photo(&answers[&format!("held-{n}")], n);
    }
    if let Some(extra) = camera.next(Duration::from_secs(2)).await {
        panic!("an extra answer: {:?}", decode(&extra.payload));
    }
}
