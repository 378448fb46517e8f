//! Machine code for another target: how an x86_64 publisher ships code an aarch64 device runs.
//!
//! A node compiles the ~31 MB classifier in ~10-20 s on an x86_64 core, minutes on a small ARM
//! board (and about 4 minutes under qemu). So `isomesh rollout --target aarch64-unknown-linux-musl`
//! compiles the module here for that target too, and the signed manifest carries that artifact
//! beside the one for this machine, each named by its engine id.
//!
//! A cross-compiling engine cannot know the CPU of the board it compiles for, so it uses the
//! target's baseline (Cranelift's defaults: on aarch64, NEON and nothing optional). That code runs
//! on every CPU of the architecture, and a node's own engine, which was built with its detected
//! CPU features, still loads it: wasmtime checks on load that the host has every feature the code
//! was compiled with, and the baseline has none beyond the architecture's. So a node takes the
//! artifacts of two engine ids ([`Sandbox::engine_ids`](crate::Sandbox::engine_ids)): its own
//! (a publisher with the very same CPU features) and the portable one of its target, which is
//! [`CrossCompiler::engine_id`] for [`host`]. Every other setting is the node's exactly
//! ([`engine_config`](crate::engine_config)); code with any other setting would be refused.
//!
//! What the compiled code does is the same on both ISAs up to rounding: relaxed SIMD lets an
//! engine fuse a multiply-add (always on aarch64, on x86_64 only with FMA), so probabilities may
//! differ in their last digits, and the top-1 of the photos does not.

use crate::cache::{write_entry, CacheKey};
use crate::{engine_config, engine_id, LoadError};
use isomesh_module::digest::{is_wasm, sha256_hex};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use target_lexicon::HOST;
use wasmtime::Engine;

/// The targets of the mesh's static builds. A build with the `cross-compile` feature (`isomesh`)
/// compiles for any triple of their two architectures (Cranelift's x86 and arm64 backends, see
/// `Cargo.toml`), e.g. for a node built for `aarch64-unknown-linux-gnu` too; one without it (a
/// node) for its own architecture only.
pub const SUPPORTED: [&str; 2] = ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];

/// Whether this build can compile for `triple`; the error says what it can compile for.
pub fn check(triple: &str) -> Result<(), String> {
    let parsed: target_lexicon::Triple = triple.parse().map_err(|e| {
        format!(
            "{triple} is not a target triple ({e}); try {}",
            SUPPORTED.join(" or ")
        )
    })?;
    match parsed.architecture {
        target_lexicon::Architecture::X86_64 | target_lexicon::Architecture::Aarch64(_)
            if cfg!(feature = "cross-compile") || parsed.architecture == HOST.architecture =>
        {
            Ok(())
        }
        target_lexicon::Architecture::X86_64 | target_lexicon::Architecture::Aarch64(_) => {
            Err(format!(
                "this build compiles for {} only (it was built without the sandbox's \
                 `cross-compile` feature); compile for {triple} with `isomesh`, which has it",
                HOST.architecture
            ))
        }
        other => Err(format!(
            "this build compiles for x86_64 and aarch64 ({}), not {other}",
            SUPPORTED.join(", ")
        )),
    }
}

/// The target triple of this build, e.g. `x86_64-unknown-linux-musl`: what a node says it runs
/// on (its status), and what `isomesh rollout --target` must name to make code it loads.
pub fn host() -> String {
    HOST.to_string()
}

/// The CPU architecture of this build (`x86_64`, `aarch64`), as job results name where a hop ran.
pub fn host_arch() -> String {
    HOST.architecture.to_string()
}

/// A wasmtime engine that compiles, and never runs, code for one target.
pub struct CrossCompiler {
    engine: Engine,
    target: String,
    /// Where [`CrossCompiler::compile_into_cache`] writes, with the key that MACs its entries.
    cache: Option<(PathBuf, Arc<CacheKey>)>,
}

impl CrossCompiler {
    /// An engine for `target` (a triple such as `aarch64-unknown-linux-musl`) with the settings of
    /// every node. With `cache_dir`, unchanged functions of a new version come from Cranelift's
    /// incremental cache there (shared with the host's engine: its entries name their target),
    /// MAC-ed with the key at `cache_key_file` (default: beside the directory, made if missing).
    pub fn new(
        target: &str,
        cache_dir: Option<&Path>,
        cache_key_file: Option<&Path>,
    ) -> Result<CrossCompiler, LoadError> {
        check(target).map_err(LoadError::Engine)?;
        let cache = match cache_dir {
            Some(dir) => {
                let path = match cache_key_file {
                    Some(path) => path.to_owned(),
                    None => CacheKey::beside(dir)?,
                };
                Some((dir.to_owned(), Arc::new(CacheKey::load_or_create(&path)?)))
            }
            None => None,
        };
        let config = engine_config(
            Some(target),
            cache
                .as_ref()
                .map(|(dir, key)| (dir.as_path(), key.clone())),
        )?;
        let engine = Engine::new(&config)
            .map_err(|e| LoadError::Engine(format!("an engine for target {target}: {e:#}")))?;
        Ok(CrossCompiler {
            engine,
            target: target.to_owned(),
            cache,
        })
    }

    /// The triple this engine compiles for.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The engine id of the code it makes: the portable id of nodes of its target.
    pub fn engine_id(&self) -> String {
        engine_id(&self.engine)
    }

    /// Compiles a module for the target: the bytes of a precompiled artifact.
    pub fn precompile(&self, bytes: &[u8]) -> Result<Vec<u8>, LoadError> {
        let path = PathBuf::from(format!("<module for {}>", self.target));
        if !is_wasm(bytes) {
            return Err(LoadError::NotWasm { path });
        }
        let compile_error = |e: wasmtime::Error| LoadError::Compile {
            path: path.clone(),
            reason: format!("{e:#}"),
        };
        // Not `Module::new`: that would also make the code runnable, which it is not here.
        self.engine.precompile_module(bytes).map_err(compile_error)
    }

    /// Compiles a module into the cache directory it was made with, where a node of the target
    /// started with that `--cache-dir` (and the same key) finds it and serves without compiling:
    /// how an arm64 image or a board gets its first module's code from an x86_64 machine.
    /// Returns the entry's path.
    pub fn compile_into_cache(&self, bytes: &[u8]) -> Result<PathBuf, LoadError> {
        let Some((dir, key)) = &self.cache else {
            return Err(LoadError::Engine(
                "a cross-compiler made without a cache directory has no cache to compile into"
                    .into(),
            ));
        };
        let code = self.precompile(bytes)?;
        let stem = format!("{}-{}", sha256_hex(bytes), self.engine_id());
        let write_error = |e: std::io::Error| {
            LoadError::Engine(format!(
                "cannot write compiled code into {}: {e}",
                dir.display()
            ))
        };
        std::fs::create_dir_all(dir).map_err(write_error)?;
        write_entry(dir, &stem, key, &code).map_err(write_error)?;
        Ok(dir.join(format!("{stem}.cwasm")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(feature = "cross-compile")]
    fn every_supported_target_has_an_engine_and_each_its_own_id() {
        let ids: Vec<String> = SUPPORTED
            .iter()
            .map(|t| CrossCompiler::new(t, None, None).expect(t).engine_id())
            .collect();
        assert_ne!(ids[0], ids[1]);
        assert!(SUPPORTED.contains(&host().as_str()), "{}", host());
    }

    #[test]
    #[cfg(feature = "cross-compile")]
    fn targets_are_checked_before_any_engine_is_made() {
        assert_eq!(check("aarch64-unknown-linux-gnu"), Ok(()));
        assert_eq!(check("x86_64-unknown-linux-musl"), Ok(()));
        let error = check("riscv64gc-unknown-linux-gnu").expect_err("no riscv64 backend");
        assert!(error.contains("riscv64"), "{error}");
        let error = check("arm64 please").expect_err("not a triple");
        assert!(error.contains("aarch64-unknown-linux-musl"), "{error}");
    }

    #[test]
    #[cfg(not(feature = "cross-compile"))]
    fn without_the_feature_only_the_host_architecture_is_compiled_for() {
        assert_eq!(check(&host()), Ok(()));
        let other = SUPPORTED
            .iter()
            .find(|t| **t != host())
            .expect("two targets");
        let error = check(other).expect_err("no backend for the other architecture");
        assert!(error.contains("cross-compile"), "{error}");
    }

    #[test]
    fn an_unknown_target_is_refused_with_the_ones_that_work() {
        let Err(error) = CrossCompiler::new("riscv64gc-unknown-linux-gnu", None, None) else {
            panic!("riscv64 has no backend in this build");
        };
        let message = error.to_string();
        assert!(message.contains("riscv64gc"), "{message}");
        assert!(message.contains("aarch64-unknown-linux-musl"), "{message}");
    }

    #[test]
    #[cfg(feature = "cross-compile")]
    fn code_for_another_architecture_is_made_and_this_host_refuses_to_run_it() {
        let wasm = wat_module();
        let other = SUPPORTED
            .iter()
            .find(|t| **t != host())
            .expect("two targets");
        let code = CrossCompiler::new(other, None, None)
            .expect("engine")
            .precompile(&wasm)
            .expect("compiles");
        let sandbox = crate::Sandbox::new(crate::SandboxConfig::default()).expect("sandbox");
        // SAFETY: the bytes were just serialized by wasmtime; the point is its refusal.
        let loaded = unsafe { wasmtime::Module::deserialize(&sandbox.engine, &code) };
        let Err(refused) = loaded else {
            panic!("this host ran code compiled for {other}");
        };
        let error = format!("{refused:#}");
        assert!(error.contains("architecture"), "{error}");
    }

    #[test]
    fn portable_code_for_this_host_loads_in_the_host_engine() {
        let wasm = wat_module();
        let cross = CrossCompiler::new(&host(), None, None).expect("engine");
        let code = cross.precompile(&wasm).expect("compiles");
        let sandbox = crate::Sandbox::new(crate::SandboxConfig::default()).expect("sandbox");
        assert!(sandbox.engine_ids().contains(&cross.engine_id()));
        // SAFETY: serialized by wasmtime just above.
        let module =
            unsafe { wasmtime::Module::deserialize(&sandbox.engine, &code) }.expect("loads");
        let mut store = wasmtime::Store::new(&sandbox.engine, ());
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).expect("instance");
        let answer = instance
            .get_typed_func::<(), i32>(&mut store, "answer")
            .expect("export")
            .call(&mut store, ())
            .expect("runs");
        assert_eq!(answer, 42);
    }

    #[test]
    fn portable_code_compiled_into_a_cache_is_found_by_a_node_on_it() {
        let dir = std::env::temp_dir().join(format!("isomesh-target-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = dir.join("cache");
        let wasm = wat_module();
        let cross = CrossCompiler::new(&host(), Some(&cache), None).expect("engine");
        let entry = cross
            .compile_into_cache(&wasm)
            .expect("compiled into the cache");
        assert!(entry.is_file());
        let sandbox = crate::Sandbox::new(crate::SandboxConfig {
            cache_dir: Some(cache.clone()),
            ..crate::SandboxConfig::default()
        })
        .expect("sandbox");
        let (_, from_cache) = sandbox
            .compile_cached(Path::new("m.wasm"), &wasm, &sha256_hex(&wasm))
            .expect("loads");
        assert!(from_cache, "the portable entry is used, not compiled again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn wat_module() -> Vec<u8> {
        wat::parse_str(r#"(module (func (export "answer") (result i32) i32.const 42))"#)
            .expect("wat")
    }
}
