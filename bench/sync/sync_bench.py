#!/usr/bin/python3
"""Sync-group step latency: K client processes on this machine run steps of
one BatchNorm layer's synchronization (forward statistics, then backward
sums), against a normserve sync group (stats mode: SyncForward +
SyncBackward) and, in the same run, against torch.distributed with the
Gloo backend on loopback doing the collectives torch.nn.SyncBatchNorm does
(an all_gather of each rank's [mean, invstd, count] for the forward, an
all_reduce of [sum_dy, sum_dy_xhat] for the backward).

usage: sync_bench.py --server BUILD/bin/normserve [--ks 2,4,8,16,32]
                     [--channels 64,256,2048] [--steps 60] [--json OUT]

Each configuration runs `steps` steps after 10 warm-up steps; a step's time
is rank 0's wall time from the start of the forward exchange to the end of
the backward one, and the table gives the median over steps. Only the
exchanges are timed: the local math around them is the same for both.
Writes {"cases": [{"k", "c", "normserve_ms", "gloo_ms", "ratio"}]} and
prints a markdown table. Uses Debian's python3-torch (/usr/bin/python3).
"""
import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

from bench_server import BenchServer

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WARMUP = 10


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def normserve_rank(address, k, rank, channels, steps, queue):
    sys.path[:0] = [os.environ["NORMSERVE_PYTHON_STUBS"],
                    os.path.join(HERE, "..", "..", "client", "python")]
    import normserve
    client = normserve.Client(address, timeout=120)
    times = {}
    for c in channels:
        name = f"bench-k{k}-c{c}"
        if rank == 0:
            try:
                client.create_layer(c, kind="sync_batch_norm", world_size=k,
                                    layer_id=name)
            except normserve.AlreadyExistsError:
                pass
        else:
            while True:
                try:
                    client.get_layer(name)
                    break
                except normserve.NotFoundError:
                    time.sleep(0.01)
        mean = np.random.default_rng(rank).standard_normal(c)
        m2 = np.abs(mean) + 1
        sums = np.ones(c)
        step_times = []
        for step in range(WARMUP + steps):
            t0 = time.perf_counter()
            client.sync_forward(name, step, rank, 16, mean, m2)
            client.sync_backward(name, step, rank, sums, sums)
            step_times.append(time.perf_counter() - t0)
        times[c] = statistics.median(step_times[WARMUP:]) * 1e3
    client.close()
    if rank == 0:
        queue.put(times)


def gloo_rank(port, k, rank, channels, steps, queue):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            world_size=k, rank=rank)
    times = {}
    for c in channels:
        # torch.nn.SyncBatchNorm's payloads (torch/nn/modules/_functions.py).
        combined = torch.randn(2 * c + 1)
        gathered = [torch.empty_like(combined) for _ in range(k)]
        sums = torch.ones(2 * c)
        step_times = []
        for _ in range(WARMUP + steps):
            t0 = time.perf_counter()
            dist.all_gather(gathered, combined)
            dist.all_reduce(sums)
            step_times.append(time.perf_counter() - t0)
        times[c] = statistics.median(step_times[WARMUP:]) * 1e3
    dist.destroy_process_group()
    if rank == 0:
        queue.put(times)


def run_ranks(target, args_of, k):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=args_of(r) + (queue,))
             for r in range(k)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise RuntimeError(f"a rank exited with {p.exitcode}")
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--ks", default="2,4,8,16,32")
    parser.add_argument("--channels", default="64,256,2048")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--json")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    channels = [int(c) for c in args.channels.split(",")]
    # The generated stubs beside the server (BUILD/bin/normserve ->
    # BUILD/python), unless the environment names them.
    os.environ.setdefault("NORMSERVE_PYTHON_STUBS", os.path.join(
        os.path.dirname(os.path.abspath(args.server)), "..", "python"))
    cases = []
    with BenchServer(args.server) as server:
        address = server.address
        for k in ks:
            ours = run_ranks(normserve_rank,
                             lambda r: (address, k, r, channels, args.steps),
                             k)
            port = free_port()
            gloo = run_ranks(gloo_rank,
                             lambda r: (port, k, r, channels, args.steps), k)
            for c in channels:
                cases.append({"k": k, "c": c, "normserve_ms": ours[c],
                              "gloo_ms": gloo[c],
                              "ratio": ours[c] / gloo[c]})
                print(f"K={k:3d} C={c:5d} normserve {ours[c]:8.3f} ms  "
                      f"gloo {gloo[c]:8.3f} ms  x{ours[c] / gloo[c]:.2f}",
                      file=sys.stderr)
    print("| K | C | normserve ms | Gloo ms | × Gloo time |")
    print("|---:|---:|---:|---:|---:|")
    for case in cases:
        print(f"| {case['k']} | {case['c']} | {case['normserve_ms']:.3f} | "
              f"{case['gloo_ms']:.3f} | {case['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": cases}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
