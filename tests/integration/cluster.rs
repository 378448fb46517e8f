//! Three isomesh-brokers as one cluster (`--cluster-*`, rmqtt's broadcast cluster): the mesh
//! works across members and survives the loss of one.
//!
//! Each test starts three members on 127.0.0.1 and spreads the mesh's clients over them: a
//! rollout published through one member reaches nodes on the others, including one that joins
//! later and one member restarted empty; members started at different times reach each other
//! from the first message; a tier's job queue (a shared subscription) is split
//! between nodes on different members with every job answered once; and a kill -9 of the member
//! a camera and a node are on moves both to another member with no job lost or answered twice.
//!
//! Only isomesh-broker clusters: with `ISOMESH_TEST_BROKER=mosquitto` these are filtered out
//! (`isomesh_broker_only`). The clients' side of fail-over, which must not depend on rmqtt, is
//! `failover`, run on both brokers.

mod isomesh_broker_only {
    use isomesh_testkit::broker::TestBroker;
    use isomesh_testkit::camera::Camera;
    use isomesh_testkit::mqtt::Client;
    use isomesh_testkit::node::{
        classify_photo, serves, try_wait_status, wait_status, NodeSpec, TestNode,
    };
    use isomesh_testkit::rollout::{self, guest_module_v2, Keys, MODULE_NAME, VERSION_2};
    use isomesh_testkit::{isomesh, photos};
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    /// Generous: a cold compile of the classifier takes ~15 s, more with both cores busy.
    const CONVERGE_WITHIN: Duration = Duration::from_secs(240);

    fn node_with_keys<'a>(id: &'a str, tier: &'a str, port: u16, keys: &Keys) -> NodeSpec<'a> {
        let mut spec = NodeSpec::with_guest(id, tier, port);
        spec.extra_args = keys.node_args();
        spec
    }

    /// Waits until the member on `port` holds the module's retained manifest, and returns its
    /// version. A member that has just started copies the others' retained messages a moment
    /// later, so a subscription that got none is made again until `within` runs out.
    async fn retained_manifest_version(port: u16, client_id: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut client = Client::connect(port, &format!("{client_id}-{attempt}")).await;
            client
                .subscribe(&format!("isomesh/modules/{MODULE_NAME}/manifest"))
                .await;
            if let Some(publish) = client.next(Duration::from_secs(2)).await {
                assert!(publish.retain, "the manifest is not a retained message");
                let manifest = <isomesh_protos::ModuleManifest as prost::Message>::decode(
                    publish.payload.as_ref(),
                )
                .expect("a manifest");
                return manifest.version;
            }
            assert!(
                Instant::now() < deadline,
                "no retained manifest on the member at port {port} within {within:?}"
            );
        }
    }

    /// Waits until a message published on the member at `from` reaches a subscriber on the one
    /// at `to`, publishing a probe every half second. A member started again copies the
    /// others' retained messages as it joins; when that copy times out (seen once in a fresh-clone
    /// rehearsal, both cores busy), rmqtt's circuit breaker drops its forwards to that peer for the next 10 s, and
    /// a single job sent meanwhile is lost on the way (the camera would ask again; a test job
    /// is sent once). The probe makes the job wait for the link, not the test for a fixed time.
    async fn wait_until_forwarding(from: u16, to: u16, within: Duration) {
        let topic = format!("test/probe/{from}-{to}-{}", std::process::id());
        let mut receiver = Client::connect(to, &format!("probe-rx-{from}-{to}")).await;
        receiver.subscribe(&topic).await;
        let sender = Client::connect(from, &format!("probe-tx-{from}-{to}")).await;
        let deadline = Instant::now() + within;
        loop {
            sender.publish(&topic, b"probe".to_vec()).await;
            if receiver.next(Duration::from_millis(500)).await.is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nothing published on port {from} reached port {to} within {within:?}"
            );
        }
    }

    /// Prints the members' warnings and errors when the test panics while it is in scope, so
    /// a failure (a job lost, a status or answer that never came) shows the links to peers,
    /// the circuit breaker and the forwards that failed.
    struct WarningsOnPanic(Vec<PathBuf>);

    impl WarningsOnPanic {
        fn of(members: &[TestBroker]) -> WarningsOnPanic {
            WarningsOnPanic(members.iter().map(TestBroker::log_path).collect())
        }
    }

    impl Drop for WarningsOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!("{}", warnings_of(&self.0));
            }
        }
    }

    /// The members' warnings and errors.
    fn warnings_of(logs: &[PathBuf]) -> String {
        let mut out = String::new();
        for (i, log) in logs.iter().enumerate() {
            out.push_str(&format!("member {}'s warnings and errors:\n", i + 1));
            for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
                if line.contains("WARN") || line.contains("ERROR") {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_rollout_through_one_member_reaches_nodes_on_the_others_and_a_restarted_member() {
        let mut members = TestBroker::start_cluster(3).await;
        let _warnings = WarningsOnPanic::of(&members);
        let keys = Keys::new();
        let edge = TestNode::start(node_with_keys("cl-e1", "edge", members[2].port(), &keys)).await;
        // Through member 1: `--wait` follows cl-e1's statuses, which it publishes on member 3.
        let (code, output) = isomesh(&rollout::rollout_args(
            &members[0].url(),
            &keys,
            &guest_module_v2(),
            VERSION_2,
            CONVERGE_WITHIN,
        ))
        .await;
        assert_eq!(code, 0, "{output}\ncl-e1's log:\n{}", edge.log());
        assert!(
            output.contains("cl-e1") && output.contains("serving mobilenet_v2@0.2.0"),
            "{output}"
        );

        // Member 2 is killed and started again with nothing in memory: it copies the retained
        // messages (the module's chunks and manifest) from the others.
        members[1].restart().await;
        let version =
            retained_manifest_version(members[1].port(), "cl-manifest", Duration::from_secs(60))
                .await;
        assert_eq!(version, VERSION_2, "{}", members[1].log());

        // A node that joins later on member 2, with no module of its own, gets it from there.
        let mut late = NodeSpec::with_guest("cl-d1", "device", members[1].port());
        late.modules.clear();
        late.extra_args = keys.node_args();
        let late = TestNode::spawn(&late);
        wait_status(members[1].port(), "cl-d1", CONVERGE_WITHIN, |s| {
            serves(s, VERSION_2)
        })
        .await;
        // A job published on member 1 for the node on member 2, answered back on member 1,
        // once the two forward to each other again.
        wait_until_forwarding(members[0].port(), members[1].port(), CONVERGE_WITHIN).await;
        wait_until_forwarding(members[1].port(), members[0].port(), CONVERGE_WITHIN).await;
        let result = classify_photo(members[0].port(), "cl-d1", Duration::from_secs(120)).await;
        let top1 = result["top"][0]["index"]
            .as_u64()
            .unwrap_or_else(|| panic!("{result}\ncl-d1's log:\n{}", late.log()));
        assert!(photos()[0].accepts(top1 as u32), "{result}");
    }

    /// Members that boot at different times: the first serves its clients only once it
    /// reaches the others, so what its clients publish reaches the last member's at once.
    /// Otherwise the first member's link to a member that did not listen yet is tried again
    /// only after 3 s, its messages meanwhile time out, and the circuit breaker then drops
    /// everything for that member for 10 s (read in rmqtt's code; the likely cause of a CI
    /// failure where half of a tier's jobs went unanswered).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_member_that_starts_first_reaches_the_later_ones_from_its_first_message() {
        let members = TestBroker::start_cluster_staggered(3, Duration::from_millis(1500)).await;
        let _warnings = WarningsOnPanic::of(&members);
        let mut subscriber = Client::connect(members[2].port(), "cl-late-sub").await;
        subscriber.subscribe("cl/boot/#").await;
        let mut publisher = Client::connect(members[0].port(), "cl-early-pub").await;
        for i in 0..12 {
            publisher
                .publish(&format!("cl/boot/{i}"), vec![i as u8])
                .await;
            // One at a time, each acknowledged before the next goes out.
            assert!(
                publisher.next_ack(Duration::from_secs(30)).await.is_some(),
                "no PUBACK for message {i}"
            );
        }
        let mut got: Vec<String> = Vec::new();
        while got.len() < 12 {
            match subscriber.next(Duration::from_secs(20)).await {
                Some(publish) => got.push(String::from_utf8_lossy(&publish.topic).into_owned()),
                None => panic!(
                    "the subscriber on member 3 got {} of 12 messages published on member 1: {got:?}\nmember 1's log:\n{}",
                    got.len(),
                    members[0].log()
                ),
            }
        }
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 12, "{got:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_tiers_jobs_are_shared_between_nodes_on_different_members_each_answered_once() {
        let members = TestBroker::start_cluster(3).await;
        let _warnings = WarningsOnPanic::of(&members);
        let first = TestNode::start(NodeSpec::with_guest("cl-s1", "edge", members[0].port())).await;
        let second =
            TestNode::start(NodeSpec::with_guest("cl-s2", "edge", members[1].port())).await;
        // Each node has subscribed to the tier's queue on its own member once its status says
        // it serves (the subscription goes out before that status).
        let camera = Camera::start(
            &members[2].url(),
            &["--tier", "edge", "--rate", "4", "--count", "24"],
        );
        let seen = camera.finish();
        seen.assert_exactly_one_correct_answer_each();
        let (by_first, by_second) = (seen.answered_by("cl-s1"), seen.answered_by("cl-s2"));
        eprintln!("the tier's 24 jobs: {by_first} answered by cl-s1 (member 1), {by_second} by cl-s2 (member 2)");
        assert!(
            by_first > 0 && by_second > 0,
            "both members' nodes took jobs from the tier's queue: cl-s1 {by_first}, cl-s2 {by_second}\ncl-s1:\n{}\ncl-s2:\n{}",
            first.log(),
            second.log()
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn killing_the_member_of_a_camera_and_a_node_moves_both_and_loses_no_job() {
        let mut members = TestBroker::start_cluster(3).await;
        let _warnings = WarningsOnPanic::of(&members);
        let list = format!("{},{}", members[0].url(), members[1].url());
        let node = TestNode::start(NodeSpec::with_guest_and_args(
            "cl-f1",
            "device",
            members[0].port(),
            &["--broker", &list],
        ))
        .await;
        let camera = Camera::start(
            &list,
            &[
                "--node",
                "cl-f1",
                "--rate",
                "5",
                "--count",
                "30",
                // Jobs the killed member took with it go out again 6 s after the camera moved.
                "--ask-again-after-s",
                "6",
            ],
        );
        node.wait_for_log_times("classified", 5, Duration::from_secs(120))
            .await;
        let killed = Instant::now();
        let killed_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        members[0].kill();
        // Seen from member 3, which neither client uses: the cluster carries the status. The
        // status retained from before the kill says online too: wait for one published after.
        let status = try_wait_status(members[2].port(), "cl-f1", Duration::from_secs(60), |s| {
            s.online && s.module.is_some() && s.published_at_ms >= killed_at_ms
        })
        .await
        .unwrap_or_else(|last| {
            panic!(
                "no status of cl-f1 published after the kill reached member 3 within 60 s; the last: {last:?}\ncl-f1's log:\n{}",
                node.log()
            )
        });
        eprintln!(
            "cl-f1 online with {:?} on member 2, seen on member 3, {} ms after member 1 was killed",
            status.module.as_ref().map(|m| &m.version),
            killed.elapsed().as_millis()
        );
        let seen = camera.finish();
        seen.assert_exactly_one_correct_answer_each();
        assert!(
            seen.log
                .contains(&format!("reconnected to {}", members[1].url())),
            "the camera moved to member 2:\n{}",
            seen.log
        );
        assert!(
            node.log().contains("moving to the next broker member"),
            "the node moved:\n{}",
            node.log()
        );
    }
}
