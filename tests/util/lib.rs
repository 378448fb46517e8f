//! The integration-test harness: real brokers and real nodes as child processes on free ports.
//!
//! - [`broker`]: `isomesh-broker` or Mosquitto, picked by `ISOMESH_TEST_BROKER` (`isomesh`, the
//!   default, or `mosquitto`), so one suite proves both.
//! - [`node`]: `isomesh-node` processes with their own module directories.
//! - [`mqtt`]: small MQTT clients for tests (rumqttc v5 and v4).
//! - [`rollout`]: signing keys, the second module version, and hand-made (also tampered) rollouts.
//! - [`faults`]: tiny hand-written modules that trap, loop or lie.
//! - [`metrics`]: scraping a node's Prometheus endpoint and reading its values.
//! - [`compose`]: the compose mesh of real containers, with faults to inject (the `compose`
//!   test binary); [`camera`]: `isomesh camera` as its load.
//!
//! Binaries are the ones `cargo build --release --bins` put next to the test executable; the
//! module is `target/wasm32-wasip1/release/isomesh_guest.wasm`; `make test` builds both.

pub mod broker;
pub mod camera;
pub mod compose;
pub mod faults;
pub mod metrics;
pub mod mqtt;
pub mod node;
pub mod rollout;

use std::path::PathBuf;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Path of one of the project's built binaries (`isomesh-broker`, `isomesh-node`, `isomesh`).
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("ISOMESH_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            // target/<profile>/deps/integration-<hash> -> target/<profile>/
            let exe = std::env::current_exe().expect("test executable path");
            exe.parent()
                .and_then(|deps| deps.parent())
                .map(PathBuf::from)
                .expect("target directory")
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --release --bins` (or `make test`) first",
        path.display()
    );
    path
}

/// The classifier module built from `guest/`.
pub fn guest_module() -> PathBuf {
    let path = workspace_root().join("target/wasm32-wasip1/release/isomesh_guest.wasm");
    assert!(
        path.is_file(),
        "{} is missing: run `make module` (or `make test`) first",
        path.display()
    );
    path
}

/// The shared photos and their reference answers (`expected.tsv`).
pub fn photos() -> Vec<Photo> {
    let dir = std::env::var_os("ISOMESH_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/images"));
    let table = std::fs::read_to_string(dir.join("expected.tsv"))
        .unwrap_or_else(|e| panic!("{}/expected.tsv: {e} (set ISOMESH_IMAGES)", dir.display()));
    table
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            Photo {
                path: dir.join(fields[0]),
                file: fields[0].to_string(),
                expected: fields[1].parse().expect("top1_index"),
            }
        })
        .collect()
}

/// A protobuf job for photo `n` of the shared set (cycling), answered on `reply_to`, with a
/// budget (0 = none).
pub fn photo_job(n: usize, id: &str, reply_to: &str, budget_ms: u32) -> Vec<u8> {
    use prost::Message;
    let photos = photos();
    isomesh_protos::Job {
        job_id: id.into(),
        image: photos[n % photos.len()].bytes(),
        reply_to: reply_to.into(),
        budget_ms,
        ..Default::default()
    }
    .encode_to_vec()
}

/// One reference photo.
#[derive(Debug, Clone)]
pub struct Photo {
    pub path: PathBuf,
    pub file: String,
    pub expected: u32,
}

impl Photo {
    /// Whether `index` is an acceptable top-1: exact, except elephants.jpg where tusker (101) and
    /// Indian elephant (385) are close and depend on the resizer.
    pub fn accepts(&self, index: u32) -> bool {
        index == self.expected || (self.file == "elephants.jpg" && (index == 101 || index == 385))
    }

    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("photo")
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A compiled-module cache shared by every test node of this build, so the ~15 s compilation
/// of the classifier happens once per test run, not once per test.
pub fn shared_cache_dir() -> PathBuf {
    let dir = workspace_root().join("target/test-module-cache");
    std::fs::create_dir_all(&dir).expect("cache dir");
    dir
}
