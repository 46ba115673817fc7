#!/usr/bin/python3
"""Before/after table of the kernel benchmarks of two builds.

usage: ab_kernels.py --old OLD_BIN --new NEW_BIN [--rounds 8]
                     [--min_time_s 0.3] [--filter REGEX] [--out OUT]

Runs normserve-kernel-bench of both builds on the cases both have, in
alternating rounds (old first in even rounds, new first in odd ones, so a
machine that slows down mid-run does not favour either), and prints one
row per case: the median of each build's per-round times, new/old, and the
spread (max/min - 1 over both builds' rounds). A ratio above 1.05 is
marked "slower". On a shared machine, re-run a marked case alone
(--filter) with more rounds before believing it.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

BENCH = "normserve-kernel-bench"


def cases(bin_dir):
    out = subprocess.run([os.path.join(bin_dir, BENCH),
                          "--benchmark_list_tests"], check=True,
                         capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def run(bin_dir, names, min_time_s):
    pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    out = subprocess.run(
        [os.path.join(bin_dir, BENCH), "--benchmark_filter=" + pattern,
         "--benchmark_format=json",
         "--benchmark_min_time=%g" % min_time_s],
        check=True, capture_output=True, text=True).stdout
    times = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("run_type", "iteration") != "iteration":
            continue
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b["time_unit"]]
        times[b["name"]] = b["real_time"] * scale
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="bin/ of the old build")
    ap.add_argument("--new", required=True, help="bin/ of the new build")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--min_time_s", type=float, default=0.3)
    ap.add_argument("--filter", default="", help="regex over case names")
    ap.add_argument("--out", help="also write the table here")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    new_cases = set(cases(args.new))
    names = [n for n in cases(args.old) if n in new_cases and
             re.search(args.filter, n) and not n.startswith("copy/")]
    if not names:
        sys.exit("ab_kernels: no case both builds have matches --filter")
    samples = {"old": {n: [] for n in names}, "new": {n: [] for n in names}}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for which in order:
            got = run(getattr(args, which), names, args.min_time_s)
            for n in names:
                if n in got:
                    samples[which][n].append(got[n])
        print("ab_kernels: round %d/%d done" % (r + 1, args.rounds),
              file=sys.stderr, flush=True)

    lines = ["| case | old ms | new ms | new/old | spread |",
             "|---|---:|---:|---:|---:|"]
    slower = 0
    for n in names:
        old, new = samples["old"][n], samples["new"][n]
        if not old or not new:
            lines.append("| %s | - | - | missing | - |" % n)
            continue
        o, w = statistics.median(old), statistics.median(new)
        both = old + new
        ratio = w / o
        mark = " slower" if ratio > 1.05 else ""
        slower += bool(mark)
        lines.append("| %s | %.3f | %.3f | %.3f%s | %.0f%% |" % (
            n.replace("/real_time", ""), o, w, ratio, mark,
            100 * (max(both) / min(both) - 1)))
    lines.append("")
    lines.append("%d cases, %d rounds of %g s each; %d more than 5%% slower "
                 "(median of rounds)." % (len(names), args.rounds,
                                          args.min_time_s, slower))
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
