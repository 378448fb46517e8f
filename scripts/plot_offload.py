#!/usr/bin/env python3
"""Plots `isomesh bench offload`'s JSON: latency CDF per policy at each load, deadline-hit rate
and p50/p99 against load. Usage: plot_offload.py bench-out/offload.json docs/offload.png"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

COLORS = {"budget": "tab:green", "local-only": "tab:red", "always-up": "tab:blue"}


def plain_log_labels(axis, low, high):
    """Log-axis labels as plain numbers (`200`, `5k`, not `2x10^2`): at 1, 2 and 5 of each decade
    when the data span at most a decade and a half, else at each power of ten only, so labels
    never run into each other (matplotlib's default labels every minor tick on a narrow range)."""
    plain = matplotlib.ticker.FuncFormatter(
        lambda value, _: f"{value / 1000:g}k" if value >= 1000 else f"{value:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
    narrow = low > 0 and high / low <= 10 ** 1.5
    axis.set_minor_formatter(plain if narrow else matplotlib.ticker.NullFormatter())


def main(src, dst):
    with open(src) as f:
        report = json.load(f)
    runs = report["runs"]
    budget = report["setup"]["budget_ms"]
    loads = sorted({r["load"] for r in runs})
    policies = list(dict.fromkeys(r["policy"] for r in runs))
    cdf_slots = [(0, 0), (0, 1), (1, 0), (1, 1)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for load, (row, col) in zip(loads, cdf_slots):
        ax = axes[row][col]
        for policy in policies:
            run = next(r for r in runs if r["policy"] == policy and r["load"] == load)
            lat = sorted(run["latencies_ms"])
            if not lat:
                continue
            ys = [(i + 1) / run["sent"] for i in range(len(lat))]
            ax.step(lat, ys, where="post", color=COLORS.get(policy),
                    label=f"{policy} ({run['hit_rate'] * 100:.0f}% in budget, "
                          f"n={run['sent']})")
        ax.axvline(budget, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        plain_log_labels(ax.xaxis, *ax.get_xlim())
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{load:g}x device capacity ({run['rate_per_s']:.1f} jobs/s)")
        ax.set_xlabel("round-trip latency, ms (log); dashed: budget")
        ax.set_ylabel("share of jobs answered")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    hit = axes[0][2]
    pct = axes[1][2]
    for policy in policies:
        per = [next(r for r in runs if r["policy"] == policy and r["load"] == l) for l in loads]
        hit.plot(loads, [r["hit_rate"] * 100 for r in per], marker="o",
                 color=COLORS.get(policy), label=policy)
        pct.plot(loads, [r["latency_ms"]["median"] for r in per], marker="o",
                 color=COLORS.get(policy), label=f"{policy} p50")
        pct.plot(loads, [r["latency_ms"]["p99"] for r in per], marker="x", linestyle=":",
                 color=COLORS.get(policy), label=f"{policy} p99")
    hit.axhline(95, color="grey", linestyle="--", linewidth=1)
    hit.set_title(f"answered within the {budget} ms budget")
    hit.set_xlabel("offered load (x device capacity)")
    hit.set_ylabel("%")
    hit.set_ylim(0, 102)
    hit.legend(fontsize=8)
    hit.grid(True, alpha=0.3)
    pct.set_yscale("log")
    plain_log_labels(pct.yaxis, *pct.get_ylim())
    pct.set_title("latency percentiles")
    pct.set_xlabel("offered load (x device capacity)")
    pct.set_ylabel("ms (log)")
    pct.legend(fontsize=7, ncol=2)
    pct.grid(True, which="both", alpha=0.3)
    setup = report["setup"]
    fig.suptitle(
        "Offload policies (one run each): device {device} core ({svc:.0f} ms/job), "
        "2 edge x {edge} core (+{el} ms each way),\ncloud {cloud} core (+{cl} ms each way)".format(
            device=setup["cores"]["device"], edge=setup["cores"]["edge"],
            cloud=setup["cores"]["cloud"], el=setup["link_delay_ms_each_way"]["edge"],
            cl=setup["link_delay_ms_each_way"]["cloud"], svc=report["device_service_ms"]))
    fig.tight_layout()
    fig.savefig(dst, dpi=90)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
