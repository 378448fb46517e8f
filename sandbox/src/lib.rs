//! The Wasm sandbox: one wasmtime [`Sandbox`] (engine and linker) per node, compiled modules
//! cached on disk ([`cache`]), and [`Instance`]s that run one classification at a time under a
//! deadline and a memory cap ([`instance`]).
//!
//! Who calls it: the node's module manager loads and probes module files through
//! [`Sandbox::load`], giving it the self-test a module must pass; each scheduler worker owns one
//! [`Instance`] and calls [`Instance::classify`] for every job it runs; `isomesh rollout` and
//! `isomesh compile` precompile modules with [`Sandbox::precompile`].
//!
//! An instance lives across calls because building the model plan inside the guest costs far
//! more than a call; it is thrown away after any trap, so a bad call never leaks into the next.

pub mod cache;
pub mod host_calls;
pub mod instance;
pub mod target;

pub use cache::{CacheKey, CacheKeyError};
pub use instance::Instance;
pub use target::CrossCompiler;

use isomesh_module::digest::is_wasm;
use isomesh_protos::{GuestError, GuestInfo, GuestModel, ModuleRef, GUEST_ABI_VERSION};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::{Config, Engine, Linker, Module};

/// How often the epoch advances; deadlines are counted in these ticks.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(10);
/// A classifier needs one memory and one function table; more is a module up to no good.
pub const MAX_MEMORIES: usize = 1;
pub const MAX_TABLES: usize = 1;
pub const MAX_INSTANCES: usize = 1;
/// Elements of a function table: the model's few thousand functions fit many times over.
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// What WASI gives the guest (see [`Instance::new`]): no preopened directory, no socket, no
/// environment variable, no argument, and no call that can block ([`host_calls`]: the clocks
/// can be read, not waited on).
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
    /// The secret that MACs the cache's entries ([`cache`]), read or created on
    /// [`Sandbox::new`]; `None`: `{cache_dir}.cache-key`, beside the cache. Never inside it.
    pub cache_key_file: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            memory_limit_bytes: 768 << 20,
            call_timeout: Duration::from_secs(10),
            cache_dir: None,
            cache_key_file: None,
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
    #[error("model {model_sha256} does not load in module {module}: {reason}")]
    Model {
        model_sha256: String,
        module: String,
        reason: String,
    },
    #[error("creating the wasmtime engine: {0}")]
    Engine(String),
    #[error(transparent)]
    CacheKey(#[from] CacheKeyError),
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
    linker: Linker<instance::HostState>,
    config: SandboxConfig,
    /// MACs the compiled-code cache; `Some` exactly when there is a cache.
    cache_key: Option<Arc<CacheKey>>,
    /// Tells the epoch ticker thread to stop when the sandbox is dropped.
    ticker_stop: Arc<AtomicBool>,
    /// The engine id of code compiled for this host's target without its CPU features
    /// ([`target::CrossCompiler`]), which this engine loads too.
    portable_engine_id: String,
}

/// A compiled, probed module, ready to be instantiated by any worker.
pub struct LoadedModule {
    /// Hex sha256 of what was rolled out: the module file, or a model rollout's model file.
    pub sha256: String,
    /// What the module says about itself (name, version, labels); for a model rollout, the
    /// name and version of its manifest, and its model's labels.
    pub info: GuestInfo,
    /// The file it came from (the model file of a model rollout).
    pub path: PathBuf,
    /// Hex sha256 of the module file whose code runs, that file, and the version the code
    /// calls itself (`info.version` unless a model rollout names it otherwise).
    pub code_sha256: String,
    pub code_path: PathBuf,
    pub code_version: String,
    /// Whether compiled code came from the on-disk cache, and how long getting it took (for a
    /// module serving a model handed in, [`Sandbox::load_with_model`]: reused, and how long
    /// building and self-testing the model's plan took).
    pub compiled: CompileReport,
    /// How long the self-test's last classification took: the service-time estimate a node
    /// uses for offload decisions before it has run a job of its own.
    pub self_test_service: Duration,
    /// The model every instance serves in place of the one the module embeds
    /// ([`Sandbox::load_with_model`]); `None`: the embedded one.
    pub model: Option<Arc<GuestModel>>,
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

    /// Names this module as statuses and results do.
    pub fn module_ref(&self) -> ModuleRef {
        ModuleRef {
            name: self.info.name.clone(),
            version: self.info.version.clone(),
            sha256: self.sha256.clone(),
            code_sha256: self.code_sha256.clone(),
            model_sha256: self.info.model_sha256.clone(),
        }
    }

    /// `name@version`, as logs write it.
    pub fn label(&self) -> String {
        format!("{}@{}", self.info.name, self.info.version)
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

/// What a model rollout served by [`Sandbox::load_with_model`] is called.
#[derive(Debug, Clone)]
pub struct ModelRollout {
    /// The model file, and its sha256.
    pub path: PathBuf,
    pub sha256: String,
    /// The rollout's name and version, from its signed manifest.
    pub name: String,
    pub version: String,
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

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl Sandbox {
    /// Builds the engine (Cranelift, SIMD, epoch interruption) and starts its epoch ticker.
    pub fn new(config: SandboxConfig) -> Result<Sandbox, LoadError> {
        let cache_key = match &config.cache_dir {
            Some(dir) => {
                let path = match &config.cache_key_file {
                    Some(path) => path.clone(),
                    None => CacheKey::beside(dir)?,
                };
                Some(Arc::new(CacheKey::load_or_create(&path)?))
            }
            None => None,
        };
        let wasm = engine_config(None, config.cache_dir.as_deref().zip(cache_key.clone()))?;
        let engine = Engine::new(&wasm).map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |state: &mut instance::HostState| {
            &mut state.wasi
        })
        .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        host_calls::refuse_blocking(&mut linker)
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
        // What a publisher cross-compiling for this host's target makes (`isomesh rollout
        // --target`): code for the target's baseline CPU, which this engine also loads.
        let portable_engine_id =
            target::CrossCompiler::new(&target::host(), None, None)?.engine_id();
        Ok(Sandbox {
            engine,
            linker,
            config,
            cache_key,
            ticker_stop,
            portable_engine_id,
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

    /// [`Sandbox::load`] of a module file, read here.
    pub fn load_file<E: std::fmt::Display>(
        &self,
        path: &Path,
        self_test: impl FnOnce(&mut Instance, &GuestInfo) -> Result<Duration, E>,
    ) -> Result<Arc<LoadedModule>, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let sha256 = isomesh_module::digest::sha256_hex(&bytes);
        self.load(path, &bytes, sha256, self_test)
    }

    /// Compiles (or loads from the cache) and probes a module whose bytes are `bytes` and digest
    /// `sha256`: ABI version, self-description, model plan, then the caller's `self_test` on the
    /// probe instance, which returns how long a classification took (the node's first service-
    /// time estimate). What a module must show to pass is the caller's policy, not the sandbox's.
    /// Slow on a cache miss: call it from a blocking thread.
    pub fn load<E: std::fmt::Display>(
        &self,
        path: &Path,
        bytes: &[u8],
        sha256: String,
        self_test: impl FnOnce(&mut Instance, &GuestInfo) -> Result<Duration, E>,
    ) -> Result<Arc<LoadedModule>, LoadError> {
        if !is_wasm(bytes) {
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
        let self_test_service =
            self_test(&mut probe, &info).map_err(|e| self_test_error(e.to_string()))?;
        Ok(Arc::new(LoadedModule {
            code_sha256: sha256.clone(),
            code_path: path.to_owned(),
            code_version: info.version.clone(),
            sha256,
            info,
            path: path.to_owned(),
            compiled,
            self_test_service,
            model: None,
            module,
            warm: std::sync::Mutex::new(vec![probe]),
        }))
    }

    /// The compiled code of `code` serving `model` instead of the model it embeds: no compile,
    /// only the new model's plan built in a probe instance, which must pass `self_test` as a new
    /// module does. `code` keeps serving meanwhile. `model.sha256` names the model from then on
    /// (`info.model_sha256`); `info.labels` are the model's.
    ///
    /// With `rollout`, the result is named as that model rollout (file, digest, name and
    /// version); without, as `code`.
    pub fn load_with_model<E: std::fmt::Display>(
        &self,
        code: &LoadedModule,
        model: GuestModel,
        rollout: Option<ModelRollout>,
        self_test: impl FnOnce(&mut Instance, &GuestInfo) -> Result<Duration, E>,
    ) -> Result<Arc<LoadedModule>, LoadError> {
        let started = Instant::now();
        let refused = |reason: String| LoadError::Model {
            model_sha256: model.sha256.clone(),
            module: code.label(),
            reason,
        };
        let mut probe = Instance::new(self, &code.module).map_err(&refused)?;
        let instantiated = started.elapsed();
        probe
            .serve_model(&model)
            .map_err(|e| refused(e.to_string()))?;
        let planned = started.elapsed();
        let mut info = probe.info().map_err(&refused)?;
        let self_test_service = self_test(&mut probe, &info)
            .map_err(|e| refused(format!("its self-test failed: {e}")))?;
        // Where a model rollout's time on the node goes (`isomesh bench swap --model`).
        tracing::info!(
            model = %isomesh_module::digest::short(&model.sha256),
            instantiate_ms = instantiated.as_millis() as u64,
            plan_ms = (planned - instantiated).as_millis() as u64,
            self_test_ms = (started.elapsed() - planned).as_millis() as u64,
            "model plan built and self-tested"
        );
        let (sha256, path) = match rollout {
            Some(rollout) => {
                info.name = rollout.name;
                info.version = rollout.version;
                (rollout.sha256, rollout.path)
            }
            None => (code.sha256.clone(), code.path.clone()),
        };
        Ok(Arc::new(LoadedModule {
            sha256,
            info,
            path,
            code_sha256: code.code_sha256.clone(),
            code_path: code.code_path.clone(),
            code_version: code.code_version.clone(),
            compiled: CompileReport {
                from_cache: true,
                elapsed: started.elapsed(),
            },
            self_test_service,
            model: Some(Arc::new(model)),
            module: code.module.clone(),
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
        engine_id(&self.engine)
    }

    /// Every engine id whose code this sandbox loads, its own first: its own, and that of code
    /// cross-compiled for its target's baseline CPU ([`target::CrossCompiler`]), which runs on
    /// any CPU of the architecture (wasmtime checks every CPU feature the code uses on load).
    pub fn engine_ids(&self) -> Vec<String> {
        let own = self.engine_id();
        if own == self.portable_engine_id {
            vec![own]
        } else {
            vec![own, self.portable_engine_id.clone()]
        }
    }

    /// The target triple this sandbox compiles for and runs on, e.g. `aarch64-unknown-linux-musl`.
    pub fn target(&self) -> String {
        target::host()
    }

    /// Compiles a module ahead of time and reads its self-description: what `isomesh rollout`
    /// publishes beside the `.wasm` for nodes with this engine.
    pub fn precompile(&self, bytes: &[u8]) -> Result<(GuestInfo, Vec<u8>), LoadError> {
        let path = PathBuf::from("<module>");
        if !is_wasm(bytes) {
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

    /// A fresh instance of `module`, with the model plan built and ready to classify.
    pub fn instantiate(&self, module: &LoadedModule) -> Result<Instance, CallError> {
        let mut instance = Instance::new(self, &module.module).map_err(CallError::Trapped)?;
        match &module.model {
            Some(model) => instance.serve_model(model)?,
            None => instance.load_model()?,
        }
        Ok(instance)
    }
}

/// The wasmtime settings of every engine isomesh makes, for this host (`target` `None`: its CPU
/// features detected) or for a target triple. One function, because code is loadable only by an
/// engine whose settings match the compiling one's exactly; `cache` adds Cranelift's
/// per-function incremental cache in `{dir}/incremental`.
pub(crate) fn engine_config(
    target: Option<&str>,
    cache: Option<(&Path, Arc<CacheKey>)>,
) -> Result<Config, LoadError> {
    let mut wasm = Config::new();
    if let Some(triple) = target {
        // Cranelift's defaults for the target: its baseline CPU, no detected features.
        wasm.target(triple).map_err(|e| {
            LoadError::Engine(format!(
                "cannot compile for target {triple}: {e:#} (this build compiles for {})",
                target::SUPPORTED.join(", ")
            ))
        })?;
    }
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
    if std::env::var_os("ISOMESH_WASM_PERFMAP").is_some() {
        // For `perf record`: /tmp/perf-PID.map names the module's functions (a module built
        // without `strip` keeps their names). Where the guest's time goes, function by function.
        wasm.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    if let Some((dir, key)) = cache {
        // A new version that changes only weights or a little code reuses the machine code
        // of every unchanged function instead of compiling all of them again. Entries are
        // keyed by the target and its settings too, so engines of several targets share it.
        wasm.enable_incremental_compilation(Arc::new(cache::FunctionCache::new(
            dir.join("incremental"),
            key,
        )))
        .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
    }
    Ok(wasm)
}

/// [`Sandbox::engine_id`] of any engine.
pub(crate) fn engine_id(engine: &Engine) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}
