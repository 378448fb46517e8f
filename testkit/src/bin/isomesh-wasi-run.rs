//! `isomesh-wasi-run MODULE [ARGS...]`: runs a WASI command module (`wasm32-wasip1`) to its end
//! and exits with its exit code. It is cargo's runner for that target (`make guest-test` sets
//! `CARGO_TARGET_WASM32_WASIP1_RUNNER`), so the classifier's unit tests run in Wasm, in the
//! wasmtime the nodes embed, rather than natively: that also spares the tests' build a native
//! tract (minutes of CPU), whose only other user is the native baseline of `make bench`.
//!
//! The module gets the arguments after MODULE (libtest's filters and flags), this process's
//! standard streams and environment, and the host's filesystem read-only at `/`, so a test finds
//! `photos/` by the absolute path it was compiled with. Nothing else: no sockets, no writes.

use anyhow::Context as _;
use std::process::ExitCode;
use wasmtime_wasi::FsPerms;

/// wasmtime's errors as anyhow's, with what was being done.
fn failed(doing: String) -> impl FnOnce(wasmtime::Error) -> anyhow::Error {
    move |e| anyhow::anyhow!("{doing}: {e:#}")
}

fn main() -> anyhow::Result<ExitCode> {
    let mut args = std::env::args();
    let _runner = args.next();
    let path = args
        .next()
        .context("usage: isomesh-wasi-run MODULE [ARGS...] (a wasm32-wasip1 command module)")?;
    // The module's own argv[0] is its path, as a native program's would be.
    let argv: Vec<String> = std::iter::once(path.clone()).chain(args).collect();

    let engine = wasmtime::Engine::default();
    let module =
        wasmtime::Module::from_file(&engine, &path).map_err(failed(format!("compiling {path}")))?;
    let mut linker = wasmtime::Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |wasi| wasi)
        .map_err(failed("linking WASI".into()))?;
    let wasi = wasmtime_wasi::WasiCtx::builder()
        .inherit_stdio()
        .inherit_env()
        .args(&argv)
        .preopened_dir("/", "/", FsPerms::ReadOnly)
        .map_err(failed("opening / for the module to read".into()))?
        .build_p1();
    let mut store = wasmtime::Store::new(&engine, wasi);
    let instance = linker
        .instantiate(&mut store, &module)
        .map_err(failed(format!("instantiating {path}")))?;
    let start = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .map_err(failed(format!("{path} is not a WASI command (no _start)")))?;
    match start.call(&mut store, ()) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // `proc_exit(n)`: libtest ends this way, with 101 when a test failed.
        Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(exit) => Ok(ExitCode::from(u8::try_from(exit.0).unwrap_or(1))),
            // A trap (a panic under panic=abort, the only strategy on wasm32) is a failure.
            None => Err(failed(format!("{path} trapped"))(e)),
        },
    }
}
