#!/usr/bin/python3
"""A training step of a small CNN (3 blocks of Conv2d 3x3 + BatchNorm2d +
ReLU on 3x32x32 inputs, then a linear head; SGD) with its BatchNorms
  local    torch.nn.BatchNorm2d
  remote   normserve.torch.BatchNorm2d (activations to the server and back)
  stats    normserve.torch.SyncBatchNorm, world_size 1 (statistics only)
  sync2    normserve.torch.SyncBatchNorm, world_size 2: two processes with
           half the batch each (rank 0's step time)
for batch 8, 64 and 256, against a CPU server it starts; medians of
`steps` steps after 5 warm-up steps, and each variant's ratio to local.

usage: cnn_step_bench.py --server BUILD/bin/normserve [--batches 8,64,256]
                         [--steps 20] [--json OUT]
"""
import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

from bench_server import BenchServer

HERE = os.path.dirname(os.path.abspath(__file__))
WARMUP = 5
WIDTHS = (16, 32, 32)


def imports(stubs):
    sys.path[:0] = [stubs, os.path.join(HERE, "..", "..", "client", "python")]
    import torch
    import normserve
    import normserve.torch as nst
    torch.set_num_threads(1)
    return torch, normserve, nst


def model(torch, norm):
    layers, cin = [], 3
    for i, cout in enumerate(WIDTHS):
        layers += [torch.nn.Conv2d(cin, cout, 3, padding=1), norm(i, cout),
                   torch.nn.ReLU()]
        cin = cout
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
               torch.nn.Linear(cin, 10)]
    return torch.nn.Sequential(*layers)


def steps_ms(torch, net, batch, steps, seed):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32)
    target = torch.randint(0, 10, (batch,))
    times = []
    for _ in range(WARMUP + steps):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[WARMUP:]) * 1e3


def variant(stubs, address, name, batch, steps, rank, queue):
    torch, normserve, nst = imports(stubs)
    client = normserve.Client(address, timeout=120)
    tag = f"cnn-{name}-{batch}"
    if name == "local":
        norm = lambda i, c: torch.nn.BatchNorm2d(c)  # noqa: E731
    elif name == "remote":
        norm = lambda i, c: nst.BatchNorm2d(c, client=client)  # noqa: E731
    else:
        k = 2 if name == "sync2" else 1
        norm = lambda i, c: nst.SyncBatchNorm(  # noqa: E731
            c, client=client, group=f"{tag}-{i}", rank=rank, world_size=k)
    per_rank = batch // 2 if name == "sync2" else batch
    ms = steps_ms(torch, model(torch, norm), per_rank, steps, seed=rank)
    if rank == 0:
        queue.put(ms)


def run(stubs, address, name, batch, steps):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    ranks = 2 if name == "sync2" else 1
    procs = [ctx.Process(target=variant, args=(stubs, address, name, batch,
                                               steps, r, queue))
             for r in range(ranks)]
    for p in procs:
        p.start()
    ms = queue.get(timeout=900)
    for p in procs:
        p.join(60)
    return ms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--batches", default="8,64,256")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    stubs = os.path.join(os.path.dirname(os.path.abspath(args.server)), "..",
                         "python")
    rows = []
    with BenchServer(args.server) as server:
        address = server.address
        for batch in [int(b) for b in args.batches.split(",")]:
            row = {"batch": batch}
            for name in ("local", "remote", "stats", "sync2"):
                row[name] = run(stubs, address, name, batch, args.steps)
                print(f"batch {batch:4d} {name:7s} {row[name]:8.2f} ms",
                      file=sys.stderr)
            rows.append(row)
    print("| batch | local ms | remote ms (×) | stats K=1 ms (×) | "
          "SyncBatchNorm K=2 ms (×) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r[n]:.2f} ({r[n] / r['local']:.2f}×)"
                 for n in ("remote", "stats", "sync2")]
        print(f"| {r['batch']} | {r['local']:.2f} | " + " | ".join(cells)
              + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
