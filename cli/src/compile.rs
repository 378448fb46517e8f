//! `isomesh compile MODULE --cache-dir DIR`: compiles a module into a compiled-module cache, the
//! same cache a node reads with `--cache-dir`, so a node started on it serves at once instead of
//! compiling for ~10 s (more under a CPU quota). `make images` runs it to bake the machine code
//! into the container image; the code is used only by nodes whose engine matches (same wasmtime,
//! settings and CPU features), and any other node compiles the module itself as usual. The code
//! is MAC-ed with the cache's key (`DIR.cache-key`, made if missing): nodes load it only with
//! that key (their default `--cache-key` for `--cache-dir DIR`).

use anyhow::Context;
use isomesh_sandbox::{Sandbox, SandboxConfig};
use std::path::PathBuf;

/// Compile a module into a node's compiled-module cache.
#[derive(Debug, clap::Args)]
pub struct CompileArgs {
    /// The classifier module (.wasm).
    pub module: PathBuf,
    /// The cache directory (a node's `--cache-dir`).
    #[arg(long)]
    pub cache_dir: PathBuf,
}

pub fn run(args: CompileArgs) -> anyhow::Result<()> {
    let sandbox = Sandbox::new(SandboxConfig {
        cache_dir: Some(args.cache_dir.clone()),
        ..SandboxConfig::default()
    })?;
    // The full load a node does: compile (or find the cache), then the self-test, so a module
    // that would be rejected is not baked in.
    let module = sandbox
        .load_file(&args.module, |probe, info| {
            isomesh_module::selftest::run(&mut probe.classifier(), info)
        })
        .with_context(|| format!("loading {}", args.module.display()))?;
    let cached = sandbox
        .cached_code_path(&module.sha256)
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    println!(
        "{}@{} ({}) {} in {} ms -> {cached}",
        module.info.name,
        module.info.version,
        isomesh_module::digest::short(&module.sha256),
        if module.compiled.from_cache {
            "found in the cache"
        } else {
            "compiled"
        },
        module.compiled.elapsed.as_millis(),
    );
    Ok(())
}
