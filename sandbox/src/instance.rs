//! One live guest instance: a wasmtime `Store` with its own linear memory, WASI context and
//! limits, and the typed exports of the isomesh guest ABI. Each scheduler worker owns one and
//! calls [`Instance::classify`] for every job it runs; it is thrown away after any trap, so a bad
//! call never leaks into the next.
//!
//! Every call is armed with the full deadline first ([`Instance::arm`]): the epoch ticker of the
//! [`crate::Sandbox`] interrupts a call that runs past it, and the memory cap refuses growth past
//! the limit; [`Instance::describe_trap`] turns either into a sentence for the job's error.

use crate::{
    CallError, Sandbox, EPOCH_TICK, MAX_INSTANCES, MAX_MEMORIES, MAX_TABLES, MAX_TABLE_ELEMENTS,
};
use isomesh_protos::GuestOutcome;
use isomesh_protos::{guest_outcome::Outcome, GuestClassification, GuestInfo, GuestModel};
use prost::Message;
use wasmtime::{Memory, Module, ResourceLimiter, Store, Trap, TypedFunc};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

/// Guest stderr kept per instance (panic messages end up in error reports).
const STDERR_CAPACITY: usize = 1 << 20;

/// Per-store host state: WASI (clocks for the guest's timings, stderr for panics) and the memory cap.
pub(crate) struct HostState {
    pub(crate) wasi: WasiP1Ctx,
    limiter: MemoryCap,
}

impl HostState {
    /// WASI with only `stderr` (into the pipe) besides clocks and randomness, and the memory cap.
    pub(crate) fn new(memory_limit: usize, stderr: MemoryOutputPipe) -> HostState {
        HostState {
            wasi: wasmtime_wasi::WasiCtx::builder().stderr(stderr).build_p1(),
            limiter: MemoryCap {
                limit: memory_limit,
                refused: false,
            },
        }
    }
}

/// Caps linear memory and remembers that it refused, so an out-of-memory trap can say so.
struct MemoryCap {
    limit: usize,
    refused: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// One live guest instance. Not shared: each worker owns its own.
pub struct Instance {
    store: Store<HostState>,
    memory: Memory,
    alloc: TypedFunc<u32, u32>,
    free: TypedFunc<(u32, u32), ()>,
    abi_version: TypedFunc<(), u32>,
    info: TypedFunc<(), u64>,
    load: TypedFunc<(), u64>,
    classify: TypedFunc<(u32, u32, u32), u64>,
    /// Optional (`isomesh bench infer` only).
    preprocess: Option<TypedFunc<(u32, u32), u64>>,
    /// Optional (`isomesh bench infer` only).
    profile: Option<TypedFunc<(u32, u32, u32), u64>>,
    /// Optional: serving a model the module does not embed.
    load_given_model: Option<TypedFunc<(u32, u32), u64>>,
    stderr: MemoryOutputPipe,
    call_ticks: u64,
}

impl Instance {
    pub(crate) fn new(sandbox: &Sandbox, module: &Module) -> Result<Instance, String> {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let state = HostState::new(sandbox.config.memory_limit_bytes, stderr.clone());
        let mut store = Store::new(&sandbox.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_trap();
        let call_ticks =
            (sandbox.config.call_timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(call_ticks);
        let instance = sandbox
            .linker
            .instantiate(&mut store, module)
            .map_err(|e| format!("instantiating: {e:#}"))?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or("the module exports no `memory`")?;
        macro_rules! export {
            ($name:literal) => {
                instance
                    .get_typed_func(&mut store, $name)
                    .map_err(|e| format!("export `{}`: {e:#}", $name))?
            };
        }
        let initialize: TypedFunc<(), ()> = export!("_initialize");
        let mut instance = Instance {
            alloc: export!("isomesh_alloc"),
            free: export!("isomesh_free"),
            abi_version: export!("isomesh_abi_version"),
            info: export!("isomesh_info"),
            load: export!("isomesh_load"),
            classify: export!("isomesh_classify"),
            preprocess: instance
                .get_typed_func(&mut store, "isomesh_preprocess")
                .ok(),
            profile: instance.get_typed_func(&mut store, "isomesh_profile").ok(),
            load_given_model: instance
                .get_typed_func(&mut store, "isomesh_load_model")
                .ok(),
            store,
            memory,
            stderr,
            call_ticks,
        };
        instance.arm();
        initialize
            .call(&mut instance.store, ())
            .map_err(|e| instance.describe_trap(e))?;
        Ok(instance)
    }

    /// The ABI version the guest speaks.
    pub fn abi_version(&mut self) -> Result<u32, String> {
        self.arm();
        self.abi_version
            .clone()
            .call(&mut self.store, ())
            .map_err(|e| self.describe_trap(e))
    }

    /// The guest's self-description.
    pub fn info(&mut self) -> Result<GuestInfo, String> {
        self.arm();
        let packed = self
            .info
            .clone()
            .call(&mut self.store, ())
            .map_err(|e| self.describe_trap(e))?;
        let bytes = self.take_buffer(packed)?;
        GuestInfo::decode(bytes.as_slice())
            .map_err(|e| format!("isomesh_info returned garbage: {e}"))
    }

    /// Builds the model plan inside the guest.
    pub fn load_model(&mut self) -> Result<(), CallError> {
        self.arm();
        let packed = self
            .load
            .clone()
            .call(&mut self.store, ())
            .map_err(|e| CallError::Trapped(self.describe_trap(e)))?;
        self.outcome(packed).map(|_| ())
    }

    /// Builds `model`'s plan inside the guest, which serves it from then on in place of the model
    /// it embeds. On an error the guest keeps serving what it served before.
    pub fn serve_model(&mut self, model: &GuestModel) -> Result<(), CallError> {
        let load = self.load_given_model.clone().ok_or_else(|| {
            CallError::Trapped(
                "the module cannot serve a model it does not embed (it exports no \
                 `isomesh_load_model`): roll out a newer build of the classifier first"
                    .into(),
            )
        })?;
        let (ptr, len) = self.hand_in(&model.encode_to_vec())?;
        let packed = load
            .call(&mut self.store, (ptr, len))
            .map_err(|e| CallError::Trapped(self.describe_trap(e)))?;
        self.outcome(packed).map(|_| ())
    }

    /// The cheapest call into the guest (it returns its ABI version): measures call overhead.
    pub fn ping(&mut self) -> Result<u32, CallError> {
        self.abi_version().map_err(CallError::Trapped)
    }

    /// Classifies one encoded image; the instance must be discarded if this returns a trap.
    pub fn classify(&mut self, image: &[u8], top_k: u32) -> Result<GuestClassification, CallError> {
        let (ptr, len) = self.hand_in(image)?;
        let packed = self
            .classify
            .clone()
            .call(&mut self.store, (ptr, len, top_k))
            .map_err(|e| CallError::Trapped(self.describe_trap(e)))?;
        self.outcome(packed)
    }

    /// [`Instance::classify`] as a plain function, for the self-test
    /// ([`isomesh_module::selftest::run`]).
    pub fn classifier(
        &mut self,
    ) -> impl FnMut(&[u8], u32) -> Result<GuestClassification, String> + '_ {
        |image, top_k| self.classify(image, top_k).map_err(|e| e.to_string())
    }

    /// Decodes and resizes one image without classifying it (the answer has no scores), or
    /// `None` when the module does not export `isomesh_preprocess`. For the benchmarks.
    pub fn preprocess(&mut self, image: &[u8]) -> Option<Result<GuestClassification, CallError>> {
        let preprocess = self.preprocess.clone()?;
        Some(self.hand_in(image).and_then(|(ptr, len)| {
            let packed = preprocess
                .call(&mut self.store, (ptr, len))
                .map_err(|e| CallError::Trapped(self.describe_trap(e)))?;
            self.outcome(packed)
        }))
    }

    /// Classifies one image as [`Instance::classify`] does, with the answer's `ops` saying where
    /// the inference's time went, by kind of operation; `None` when the module does not export
    /// `isomesh_profile`. For the benchmarks.
    pub fn profile(
        &mut self,
        image: &[u8],
        top_k: u32,
    ) -> Option<Result<GuestClassification, CallError>> {
        let profile = self.profile.clone()?;
        Some(self.hand_in(image).and_then(|(ptr, len)| {
            let packed = profile
                .call(&mut self.store, (ptr, len, top_k))
                .map_err(|e| CallError::Trapped(self.describe_trap(e)))?;
            self.outcome(packed)
        }))
    }

    /// Copies `image` (or a model) into a guest buffer, which the next call takes ownership of.
    fn hand_in(&mut self, image: &[u8]) -> Result<(u32, u32), CallError> {
        self.arm();
        let len = u32::try_from(image.len())
            .map_err(|_| CallError::Trapped("input larger than 4 GiB".into()))?;
        let ptr = self
            .alloc
            .clone()
            .call(&mut self.store, len)
            .map_err(|e| CallError::Trapped(self.describe_trap(e)))?;
        if len > 0 && ptr == 0 {
            return Err(CallError::Trapped(format!(
                "the module could not allocate {len} bytes for its input (memory limit {} MiB)",
                self.store.data().limiter.limit >> 20
            )));
        }
        self.memory
            .write(&mut self.store, ptr as usize, image)
            .map_err(|e| CallError::Trapped(format!("writing the input into guest memory: {e}")))?;
        Ok((ptr, len))
    }

    /// Resets the per-call deadline: every call gets the full timeout.
    fn arm(&mut self) {
        self.store.set_epoch_deadline(self.call_ticks);
    }

    fn outcome(&mut self, packed: u64) -> Result<GuestClassification, CallError> {
        let bytes = self.take_buffer(packed).map_err(CallError::Trapped)?;
        let outcome = GuestOutcome::decode(bytes.as_slice()).map_err(|e| {
            CallError::Trapped(format!("the module returned a garbled outcome: {e}"))
        })?;
        match outcome.outcome {
            Some(Outcome::Classification(answer)) => Ok(answer),
            Some(Outcome::Error(error)) => Err(CallError::Guest(error)),
            None => Err(CallError::Trapped(
                "the module returned an empty outcome".into(),
            )),
        }
    }

    /// Copies a guest-owned `(ptr << 32) | len` buffer out and frees it in the guest.
    fn take_buffer(&mut self, packed: u64) -> Result<Vec<u8>, String> {
        let (ptr, len) = ((packed >> 32) as u32, packed as u32);
        // Check before allocating: a hostile module must not make the host allocate 4 GiB.
        let memory_size = self.memory.data_size(&self.store);
        if ptr as usize + len as usize > memory_size {
            return Err(format!(
                "the module returned a buffer ({len} bytes at {ptr}) outside its {memory_size}-byte memory"
            ));
        }
        let mut bytes = vec![0u8; len as usize];
        self.memory
            .read(&self.store, ptr as usize, &mut bytes)
            .map_err(|e| format!("the module returned an out-of-bounds buffer: {e}"))?;
        self.arm();
        self.free
            .clone()
            .call(&mut self.store, (ptr, len))
            .map_err(|e| self.describe_trap(e))?;
        Ok(bytes)
    }

    /// Turns a wasmtime error into a sentence: deadline, memory cap, or the guest's own panic.
    fn describe_trap(&self, error: wasmtime::Error) -> String {
        let limits = &self.store.data().limiter;
        if let Some(Trap::Interrupt) = error.downcast_ref::<Trap>() {
            return format!(
                "the module ran past its {} ms call deadline and was interrupted",
                self.call_ticks * EPOCH_TICK.as_millis() as u64
            );
        }
        if limits.refused {
            return format!(
                "the module exceeded its memory limit of {} MiB",
                limits.limit >> 20
            );
        }
        let stderr = self.stderr.contents();
        let said = String::from_utf8_lossy(&stderr);
        let said = said.trim();
        if said.is_empty() {
            format!("the module trapped: {error:#}")
        } else {
            let tail: String = said
                .chars()
                .rev()
                .take(500)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            format!("the module trapped: {error}; it said: {tail}")
        }
    }
}
