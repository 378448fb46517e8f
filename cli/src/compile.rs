//! `isomesh compile MODULE --cache-dir DIR`: compiles a module into a compiled-module cache, the
//! same cache a node reads with `--cache-dir`, so a node started on it serves at once instead of
//! compiling for ~10 s (more under a CPU quota). `make images` runs it to bake the machine code
//! into the container image; the code is used only by nodes whose engine matches (same wasmtime,
//! settings and CPU features), and any other node compiles the module itself as usual. The code
//! is MAC-ed with the cache's key (`DIR.cache-key`, made if missing): nodes load it only with
//! that key (their default `--cache-key` for `--cache-dir DIR`).
//!
//! With `--target TRIPLE` (e.g. `aarch64-unknown-linux-musl`) it compiles for nodes of that
//! target instead, for its baseline CPU: how an arm64 image, or the cache directory copied onto
//! a board, gets the first module's code from an x86_64 machine. The module is still loaded and
//! self-tested here first, with this machine's engine: foreign code cannot run here.

use anyhow::Context;
use isomesh_sandbox::{CrossCompiler, Sandbox, SandboxConfig};
use std::path::PathBuf;

/// Compile a module into a node's compiled-module cache.
#[derive(Debug, clap::Args)]
pub struct CompileArgs {
    /// The classifier module (.wasm).
    pub module: PathBuf,
    /// The cache directory (a node's `--cache-dir`).
    #[arg(long)]
    pub cache_dir: PathBuf,
    /// Compile for nodes of this target triple (`aarch64-unknown-linux-musl`) rather than for
    /// this machine.
    #[arg(long, value_parser = crate::rollout::parse_target)]
    pub target: Option<String>,
    /// With --target: this machine's compile cache, for the self-test's compile (as `isomesh
    /// rollout --compile-cache`) [default: $XDG_CACHE_HOME/isomesh or ~/.cache/isomesh].
    #[arg(long, env = "ISOMESH_COMPILE_CACHE", requires = "target")]
    pub compile_cache: Option<PathBuf>,
}

pub fn run(args: CompileArgs) -> anyhow::Result<()> {
    // For another target, this machine's code is only for the self-test: it goes to this
    // machine's compile cache (where `isomesh rollout` keeps it too), not into DIR, which is the
    // other target's.
    let cache_dir = match &args.target {
        None => Some(args.cache_dir.clone()),
        Some(_) => args
            .compile_cache
            .clone()
            .or_else(crate::rollout::default_compile_cache),
    };
    let sandbox = Sandbox::new(SandboxConfig {
        cache_dir,
        ..SandboxConfig::default()
    })?;
    // The full load a node does: compile (or find the cache), then the self-test, so a module
    // that would be rejected is not baked in.
    let module = sandbox
        .load_file(&args.module, |probe, info| {
            isomesh_module::selftest::run(&mut probe.classifier(), info)
        })
        .with_context(|| format!("loading {}", args.module.display()))?;
    let cached = match &args.target {
        None => sandbox
            .cached_code_path(&module.sha256)
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        Some(_) => String::new(),
    };
    println!(
        "{}@{} ({}) {} in {} ms{}",
        module.info.name,
        module.info.version,
        isomesh_module::digest::short(&module.sha256),
        if module.compiled.from_cache {
            "found in the cache"
        } else {
            "compiled"
        },
        module.compiled.elapsed.as_millis(),
        if cached.is_empty() {
            " (self-test passed)".to_string()
        } else {
            format!(" -> {cached}")
        }
    );
    if let Some(target) = &args.target {
        let started = std::time::Instant::now();
        let bytes = std::fs::read(&args.module)
            .with_context(|| format!("reading {}", args.module.display()))?;
        let entry = CrossCompiler::new(target, Some(&args.cache_dir), None)?
            .compile_into_cache(&bytes)
            .with_context(|| format!("compiling {} for {target}", args.module.display()))?;
        println!(
            "{}@{} compiled for {target} in {} ms -> {}",
            module.info.name,
            module.info.version,
            started.elapsed().as_millis(),
            entry.display()
        );
    }
    Ok(())
}
