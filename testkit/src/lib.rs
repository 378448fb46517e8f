//! The integration-test harness: real brokers and real nodes as child processes on free ports.
//!
//! - [`broker`]: `isomesh-broker` or Mosquitto, picked by `ISOMESH_TEST_BROKER` (`isomesh`, the
//!   default, or `mosquitto`), so one suite proves both.
//! - [`node`]: `isomesh-node` processes with their own module directories; [`arm64`]: the
//!   aarch64 build of it under qemu, beside them.
//! - [`mqtt`]: small MQTT clients for tests (rumqttc v5 and v4).
//! - [`rollout`]: signing keys, the second module version, and hand-made (also tampered) rollouts.
//! - [`faults`]: tiny hand-written modules that trap, loop or lie.
//! - [`metrics`]: scraping a node's Prometheus endpoint and reading its values.
//! - [`compose`]: the compose mesh of real containers, with faults to inject (the `compose`
//!   test binary); [`camera`]: `isomesh camera` as its load.
//!
//! - [`harness`]: the same processes for the benchmarks (`isomesh bench`), with CPU quotas and
//!   delayed links, returning errors instead of panicking.
//!
//! Binaries are the ones `cargo build --release --bins` put next to the test executable (or
//! next to `isomesh`, for the benchmarks); the module is
//! `target/wasm32-wasip1/release/isomesh_guest.wasm`; `make test` builds both.

pub mod accounts;
pub mod arm64;
pub mod broker;
pub mod camera;
pub mod compose;
pub mod faults;
pub mod harness;
pub mod metrics;
pub mod mqtt;
pub mod node;
pub mod rollout;
pub mod vanishing;

use std::path::PathBuf;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Path of one of the project's built binaries (`isomesh-broker`, `isomesh-node`, `isomesh`):
/// in `$ISOMESH_BIN_DIR`, else beside the running executable (`isomesh` for the benchmarks),
/// else one folder up (a test executable lives in `target/<profile>/deps/`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("ISOMESH_BIN_DIR") {
        Some(dir) => vec![PathBuf::from(dir).join(name)],
        None => {
            let exe = std::env::current_exe()?;
            exe.ancestors()
                .skip(1)
                .take(2)
                .map(|dir| dir.join(name))
                .collect()
        }
    };
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{name} is missing (looked in {}): run `make build` (or `make test`) first",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// [`binary`] for tests, which stop at a missing binary.
pub fn bin_path(name: &str) -> PathBuf {
    binary(name).unwrap_or_else(|e| panic!("{e:#}"))
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

/// Photos whose top-1 depends on the resizer, with the other indices accepted for them: the
/// tolerance the photo set's `SOURCES.md` declares ("Note on elephants.jpg: two elephant classes
/// compete (101 tusker 0.77, 385 Indian elephant 0.23); with a nearest-neighbour resize the top-1
/// becomes 385. Accept {101, 385} when the resizer differs from PIL bilinear."). Used only when
/// `expected.tsv` has no `also_accept` column; the shared one has none.
pub const RESIZER_SENSITIVE: &[(&str, &[u32])] = &[("elephants.jpg", &[385])];

/// The shared photos and their reference answers (`expected.tsv`: `file`, `top1_index`, ..., and
/// an optional `also_accept` column of comma-separated indices; without that column the
/// tolerances come from [`RESIZER_SENSITIVE`]).
pub fn photos() -> Vec<Photo> {
    let dir = photo_set_dir();
    let table = std::fs::read_to_string(dir.join("expected.tsv"))
        .unwrap_or_else(|e| panic!("{}/expected.tsv: {e} (set ISOMESH_IMAGES)", dir.display()));
    parse_expected(&dir, &table)
}

/// The folder of the photos (`$ISOMESH_IMAGES`, else the repository's `photos/`).
fn photo_set_dir() -> PathBuf {
    std::env::var_os("ISOMESH_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("photos"))
}

/// The rows of an `expected.tsv` whose photos live in `dir`.
fn parse_expected(dir: &std::path::Path, table: &str) -> Vec<Photo> {
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split('\t')
        .map(str::trim)
        .collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let file_at = column("file").expect("expected.tsv: no `file` column");
    let index_at = column("top1_index").expect("expected.tsv: no `top1_index` column");
    let also_at = column("also_accept");
    let photos: Vec<Photo> = lines
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
            let field = |at: usize| {
                *fields
                    .get(at)
                    .unwrap_or_else(|| panic!("expected.tsv: short row {line:?}"))
            };
            let file = field(file_at).to_string();
            let expected = field(index_at)
                .parse()
                .unwrap_or_else(|e| panic!("expected.tsv: top1_index of {file}: {e}"));
            let also_accept = match also_at {
                Some(at) => fields
                    .get(at)
                    .copied()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        s.parse()
                            .unwrap_or_else(|e| panic!("expected.tsv: also_accept of {file}: {e}"))
                    })
                    .collect(),
                None => RESIZER_SENSITIVE
                    .iter()
                    .find(|(name, _)| *name == file)
                    .map(|(_, also)| also.to_vec())
                    .unwrap_or_default(),
            };
            Photo {
                path: dir.join(&file),
                file,
                expected,
                also_accept,
            }
        })
        .collect();
    assert!(
        !photos.is_empty(),
        "expected.tsv in {} lists no photo",
        dir.display()
    );
    photos
}

/// The shared photo named `file` (panics if `expected.tsv` does not list it).
pub fn photo(file: &str) -> Photo {
    let photos = photos();
    photos
        .iter()
        .find(|p| p.file == file)
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{file} is not in expected.tsv (it lists {:?})",
                photos.iter().map(|p| &p.file).collect::<Vec<_>>()
            )
        })
}

/// Runs the `isomesh` binary under test with `args`; returns (exit code, stdout + stderr).
pub async fn isomesh(args: &[String]) -> (i32, String) {
    let output = tokio::process::Command::new(bin_path("isomesh"))
        .args(args)
        .output()
        .await
        .expect("run isomesh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
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

/// Checks that `result`, the answer to job `id` carrying photo `n` of the set (cycling, as
/// [`photo_job`] sends it), has no error and the photo's reference top-1; returns that top-1.
pub fn assert_answers_photo(id: &str, n: usize, result: &isomesh_protos::JobResult) -> u32 {
    let photos = photos();
    let photo = &photos[n % photos.len()];
    assert!(result.error.is_empty(), "{id}: {}", result.error);
    let top1 = result.top.first().map(|c| c.index).unwrap_or(u32::MAX);
    assert!(
        photo.accepts(top1),
        "{id} ({}): got class {top1}, expected {}",
        photo.file,
        photo.acceptable()
    );
    top1
}

/// One reference photo.
#[derive(Debug, Clone)]
pub struct Photo {
    pub path: PathBuf,
    pub file: String,
    /// The reference top-1 (`top1_index` of `expected.tsv`).
    pub expected: u32,
    /// Other top-1 indices accepted because the photo is resizer-sensitive (`also_accept`, or
    /// [`RESIZER_SENSITIVE`]); empty for almost every photo.
    pub also_accept: Vec<u32>,
}

impl Photo {
    /// Whether `index` is an acceptable top-1: the reference one, or one `also_accept` declares.
    pub fn accepts(&self, index: u32) -> bool {
        index == self.expected || self.also_accept.contains(&index)
    }

    /// What [`Photo::accepts`], for messages: `954`, or `101 (or 385)`.
    pub fn acceptable(&self) -> String {
        if self.also_accept.is_empty() {
            return self.expected.to_string();
        }
        let also: Vec<String> = self.also_accept.iter().map(u32::to_string).collect();
        format!("{} (or {})", self.expected, also.join(", "))
    }

    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("photo")
    }
}

/// A PNG whose header declares `width` x `height` RGB pixels and which carries no pixel data:
/// a decompression bomb's header, written by the `png` crate's encoder.
pub fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // Dropping the writer ends the file (IEND) without a single row.
    drop(encoder.write_header().expect("a PNG header"));
    png
}

/// A port nobody listens on right now.
pub fn try_free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
}

/// [`try_free_port`] for tests.
pub fn free_port() -> u16 {
    try_free_port().expect("a free port")
}

/// A compiled-module cache shared by every test node of this build, so the ~15 s compilation
/// of the classifier happens once per test run, not once per test.
pub fn shared_cache_dir() -> PathBuf {
    let dir = workspace_root().join("target/test-module-cache");
    std::fs::create_dir_all(&dir).expect("cache dir");
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARED: &str = "file\ttop1_index\ttop1_label\ttop1_prob\n\
                          banana.jpg\t954\tbanana\t0.9512\n\
                          elephants.jpg\t101\ttusker\t0.7711\n";

    #[test]
    fn the_reference_top1_is_accepted_exactly() {
        let photos = parse_expected(std::path::Path::new("/p"), SHARED);
        let banana = &photos[0];
        assert_eq!(banana.path, PathBuf::from("/p/banana.jpg"));
        assert!(banana.accepts(954));
        assert!(!banana.accepts(953) && !banana.accepts(385) && !banana.accepts(101));
    }

    #[test]
    fn without_an_also_accept_column_the_declared_table_applies() {
        let photos = parse_expected(std::path::Path::new("/p"), SHARED);
        let elephants = &photos[1];
        assert_eq!(elephants.also_accept, vec![385]);
        assert!(elephants.accepts(101) && elephants.accepts(385));
        assert!(!elephants.accepts(386));
        assert_eq!(elephants.acceptable(), "101 (or 385)");
    }

    #[test]
    fn an_also_accept_column_replaces_the_table() {
        let table = "file\ttop1_index\ttop1_label\ttop1_prob\talso_accept\n\
                     banana.jpg\t954\tbanana\t0.95\t953, 952\n\
                     elephants.jpg\t101\ttusker\t0.77\t\n";
        let photos = parse_expected(std::path::Path::new("/p"), table);
        assert_eq!(photos[0].also_accept, vec![953, 952]);
        assert!(photos[0].accepts(952));
        assert!(photos[1].also_accept.is_empty(), "the column is the oracle");
        assert!(!photos[1].accepts(385));
    }
}
