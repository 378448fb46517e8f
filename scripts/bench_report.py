#!/usr/bin/env python3
"""Turns the JSON of `make bench` into one Markdown report and its plots.

    python3 scripts/bench_report.py BENCH_DIR MARKDOWN_OUT PLOT_DIR

BENCH_DIR holds what the benchmarks wrote (infer*.json, swap*.json, container.json,
offload.json, offload-steady.json, mesh.json); a missing file makes its section say so
instead of failing, so the quick CI run and a partial run still get a report. Each section puts our figure beside the
paper's (Kuribayashi et al., WF-IoT 2023). Ratios are taken inside one run only: this machine
is shared and noisy, so a ratio of two runs would mostly measure the neighbours.
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TIERS = [("device", "infer-device.json"), ("edge", "infer-edge.json"),
         ("cloud", "infer-cloud.json"), ("whole machine", "infer.json")]


def load(bench_dir, name):
    path = os.path.join(bench_dir, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def fmt(value, digits=1, unit=""):
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}{unit}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def inference(bench_dir, plots, out):
    runs = [(tier, load(bench_dir, name)) for tier, name in TIERS]
    runs = [(tier, run) for tier, run in runs if run]
    out.append("## Inference across tiers (`isomesh bench infer`)\n")
    if not runs:
        out.append("Not run.\n")
        return
    out.append("Paper: MobileNetV2 in ~0.6 s on a Raspberry Pi 4. Goal: Wasm within 1.3x of "
               "native tract. Each row is one run: the module in Wasm, the same guest crate "
               "natively and onnxruntime (Python, one thread) alternate on the same photos, "
               "under a cgroup CPU quota of the tier's cores.\n")
    rows, bars = [], []
    for tier, run in runs:
        cores = run.get("cpu_cores")
        infer = run["infer_ms"]
        ort = (run.get("onnxruntime") or {}).get("infer_ms", {}).get("median")
        rows.append([tier, fmt(cores, 2) if cores else "all",
                     fmt(infer["wasm"]["median"]), fmt(infer["wasm"]["p95"]),
                     fmt((infer.get("native") or {}).get("median")), fmt(ort),
                     fmt(infer["wasm_over_native_median"], 2, "x"),
                     fmt(infer.get("wasm_over_onnxruntime_median"), 2, "x"),
                     fmt(600 / infer["wasm"]["median"], 0, "x")])
        bars.append((f"{tier}\n({fmt(cores, 2) if cores else 'all'} cores, "
                     f"n={infer['wasm'].get('n', '?')})",
                     infer["wasm"], infer["native"],
                     (run.get("onnxruntime") or {}).get("infer_ms")))
    out.append(table(["tier", "cores", "Wasm median ms", "Wasm p95 ms", "native tract ms",
                      "onnxruntime ms", "Wasm / native", "Wasm / onnxruntime",
                      "paper's 0.6 s / ours"], rows))
    if any(not run["infer_ms"].get("native") for _, run in runs):
        out.append("\nNative tract: not built into this `isomesh-bench` (`make bench` builds it "
                   "with `--features isomesh-bench/native-baseline`; `make bench-quick` and the "
                   "tests' build leave it out).\n")
    whole = dict(runs).get("whole machine")
    if whole:
        compile_ms = whole.get("compile_ms")
        # With a warm --cache-dir (make bench keeps target/bench-cache) nothing is compiled:
        # the swap benchmark's cold restart measures a compile then.
        compiled = (f"Cranelift compile {fmt(compile_ms / 1000, 1)} s cold" if compile_ms
                    else "compiled code from the cache (the cold compile: the swap "
                         "benchmark's process restart with a cold cache)")
        out.append(f"\nModule {whole['module']['bytes'] / 1e6:.1f} MB; {compiled}, cached load "
                   f"{fmt(whole['cached_load_ms'], 1)} ms, instantiate + model plan "
                   f"{fmt(whole['instantiate_with_model_plan_ms'], 0)} ms. ResNet-50: no weights "
                   f"in ../shared/models, not measured.\n")
    # Bar lengths are read, so the axis is linear; whiskers run from the fastest run to p95
    # (the runs record no p5). No line for the paper's Raspberry Pi: other hardware.
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.27
    for i, (label, color) in enumerate([("Wasm (isomesh)", "#1f77b4"),
                                        ("native tract", "#ff7f0e"),
                                        ("onnxruntime", "#2ca02c")]):
        xs = [n + (i - 1) * width for n in range(len(bars))]
        stats = [b[1 + i] or {} for b in bars]
        ys = [st.get("median") or 0 for st in stats]
        low = [max(y - st.get("min", y), 0) for y, st in zip(ys, stats)]
        high = [max(st.get("p95", y) - y, 0) for y, st in zip(ys, stats)]
        ax.bar(xs, ys, width, label=label, color=color, yerr=[low, high], capsize=2,
               error_kw={"elinewidth": 0.8, "ecolor": "#333333"})
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("MobileNetV2 per photo, ms (median)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("Inference per tier CPU quota, this machine (whiskers: fastest to p95)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(plots, "infer.png"), dpi=110)
    plt.close(fig)
    out.append("\n![inference per tier](infer.png)\n")

    out.append("## Call overhead (`isomesh bench infer`)\n")
    out.append("Paper: the cost of crossing into Wasm is limited and negligible for complex "
               "work. Ours: the host times each call; the guest times its own work inside it; "
               "the difference is the boundary (copying the photo in, the call, the protobuf "
               "answer out, freeing it).\n")
    rows, bars = [], []
    for tier, run in runs:
        for task in run.get("call_overhead", []):
            if "call_us" not in task:
                continue
            rows.append([tier, task["task"], fmt(task["call_us"], 2), fmt(task["work_us"], 0),
                         fmt(task["overhead_us"], 2), fmt(100 * task["overhead_fraction"], 3, "%")])
            if tier == runs[-1][0]:
                bars.append(task)
    out.append(table(["tier", "task", "call us", "work inside us", "overhead us",
                      "overhead / call"], rows))
    if bars:
        # Bar lengths are read: a linear axis of the boundary's cost in microseconds (about the
        # same whatever the call carries), each bar labelled with its share of the whole call.
        fig, ax = plt.subplots(figsize=(7.5, 2.6))
        names = [b["task"].replace(" (decode + resize + inference)", "\n(decode, resize, infer)")
                 for b in bars]
        ax.barh(names, [b["overhead_us"] for b in bars], color="#9467bd")
        for y, b in enumerate(bars):
            ax.annotate(f" {b['overhead_us']:.2f} µs = {100 * b['overhead_fraction']:.3g}% of a "
                        f"{b['call_us'] / 1000:.3g} ms call" if b["work_us"] else
                        f" {b['overhead_us'] * 1000:.0f} ns (nothing inside)",
                        (b["overhead_us"], y), va="center", fontsize=8)
        ax.set_xlim(0, max(b["overhead_us"] for b in bars) * 2.2)
        ax.set_xlabel("boundary overhead per call, µs")
        ax.set_title(f"Call overhead by task ({runs[-1][0]}, one run)", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(plots, "call_overhead.png"), dpi=110)
        plt.close(fig)
        out.append("\n![call overhead](call_overhead.png)\n")


def where_time_goes(bench_dir, out):
    """The whole-machine run's profile (the guest's `isomesh_profile`, natively the same call) and
    the module builds timed beside it (`--variant`)."""
    run = load(bench_dir, "infer.json")
    if not run:
        return
    out.append("## Where the Wasm time goes (`isomesh bench infer`, whole machine)\n")
    profile = run.get("profile") or []
    if not profile:
        out.append("No profile: the module exports no `isomesh_profile`.\n")
    else:
        out.append("One profiled classification of every photo in Wasm and natively, by kind of "
                   "operation of tract's plan (mean per photo). The rest of the plan's "
                   "operations take under 0.1 ms each.\n")
        rows = [[f"`{o['op']}`", o["nodes"], fmt(o["wasm_ms"], 2), fmt(o.get("native_ms"), 2),
                 fmt(o.get("wasm_over_native"), 2, "x")]
                for o in profile if o["wasm_ms"] >= 0.1 or (o.get("native_ms") or 0) >= 0.1]
        total_wasm = sum(o["wasm_ms"] for o in profile)
        total_native = sum(o.get("native_ms") or 0 for o in profile)
        rows.append(["all", sum(o["nodes"] for o in profile), fmt(total_wasm, 2),
                     fmt(total_native or None, 2),
                     fmt(total_wasm / total_native if total_native else None, 2, "x")])
        out.append(table(["operation", "nodes", "Wasm ms", "native ms", "Wasm / native"], rows))
    variants = run.get("variants") or []
    if variants:
        out.append("\nOther builds of the module, timed in the same run (each photo's runs "
                   "alternate between all of them and native tract):\n")
        rows = [["`--module` (as shipped)", fmt(run["infer_ms"]["wasm"]["median"]), "1.00x",
                 fmt(run["infer_ms"].get("wasm_over_native_median"), 2, "x"), "-"]]
        rows += [[v["label"], fmt(v["infer_ms"]["median"]), fmt(v["over_module_median"], 2, "x"),
                  fmt(v.get("over_native_median"), 2, "x"),
                  f"{v['top1_agrees_with_module']} of {len(run['images'])}"]
                 for v in variants]
        out.append(table(["build", "median ms", "/ shipped", "/ native", "same top-1"], rows))
    out.append("")


def update(bench_dir, out):
    out.append("## Update time (`isomesh bench swap`, `scripts/bench_container.py`)\n")
    out.append("Paper: ~1.4 s to restart the Wasm runtime on a new module vs 10+ s to reboot "
               "firmware (7x).\n")
    swap = load(bench_dir, "swap.json")
    if swap:
        restart = swap["restart_baseline_ms"]
        rows = [
            ["hot swap: `isomesh rollout` start to every node serving",
             " / ".join(fmt(v / 1000, 2) for v in swap["rollout_to_serving_ms"]) + " s"],
            ["hot swap: published to serving, per node",
             " / ".join(fmt(v / 1000, 2) for v in swap["published_to_serving_ms"]) + " s"],
            ["jobs during the run: sent / failed / lost",
             f"{swap['jobs']['sent']} / {swap['jobs']['failed']} / {swap['jobs']['lost']}"],
            ["job p99 before vs during the swap",
             f"{fmt(swap['latency_ms']['before']['p99'], 0)} vs "
             f"{fmt(swap['latency_ms']['during_swap']['p99'], 0)} ms "
             f"({fmt(swap['latency_ms']['p99_during_over_before'], 2)}x)"],
            ["process restart to first answer, cold cache (compiles)",
             fmt(restart.get("cold_cache", 0) / 1000, 2) + " s"],
            ["process restart to first answer, warm cache",
             fmt(restart.get("warm_cache", 0) / 1000, 2) + " s"],
        ]
        compile_run = load(bench_dir, "swap-compile.json")
        if compile_run:
            rows.append(["hot swap without precompiled code (every node compiles)",
                         fmt(compile_run["rollout_to_all_serving_ms"] / 1000, 1) + " s, p99 "
                         + fmt(compile_run["latency_ms"]["p99_during_over_before"], 1) + "x"])
        model_run = load(bench_dir, "swap-model.json")
        if model_run:
            manifest = model_run.get("published_manifest") or {}
            module = manifest.get("module") or {}
            rows += [
                ["model rollout (model only, same code): `isomesh rollout --model` start to "
                 "every node serving",
                 " / ".join(fmt(v / 1000, 2) for v in model_run["rollout_to_serving_ms"]) + " s"],
                ["model rollout: command start to published, then published to serving per node",
                 secs(model_run["rollout_to_published_ms"], 2) + "; "
                 + " / ".join(fmt(v / 1000, 2) for v in model_run["published_to_serving_ms"])
                 + " s"],
                ["model rollout, on each node: fetch; check and write (CPU); plan; self-test; "
                 "from the file to serving (CPU)",
                 " / ".join(model_phases(n.get("phases") or {})
                            for n in model_run["model_rollout"]["node_log"])],
                ["model rollout: bytes published (model file, stored)",
                 f"{module.get('size', 0) / 1e6:.1f} MB ({module.get('stored_size', 0) / 1e6:.1f}"
                 " MB in chunks)"],
                ["model rollout: nodes that compiled nothing",
                 f"{sum(n['nothing_compiled'] for n in model_run['model_rollout']['node_log'])}"
                 f" of {len(model_run['model_rollout']['node_log'])}"],
                ["model rollout: jobs sent / failed / lost; p99 before vs during",
                 f"{model_run['jobs']['sent']} / {model_run['jobs']['failed']} / "
                 f"{model_run['jobs']['lost']}; "
                 f"{fmt(model_run['latency_ms']['before']['p99'], 0)} vs "
                 f"{fmt(model_run['latency_ms']['during_swap']['p99'], 0)} ms "
                 f"({fmt(model_run['latency_ms']['p99_during_over_before'], 2)}x)"],
            ]
        out.append(table(["process mesh, one run", "value"], rows))
    else:
        out.append("`swap.json`: not run.")
    arm64(bench_dir, swap, out)
    container = load(bench_dir, "container.json")
    if container:
        out.append("\nIn the compose mesh (real containers, the device node at 0.25 CPU), one "
                   "run under the same photo stream:\n")
        out.append(container_table(container))
    else:
        out.append("\n`container.json`: not run.")
    out.append("")


def secs(value_ms, digits=1):
    """Milliseconds as seconds, "-" when missing."""
    return fmt(None if value_ms is None else value_ms / 1000, digits, " s")


def size(n):
    """Bytes as MB, with the exact count."""
    return f"{n / 1e6:.1f} MB ({n:,} B)"


# `isomesh bench swap --arm64`: with the aarch64 code in the rollout, and with --no-precompile.
ARM64_RUNS = [("swap-arm64.json", "with its precompiled artifact"),
              ("swap-arm64-compile.json", "compiling itself")]


def arm64(bench_dir, swap, out):
    """The aarch64 node of `isomesh bench swap --arm64` and the published artifacts' sizes."""
    runs = [(how, run) for name, how in ARM64_RUNS
            for run in [load(bench_dir, name)] if run and run.get("arm64")]
    if runs:
        out.append("\nOne more node, the aarch64 `isomesh-node` as a device, run on this x86_64 "
                   "machine by `qemu-aarch64-static` beside the x86_64 nodes of the same run "
                   "(one run each). Emulated, not a board: its times are qemu's, far slower "
                   "than a Raspberry Pi's, and only say what it does, not how fast a board "
                   "would. It started on the first module's aarch64 code compiled here.\n")
        rows = []
        for how, run in runs:
            arm = run["arm64"]
            # The node's "module swapped in" line: the load (or compile), then until it served.
            if arm.get("from_cache") is None:
                compiled = "-"
            elif arm["from_cache"]:
                compiled = (f"no compile: loaded the published code in "
                            f"{secs(arm.get('compile_ms'))}, ready after {secs(arm.get('ready_ms'))}")
            else:
                compiled = (f"compiled the module itself in {secs(arm.get('compile_ms'))}, "
                            f"ready after {secs(arm.get('ready_ms'))}")
            rows.append([f"aarch64 node under qemu (emulated, not a board): rollout to serving "
                         f"{how}",
                         secs(arm.get("rollout_to_serving_ms")),
                         secs(arm.get("published_to_serving_ms")),
                         compiled,
                         secs(run.get("rollout_to_all_serving_ms"), 2)])
        out.append(table(["run", "rollout start to serving", "published to serving",
                          "on the node", "x86_64 nodes, same run: all serving"], rows))
    # The manifest with the most artifacts (the --arm64 run's carries aarch64 code too).
    manifests = [run["published_manifest"] for run in [r for _, r in runs] + [swap]
                 if run and run.get("published_manifest")]
    manifest = max(manifests, key=lambda m: len(m["artifacts"]), default=None)
    if manifest:
        module = manifest["module"]
        stored = module.get("stored_size") or module["size"]
        rows = [[f"module {manifest['name']} {manifest['version']} (.wasm)", "-",
                 size(module["size"]), size(stored)]]
        for artifact in manifest["artifacts"]:
            stored = artifact.get("stored_size") or artifact["size"]
            rows.append([f"precompiled for {artifact['target']} ({artifact['engine_kind']})",
                         f"`{artifact['engine'][:16]}`", size(artifact["size"]), size(stored)])
        encoding = manifest.get("encoding")
        stored_as = f"{encoding}-compressed" if encoding else "as they are"
        out.append(f"\nWhat the rollout published (its signed manifest, read back from the broker; "
                   f"chunks stored {stored_as}):\n")
        out.append(table(["blob", "engine", "size", "stored in chunks"], rows))


def model_phases(p):
    """One node's model-rollout phases (`isomesh bench swap --model`), in ms."""
    ms = lambda k: "-" if p.get(k) is None else f"{p[k]}"
    check_write = ("-" if p.get("check_ms") is None or p.get("write_ms") is None
                   else f"{p['check_ms'] + p['write_ms']}")
    return (f"{ms('fetch_ms')}; {check_write} ({ms('install_cpu_ms')}); {ms('plan_ms')}; "
            f"{ms('self_test_ms')}; {ms('ready_ms')} ({ms('ready_cpu_ms')}) ms")


def container_table(container):
    """`scripts/bench_container.py`'s phases side by side."""
    restart, swap = container.get("restart") or {}, container.get("swap") or {}
    model = container.get("model_swap") or {}
    camera = (container.get("camera") or {}).get("summary") or {}
    phases = [restart, swap, model]
    rows = [
        ["command (restart; rollout incl. its compile, if any, and `--wait`)"]
        + [fmt(p.get("command_s"), 1) + " s" for p in phases],
        ["command start to the first answer after the update",
         fmt(restart.get("next_answer_s"), 1) + " s"]
        + [fmt(p.get("first_new_version_s"), 1) + " s" for p in phases[1:]],
        ["`isomesh rollout` start (in its container) to d1 serving, as the command saw it", "-"]
        + [fmt(p.get("rollout_to_serving_s"), 2) + " s" for p in phases[1:]],
        ["longest gap between answers"] + [fmt(p.get("longest_gap_s"), 2) + " s" for p in phases],
        ["answers while it went on"] + [p.get("answers_during", "-") for p in phases],
        ["error answers"] + [p.get("error_answers", "-") for p in phases],
        ["jobs lost"] + [len(p.get("lost", [])) for p in phases],
        ["slowest round trip"] + [fmt(p.get("max_round_trip_ms"), 0) + " ms" for p in phases],
    ]
    return (table(["", "container restart (d1)", "hot swap 0.1.0 -> 0.2.0 (d1)",
                   "model rollout 0.3.0 on 0.2.0's code (d1)"], rows)
            + f"\n\nCamera: sent {camera.get('sent')}, answered {camera.get('answered')}, "
            f"missing {camera.get('missing')}, errors {camera.get('errors')}, "
            f"duplicates {camera.get('duplicates')}.")


def offload(bench_dir, out):
    out.append("## Offload (`isomesh bench offload`)\n")
    data = load(bench_dir, "offload.json")
    if not data:
        out.append("Not run.\n")
        return
    rows = []
    for run in data["runs"]:
        rows.append([f"{run['load']}x", run["policy"], fmt(100 * run["hit_rate"], 1, "%"),
                     f"{fmt(run['latency_ms']['median'], 0)} / {fmt(run['latency_ms']['p99'], 0)}",
                     " / ".join(str(run["ran_on"][t]) for t in ("device", "edge", "cloud")),
                     run["lost"] + run["failed"]])
    out.append(f"Device capacity {fmt(data['device_capacity_per_s'], 2)} jobs/s, budget "
               f"{data['setup']['budget_ms']} ms.\n")
    out.append(table(["load", "policy", "in budget", "p50 / p99 ms",
                      "ran on device / edge / cloud", "lost + failed"], rows))
    out.append("\n![offload](offload.png)\n")


def offload_steady(bench_dir, plots, out):
    out.append("## Offload stability (`isomesh bench offload --arrivals steady --repeat N`)\n")
    data = load(bench_dir, "offload-steady.json")
    if not data:
        out.append("Not run.\n")
        return
    setup = data["setup"]
    runs = data["runs"]
    out.append(f"The same steady stream for {setup['duration_s']} s with a {setup['budget_ms']} ms "
               f"budget, sent to the device of a fresh mesh {setup['repeat']} times per policy and "
               f"load (load: a multiple of the device's capacity of "
               f"{fmt(data['device_capacity_per_s'], 1)} jobs/s). No CPU quotas: the device, both "
               "edges and the cloud share the machine's cores, as nodes on one box do. CPU demand: "
               "what the nodes and the broker used, per second of the stream, as a share of all "
               "the cores (over 100%: more than the machine can serve). Goal: every budget-policy "
               "run of a stream the machine can serve at least 90% in budget, none below "
               "local-only.\n")
    rows = []

    def median(values):
        values = sorted(v for v in values if v is not None)
        return values[len(values) // 2] if values else None
    for d in data["distributions"]:
        mine = [r for r in runs if r["policy"] == d["policy"] and r["load"] == d["load"]]
        h = d["hit_rate"]
        demand = [100 * r["cpu"]["cpu_demand_share"] for r in mine if "cpu" in r]
        per_job = [r["cpu"]["cpu_ms_per_job"] for r in mine if "cpu" in r]
        rows.append([f"{d['load']}x ({fmt(mine[0]['rate_per_s'], 1) if mine else '-'}/s)",
                     d["policy"], d["runs"],
                     " / ".join(fmt(100 * h[k], 1, "%") if h[k] is not None else "-"
                                for k in ("min", "p10", "median", "max")),
                     d["runs_below_90_percent"],
                     f"{fmt(min(demand), 0, '%')} - {fmt(max(demand), 0, '%')}" if demand else "-",
                     fmt(median(per_job), 1),
                     median([r["fallbacks"] for r in mine]), median([r["wasted_runs"] for r in mine]),
                     sum(r["lost"] + r["failed"] for r in mine)])
    out.append(table(["load", "policy", "runs", "in budget: min / p10 / median / max",
                      "runs below 90%", "CPU demand (min - max)", "CPU ms a job (median run)",
                      "fallbacks (median run)", "jobs run twice (median run)",
                      "lost + failed (all runs)"], rows))
    fig, ax = plt.subplots(figsize=(7, 3))
    labels = [f"{d['policy']}\n{d['load']}x" for d in data["distributions"]]
    for i, d in enumerate(data["distributions"]):
        shares = [100 * s for s in d["hit_rates"]]
        # Spread equal values sideways so twenty runs stay countable.
        xs = [i + 0.25 * ((k % 9) - 4) / 4 for k in range(len(shares))]
        ax.scatter(xs, shares, s=14, alpha=0.8)
    ax.axhline(90, color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, 102)
    ax.set_ylabel("jobs in budget, % (one dot a run)")
    ax.set_title(f"Steady stream, shared cores: {setup['repeat']} runs per policy and load",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(plots, "offload_steady.png"), dpi=110)
    plt.close(fig)
    out.append("\n![offload stability](offload_steady.png)\n")


def mesh(bench_dir, plots, out):
    out.append("## Mesh throughput and latency (`isomesh bench mesh`)\n")
    data = load(bench_dir, "mesh.json")
    if not data:
        out.append("Not run.\n")
        return
    setup = data["setup"]
    out.append(f"Edge nodes sharing the tier's queue, each held to "
               f"{setup['node_cores'] or 'all'} cores; photos of {setup['mean_photo_bytes'] // 1000} KB "
               f"mean, QoS 1. Latency: one job at a time. Throughput: twice as many jobs in "
               f"flight as nodes. Goal: scaling efficiency >= 90%.\n")
    if any(r.get("broker_members", 1) > 1 for r in data["runs"]):
        out.append("`isomesh-broker x3`: three isomesh-brokers as one cluster (`--cluster-*`), the "
                   "benchmark's client on member 1 and the nodes on the others first (node i on "
                   "member (i + 1) % 3 + 1), so each job and its answer cross the cluster: its "
                   "rows against `isomesh-broker`'s are the cluster's cost.\n")
    rows = []
    for run in data["runs"]:
        lat = run["latency"]["latency_ms"]
        thr = run["throughput"]
        lost = (run["latency"]["lost"] + run["latency"]["failed"]
                + thr["loaded"]["lost"] + thr["loaded"]["failed"])
        dup = run["latency"]["duplicates"] + thr["loaded"]["duplicates"]
        rows.append([run["broker"], run["nodes"], fmt(lat["median"]), fmt(lat["p99"]),
                     fmt(thr["photos_per_s"], 2), fmt(100 * (run.get("scaling_efficiency") or 0), 0, "%"),
                     f"{fmt(thr['loaded']['latency_ms']['median'], 0)} / "
                     f"{fmt(thr['loaded']['latency_ms']['p99'], 0)}", f"{lost} / {dup}"])
    out.append(table(["broker", "nodes", "p50 ms", "p99 ms", "photos/s", "efficiency",
                      "loaded p50 / p99 ms", "lost / duplicated"], rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.4))
    # One colour per broker in both panels.
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    brokers = sorted({r["broker"] for r in data["runs"]})
    colors = {b: palette[i % len(palette)] for i, b in enumerate(brokers)}
    for broker in brokers:
        mine = [r for r in data["runs"] if r["broker"] == broker]
        nodes = [r["nodes"] for r in mine]
        color = colors[broker]
        left.plot(nodes, [r["throughput"]["photos_per_s"] for r in mine], "o-", label=broker,
                  color=color)
        right.plot(nodes, [r["latency"]["latency_ms"]["median"] for r in mine], "o-",
                   label=f"{broker} p50", color=color)
        right.plot(nodes, [r["latency"]["latency_ms"]["p99"] for r in mine], "x--",
                   label=f"{broker} p99", color=color)
        one = next((r for r in mine if r["nodes"] == 1), None)
        if one and broker == "isomesh-broker":
            rate = one["throughput"]["photos_per_s"]
            left.plot(nodes, [n * rate for n in nodes], ":", color="grey", label="ideal")
    counts = sorted({r["nodes"] for r in data["runs"]})
    left.set_xticks(counts)
    right.set_xticks(counts)
    left.set_xlabel("nodes")
    left.set_ylabel("photos/s")
    left.legend(fontsize=7)
    right.set_xlabel("nodes")
    right.set_ylabel("round trip, ms")
    right.legend(fontsize=7)
    jobs = sorted({r["latency"]["latency_ms"].get("n") for r in data["runs"]} - {None})
    sample = f", {'/'.join(str(j) for j in jobs)} jobs per latency point" if jobs else ""
    fig.suptitle(f"Mesh through the broker (one run{sample})", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(plots, "mesh.png"), dpi=110)
    plt.close(fig)
    out.append("\n![mesh](mesh.png)\n")

    out.append("## Memory (`isomesh bench mesh`)\n")
    memory = data.get("memory") or {}
    rows = [[r["workers"], fmt((r["idle_kib"] or 0) / 1024, 0), fmt((r["after_load_kib"] or 0) / 1024, 0),
             fmt((r["peak_kib"] or 0) / 1024, 0)] for r in memory.get("by_workers", [])]
    out.append(table(["workers (sandbox instances)", "RSS idle MiB", "RSS after load MiB",
                      "peak MiB"], rows))
    per = memory.get("per_extra_instance_kib") or {}
    out.append(f"\nEach extra instance: {fmt((per.get('idle') or 0) / 1024, 0)} MiB idle, "
               f"{fmt((per.get('after_load') or 0) / 1024, 0)} MiB after load (least-squares "
               f"slope over the worker counts).\n")


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    bench_dir, markdown, plots = sys.argv[1:]
    os.makedirs(plots, exist_ok=True)
    machine = next((d["machine"] for d in (load(bench_dir, n) for n in
                    ("infer.json", "mesh.json", "swap.json", "offload.json")) if d), None)
    out = ["# Benchmarks\n",
           "Generated by `make bench` (`scripts/bench_report.py`) from the JSON in "
           f"`{bench_dir}/`. Machine: "
           + (f"{machine['cpu']}, {machine['cores']} cores" if machine else "unknown")
           + ", shared with other work: compare ratios within a run, not across runs.\n"]
    update(bench_dir, out)
    inference(bench_dir, plots, out)
    where_time_goes(bench_dir, out)
    mesh(bench_dir, plots, out)
    offload(bench_dir, out)
    offload_steady(bench_dir, plots, out)
    with open(markdown, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {markdown} and plots in {plots}")


if __name__ == "__main__":
    main()
