//! The Wasm sandbox: one wasmtime [`Engine`] per node, compiled modules cached on disk, and
//! [`Instance`]s that run one classification at a time under a deadline and a memory cap.
//!
//! Who calls it: the module manager ([`crate::modules`]) loads and probes module files through
//! [`Sandbox::load_file`]; each scheduler worker owns one [`Instance`] and calls
//! [`Instance::classify`] for every job it runs.
//!
//! Design: compiling the ~31 MB classifier with Cranelift takes ~15 s and ~630 MB, loading a
//! precompiled one takes milliseconds. So compiled code is cached on disk, keyed by the module's
//! sha256 and the engine's compatibility hash (never trusted across engine versions), written
//! atomically and guarded by a lock file so the nodes of one host compile a module once.
//!
//! An instance lives across calls because building the model plan inside the guest costs far
//! more than a call; it is thrown away after any trap, so a bad call never leaks into the next.

use isomesh_protos::{guest_outcome::Outcome, GuestClassification, GuestError, GuestInfo};
use isomesh_protos::{GuestOutcome, GUEST_ABI_VERSION};
use prost::Message;
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::{Config, Engine, Linker, Memory, Module, ResourceLimiter, Store, Trap, TypedFunc};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

/// How often the epoch advances; deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Guest stderr kept per instance (panic messages end up in error reports).
const STDERR_CAPACITY: usize = 1 << 20;
/// A classifier needs one memory and one function table; more is a module up to no good.
pub const MAX_MEMORIES: usize = 1;
pub const MAX_TABLES: usize = 1;
pub const MAX_INSTANCES: usize = 1;
/// Elements of a function table: the model's few thousand functions fit many times over.
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// What WASI gives the guest (see [`Instance::new`]): no preopened directory, no socket, no
/// environment variable, no argument.
pub const WASI_CAPABILITIES: [&str; 3] = ["stderr (captured, 1 MiB)", "clocks", "random"];

/// Limits every instance runs under.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Largest linear memory an instance may grow to, in bytes. Default 768 MiB.
    pub memory_limit_bytes: usize,
    /// Longest a single guest call may run before it is interrupted. Default 10 s.
    pub call_timeout: Duration,
    /// Where compiled modules are cached, with Cranelift's per-function incremental cache in its
    /// `incremental/` folder; `None` disables both.
    pub cache_dir: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            memory_limit_bytes: 768 << 20,
            call_timeout: Duration::from_secs(10),
            cache_dir: None,
        }
    }
}

/// Why a module could not be loaded. The module is rejected; the node keeps what it had.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read module {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a WebAssembly module (it does not start with \\0asm)")]
    NotWasm { path: PathBuf },
    #[error("module {path} does not compile: {reason}")]
    Compile { path: PathBuf, reason: String },
    #[error("module {path} does not fit the isomesh guest ABI: {reason}")]
    Abi { path: PathBuf, reason: String },
    #[error("module {path} failed its self-test: {reason}")]
    SelfTest { path: PathBuf, reason: String },
    #[error("creating the wasmtime engine: {0}")]
    Engine(String),
}

/// Why one guest call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The guest answered with an error (bad image, ...): the instance is fine.
    #[error("{}", .0.message)]
    Guest(GuestError),
    /// The guest trapped or was interrupted: the instance must be discarded.
    #[error("{0}")]
    Trapped(String),
}

impl CallError {
    /// Whether the instance that produced this error must be thrown away.
    pub fn poisons_instance(&self) -> bool {
        matches!(self, CallError::Trapped(_))
    }
}

/// A node's wasmtime engine and linker, shared by every module and instance.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<HostState>,
    config: SandboxConfig,
    /// Tells the epoch ticker thread to stop when the sandbox is dropped.
    ticker_stop: Arc<AtomicBool>,
}

/// A compiled, probed module, ready to be instantiated by any worker.
pub struct LoadedModule {
    /// Hex sha256 of the module file.
    pub sha256: String,
    /// What the module says about itself (name, version, labels).
    pub info: GuestInfo,
    /// The file it came from.
    pub path: PathBuf,
    /// Whether compiled code came from the on-disk cache, and how long getting it took.
    pub compiled: CompileReport,
    /// How long the self-test's last classification took: the service-time estimate a node
    /// uses for offload decisions before it has run a job of its own.
    pub self_test_service: Duration,
    module: Module,
    /// Instances built ahead of time (the self-test's among them), handed to workers on a swap
    /// so the first jobs on a new module do not wait for an instance to be built.
    warm: std::sync::Mutex<Vec<Instance>>,
}

impl LoadedModule {
    /// A ready instance built ahead of time, if one is left.
    pub fn take_warm(&self) -> Option<Instance> {
        self.warm.lock().ok().and_then(|mut warm| warm.pop())
    }

    /// Instances built ahead of time and not yet taken.
    pub fn warm_count(&self) -> usize {
        self.warm.lock().map(|warm| warm.len()).unwrap_or(0)
    }

    /// Whether a job pinned to `pin` may run on this module: `pin` is `name@version`, a bare
    /// version, or the module's sha256 (a prefix of 12 or more hex digits will do).
    pub fn matches(&self, pin: &str) -> bool {
        if pin.is_empty() {
            return true;
        }
        if let Some((name, version)) = pin.split_once('@') {
            return name == self.info.name && version == self.info.version;
        }
        pin == self.info.version || (pin.len() >= 12 && self.sha256.starts_with(pin))
    }
}

/// How a module's machine code was obtained.
#[derive(Debug, Clone, Copy)]
pub struct CompileReport {
    pub from_cache: bool,
    pub elapsed: Duration,
}

impl std::fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModule")
            .field("name", &self.info.name)
            .field("version", &self.info.version)
            .field("sha256", &self.sha256)
            .field("path", &self.path)
            .finish()
    }
}

/// Per-store host state: WASI (clocks for the guest's timings, stderr for panics) and the memory cap.
struct HostState {
    wasi: WasiP1Ctx,
    limiter: MemoryCap,
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

impl Sandbox {
    /// Builds the engine (Cranelift, SIMD, epoch interruption) and starts its epoch ticker.
    pub fn new(config: SandboxConfig) -> Result<Sandbox, LoadError> {
        let mut wasm = Config::new();
        wasm.epoch_interruption(true)
            .cranelift_opt_level(wasmtime::OptLevel::Speed)
            .wasm_simd(true)
            .wasm_relaxed_simd(true)
            // Maps from machine code back to Wasm offsets only serve backtraces, which trap
            // reports do not use; without them compiled code is ~6 MB (10%) smaller to ship.
            .generate_address_map(false)
            // No .eh_frame for the system unwinder: wasmtime walks Wasm frames itself for traps.
            // In the static musl build that unwinder is LLVM's libunwind, where wasmtime
            // registers every function's FDE one by one and each deregistration scans the whole
            // table: dropping a swapped-out module of ~26,500 functions took ~1.8 s of CPU, a
            // 7-10 s stall of the first job after a hot swap on a 0.25-CPU device container.
            .native_unwind_info(false);
        if let Some(dir) = &config.cache_dir {
            // A new version that changes only weights or a little code reuses the machine code
            // of every unchanged function instead of compiling all of them again.
            wasm.enable_incremental_compilation(Arc::new(FunctionCache {
                dir: dir.join("incremental"),
            }))
            .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        }
        let engine = Engine::new(&wasm).map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |state: &mut HostState| &mut state.wasi)
            .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (ticking, stop) = (engine.clone(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })
            .map_err(|e| LoadError::Engine(format!("starting the epoch ticker: {e}")))?;
        Ok(Sandbox {
            engine,
            linker,
            config,
            ticker_stop,
        })
    }

    /// The limits this sandbox applies.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// The limits, as status reports publish them.
    pub fn limits(&self) -> isomesh_protos::SandboxLimits {
        isomesh_protos::SandboxLimits {
            memory_limit_bytes: self.config.memory_limit_bytes as u64,
            call_timeout_ms: self.config.call_timeout.as_millis() as u64,
            max_table_elements: MAX_TABLE_ELEMENTS as u32,
            max_tables: MAX_TABLES as u32,
            max_memories: MAX_MEMORIES as u32,
            max_instances: MAX_INSTANCES as u32,
            wasi: WASI_CAPABILITIES.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Reads, compiles (or loads from the cache) and probes a module file: ABI version, metadata,
    /// model load, and a classification of a known image. Slow on a cache miss: call it from a
    /// blocking thread.
    pub fn load_file(&self, path: &Path) -> Result<Arc<LoadedModule>, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let sha256 = sha256_hex(&bytes);
        self.load_bytes(path, &bytes, sha256)
    }

    /// [`Sandbox::load_file`] for a file already read, whose digest is `sha256`.
    pub fn load_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
        sha256: String,
    ) -> Result<Arc<LoadedModule>, LoadError> {
        if !bytes.starts_with(b"\0asm") {
            return Err(LoadError::NotWasm {
                path: path.to_owned(),
            });
        }
        let started = Instant::now();
        let (module, from_cache) = self.compile_cached(path, bytes, &sha256)?;
        let compiled = CompileReport {
            from_cache,
            elapsed: started.elapsed(),
        };
        let abi_error = |reason: String| LoadError::Abi {
            path: path.to_owned(),
            reason,
        };
        let mut probe = Instance::new(self, &module).map_err(abi_error)?;
        let version = probe.abi_version().map_err(abi_error)?;
        if version != GUEST_ABI_VERSION {
            return Err(abi_error(format!(
                "it speaks ABI version {version}, this node speaks {GUEST_ABI_VERSION}"
            )));
        }
        let info = probe.info().map_err(abi_error)?;
        let self_test_error = |reason: String| LoadError::SelfTest {
            path: path.to_owned(),
            reason,
        };
        probe
            .load_model()
            .map_err(|e| self_test_error(e.to_string()))?;
        let mut timed = Instant::now();
        let answer = probe
            .classify(&crate::selftest::IMAGE, 5)
            .map_err(|e| self_test_error(e.to_string()))?;
        let mut self_test_service = timed.elapsed();
        crate::selftest::check(&answer, info.labels.len()).map_err(self_test_error)?;
        if crate::selftest::knows_photo(&info.labels) {
            timed = Instant::now();
            let answer = probe
                .classify(crate::selftest::PHOTO, 1)
                .map_err(|e| self_test_error(e.to_string()))?;
            self_test_service = timed.elapsed();
            crate::selftest::check_photo(&answer, &info.labels).map_err(self_test_error)?;
        }
        Ok(Arc::new(LoadedModule {
            sha256,
            info,
            path: path.to_owned(),
            compiled,
            self_test_service,
            module,
            warm: std::sync::Mutex::new(vec![probe]),
        }))
    }

    /// Builds instances of `module` until `count` are waiting for workers.
    pub fn prewarm(&self, module: &LoadedModule, count: usize) -> Result<(), CallError> {
        while module.warm_count() < count {
            let instance = self.instantiate(module)?;
            if let Ok(mut warm) = module.warm.lock() {
                warm.push(instance);
            }
        }
        Ok(())
    }

    /// Names this engine's machine-code format: a precompiled artifact is usable exactly by
    /// engines with the same id (same wasmtime, target CPU features and settings).
    pub fn engine_id(&self) -> String {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    }

    /// Compiles a module ahead of time and reads its self-description: what `isomesh rollout`
    /// publishes beside the `.wasm` for nodes with this engine.
    pub fn precompile(&self, bytes: &[u8]) -> Result<(GuestInfo, Vec<u8>), LoadError> {
        let path = PathBuf::from("<module>");
        if !bytes.starts_with(b"\0asm") {
            return Err(LoadError::NotWasm { path });
        }
        let compile_error = |e: wasmtime::Error| LoadError::Compile {
            path: path.clone(),
            reason: format!("{e:#}"),
        };
        let module = Module::new(&self.engine, bytes).map_err(compile_error)?;
        let code = module.serialize().map_err(compile_error)?;
        let abi_error = |reason: String| LoadError::Abi {
            path: path.clone(),
            reason,
        };
        let info = Instance::new(self, &module)
            .and_then(|mut probe| probe.info())
            .map_err(abi_error)?;
        Ok((info, code))
    }

    /// Stores a precompiled artifact for the module with digest `module_sha256` where
    /// [`Sandbox::load_file`] looks for compiled code. Only for artifacts whose digest was checked
    /// against a signed manifest: loading one runs its machine code.
    pub fn store_precompiled(&self, module_sha256: &str, code: &[u8]) -> std::io::Result<()> {
        let Some(dir) = &self.config.cache_dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir)?;
        let stem = format!("{module_sha256}-{}", self.engine_id());
        let tmp = dir.join(format!(".{stem}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, code)?;
        std::fs::rename(&tmp, dir.join(format!("{stem}.cwasm")))
    }

    /// Where the compiled code of the module with digest `module_sha256` is cached, if caching.
    pub fn cached_code_path(&self, module_sha256: &str) -> Option<PathBuf> {
        let dir = self.config.cache_dir.as_ref()?;
        Some(dir.join(format!("{module_sha256}-{}.cwasm", self.engine_id())))
    }

    /// A fresh instance of `module`, with the model plan built and ready to classify.
    pub fn instantiate(&self, module: &LoadedModule) -> Result<Instance, CallError> {
        let mut instance = Instance::new(self, &module.module).map_err(CallError::Trapped)?;
        instance.load_model()?;
        Ok(instance)
    }

    fn compile_cached(
        &self,
        path: &Path,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Module, bool), LoadError> {
        let compile = || {
            Module::new(&self.engine, bytes).map_err(|e| LoadError::Compile {
                path: path.to_owned(),
                reason: format!("{e:#}"),
            })
        };
        let Some(dir) = &self.config.cache_dir else {
            return Ok((compile()?, false));
        };
        let stem = format!("{sha256}-{}", self.engine_id());
        let cached = dir.join(format!("{stem}.cwasm"));
        // The lock makes a second node on this host wait for the first one's compilation
        // instead of compiling the same module again.
        let _lock = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::File::create(dir.join(format!("{stem}.lock"))))
            .and_then(|file| file.lock().map(|_| file));
        if cached.is_file() {
            // SAFETY: files in the cache dir are written only by `Module::serialize` below, renamed
            // into place atomically, and named after the engine's compatibility hash; wasmtime checks
            // that header again on load.
            match unsafe { Module::deserialize_file(&self.engine, &cached) } {
                Ok(module) => return Ok((module, true)),
                Err(e) => {
                    tracing::warn!(file = %cached.display(), error = %e, "ignoring unusable compiled-module cache entry")
                }
            }
        }
        let module = compile()?;
        match module.serialize() {
            Ok(code) => {
                let tmp = dir.join(format!("{stem}.{}.tmp", std::process::id()));
                if let Err(e) =
                    std::fs::write(&tmp, code).and_then(|_| std::fs::rename(&tmp, &cached))
                {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot write the compiled-module cache");
                    let _ = std::fs::remove_file(&tmp);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot serialize compiled module"),
        }
        Ok((module, false))
    }
}

/// Cranelift's incremental compilation cache on disk: one file per compiled function, named by
/// the digest of its key (the function's body and the compiler's settings).
#[derive(Debug)]
struct FunctionCache {
    dir: PathBuf,
}

impl FunctionCache {
    fn path(&self, key: &[u8]) -> PathBuf {
        let digest = sha256_hex(key);
        self.dir.join(&digest[..2]).join(&digest[2..])
    }
}

impl wasmtime::CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
        std::fs::read(self.path(key)).ok().map(Into::into)
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let path = self.path(key);
        let Some(dir) = path.parent() else {
            return false;
        };
        // Unique temporary names: compilation runs on several threads, maybe several processes.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&tmp, value))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .is_ok()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
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
    stderr: MemoryOutputPipe,
    call_ticks: u64,
}

impl Instance {
    fn new(sandbox: &Sandbox, module: &Module) -> Result<Instance, String> {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let wasi = wasmtime_wasi::WasiCtx::builder()
            .stderr(stderr.clone())
            .build_p1();
        let state = HostState {
            wasi,
            limiter: MemoryCap {
                limit: sandbox.config.memory_limit_bytes,
                refused: false,
            },
        };
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
    fn abi_version(&mut self) -> Result<u32, String> {
        self.arm();
        self.abi_version
            .clone()
            .call(&mut self.store, ())
            .map_err(|e| self.describe_trap(e))
    }

    /// The guest's self-description.
    fn info(&mut self) -> Result<GuestInfo, String> {
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
    fn load_model(&mut self) -> Result<(), CallError> {
        self.arm();
        let packed = self
            .load
            .clone()
            .call(&mut self.store, ())
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

    /// Copies `image` into a guest buffer, which the next call takes ownership of.
    fn hand_in(&mut self, image: &[u8]) -> Result<(u32, u32), CallError> {
        self.arm();
        let len = u32::try_from(image.len())
            .map_err(|_| CallError::Trapped("image larger than 4 GiB".into()))?;
        let ptr = self
            .alloc
            .clone()
            .call(&mut self.store, len)
            .map_err(|e| CallError::Trapped(self.describe_trap(e)))?;
        if len > 0 && ptr == 0 {
            return Err(CallError::Trapped(format!(
                "the module could not allocate {len} bytes for the image (memory limit {} MiB)",
                self.store.data().limiter.limit >> 20
            )));
        }
        self.memory
            .write(&mut self.store, ptr as usize, image)
            .map_err(|e| CallError::Trapped(format!("writing the image into guest memory: {e}")))?;
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

/// Hex sha256 of `bytes`, as used for module identities.
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::signing::hex(&Sha256::digest(bytes))
}
