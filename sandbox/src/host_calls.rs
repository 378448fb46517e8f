//! No host call may block: the call deadline must hold for the whole call.
//!
//! A call's deadline is enforced by epoch interruption ([`crate::instance`]), which stops Wasm
//! code at its next loop header or function entry; it cannot stop the host while the host is
//! inside one of its own functions. Of the WASI preview 1 functions the linker gives the guest,
//! one can wait: `poll_oneoff`, which sleeps until a clock subscription fires (it is how
//! `std::thread::sleep` works on WASI). A signed module could pass its self-test and then sleep
//! for an hour in every call, holding a worker far past any deadline. So it is replaced by a
//! function that answers `ENOTSUP` at once; a guest that insists (Rust's `sleep` panics on the
//! error) traps, and the job fails as any bad call does.
//!
//! The rest cannot wait here: stdin is empty (reads end at once), stdout is discarded, stderr
//! is an in-memory pipe, and with no preopened directory and no socket every file and socket
//! call fails with `EBADF` before touching the host. `sched_yield` yields, it does not sleep.

use wasmtime::Linker;

/// WASI preview 1 errno `notsup`: "not supported, or operation not supported on socket".
pub const ERRNO_NOTSUP: i32 = 58;

/// Shadows every WASI import that could block with one that fails at once.
pub(crate) fn refuse_blocking<T: 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let shadowed = linker
        .func_wrap(
            "wasi_snapshot_preview1",
            "poll_oneoff",
            |_subscriptions: i32, _events: i32, _count: i32, _events_written: i32| -> i32 {
                ERRNO_NOTSUP
            },
        )
        .map(|_| ());
    linker.allow_shadowing(false);
    shadowed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::HostState;
    use crate::{Sandbox, SandboxConfig};
    use std::time::Duration;
    use wasmtime::{Module, Store};
    use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

    /// A guest that asks `poll_oneoff` to sleep 30 s on the monotonic clock and returns the
    /// errno it got.
    const SLEEPER: &str = r#"
        (module
          (import "wasi_snapshot_preview1" "poll_oneoff"
            (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "sleep") (result i32)
            ;; One subscription at 0: userdata 0, tag 0 (clock), clock id 1 (monotonic),
            ;; timeout 30 s in ns, precision 0, flags 0 (relative).
            (i64.store (i32.const 0) (i64.const 0))
            (i32.store8 (i32.const 8) (i32.const 0))
            (i32.store (i32.const 16) (i32.const 1))
            (i64.store (i32.const 24) (i64.const 30000000000))
            (i64.store (i32.const 32) (i64.const 0))
            (i32.store16 (i32.const 40) (i32.const 0))
            ;; Events at 64, the count written at 128.
            (call $poll_oneoff (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128))))
    "#;

    #[test]
    fn a_guest_cannot_sleep_in_poll_oneoff() {
        let (done, result) = std::sync::mpsc::channel();
        // On a thread of its own, so a regression fails the test instead of hanging it.
        std::thread::spawn(move || {
            let run = || -> wasmtime::Result<i32> {
                let sandbox = Sandbox::new(SandboxConfig::default())?;
                let wasm = wat::parse_str(SLEEPER)?;
                let module = Module::new(&sandbox.engine, wasm)?;
                let state = HostState::new(1 << 20, MemoryOutputPipe::new(1024));
                let mut store = Store::new(&sandbox.engine, state);
                store.set_epoch_deadline(u64::MAX / 2);
                let instance = sandbox.linker.instantiate(&mut store, &module)?;
                let sleep = instance.get_typed_func::<(), i32>(&mut store, "sleep")?;
                sleep.call(&mut store, ())
            };
            let _ = done.send(run().map_err(|e| format!("{e:#}")));
        });
        let errno = result
            .recv_timeout(Duration::from_secs(20))
            .expect("poll_oneoff blocked: a guest can sleep past its call deadline")
            .expect("the sleeper runs");
        assert_eq!(errno, ERRNO_NOTSUP);
    }
}
