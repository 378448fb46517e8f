//! aarch64 nodes on this x86_64 machine: the very `isomesh-node` a Raspberry Pi runs, built for
//! `aarch64-unknown-linux-musl` (`make arm64-node`), run by `qemu-aarch64-static` (user-mode
//! emulation: the node's own syscalls, sockets and signals, an emulated CPU) beside x86_64 nodes
//! on the same broker. Everything they do is slower than on a board, the compile most of all
//! (minutes), so a node starts on a cache holding module 0.1.0's aarch64 code, compiled on this
//! machine by `isomesh compile --target`, as an arm64 image or a board would get it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The target triple of the ARM build.
pub const TARGET: &str = "aarch64-unknown-linux-musl";

/// The aarch64 `isomesh-node`.
pub fn node_binary() -> PathBuf {
    let path = crate::workspace_root().join(format!("target/{TARGET}/release/isomesh-node"));
    assert!(
        path.is_file(),
        "{} is missing: run `make arm64-node` (or `make test`) first",
        path.display()
    );
    path
}

/// `qemu-aarch64-static`, which runs aarch64 Linux programs here: the benchmarks' lookup
/// ([`crate::harness::qemu_aarch64`]), for tests, which stop where it is missing.
pub fn qemu() -> PathBuf {
    crate::harness::qemu_aarch64().unwrap_or_else(|e| panic!("{e:#}"))
}

/// The command that starts an aarch64 node: qemu, then the node binary; its flags follow.
pub fn node_command() -> Vec<OsString> {
    vec![qemu().into(), node_binary().into()]
}

/// Fills `cache` (a node's `--cache-dir`, empty or missing) with module 0.1.0's aarch64 code and
/// its key (`{cache}.cache-key`, the node's default `--cache-key`): the node starts serving
/// without compiling. Each node gets a copy, so what one later compiles or receives is its own.
pub fn seed_cache(cache: &Path) {
    let made = precompiled_module_cache();
    std::fs::create_dir_all(cache).expect("cache dir");
    for entry in std::fs::read_dir(&made).expect("precompiled cache") {
        let entry = entry.expect("cache entry");
        let name = entry.file_name();
        let is_code = Path::new(&name)
            .extension()
            .is_some_and(|e| e == "cwasm" || e == "mac");
        if is_code {
            std::fs::copy(entry.path(), cache.join(&name)).expect("copy cache entry");
        }
    }
    std::fs::copy(key_beside(&made), key_beside(cache)).expect("copy cache key");
}

/// `target/test-arm64-cache`, holding module 0.1.0 compiled for aarch64 by `isomesh compile
/// --target` (the x86_64 binary under test); made once per module file (a marker names its
/// digest), so every test process after the first reuses it.
fn precompiled_module_cache() -> PathBuf {
    static MAKING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = crate::workspace_root().join("target/test-arm64-cache");
    let module = crate::guest_module();
    let bytes = std::fs::read(&module).expect("guest module");
    let marker = dir.join(format!(
        "{}.made",
        isomesh_module::digest::sha256_hex(&bytes)
    ));
    if marker.is_file() {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(key_beside(&dir));
    let output = Command::new(crate::bin_path("isomesh"))
        .arg("compile")
        .arg(&module)
        .arg("--cache-dir")
        .arg(&dir)
        .args(["--target", TARGET])
        .output()
        .expect("run isomesh compile");
    assert!(
        output.status.success(),
        "isomesh compile --target {TARGET} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::write(&marker, b"").expect("marker");
    dir
}

/// A cache directory's default key file, as the node and `isomesh compile` name it.
fn key_beside(cache: &Path) -> PathBuf {
    let mut name = cache.as_os_str().to_owned();
    name.push(".cache-key");
    PathBuf::from(name)
}
