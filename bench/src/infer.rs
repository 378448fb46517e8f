//! `isomesh bench infer`: what the sandbox costs. In one run, on the same images: MobileNetV2
//! latency inside Wasm and natively (the same guest crate linked into this binary, with the
//! `native-baseline` feature that `make bench` turns on), what a call
//! across the sandbox boundary costs next to the work it carries (an empty call, decoding only,
//! a whole classification), compile time, cached load time and resident memory; with
//! `--onnxruntime`, the same model in onnxruntime too, the tool a user would pick instead (through
//! its Python package: a baseline, not a dependency). With `--cpu-cores`, all of it runs under a
//! CPU quota, as on a device or an edge box. Writes JSON.

use crate::common::{machine, ms, read_files, stats, tempdir, Stats};
use anyhow::Context;
use isomesh_protos::{guest_input::Layout, GuestInput, GuestModel};
use isomesh_sandbox::{LoadedModule, Sandbox, SandboxConfig};
use isomesh_testkit::harness::CpuQuota;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Run the measurements (not the compile) limited to this many cores of CPU time (0.25 =
    /// a quarter of one), by a cgroup quota with 10 ms periods: needs root.
    #[arg(long, value_name = "CORES")]
    pub cpu_cores: Option<f64>,
    /// Keep compiled code here, so runs after the first skip the compile (default: a temporary
    /// directory, removed after the run).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Another build of the classifier to time beside `--module` (repeatable): each image's runs
    /// alternate between all of them and the native baseline, so a slower or faster spell of the
    /// machine hits every variant alike. Each gets its own column: median, and over native.
    #[arg(long, value_name = "LABEL=MODULE.wasm", value_parser = parse_variant)]
    pub variant: Vec<(String, PathBuf)>,
    /// Time this ONNX classifier, served by the module's code in place of the model it embeds
    /// (a user's own model, before it is rolled out), in Wasm and natively. Needs --labels.
    #[arg(
        long,
        value_name = "MODEL.onnx",
        requires = "labels",
        conflicts_with = "onnxruntime"
    )]
    pub model: Option<PathBuf>,
    /// The class names of --model, one a line, in the order of its outputs.
    #[arg(long, value_name = "LABELS.txt", requires = "model")]
    pub labels: Option<PathBuf>,
    /// How an image becomes --model's input: nchw-f32-imagenet (float32 channels first,
    /// normalised as torchvision does) or nhwc-u8 (raw pixels channels last).
    #[arg(long, default_value = "nchw-f32-imagenet", value_parser = isomesh_module::model::parse_layout)]
    pub input_layout: Layout,
    /// Side of --model's square input, pixels.
    #[arg(long, default_value_t = 224)]
    pub input_side: u32,
}

fn parse_variant(arg: &str) -> Result<(String, PathBuf), String> {
    match arg.split_once('=') {
        Some((label, path)) if !label.is_empty() && !path.is_empty() => {
            Ok((label.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!(
            "{arg:?}: expected LABEL=MODULE.wasm, e.g. 4x8=target/variants/4x8.wasm"
        )),
    }
}

/// One `--variant`: its module, an instance of it, and its timings.
struct Variant {
    label: String,
    path: PathBuf,
    sha256: String,
    instance: isomesh_sandbox::Instance,
    infer_ms: Vec<f64>,
    top1: Vec<Option<u32>>,
}

/// The onnxruntime baseline, carried in the binary so it runs from any directory.
const ONNXRUNTIME_SCRIPT: &str = include_str!("../../scripts/bench_onnxruntime.py");

pub fn infer(args: InferArgs) -> anyhow::Result<()> {
    let images = read_files(&args.images)?;
    let scratch = tempdir()?;
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| scratch.join("cache"));
    let sandbox = Sandbox::new(SandboxConfig {
        cache_dir: Some(cache.clone()),
        ..SandboxConfig::default()
    })?;

    eprintln!("loading {} ...", args.module.display());
    let rss_before = crate::common::own_status_kib("VmRSS:");
    let started = Instant::now();
    let module = sandbox.load_file(&args.module, |probe, info| {
        isomesh_module::selftest::run(&mut probe.classifier(), info)
    })?;
    let cold_load = started.elapsed();
    let compile = (!module.compiled.from_cache).then_some(module.compiled.elapsed);
    let rss_after_compile = crate::common::own_status_kib("VmHWM:");
    let started = Instant::now();
    let cached = sandbox.load_file(&args.module, |probe, info| {
        isomesh_module::selftest::run(&mut probe.classifier(), info)
    })?;
    let warm_load = started.elapsed();
    anyhow::ensure!(
        cached.compiled.from_cache,
        "the second load did not come from the cache"
    );
    let cached_load = cached.compiled.elapsed;
    let given = match &args.model {
        Some(onnx) => Some(GivenModel::read(&sandbox, &module, onnx, &args)?),
        None => None,
    };
    let module = given.as_ref().map_or(module, |g| g.loaded.clone());
    // Only now: the compile is a publisher's or a first start's cost, not a tier's.
    let quota = match args.cpu_cores {
        Some(cores) => Some(SelfQuota::enter(cores)?),
        None => None,
    };

    let started = Instant::now();
    let mut instance = sandbox.instantiate(&module).map_err(anyhow::Error::msg)?;
    let instantiate = started.elapsed();
    let calls = 100_000;
    let started = Instant::now();
    for _ in 0..calls {
        instance.ping().map_err(anyhow::Error::msg)?;
    }
    let empty_call_ns = started.elapsed().as_nanos() as f64 / calls as f64;

    let mut variants = Vec::new();
    for (label, path) in &args.variant {
        eprintln!("loading variant {label}: {} ...", path.display());
        let mut loaded = sandbox.load_file(path, |probe, info| {
            isomesh_module::selftest::run(&mut probe.classifier(), info)
        })?;
        if let Some(given) = &given {
            loaded =
                sandbox.load_with_model(&loaded, given.model.clone(), None, |probe, info| {
                    isomesh_module::selftest::run(&mut probe.classifier(), info)
                })?;
        }
        variants.push(Variant {
            label: label.clone(),
            path: path.clone(),
            sha256: loaded.sha256.clone(),
            instance: sandbox.instantiate(&loaded).map_err(anyhow::Error::msg)?,
            infer_ms: Vec::new(),
            top1: Vec::new(),
        });
    }
    let mut wasm = Vec::new();
    let mut native = Vec::new();
    let mut wasm_top1 = Vec::new();
    let mut classify_calls = Boundary::default();
    let mut preprocess_calls = Boundary::default();
    let native_classifier = native_baseline(given.as_ref().map(|g| &g.model))?;
    for image in &images {
        // One untimed run each to warm caches, then alternate so drift hits both alike.
        let warm = instance.classify(image, 5).map_err(anyhow::Error::msg)?;
        wasm_top1.push(warm.top.first().map(|score| score.index));
        if let Some(native_classifier) = &native_classifier {
            native_classifier(image, Run::Timed)?;
        }
        for variant in &mut variants {
            let warm = variant
                .instance
                .classify(image, 5)
                .map_err(anyhow::Error::msg)?;
            variant.top1.push(warm.top.first().map(|score| score.index));
        }
        for _ in 0..args.iterations {
            let t = Instant::now();
            let answer = instance.classify(image, 5).map_err(anyhow::Error::msg)?;
            classify_calls.add(t.elapsed(), answer.decode_us + answer.infer_us);
            wasm.push(answer.infer_us as f64 / 1000.0);
            if let Some(native_classifier) = &native_classifier {
                native.push(native_classifier(image, Run::Timed)?.infer_ms);
            }
            for variant in &mut variants {
                let answer = variant
                    .instance
                    .classify(image, 5)
                    .map_err(anyhow::Error::msg)?;
                variant.infer_ms.push(answer.infer_us as f64 / 1000.0);
            }
            let t = Instant::now();
            if let Some(answer) = instance.preprocess(image) {
                let answer = answer.map_err(anyhow::Error::msg)?;
                preprocess_calls.add(t.elapsed(), answer.decode_us);
            }
        }
    }
    let profile = profile(&mut instance, native_classifier.as_ref(), &images)?;
    let rss_end = crate::common::own_status_kib("VmRSS:");
    let w = stats(&mut wasm);
    let n = native_classifier.is_some().then(|| stats(&mut native));
    let ratio = n.as_ref().map(|n| w.median / n.median);
    let variants_json: Vec<serde_json::Value> = variants
        .iter_mut()
        .map(|v| {
            let s = stats(&mut v.infer_ms);
            json!({"label": v.label, "path": v.path.display().to_string(), "sha256": v.sha256,
                   "infer_ms": s.to_json(), "over_native_median": n.as_ref().map(|n| s.median / n.median),
                   "over_module_median": s.median / w.median,
                   "top1_agrees_with_module": v.top1.iter().zip(&wasm_top1).filter(|(a, b)| a == b).count()})
        })
        .collect();
    let call_overhead = json!([
        {"task": "empty call", "call_us": empty_call_ns / 1000.0, "work_us": 0.0,
         "overhead_us": empty_call_ns / 1000.0, "overhead_fraction": 1.0},
        preprocess_calls.to_json("decode + resize only"),
        classify_calls.to_json("MobileNetV2 (decode + resize + inference)"),
    ]);
    // After the Wasm and native runs, so that neither shares the CPU with it.
    let onnxruntime = match &args.onnxruntime {
        Some(model) => {
            eprintln!("running the onnxruntime baseline...");
            Some(onnxruntime_baseline(model, &args, &wasm_top1, &scratch)?)
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
        // Each image's top-1 in Wasm, by the labels of the model served.
        "top1": wasm_top1.iter().map(|index| index.and_then(|i| module.info.labels.get(i as usize))).collect::<Vec<_>>(),
        "iterations_per_image": args.iterations,
        "cpu_cores": args.cpu_cores,
        "call_overhead": call_overhead,
        "infer_ms": {"wasm": w.to_json(), "native": n.as_ref().map(Stats::to_json), "wasm_over_native_median": ratio,
                     "wasm_over_onnxruntime_median": over_onnxruntime},
        "onnxruntime": onnxruntime,
        "variants": variants_json,
        "model": given.as_ref().map(GivenModel::to_json),
        "profile": profile,
        "empty_call_ns": empty_call_ns,
        "compile_ms": compile.map(ms),
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
    match &given {
        Some(given) => {
            println!(
                "{} ({} classes) served by the module's code, {} images x {} runs",
                given.path.display(),
                given.model.labels.len(),
                images.len(),
                args.iterations
            );
            println!(
                "  model handed in: plan built and self-tested in {:.0} ms, no compile ({})",
                ms(given.loaded.compiled.elapsed),
                given.checked.describe()
            );
        }
        None => println!(
            "MobileNetV2 inference, {} images x {} runs",
            images.len(),
            args.iterations
        ),
    }
    println!("  wasm   median {:.1} ms  p95 {:.1} ms", w.median, w.p95);
    match (&n, ratio) {
        (Some(n), Some(ratio)) => {
            println!("  native median {:.1} ms  p95 {:.1} ms", n.median, n.p95);
            println!("  wasm / native (median): {ratio:.2}x");
        }
        _ => println!("  native: not built into this isomesh-bench ({NOT_BUILT})"),
    }
    for v in &variants_json {
        println!(
            "  variant {}: median {:.1} ms, {:.2}x the module, {} of {} top-1 agree",
            v["label"].as_str().unwrap_or("?"),
            v["infer_ms"]["median"].as_f64().unwrap_or(f64::NAN),
            v["over_module_median"].as_f64().unwrap_or(f64::NAN),
            v["top1_agrees_with_module"],
            images.len()
        );
    }
    if let (Some(o), Some(over)) = (&onnxruntime, over_onnxruntime) {
        println!(
            "  onnxruntime (1 thread) median {:.1} ms; wasm / onnxruntime {over:.2}x",
            o["infer_ms"]["median"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!("  empty call into the module: {empty_call_ns:.0} ns");
    for (what, calls) in [
        ("decode only", &preprocess_calls),
        ("classification", &classify_calls),
    ] {
        if let Some((call_us, overhead_us)) = calls.medians() {
            println!(
                "  call overhead, {what}: {overhead_us:.1} us of {call_us:.0} us ({:.3}%)",
                100.0 * overhead_us / call_us
            );
        }
    }
    match compile {
        Some(compile) => println!("  compile {:.0} ms", ms(compile)),
        None => println!("  compiled code from {}", cache.display()),
    }
    println!(
        "  cached load {:.1} ms, instantiate + model plan {:.0} ms",
        ms(cached_load),
        ms(instantiate)
    );
    println!("  peak RSS {} MiB", rss_after_compile.unwrap_or(0) / 1024);
    println!("report: {}", args.out.display());
    drop(quota);
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// `--model`: a classifier served by the module's code in place of the one it embeds.
struct GivenModel {
    path: PathBuf,
    model: GuestModel,
    /// The module's code serving it (`Sandbox::load_with_model`).
    loaded: Arc<LoadedModule>,
    checked: isomesh_module::selftest::Checked,
}

impl GivenModel {
    fn read(
        sandbox: &Sandbox,
        code: &LoadedModule,
        onnx: &std::path::Path,
        args: &InferArgs,
    ) -> anyhow::Result<GivenModel> {
        let labels = args.labels.as_deref().context("--model needs --labels")?;
        let input = GuestInput {
            layout: args.input_layout as i32,
            side: args.input_side,
        };
        let model = isomesh_module::model::read(onnx, labels, input)?;
        eprintln!(
            "handing {} ({} labels, {}, {} px) to the module's code ...",
            onnx.display(),
            model.labels.len(),
            isomesh_module::model::layout_name(args.input_layout),
            args.input_side
        );
        let mut checked = None;
        let loaded = sandbox.load_with_model(code, model.clone(), None, |probe, info| {
            isomesh_module::selftest::run_saying(&mut probe.classifier(), info).map(
                |(service, how)| {
                    checked = Some(how);
                    service
                },
            )
        })?;
        Ok(GivenModel {
            path: onnx.to_owned(),
            model,
            loaded,
            checked: checked.context("the self-test did not run")?,
        })
    }

    fn to_json(&self) -> serde_json::Value {
        let input = self.model.input.unwrap_or_default();
        json!({"path": self.path.display().to_string(), "sha256": self.model.sha256,
               "bytes": self.model.onnx.len(), "classes": self.model.labels.len(),
               "input_layout": isomesh_module::model::layout_name(input.layout()),
               "input_side": input.side,
               "swap_in_ms": ms(self.loaded.compiled.elapsed),
               "self_test": self.checked.describe()})
    }
}

/// Calls across the sandbox boundary: the time the host saw each take, and the work the guest
/// measured inside it. The difference is what the boundary costs (copying the image in, the
/// call, the protobuf answer out, freeing it).
#[derive(Default)]
struct Boundary {
    call_us: Vec<f64>,
    work_us: Vec<f64>,
    overhead_us: Vec<f64>,
}

impl Boundary {
    fn add(&mut self, call: Duration, work_us: u64) {
        let call_us = call.as_secs_f64() * 1e6;
        self.call_us.push(call_us);
        self.work_us.push(work_us as f64);
        self.overhead_us.push(call_us - work_us as f64);
    }

    /// Median call and median overhead, us.
    fn medians(&self) -> Option<(f64, f64)> {
        if self.call_us.is_empty() {
            return None;
        }
        let median = |v: &[f64]| stats(&mut v.to_vec()).median;
        Some((median(&self.call_us), median(&self.overhead_us)))
    }

    fn to_json(&self, task: &str) -> serde_json::Value {
        let Some((call_us, overhead_us)) = self.medians() else {
            return json!({"task": task, "missing": "the module exports no isomesh_preprocess"});
        };
        json!({"task": task, "call_us": call_us,
               "work_us": stats(&mut self.work_us.clone()).median,
               "overhead_us": overhead_us, "overhead_fraction": overhead_us / call_us,
               "n": self.call_us.len()})
    }
}

/// This process, moved into a CPU-limited cgroup for as long as the value lives (then out of
/// it, so the group can be removed).
struct SelfQuota(CpuQuota);

impl SelfQuota {
    fn enter(cores: f64) -> anyhow::Result<SelfQuota> {
        // 10 ms periods: every job runs slower, as on a slower CPU, rather than a job that fits
        // a 100 ms allowance running at full speed (native tract's 20 ms did, at 0.5 cores).
        let quota = CpuQuota::with_period(
            &format!("infer-{}", std::process::id()),
            cores,
            Duration::from_millis(10),
        )?;
        quota.add(std::process::id())?;
        eprintln!("measuring on {cores} cores of CPU time");
        Ok(SelfQuota(quota))
    }
}

impl Drop for SelfQuota {
    fn drop(&mut self) {
        self.0.release(std::process::id());
    }
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

/// Where an inference's time goes, in Wasm and natively, by kind of operation (tract's own names):
/// one profiled classification of every image on each side, after the timed runs. Per operation,
/// the mean ms an image and Wasm/native; most expensive in Wasm first. Empty when the module
/// exports no `isomesh_profile`.
fn profile(
    instance: &mut isomesh_sandbox::Instance,
    native: Option<&NativeRun>,
    images: &[Vec<u8>],
) -> anyhow::Result<serde_json::Value> {
    // (op, nodes, Wasm ns, native ns), summed over the images.
    let mut ops: Vec<(String, u32, u64, u64)> = Vec::new();
    let mut add = |op: &str, nodes: u32, ns: u64, in_wasm: bool| {
        let ix = match ops.iter().position(|o| o.0 == op) {
            Some(ix) => ix,
            None => {
                ops.push((op.to_string(), nodes, 0, 0));
                ops.len() - 1
            }
        };
        if in_wasm {
            ops[ix].2 += ns;
        } else {
            ops[ix].3 += ns;
        }
    };
    for image in images {
        let Some(answer) = instance.profile(image, 5) else {
            return Ok(json!([]));
        };
        for op in answer.map_err(anyhow::Error::msg)?.ops {
            add(&op.op, op.nodes, op.ns, true);
        }
        if let Some(native) = native {
            for (op, nodes, ns) in native(image, Run::Profiled)?.ops {
                add(&op, nodes, ns, false);
            }
        }
    }
    ops.sort_by_key(|o| std::cmp::Reverse(o.2));
    let per_image = |ns: u64| ns as f64 / 1e6 / images.len() as f64;
    Ok(ops
        .into_iter()
        .map(|(op, nodes, wasm, native_ns)| {
            let native_ms = native.map(|_| per_image(native_ns));
            json!({"op": op, "nodes": nodes, "wasm_ms": per_image(wasm), "native_ms": native_ms,
                   "wasm_over_native": native_ms.filter(|n| *n > 0.0).map(|n| per_image(wasm) / n)})
        })
        .collect())
}

/// What the native baseline is asked to do with an image.
#[derive(Debug, Clone, Copy)]
enum Run {
    /// Classify it, for its inference time.
    Timed,
    /// Classify it with the time of each kind of operation (`Classifier::profile`).
    Profiled,
}

/// One native classification.
#[derive(Debug, Default)]
struct NativeAnswer {
    infer_ms: f64,
    /// `Run::Profiled` only: (operation, nodes, ns).
    ops: Vec<(String, u32, u64)>,
}

/// The native baseline: classifies an image on its own thread.
type NativeRun = Box<dyn Fn(&[u8], Run) -> anyhow::Result<NativeAnswer>>;

/// How to get the native baseline into a build that lacks it.
const NOT_BUILT: &str =
    "`make bench` builds it: cargo build --features isomesh-bench/native-baseline";

/// Runs the native classifier on a thread of its own. tract's native kernels are hand-written
/// AVX assembly that can leave the upper halves of the vector registers dirty; on the thread that
/// runs them, the SSE code Cranelift emits for Wasm then ran ~250x slower here (9.3 s instead of
/// 35 ms per image). Apart, each keeps its own register state.
#[cfg(feature = "native-baseline")]
fn native_baseline(given: Option<&GuestModel>) -> anyhow::Result<Option<NativeRun>> {
    use isomesh_guest::preprocess::InputSpec;
    let (images, requests) = std::sync::mpsc::channel::<(Vec<u8>, Run)>();
    let (results, answers) = std::sync::mpsc::channel::<Result<NativeAnswer, String>>();
    let given = given.cloned();
    std::thread::Builder::new()
        .name("native-baseline".into())
        .spawn(move || {
            let loaded = match given {
                None => isomesh_guest::Classifier::load(),
                Some(model) => isomesh_guest::Classifier::from_onnx(
                    &model.onnx,
                    model.labels,
                    InputSpec::from_guest(model.input.as_ref()),
                ),
            };
            let classifier = match loaded {
                Ok(classifier) => classifier,
                Err(e) => {
                    let _ = results.send(Err(e.to_string()));
                    return;
                }
            };
            while let Ok((image, run)) = requests.recv() {
                let answer = match run {
                    Run::Timed => classifier.classify(&image, 5).map(|a| NativeAnswer {
                        infer_ms: a.infer_us as f64 / 1000.0,
                        ops: Vec::new(),
                    }),
                    Run::Profiled => classifier.profile(&image, 5).map(|(a, ops)| NativeAnswer {
                        infer_ms: a.infer_us as f64 / 1000.0,
                        ops: ops.into_iter().map(|t| (t.op, t.nodes, t.ns)).collect(),
                    }),
                }
                .map_err(|e| e.to_string());
                if results.send(answer).is_err() {
                    return;
                }
            }
        })?;
    Ok(Some(Box::new(move |image: &[u8], run: Run| {
        images.send((image.to_vec(), run))?;
        answers
            .recv()?
            .map_err(|e| anyhow::anyhow!("native classifier: {e}"))
    })))
}

/// Without the `native-baseline` feature: no native column (said once, on stderr).
#[cfg(not(feature = "native-baseline"))]
fn native_baseline(_given: Option<&GuestModel>) -> anyhow::Result<Option<NativeRun>> {
    eprintln!("native tract baseline: not built into this isomesh-bench ({NOT_BUILT})");
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_is_a_label_and_a_module() {
        assert_eq!(
            parse_variant("relaxed-simd=target/variants/a=b.wasm"),
            Ok((
                "relaxed-simd".to_string(),
                PathBuf::from("target/variants/a=b.wasm")
            ))
        );
        for bad in ["module.wasm", "=module.wasm", "label=", ""] {
            let error = parse_variant(bad).expect_err(bad);
            assert!(error.contains("LABEL=MODULE.wasm"), "{bad}: {error}");
        }
    }
}
