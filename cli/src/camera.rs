//! `isomesh camera DIR`: a camera that sends the photos of a folder to the mesh at a steady rate,
//! each with a latency budget, and prints where each one ran: the load of the compose demo and
//! of the container fault tests.
//!
//! It is an ordinary MQTT client like `isomesh classify`, with two differences that let it live
//! through broker trouble. Its session is persistent and it subscribes again after every
//! (re)connection, so answers published while it reconnects still reach it. And it owns its
//! jobs end to end: a broker restarted without persistence loses the jobs and answers it held,
//! so after a reconnection it asks again: `--ask-again-after-s` later it publishes again, under
//! the same job id, every job still unanswered that is at least half that wait old, and it goes
//! on in rounds of that wait until a round finds none, each job at most once per reconnection.
//! Rounds, not one: on a new broker member the nodes may take seconds to subscribe again (a
//! cluster's surviving members wait on the lost one at first), and a job that reached the
//! member before its node did is lost however late it was sent. A node that answered it
//! already sends the same answer again (see `answered`); one still running it ignores the
//! copy. The camera prints the first answer of each job; a later one counts as `answered_again`
//! while the job has had that many copies published (the first answer was late, not lost, and
//! the copy was answered too), and as a duplicate beyond that. Copies are the camera's own and
//! those rumqttc publishes after a reconnection: what the last connection had not acknowledged
//! goes out again, as a new message to the node. The broker does the same the other way: an
//! answer whose acknowledgement went down with the connection comes again on the next one,
//! flagged DUP; past the copies, such an answer counts as `redelivered`, not as a duplicate.
//!
//! A reconnection is not the only way to lose a job. A member of a clustered broker cut off from
//! the others (a partition of the cluster's own network) drops what crosses to it and from it,
//! and every client's connection stays up, so nothing tells the camera. So a job still
//! unanswered `--unanswered-after-s` after it was last sent is asked again too (looked for four
//! times a wait, so up to a quarter of it later), and again every wait while it stays
//! unanswered: a node still running it holds the copy back and acknowledges it with its answer,
//! so a slow node costs a few bytes, not a second answer.
//!
//! Ctrl-C (or SIGTERM) stops the shutter: the camera then waits for the answers still due, as
//! after its last photo, and prints its summary.
//!
//! The last line is a JSON summary (`{"summary":{...}}`): sent, answered, missing, errors,
//! late, duplicates, answered_again, redelivered, asked_again, reconnects, and answers by
//! node. Exit code 0 when every photo got an answer and none was an error, 1 otherwise, 2 when
//! the camera itself failed.

use crate::classify::{print_answer, print_header};
use anyhow::Context;
use isomesh_mesh::report;
use isomesh_mesh::topics::parse_tier;
use isomesh_mesh::topics::Topics;
use isomesh_protos::{Job, JobResult, NodeStatus, Tier};
use prost::Message;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;

/// Send the photos of a folder to the mesh at a steady rate.
#[derive(Debug, clap::Args)]
pub struct CameraArgs {
    /// Folder of JPEG/PNG photos, sent in name order, round and round.
    pub dir: PathBuf,
    /// Broker URL, or the members of a clustered broker: URL,URL,... (the camera moves to the
    /// next when its member goes).
    #[arg(long, env = "ISOMESH_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// Send to these nodes in turn (repeat the flag or separate ids with commas).
    #[arg(long = "node", value_delimiter = ',', conflicts_with = "tier")]
    pub nodes: Vec<String>,
    /// Send to any node of this tier (device, edge, cloud).
    #[arg(long, value_parser = parse_tier)]
    pub tier: Option<Tier>,
    /// Photos per second.
    #[arg(long, env = "ISOMESH_CAMERA_RATE", default_value_t = 1.0)]
    pub rate: f64,
    /// Latency budget of each photo, ms (0 = the node's default).
    #[arg(long, env = "ISOMESH_CAMERA_BUDGET_MS", default_value_t = 0)]
    pub budget_ms: u32,
    /// Photos to send before stopping (0 = never stop).
    #[arg(long, env = "ISOMESH_CAMERA_COUNT", default_value_t = 0)]
    pub count: u64,
    /// After a reconnection, jobs still unanswered this long afterwards (and at least half as
    /// old) are published again, in rounds this long apart until a round finds none, s.
    #[arg(long, default_value_t = 10)]
    pub ask_again_after_s: u64,
    /// A job still unanswered this long after it was last sent is asked again, connection lost
    /// or not (a clustered broker's member cut off from the others drops what crosses to it), s;
    /// 0: only after a reconnection.
    #[arg(long, default_value_t = 30)]
    pub unanswered_after_s: u64,
    /// Before the first photo, wait up to this long for the target nodes (or one node of the
    /// target tier) to be online with a module, s: a job sent to a node that never connected
    /// is dropped by the broker.
    #[arg(long, default_value_t = 300)]
    pub wait_ready_s: u64,
    /// Once the last photo is sent, how long to wait for the remaining answers, s.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// Print one JSON line per answer instead of a table.
    #[arg(long)]
    pub json: bool,
    /// MQTT client id (and job id prefix) [default: isomesh-camera-PID-N].
    #[arg(long, env = "ISOMESH_CAMERA_ID")]
    pub id: Option<String>,
    /// Topic prefix of the mesh.
    #[arg(long, env = "ISOMESH_PREFIX", default_value = "isomesh")]
    pub prefix: String,
}

/// A job sent and not answered yet.
struct Pending {
    photo: usize,
    target: String,
    job: Vec<u8>,
    sent: Instant,
    /// When it was last published: when it was sent or last asked again.
    last_asked: Instant,
    /// The last reconnection (its number) after which this job was asked again; 0: never.
    asked_after: u64,
    /// How many times it was asked again.
    asked_again: u32,
    /// Reconnections while it was pending. rumqttc publishes again what the last connection had
    /// not acknowledged, with no DUP flag (and a broker forwards a QoS 1 copy as a new message
    /// anyway), so a node may take such a copy for the job asked again and answer it again.
    resent: u32,
}

impl Pending {
    /// Unanswered for `after` since it was last published.
    fn is_overdue(&self, now: Instant, after: Duration) -> bool {
        now.saturating_duration_since(self.last_asked) >= after
    }

    /// Publishes the job again, under the same id.
    fn ask_again(&mut self, client: &AsyncClient, now: Instant) {
        // A full request queue (the broker away for long) drops this copy: the job stays
        // pending and its next turn comes `--unanswered-after-s` later or after a reconnection.
        let _ = client.try_publish(
            self.target.clone(),
            QoS::AtLeastOnce,
            false,
            self.job.clone(),
        );
        self.last_asked = now;
        self.asked_again += 1;
    }
}

/// Counts for the summary line.
#[derive(Default)]
struct Tally {
    sent: u64,
    answered: u64,
    errors: u64,
    late: u64,
    duplicates: u64,
    answered_again: u64,
    redelivered: u64,
    asked_again: u64,
    reconnects: u64,
    by_node: BTreeMap<String, u64>,
}

/// Runs the camera; `Ok(false)` when a photo got an error or no answer.
pub async fn run(args: CameraArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(
        args.rate.is_finite() && args.rate > 0.0,
        "--rate must be a positive number of photos per second, not {}",
        args.rate
    );
    let photos = read_photos(&args.dir)?;
    let topics = Topics::new(args.prefix.clone());
    let targets: Vec<String> = match (&args.nodes[..], args.tier) {
        ([], Some(tier)) => vec![topics.tier_jobs(tier)],
        ([], None) => anyhow::bail!("name where to send: --node ID (repeatable) or --tier T"),
        (nodes, _) => nodes.iter().map(|n| topics.jobs(n)).collect(),
    };
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| isomesh_mqtt::connect::client_id_at(&args.broker, "camera"));
    let reply_to = topics.replies(&id);
    // Job ids unique to this run: a node remembers the answers it gave (to answer again a job
    // asked again), so a restarted camera must not reuse the ids of its previous run.
    let run_tag = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000_000)
        .unwrap_or_default();
    let members = isomesh_mqtt::login::BrokerAddress::parse_members(&args.broker)?;
    let mut member_options = Vec::with_capacity(members.len());
    for member in &members {
        let mut options = member.options(&id, &isomesh_mqtt::login::Login::from_env(), None)?;
        options
            .set_keep_alive(Duration::from_secs(10))
            .set_max_packet_size(Some(256 << 20))
            // Answers published while the camera reconnects wait in its session.
            .set_clean_start(false)
            .set_session_expiry_interval(Some(3600));
        member_options.push(options);
    }
    // Room for every job sent while the broker is away: they go out once it is back.
    let (client, mut eventloop) = AsyncClient::new(member_options[0].clone(), 4096);
    // The first member that accepts; the link starts from it and moves on from there.
    let mut failures = Vec::new();
    let mut members_shown: Vec<String> = members.iter().map(|m| m.display()).collect();
    for (index, member) in members.iter().enumerate() {
        eventloop.options = member_options[index].clone();
        match isomesh_mqtt::connect::first_connack(&mut eventloop, member).await {
            Ok(()) => {
                member_options.rotate_left(index);
                members_shown.rotate_left(index);
                break;
            }
            Err(failure) => failures.push(failure),
        }
    }
    if failures.len() == members.len() {
        anyhow::bail!("{}", failures.join("\n"));
    }
    client.try_subscribe(reply_to.clone(), QoS::AtLeastOnce)?;
    client.try_subscribe(topics.all_status(), QoS::AtMostOnce)?;
    // From here the connection is polled by a task of its own: the shutter's ticks below
    // would otherwise cancel a reconnection half-way (isomesh_mqtt::link).
    let mut link = isomesh_mqtt::link::Link::spawn_members(eventloop, member_options);
    // Nodes heard online with a module, by id and tier.
    let mut serving: HashMap<String, Tier> = HashMap::new();
    let is_ready = |serving: &HashMap<String, Tier>| match args.tier {
        Some(tier) => serving.values().any(|t| *t == tier),
        None => args.nodes.iter().all(|n| serving.contains_key(n)),
    };
    let ready_by = Instant::now() + Duration::from_secs(args.wait_ready_s);
    let mut ready = false;

    if !args.json {
        print_header();
    }
    let mut tally = Tally::default();
    let mut pending: HashMap<String, Pending> = HashMap::new();
    let mut answered = Answered::default();
    let mut shutter = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    shutter.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set at a reconnection: when the next round of asking again is due.
    let mut ask_again: Option<Instant> = None;
    let unanswered_after =
        (args.unanswered_after_s > 0).then(|| Duration::from_secs(args.unanswered_after_s));
    // Overdue jobs are looked for a few times a wait, and asked again together: one log line
    // for a burst of them, each at most a quarter of a wait late.
    let check_every = unanswered_after.map_or(Duration::from_secs(1), |after| after / 4);
    let mut overdue_check = tokio::time::interval(check_every.max(Duration::from_secs(1)));
    overdue_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent = Instant::now();
    let wait = Duration::from_secs(args.timeout_s);
    let mut stop_requested = std::pin::pin!(stop_signal());
    let mut stopped = false;
    loop {
        let done_sending = stopped || (args.count > 0 && tally.sent >= args.count);
        if done_sending && pending.is_empty() {
            break;
        }
        let ask_at = ask_again;
        tokio::select! {
            _ = tokio::time::sleep_until(ready_by), if !ready => {
                let mut waiting: Vec<&String> = args.nodes.iter().filter(|n| !serving.contains_key(*n)).collect();
                waiting.sort();
                anyhow::bail!(
                    "target nodes not online with a module within {} s (--wait-ready-s): {}",
                    args.wait_ready_s,
                    if waiting.is_empty() { format!("no {} node", args.tier.map(Tier::name).unwrap_or("")) } else { format!("{waiting:?}") }
                );
            }
            _ = shutter.tick(), if ready && !done_sending => {
                let n = tally.sent;
                let photo = (n % photos.len() as u64) as usize;
                let target = targets[(n % targets.len() as u64) as usize].clone();
                let job = Job {
                    job_id: format!("{id}-{run_tag}-{n}"),
                    image: photos[photo].1.clone(),
                    reply_to: reply_to.clone(),
                    budget_ms: args.budget_ms,
                    top_k: 5,
                    ..Default::default()
                };
                let bytes = job.encode_to_vec();
                if let Err(e) = client.try_publish(target.clone(), QoS::AtLeastOnce, false, bytes.clone()) {
                    eprintln!("isomesh camera: photo {n} not sent now ({e}); it is asked again later");
                }
                let now = Instant::now();
                pending.insert(job.job_id, Pending { photo, target, job: bytes, sent: now, last_asked: now, asked_after: 0, asked_again: 0, resent: 0 });
                tally.sent += 1;
                last_sent = Instant::now();
            }
            _ = sleep_until(ask_at) => {
                // Jobs at least half a wait old: younger ones were sent once the mesh had had
                // that long to settle, and get their turn in the next round if still due.
                let wait = Duration::from_secs(args.ask_again_after_s);
                let now = Instant::now();
                let mut asked = 0;
                for p in pending.values_mut().filter(|p| p.asked_after < tally.reconnects && now.duration_since(p.sent) >= wait / 2) {
                    p.asked_after = tally.reconnects;
                    p.ask_again(&client, now);
                    tally.asked_again += 1;
                    asked += 1;
                }
                ask_again = (asked > 0).then_some(now + wait);
            }
            _ = overdue_check.tick(), if unanswered_after.is_some() => {
                let now = Instant::now();
                let mut asked = 0;
                for p in pending.values_mut().filter(|p| unanswered_after.is_some_and(|after| p.is_overdue(now, after))) {
                    p.ask_again(&client, now);
                    tally.asked_again += 1;
                    asked += 1;
                }
                if asked > 0 {
                    eprintln!("isomesh camera: asked again {asked} job(s) unanswered for {} s or more", args.unanswered_after_s);
                }
            }
            _ = tokio::time::sleep_until(last_sent + wait), if done_sending => break,
            _ = &mut stop_requested, if !stopped => {
                stopped = true;
                last_sent = Instant::now();
                eprintln!("isomesh camera: stopping; waiting for {} answer(s) still due", pending.len());
            }
            Some(event) = link.next() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // The broker may have lost the subscription with everything else.
                    tally.reconnects += 1;
                    for p in pending.values_mut() {
                        p.resent += 1;
                    }
                    let _ = client.try_subscribe(reply_to.clone(), QoS::AtLeastOnce);
                    ask_again = Some(Instant::now() + Duration::from_secs(args.ask_again_after_s));
                    eprintln!("isomesh camera: reconnected to {}", members_shown.get(link.member()).map_or("", String::as_str));
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                    if let Some(node) = topics.status_of(&topic) {
                        match NodeStatus::decode(publish.payload.as_ref()) {
                            Ok(s) if s.online && s.module.is_some() => {
                                serving.insert(node.to_string(), Tier::try_from(s.tier).unwrap_or(Tier::Unspecified));
                            }
                            _ => { serving.remove(node); }
                        }
                        if !ready && is_ready(&serving) {
                            ready = true;
                            // The shutter starts now, not when the camera was started.
                            shutter.reset_immediately();
                        }
                        continue;
                    }
                    let Ok(result) = JobResult::decode(publish.payload.as_ref()) else {
                        eprintln!("isomesh camera: ignoring an unreadable reply on {reply_to}");
                        continue;
                    };
                    let Some(p) = pending.remove(&result.job_id) else {
                        match answered.another(&result.job_id, publish.dup) {
                            Another::Repeat => tally.answered_again += 1,
                            Another::Redelivered => tally.redelivered += 1,
                            Another::Duplicate => {
                                tally.duplicates += 1;
                                eprintln!("isomesh camera: job {} answered once more than it was asked (by {}, packet id {})", result.job_id, result.node, publish.pkid);
                            }
                            Another::Unknown => {}
                        }
                        continue;
                    };
                    answered.first(&result.job_id, p.asked_again + p.resent);
                    tally.answered += 1;
                    *tally.by_node.entry(result.node.clone()).or_default() += 1;
                    if !result.error.is_empty() {
                        tally.errors += 1;
                    } else if !result.deadline_met {
                        tally.late += 1;
                    }
                    let path = &photos[p.photo].0;
                    if args.json {
                        let mut line = report::to_json(&result);
                        line["file"] = path.display().to_string().into();
                        line["round_trip_ms"] = (p.sent.elapsed().as_secs_f64() * 1000.0).into();
                        line["asked_again"] = (p.asked_again > 0).into();
                        println!("{line}");
                    } else {
                        print_answer(false, args.budget_ms, path, &result, p.sent.elapsed());
                    }
                }
                Ok(_) => {}
                Err(e) => eprintln!("isomesh camera: broker connection lost ({e}); retrying"),
            }
        }
    }
    let missing = pending.len() as u64;
    let mut missing_ids: Vec<&String> = pending.keys().collect();
    missing_ids.sort();
    println!(
        "{}",
        serde_json::json!({"summary": {
            "sent": tally.sent, "answered": tally.answered, "missing": missing,
            "missing_ids": missing_ids, "errors": tally.errors, "late": tally.late,
            "duplicates": tally.duplicates, "answered_again": tally.answered_again,
            "redelivered": tally.redelivered, "asked_again": tally.asked_again,
            // The first connection is not a reconnection.
            "reconnects": tally.reconnects, "by_node": tally.by_node,
        }})
    );
    link.close(&client, Duration::from_secs(1)).await;
    Ok(missing == 0 && tally.errors == 0)
}

/// Resolves at the first Ctrl-C or SIGTERM.
async fn stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The jobs answered, each with how many more answers it may still get: one per copy of it
/// published, by the camera asking again or by rumqttc after a reconnection (the node repeats
/// its answer to a copy, and the first answer may only have been late). An answer beyond those
/// is a duplicate, unless the broker flagged it as its own redelivery.
#[derive(Default)]
struct Answered(HashMap<String, u32>);

/// What a further answer to an answered job is.
#[derive(Debug, PartialEq, Eq)]
enum Another {
    /// The node's repeat, for a copy the camera published.
    Repeat,
    /// The broker's second delivery of an answer (its DUP flag set): the camera's
    /// acknowledgement of the first went down with the connection, so the broker sent it again
    /// on the next one, as MQTT's at-least-once delivery must. One answer from the node, two
    /// deliveries; not a second answer.
    Redelivered,
    /// More answers than the job was asked for.
    Duplicate,
    /// A job of another run (the client id's replies topic outlives a run).
    Unknown,
}

impl Answered {
    /// The job's first answer, after `copies` more copies of it were published.
    fn first(&mut self, job_id: &str, copies: u32) {
        self.0.insert(job_id.to_string(), copies);
    }

    /// A further answer to `job_id`; `redelivery` when the broker flagged it as one (DUP).
    /// A flagged answer first uses up the job's copies, since the copy's answer may be what
    /// the broker delivered again; only past them is it a redelivery. A broker never flags a
    /// node's own second answer: the DUP flag of a publish is not passed on to subscribers.
    fn another(&mut self, job_id: &str, redelivery: bool) -> Another {
        match self.0.get_mut(job_id) {
            Some(repeats) if *repeats > 0 => {
                *repeats -= 1;
                Another::Repeat
            }
            Some(_) if redelivery => Another::Redelivered,
            Some(_) => Another::Duplicate,
            None => Another::Unknown,
        }
    }
}

/// The photos of `dir` (`.jpg`, `.jpeg`, `.png`), by name, read once.
fn read_photos(dir: &std::path::Path) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the photo folder {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase);
            matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png"))
        })
        .collect();
    paths.sort();
    anyhow::ensure!(
        !paths.is_empty(),
        "no .jpg, .jpeg or .png photos in {}",
        dir.display()
    );
    paths
        .into_iter()
        .map(|path| {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            Ok((path, bytes))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_asked_again_may_be_answered_once_more_per_copy_and_no_more() {
        let mut answered = Answered::default();
        answered.first("never-asked-again", 0);
        answered.first("asked-again-twice", 2);
        assert_eq!(
            answered.another("never-asked-again", false),
            Another::Duplicate
        );
        assert_eq!(
            answered.another("asked-again-twice", false),
            Another::Repeat
        );
        assert_eq!(
            answered.another("asked-again-twice", false),
            Another::Repeat
        );
        assert_eq!(
            answered.another("asked-again-twice", false),
            Another::Duplicate
        );
        assert_eq!(answered.another("of-another-run", false), Another::Unknown);
    }

    #[test]
    fn an_answer_the_broker_delivers_again_is_not_a_second_answer() {
        let mut answered = Answered::default();
        answered.first("asked-once", 0);
        answered.first("asked-again-once", 1);
        assert_eq!(answered.another("asked-once", true), Another::Redelivered);
        // Not flagged, the same job's further answer is one the node sent again.
        assert_eq!(answered.another("asked-once", false), Another::Duplicate);
        // A flagged answer to a job with a copy out counts against the copy first.
        assert_eq!(answered.another("asked-again-once", true), Another::Repeat);
        assert_eq!(
            answered.another("asked-again-once", true),
            Another::Redelivered
        );
        assert_eq!(answered.another("of-another-run", true), Another::Unknown);
    }

    #[test]
    fn a_job_is_overdue_once_unanswered_for_the_wait_since_it_was_last_asked() {
        let start = Instant::now();
        let after = Duration::from_secs(30);
        let mut job = Pending {
            photo: 0,
            target: "isomesh/jobs/d1".into(),
            job: Vec::new(),
            sent: start,
            last_asked: start,
            asked_after: 0,
            asked_again: 0,
            resent: 0,
        };
        assert!(!job.is_overdue(start + Duration::from_secs(29), after));
        assert!(job.is_overdue(start + after, after));
        // Asked again, its next turn is a whole wait later.
        job.last_asked = start + after;
        assert!(!job.is_overdue(start + Duration::from_secs(59), after));
        assert!(job.is_overdue(start + Duration::from_secs(60), after));
    }
}
