#!/usr/bin/python3
"""Plots a normserve-load JSON report: throughput and p50/p99 latency against
batch size, one line per concurrency.

usage: plot_load.py REPORT.json OUT.png

Uses Debian's python3-matplotlib (Agg backend, no display needed).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv):
    if len(argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    with open(argv[1]) as f:
        report = json.load(f)
    by_conc = {}
    for step in report["steps"]:
        by_conc.setdefault(step["concurrency"], []).append(step)

    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (conc, steps) in enumerate(sorted(by_conc.items())):
        steps.sort(key=lambda s: s["batch_size"])
        batch = [s["batch_size"] for s in steps]
        color = colors[i % len(colors)]
        ax_tp.plot(batch, [s["samples_per_s"] for s in steps], "o-",
                   color=color, label=f"concurrency {conc}")
        ax_lat.plot(batch, [s["latency_ms"]["p50"] for s in steps], "o-",
                    color=color, label=f"p50, concurrency {conc}")
        ax_lat.plot(batch, [s["latency_ms"]["p99"] for s in steps], "s--",
                    color=color, label=f"p99, concurrency {conc}")

    config = report["config"]
    shape = "x".join(str(d) for d in config["feature_shape"])
    rate = config["target_rate"]
    loop = f"open loop {rate:g} req/s" if rate else "closed loop"
    fig.suptitle(f"normserve-load: ops {config['mix']}, sample {shape} "
                 f"{config['dtype']} {config['layout']}, {loop} "
                 f"({report['machine']['cpus']} CPUs, {report['started_at']})",
                 fontsize=10)
    for ax in (ax_tp, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (N)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_tp.set_ylabel("samples / s")
    ax_tp.set_title("throughput")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_title("latency p50 (solid) and p99 (dashed)")
    fig.tight_layout()
    fig.savefig(argv[2], dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
