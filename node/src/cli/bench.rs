//! `isomesh bench infer`: what the sandbox costs. In one run, on the same images: MobileNetV2
//! latency inside Wasm and natively (the same guest crate linked into this binary), the cost of an
//! empty call into the module, compile time, cached load time and resident memory; with
//! `--onnxruntime`, the same model in onnxruntime too, the tool a user would pick instead (through
//! its Python package: a baseline, not a dependency). Writes JSON.

use crate::sandbox::{Sandbox, SandboxConfig};
use anyhow::Context;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Inference latency in Wasm vs native, call overhead, compile and load times, memory.
    Infer(InferArgs),
    /// A rollout under load vs restarting a node on the new module.
    Swap(super::bench_swap::SwapArgs),
    /// Deadline hits and latency of the offload policies under Poisson load, device to cloud.
    Offload(super::bench_offload::OffloadArgs),
}

#[derive(Debug, clap::Args)]
pub struct InferArgs {
    /// The classifier module.
    #[arg(long)]
    pub module: PathBuf,
    /// Images to classify (each is run --iterations times).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Timed runs per image and runtime.
    #[arg(long, default_value_t = 20)]
    pub iterations: usize,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-out/infer.json")]
    pub out: PathBuf,
    /// Also run this ONNX model (the one the guest embeds) in onnxruntime, single-threaded, on
    /// the same images; needs python3 with onnxruntime, numpy and pillow.
    #[arg(long, value_name = "MODEL.onnx")]
    pub onnxruntime: Option<PathBuf>,
}

/// The onnxruntime baseline, carried in the binary so it runs from any directory.
const ONNXRUNTIME_SCRIPT: &str = include_str!("../../../scripts/bench_onnxruntime.py");

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Infer(args) => infer(args),
        BenchCommand::Swap(args) => {
            tokio::runtime::Runtime::new()?.block_on(super::bench_swap::swap(args))
        }
        BenchCommand::Offload(args) => {
            tokio::runtime::Runtime::new()?.block_on(super::bench_offload::offload(args))
        }
    }
}

fn infer(args: InferArgs) -> anyhow::Result<()> {
    let images: Vec<Vec<u8>> = args
        .images
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect::<Result<_, _>>()?;
    let cache = tempdir()?;
    let sandbox = Sandbox::new(SandboxConfig {
        cache_dir: Some(cache.clone()),
        ..SandboxConfig::default()
    })?;

    eprintln!("compiling {} (cold cache)...", args.module.display());
    let rss_before = rss_kib();
    let started = Instant::now();
    let module = sandbox.load_file(&args.module)?;
    let cold_load = started.elapsed();
    let compile = module.compiled.elapsed;
    let rss_after_compile = peak_rss_kib();
    let started = Instant::now();
    let cached = sandbox.load_file(&args.module)?;
    let warm_load = started.elapsed();
    anyhow::ensure!(
        cached.compiled.from_cache,
        "the second load did not come from the cache"
    );
    let cached_load = cached.compiled.elapsed;

    let started = Instant::now();
    let mut instance = sandbox.instantiate(&module).map_err(anyhow::Error::msg)?;
    let instantiate = started.elapsed();
    let calls = 100_000;
    let started = Instant::now();
    for _ in 0..calls {
        instance.ping().map_err(anyhow::Error::msg)?;
    }
    let empty_call_ns = started.elapsed().as_nanos() as f64 / calls as f64;

    let mut wasm = Vec::new();
    let mut native = Vec::new();
    let mut wasm_top1 = Vec::new();
    let native_classifier = native_baseline()?;
    for image in &images {
        // One untimed run each to warm caches, then alternate so drift hits both alike.
        let warm = instance.classify(image, 5).map_err(anyhow::Error::msg)?;
        wasm_top1.push(warm.top.first().map(|score| score.index));
        native_classifier(image)?;
        for _ in 0..args.iterations {
            let t = Instant::now();
            let answer = instance.classify(image, 5).map_err(anyhow::Error::msg)?;
            let _ = t.elapsed();
            wasm.push(answer.infer_us as f64 / 1000.0);
            native.push(native_classifier(image)?);
        }
    }
    let rss_end = rss_kib();
    let (w, n) = (stats(&mut wasm), stats(&mut native));
    let ratio = w.median / n.median;
    // After the Wasm and native runs, so that neither shares the CPU with it.
    let onnxruntime = match &args.onnxruntime {
        Some(model) => {
            eprintln!("running the onnxruntime baseline...");
            Some(onnxruntime_baseline(model, &args, &wasm_top1, &cache)?)
        }
        None => None,
    };
    let over_onnxruntime = onnxruntime
        .as_ref()
        .and_then(|o| o["infer_ms"]["median"].as_f64())
        .map(|median| w.median / median);
    let report = json!({
        "machine": machine(),
        "module": {"path": args.module.display().to_string(), "sha256": module.sha256, "bytes": std::fs::metadata(&args.module)?.len()},
        "images": args.images.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "iterations_per_image": args.iterations,
        "infer_ms": {"wasm": w.to_json(), "native": n.to_json(), "wasm_over_native_median": ratio,
                     "wasm_over_onnxruntime_median": over_onnxruntime},
        "onnxruntime": onnxruntime,
        "empty_call_ns": empty_call_ns,
        "compile_ms": ms(compile),
        "first_load_with_selftest_ms": ms(cold_load),
        "cached_load_ms": ms(cached_load),
        "cached_load_with_selftest_ms": ms(warm_load),
        "instantiate_with_model_plan_ms": ms(instantiate),
        "rss_kib": {"before": rss_before, "peak_after_compile": rss_after_compile, "end": rss_end},
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!(
        "MobileNetV2 inference, {} images x {} runs",
        images.len(),
        args.iterations
    );
    println!("  wasm   median {:.1} ms  p95 {:.1} ms", w.median, w.p95);
    println!("  native median {:.1} ms  p95 {:.1} ms", n.median, n.p95);
    println!("  wasm / native (median): {ratio:.2}x");
    if let (Some(o), Some(over)) = (&onnxruntime, over_onnxruntime) {
        println!(
            "  onnxruntime (1 thread) median {:.1} ms; wasm / onnxruntime {over:.2}x",
            o["infer_ms"]["median"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!("  empty call into the module: {empty_call_ns:.0} ns");
    println!(
        "  compile {:.0} ms, cached load {:.1} ms, instantiate + model plan {:.0} ms",
        ms(compile),
        ms(cached_load),
        ms(instantiate)
    );
    println!("  peak RSS {} MiB", rss_after_compile.unwrap_or(0) / 1024);
    println!("report: {}", args.out.display());
    let _ = std::fs::remove_dir_all(&cache);
    Ok(())
}

/// Runs `scripts/bench_onnxruntime.py` on `model` and the bench's images, and counts the images
/// where it picks the same top-1 class as the module (`wasm_top1`, in image order): a baseline
/// that classifies differently would not be the same work.
fn onnxruntime_baseline(
    model: &std::path::Path,
    args: &InferArgs,
    wasm_top1: &[Option<u32>],
    scratch: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    let script = scratch.join("bench_onnxruntime.py");
    std::fs::write(&script, ONNXRUNTIME_SCRIPT)?;
    let output = std::process::Command::new("python3")
        .arg(&script)
        .arg(model)
        .arg(args.iterations.to_string())
        .args(&args.images)
        .output()
        .context("cannot run python3 for the onnxruntime baseline")?;
    anyhow::ensure!(
        output.status.success(),
        "the onnxruntime baseline failed (pip install onnxruntime numpy pillow?): {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let mut report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .context("the onnxruntime baseline printed no JSON")?;
    let agree = args
        .images
        .iter()
        .zip(wasm_top1)
        .filter(|(path, wasm)| {
            let theirs = report["top1"][path.display().to_string()].as_u64();
            theirs.is_some() && theirs == wasm.map(u64::from)
        })
        .count();
    if agree < args.images.len() {
        eprintln!(
            "note: onnxruntime's top-1 matches the module's on {agree} of {} images",
            args.images.len()
        );
    }
    report["top1_agrees_with_wasm"] = json!(agree);
    Ok(report)
}

/// Runs the native classifier on a thread of its own. tract's native kernels are hand-written
/// AVX assembly that can leave the upper halves of the vector registers dirty; on the thread that
/// runs them, the SSE code Cranelift emits for Wasm then ran ~250x slower here (9.3 s instead of
/// 35 ms per image). Apart, each keeps its own register state.
#[cfg(feature = "native-baseline")]
fn native_baseline() -> anyhow::Result<impl Fn(&[u8]) -> anyhow::Result<f64>> {
    let (images, requests) = std::sync::mpsc::channel::<Vec<u8>>();
    let (results, answers) = std::sync::mpsc::channel::<Result<f64, String>>();
    std::thread::Builder::new()
        .name("native-baseline".into())
        .spawn(move || {
            let classifier = match isomesh_guest::Classifier::load() {
                Ok(classifier) => classifier,
                Err(e) => {
                    let _ = results.send(Err(e.to_string()));
                    return;
                }
            };
            while let Ok(image) = requests.recv() {
                let answer = classifier
                    .classify(&image, 5)
                    .map(|a| a.infer_us as f64 / 1000.0)
                    .map_err(|e| e.to_string());
                if results.send(answer).is_err() {
                    return;
                }
            }
        })?;
    Ok(move |image: &[u8]| {
        images.send(image.to_vec())?;
        answers
            .recv()?
            .map_err(|e| anyhow::anyhow!("native classifier: {e}"))
    })
}

#[cfg(not(feature = "native-baseline"))]
fn native_baseline() -> anyhow::Result<fn(&[u8]) -> anyhow::Result<f64>> {
    anyhow::bail!(
        "this isomesh was built without the native-baseline feature; rebuild with it to compare"
    )
}

pub(super) struct Stats {
    pub median: f64,
    pub p95: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub n: usize,
}

impl Stats {
    pub fn to_json(&self) -> serde_json::Value {
        json!({"median": self.median, "p95": self.p95, "p99": self.p99, "min": self.min,
               "max": self.max, "mean": self.mean, "n": self.n})
    }
}

/// Order statistics of `samples` (all NaN when there are none).
pub(super) fn stats(samples: &mut [f64]) -> Stats {
    samples.sort_by(f64::total_cmp);
    if samples.is_empty() {
        return Stats {
            median: f64::NAN,
            p95: f64::NAN,
            p99: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            mean: f64::NAN,
            n: 0,
        };
    }
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Stats {
        median: at(0.5),
        p95: at(0.95),
        p99: at(0.99),
        min: samples[0],
        max: samples[samples.len() - 1],
        mean: samples.iter().sum::<f64>() / samples.len() as f64,
        n: samples.len(),
    }
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn status_field(name: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn rss_kib() -> Option<u64> {
    status_field("VmRSS:")
}

fn peak_rss_kib() -> Option<u64> {
    status_field("VmHWM:")
}

pub(super) fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    json!({"cpu": model, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)})
}

pub(super) fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(super::client_id("bench"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
