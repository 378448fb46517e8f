//! `isomesh camera` as a load generator for tests: a child process sending photos at a rate,
//! whose JSON lines (one per job's first answer) and summary a test checks afterwards.

use serde_json::Value;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};

/// A running camera.
pub struct Camera {
    child: Child,
}

/// What a camera saw: the first answer of each job, and its summary counts.
pub struct Seen {
    pub answers: Vec<Value>,
    pub summary: Value,
    /// The camera's stderr (reconnections, send errors).
    pub log: String,
}

impl Camera {
    /// Starts `isomesh camera PHOTOS --broker URL --json ARGS...`.
    pub fn start(broker: &str, args: &[&str]) -> Camera {
        let child = Command::new(crate::bin_path("isomesh"))
            .arg("camera")
            .arg(crate::compose::photos_dir())
            .args(["--broker", broker, "--json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start isomesh camera");
        Camera { child }
    }

    /// Waits for the camera to finish and reads what it printed.
    pub fn finish(self) -> Seen {
        let out = self.child.wait_with_output().expect("camera output");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        let mut answers = Vec::new();
        let mut summary = Value::Null;
        for line in stdout.lines() {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("camera printed a line that is not JSON ({e}): {line}"));
            match value.get("summary") {
                Some(s) => summary = s.clone(),
                None => answers.push(value),
            }
        }
        assert!(
            !summary.is_null(),
            "the camera printed no summary (exit {:?}); stderr:\n{log}",
            out.status
        );
        Seen {
            answers,
            summary,
            log,
        }
    }
}

impl Seen {
    /// Asserts the fault tests' promise: every job answered, exactly once (no second answer
    /// reached the camera either, but the node's repeat of an answer to a job the camera asked
    /// again: `answered_again`), without error, with the reference label for its photo.
    pub fn assert_exactly_one_correct_answer_each(&self) {
        let s = &self.summary;
        let count = |key: &str| s[key].as_u64().unwrap_or(u64::MAX);
        assert_eq!(
            count("missing"),
            0,
            "lost jobs: {}; camera log:\n{}",
            s["missing_ids"],
            self.log
        );
        assert_eq!(count("answered"), count("sent"), "summary: {s}");
        assert_eq!(count("errors"), 0, "error answers: {:?}", self.errors());
        assert_eq!(count("duplicates"), 0, "a job was answered twice: {s}");
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for answer in &self.answers {
            *seen
                .entry(answer["job_id"].as_str().unwrap_or(""))
                .or_default() += 1;
        }
        assert_eq!(
            seen.len() as u64,
            count("sent"),
            "answers: {}",
            self.answers.len()
        );
        assert!(seen.values().all(|n| *n == 1), "a job printed twice");
        let photos = crate::photos();
        for answer in &self.answers {
            let file = answer["file"].as_str().unwrap_or("");
            let top1 = answer["top"][0]["index"].as_u64().unwrap_or(u64::MAX) as u32;
            // Every answer is checked: one naming no known photo has no reference to pass.
            let photo = photos
                .iter()
                .find(|p| file.ends_with(&format!("/{}", p.file)))
                .unwrap_or_else(|| {
                    panic!(
                        "an answer names {file:?}, which is not one of the photos of expected.tsv \
                         ({:?}), so its label cannot be checked; answer {answer}",
                        photos.iter().map(|p| &p.file).collect::<Vec<_>>()
                    )
                });
            assert!(
                photo.accepts(top1),
                "{file}: class {top1}, expected {}; answer {answer}",
                photo.acceptable()
            );
        }
    }

    /// Error answers, for messages.
    pub fn errors(&self) -> Vec<&Value> {
        self.answers
            .iter()
            .filter(|a| a.get("error").is_some())
            .collect()
    }

    /// How many answers came from `node`.
    pub fn answered_by(&self, node: &str) -> usize {
        self.answers.iter().filter(|a| a["node"] == node).count()
    }

    /// The path (node ids) of each answer.
    pub fn paths(&self) -> Vec<Vec<String>> {
        self.answers
            .iter()
            .map(|a| {
                a["path"]
                    .as_array()
                    .map(|p| {
                        p.iter()
                            .filter_map(|n| n.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect()
    }
}
