#!/usr/bin/python3
"""`make bench`: kernels against PyTorch and copy bandwidth, and the service
against a plain gRPC echo, under each allocator; one JSON and one Markdown
report.

usage: run_bench.py --bin BUILD/bin [--out BUILD/reports] [--rounds 3]
                    [--sections kernels,rpc] [--allocators glibc,tcmalloc,...]
                    [--sizes 1K,...,256M] [--quick] [--readme docs/benchmarks.md]

Kernels: normserve-kernel-bench (Google Benchmark) and torch_bench.py run
alternately for --rounds rounds with the same thread counts; each case's
time is the median over rounds and "spread" is (max - min) / median. Cases
are matched by name; where torch_bench.py labels what it timed (a composite
for an op PyTorch has no kernel for, e.g. RMSNorm), the table marks the
PyTorch time † and lists the label below.
Service: for each allocator, normserve-echo-server and normserve (and the
client, normserve-rpc-bench) run with that allocator preloaded (glibc: none),
and the rpc bench measures echo vs Forward, unary and on the Train stream.
"normserve (as built)" is the server binary as shipped, whatever it links.

Writes OUT/bench.json and OUT/bench.md; with --readme, replaces the part of
that file between "<!-- bench:begin -->" and "<!-- bench:end -->" with the
Markdown report.
"""
import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"

ALLOCATORS = {
    "glibc": None,
    "tcmalloc": ["/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                 "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4"],
    "jemalloc": ["/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                 "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2"],
}
LARGE_KERNEL_SHAPES = {"32x64x56x56", "8x32x224x224", "256x2048x7x7",
                       "4096x1024"}


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def machine_info():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = 0
    try:
        with open("/proc/meminfo") as f:
            mem_gb = int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return {
        "hostname": platform.node(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_gb, 1),
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"),
    }


# --------------------------------------------------------------------------
# Kernels.

def run_kernel_rounds(bin_dir, rounds, min_time, tmp):
    ours, torch = {}, {}
    torch_labels = {}  # Cases where torch_bench timed something else.
    torch_version = None
    for r in range(rounds):
        log(f"kernels: round {r + 1}/{rounds}: normserve-kernel-bench")
        out = os.path.join(tmp, f"kernels_{r}.json")
        subprocess.run([os.path.join(bin_dir, "normserve-kernel-bench"),
                        f"--benchmark_min_time={min_time}",
                        f"--benchmark_out={out}",
                        "--benchmark_out_format=json",
                        "--benchmark_format=console"],
                       check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            for b in json.load(f)["benchmarks"]:
                name = b["name"].replace("/real_time", "")
                ms = b["real_time"] * {"ms": 1, "us": 1e-3, "ns": 1e-6,
                                       "s": 1e3}[b["time_unit"]]
                ours.setdefault(name, {"ms": [], "traffic_bytes":
                                       b["traffic_bytes"]})["ms"].append(ms)
        log(f"kernels: round {r + 1}/{rounds}: torch")
        out = os.path.join(tmp, f"torch_{r}.json")
        subprocess.run([PYTHON, os.path.join(HERE, "kernels", "torch_bench.py"),
                        "--min_time_s", str(min_time), "--json", out],
                       check=True, stderr=subprocess.DEVNULL)
        with open(out) as f:
            t = json.load(f)
        torch_version = t["torch_version"]
        for name, c in t["cases"].items():
            torch.setdefault(name, []).append(c["ms"])
            if "label" in c:
                torch_labels[name] = c["label"]
    return ours, torch, torch_labels, torch_version


def spread(values):
    m = statistics.median(values)
    return (max(values) - min(values)) / m if m > 0 else 0.0


def kernel_report(ours, torch, torch_labels=None):
    copy = {}
    for name, c in ours.items():
        if name.startswith("copy/"):
            t = name.rsplit("/", 1)[1]
            ms = statistics.median(c["ms"])
            copy[t] = {"name": name, "ms": ms, "spread": spread(c["ms"]),
                       "rounds_ms": c["ms"],
                       "gb_per_s": c["traffic_bytes"] / ms / 1e6}
    rows = []
    for name, c in ours.items():
        if name.startswith("copy/"):
            continue
        op, shape, layout, t = name.split("/")
        ms = statistics.median(c["ms"])
        gbs = c["traffic_bytes"] / ms / 1e6
        row = {"case": name, "op": op, "shape": shape, "layout": layout,
               "threads": int(t[1:]), "ms": ms, "spread": spread(c["ms"]),
               "gb_per_s": gbs,
               "copy_fraction": gbs / copy[t]["gb_per_s"] if t in copy else None,
               "large": shape in LARGE_KERNEL_SHAPES, "rounds_ms": c["ms"]}
        if name in torch:
            row["torch_rounds_ms"] = torch[name]
            row["torch_ms"] = statistics.median(torch[name])
            row["torch_spread"] = spread(torch[name])
            row["speedup_vs_torch"] = row["torch_ms"] / ms
            if torch_labels and name in torch_labels:
                row["torch_label"] = torch_labels[name]
        rows.append(row)
    return {"copy": copy, "cases": rows}


# --------------------------------------------------------------------------
# Service.

class Server:
    """A server process on 127.0.0.1:0; the port comes from its first line."""

    def __init__(self, argv, env, marker):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env,
                                     text=True)
        deadline = time.time() + 60
        self.address = None
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(marker + r" listening on (\S+)", line)
            if m:
                self.address = m.group(1)
                break
        if self.address is None:
            self.stop()
            raise RuntimeError(f"{argv[0]} did not start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def find_preload(name):
    paths = ALLOCATORS[name]
    if paths is None:
        return ""
    for p in paths:
        if os.path.exists(p):
            return p
    return None


def linked_allocator(binary):
    """Returns (name, path) of the allocator `binary` links, or None."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    for name in ("tcmalloc", "jemalloc"):
        m = re.search(r"(lib%s\S*\.so\S*) => (\S+)" % name, out)
        if m:
            return name, m.group(2)
    return None


def run_rpc(bin_dir, server_bin, preload, sizes, min_time, rounds, tmp, label):
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    echo = Server([os.path.join(bin_dir, "normserve-echo-server"),
                   "--address", "127.0.0.1:0"], env, "normserve-echo")
    try:
        norm = Server([server_bin, "--address", "127.0.0.1:0",
                       "--max_message_mb", "1024"], env, "normserve")
        try:
            out = os.path.join(tmp, f"rpc_{label}.json")
            subprocess.run([os.path.join(bin_dir, "normserve-rpc-bench"),
                            "--echo", echo.address, "--normserve",
                            norm.address, "--sizes", sizes,
                            "--min_time_s", str(min_time),
                            "--rounds", str(rounds), "--label", label,
                            "--json", out],
                           check=True, env=env, stdout=subprocess.DEVNULL)
            with open(out) as f:
                result = json.load(f)
            result["page_faults_per_call"] = count_faults(
                bin_dir, echo, norm, env)
            return result
        finally:
            norm.stop()
    finally:
        echo.stop()


def minor_faults(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def count_faults(bin_dir, echo, norm, env, size="64M", calls=4):
    """Minor page faults per call in each server at one large payload: a
    number the machine's load does not change (every fault is a page of
    fresh memory the allocator handed out)."""
    faults = {}
    for mode, server in (("echo_unary", echo), ("forward_unary", norm),
                         ("echo_stream", echo), ("forward_stream", norm)):
        before = minor_faults(server.proc.pid)
        # The rpc bench makes one warm-up call besides `calls`.
        subprocess.run([os.path.join(bin_dir, "normserve-rpc-bench"),
                        "--echo", echo.address, "--normserve", norm.address,
                        "--sizes", size, "--modes", mode, "--min_time_s", "0",
                        "--rounds", "1", "--min_calls", str(calls),
                        "--max_calls", str(calls)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        faults[mode] = (minor_faults(server.proc.pid) - before) / (calls + 1)
    return {"bytes": 64 << 20, "modes": faults}


def rpc_ratios(result):
    rows = []
    for s in result["sizes"]:
        m = s["modes"]
        row = {"bytes": s["bytes"], "input_shape": s["input_shape"]}
        for kind in ("unary", "stream"):
            e, f = m.get(f"echo_{kind}"), m.get(f"forward_{kind}")
            if not e or not f:
                continue
            row[kind] = {
                "echo_p50_ms": e["p50_ms"], "forward_p50_ms": f["p50_ms"],
                "latency_ratio": f["p50_ms"] / e["p50_ms"],
                "echo_mb_per_s": e["mb_per_s"],
                "forward_mb_per_s": f["mb_per_s"],
                "throughput_ratio": f["mb_per_s"] / e["mb_per_s"],
            }
        rows.append(row)
    return rows


# --------------------------------------------------------------------------
# Markdown.

def human_bytes(n):
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def mark(ok):
    return "✓" if ok else "✗"


def markdown(report):
    m = report["machine"]
    lines = [f"Measured {m['date']} on {m['hostname']}: {m['cpu_model']}, "
             f"{m['cpus']} CPUs, {m['memory_gib']} GiB, Linux {m['kernel']} "
             f"(load average {m['load_average_at_start']:.2f} at start, "
             f"{m.get('load_average_at_end', float('nan')):.2f} at end; "
             "on a shared machine, other work inflates the spread and "
             "hurts PyTorch's 2-thread OpenMP runs most)."]
    k = report.get("kernels")
    if k:
        lines += ["", f"**Kernels** (float32, median of {k['rounds']} rounds; "
                  f"PyTorch {k['torch_version']}, same thread count; GB/s of "
                  "minimum traffic; copy = memcpy "
                  + ", ".join(f"{c['gb_per_s']:.1f} GB/s on {t[1:]} thread(s)"
                              for t, c in sorted(k["copy"].items())) + ")", "",
                  "| case | threads | normserve ms | GB/s | % of copy | "
                  "PyTorch ms | × PyTorch | spread |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in k["cases"]:
            # Cases PyTorch has no CPU kernel for (the split ops but stats)
            # are judged on bandwidth alone.
            has_torch = "torch_ms" in r
            ok = ((not has_torch or r["speedup_vs_torch"] >= 1.0) and
                  (not r["large"] or r["copy_fraction"] >= 0.5))
            # † PyTorch has no such kernel; torch_bench timed a composite.
            dagger = " †" if "torch_label" in r else ""
            torch_cells = (f"{r['torch_ms']:.2f}{dagger} | "
                           f"{r['speedup_vs_torch']:.2f} {mark(ok)}"
                           if has_torch else f"– | – {mark(ok)}")
            lines.append(
                f"| {r['op']} {r['shape']} {r['layout']} | {r['threads']} | "
                f"{r['ms']:.2f} | {r['gb_per_s']:.1f} | "
                f"{100 * r['copy_fraction']:.0f}% | {torch_cells} | "
                f"{100 * max(r['spread'], r.get('torch_spread', 0)):.0f}% |")
        labels = sorted({r["torch_label"] for r in k["cases"]
                         if "torch_label" in r})
        if labels:
            lines += [""] + [f"† PyTorch side: {label}." for label in labels]
    for svc in report.get("service", []):
        lines += ["", f"**Service, {svc['label']}**: one call at a time over "
                  "loopback; p50 latency and one-way MB/s (payload / mean "
                  "latency); ratio = Forward / echo (targets: throughput "
                  "≥ 0.8 from 1 MiB, batch-1 p50 ≤ 1.3)", "",
                  "| payload | echo p50 ms | Forward p50 ms | p50 ratio | "
                  "echo MB/s | Forward MB/s | MB/s ratio | stream: echo p50 | "
                  "Forward p50 | p50 ratio | echo MB/s | Forward MB/s | "
                  "MB/s ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                  "---:|---:|"]
        for r in svc["rows"]:
            cells = [human_bytes(r["bytes"])]
            for kind in ("unary", "stream"):
                x = r.get(kind)
                if not x:
                    cells += ["–"] * 6
                    continue
                lat_note = ""
                if r["bytes"] == 16 << 10:
                    lat_note = " " + mark(x["latency_ratio"] <= 1.3)
                tp_note = ""
                if r["bytes"] >= 1 << 20:
                    tp_note = " " + mark(x["throughput_ratio"] >= 0.8)
                cells += [f"{x['echo_p50_ms']:.3f}", f"{x['forward_p50_ms']:.3f}",
                          f"{x['latency_ratio']:.2f}{lat_note}",
                          f"{x['echo_mb_per_s']:.0f}",
                          f"{x['forward_mb_per_s']:.0f}",
                          f"{x['throughput_ratio']:.2f}{tp_note}"]
            lines.append("| " + " | ".join(cells) + " |")
    alloc = report.get("allocators")
    if alloc:
        sizes = sorted({r["bytes"] for a in alloc for r in a["rows"]
                        if r["bytes"] >= 1 << 20})
        lines += ["", "**Allocators**: Forward (unary) MB/s by payload; the "
                  "echo under the same allocator in parentheses", "",
                  "| allocator | " + " | ".join(human_bytes(s) for s in sizes)
                  + " | page faults per 64 MiB call: Forward / echo unary, "
                  "Forward / echo stream |",
                  "|---|" + "---:|" * (len(sizes) + 1)]
        for a in alloc:
            by = {r["bytes"]: r for r in a["rows"]}
            cells = []
            for s in sizes:
                u = by.get(s, {}).get("unary")
                cells.append(f"{u['forward_mb_per_s']:.0f} "
                             f"({u['echo_mb_per_s']:.0f})" if u else "–")
            f = a["raw"].get("page_faults_per_call", {}).get("modes", {})
            cells.append(" / ".join(f"{f[m]:.0f}" for m in
                                    ("forward_unary", "echo_unary",
                                     "forward_stream", "echo_stream")
                                    if m in f) or "–")
            lines.append(f"| {a['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def update_readme(path, md):
    with open(path) as f:
        text = f.read()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    if begin not in text or end not in text:
        log(f"{path} has no {begin} ... {end} markers; not updated")
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + md + end + tail)
    log(f"updated {path}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sections", default="kernels,rpc")
    parser.add_argument("--allocators", default="glibc,tcmalloc,jemalloc")
    parser.add_argument("--sizes",
                        default="1K,4K,16K,64K,256K,1M,4M,16M,64M,256M")
    parser.add_argument("--min_time_s", type=float, default=0.3)
    parser.add_argument("--rpc_min_time_s", type=float, default=0.6)
    parser.add_argument("--quick", action="store_true",
                        help="one round, shorter timings, sizes up to 16M")
    parser.add_argument("--readme")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
        args.min_time_s = 0.1
        args.rpc_min_time_s = 0.2
        args.sizes = "1K,16K,1M,16M"
    bin_dir = os.path.abspath(args.bin)
    out_dir = args.out or os.path.join(os.path.dirname(bin_dir), "reports")
    os.makedirs(out_dir, exist_ok=True)
    sections = args.sections.split(",")

    report = {"format": "normserve.bench.v1", "machine": machine_info()}
    with tempfile.TemporaryDirectory() as tmp:
        if "kernels" in sections:
            ours, torch, labels, version = run_kernel_rounds(
                bin_dir, args.rounds, args.min_time_s, tmp)
            report["kernels"] = kernel_report(ours, torch, labels)
            report["kernels"].update(rounds=args.rounds,
                                     torch_version=version)
        if "rpc" in sections:
            server_bin = os.path.join(bin_dir, "normserve")
            plain_bin = os.path.join(bin_dir, "normserve-plain-malloc")
            if not os.path.exists(plain_bin):
                plain_bin = server_bin
            report["allocators"] = []
            for name in args.allocators.split(","):
                preload = find_preload(name)
                if preload is None:
                    log(f"service: {name} not installed; skipped")
                    continue
                log(f"service: {name}")
                result = run_rpc(bin_dir, plain_bin, preload, args.sizes,
                                 args.rpc_min_time_s, args.rounds, tmp, name)
                report["allocators"].append(
                    {"label": name, "preload": preload, "raw": result,
                     "rows": rpc_ratios(result)})
            if plain_bin != server_bin:
                linked = linked_allocator(server_bin)
                label = f"normserve as built ({linked[0] if linked else 'glibc'})"
                log(f"service: {label}")
                # The echo server and the client get the same allocator.
                result = run_rpc(bin_dir, server_bin, linked[1] if linked else "",
                                 args.sizes, args.rpc_min_time_s, args.rounds,
                                 tmp, "as built")
                report["allocators"].append(
                    {"label": label, "preload": linked[1] if linked else "",
                     "raw": result, "rows": rpc_ratios(result)})
            if report["allocators"]:
                # The detailed table is the configuration normserve ships.
                shipped = report["allocators"][-1]
                report["service"] = [{"label": shipped["label"],
                                      "rows": shipped["rows"]}]
    report["machine"]["load_average_at_end"] = os.getloadavg()[0]
    md = markdown(report)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {out_dir}/bench.json and {out_dir}/bench.md")
    if args.readme:
        update_readme(args.readme, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
