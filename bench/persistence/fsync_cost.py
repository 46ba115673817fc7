"""Cost of each --fsync policy on a training step (docs/persistence.md).

One training step = training Forward + accumulating Backward + SGD
OptimizerStep (three unary calls; Forward, Backward and the step are each
logged when a state dir is set), on one layer, input N x C x H x W float32.
Servers: in memory (no --state_dir), --fsync always, --fsync interval
(100 ms); rounds alternate between them so drift hits all alike. Prints
p50/p90 step latency per policy and the overhead against in memory.

usage: PYTHONPATH=build/python:tests/persistence \
         python3 bench/persistence/fsync_cost.py [--steps 200] [--rounds 3]
         [--shape 8,64,16,16]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..",
                                "tests", "persistence"))
import common  # noqa: E402
from common import pb  # noqa: E402


def run_steps(stub, layer, x, dy, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        f = stub.Forward(pb.ForwardRequest(name=layer, input=x, training=True),
                         timeout=10)
        stub.Backward(pb.BackwardRequest(name=layer, handle=f.handle,
                                         grad_output=dy, accumulate_grad=True,
                                         skip_grad_input=True), timeout=10)
        stub.OptimizerStep(pb.OptimizerStepRequest(
            name=layer, sgd=pb.SgdOptions(lr=0.01, momentum=0.9)), timeout=10)
        times.append(time.perf_counter() - t)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", default="8,64,16,16")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(0)
    x = common.tensor(rng.standard_normal(shape).astype(np.float32))
    dy = common.tensor(rng.standard_normal(shape).astype(np.float32))
    policies = {
        "in memory (no --state_dir)": None,
        "--fsync always": ["--fsync", "always"],
        "--fsync interval (100 ms)": ["--fsync", "interval",
                                      "--fsync_interval_ms", "100"],
    }
    results = {name: [] for name in policies}
    root = tempfile.mkdtemp(prefix="normserve-fsync-",
                            dir=os.environ.get("FSYNC_BENCH_DIR"))
    try:
        for r in range(args.rounds):
            for name, flags in policies.items():
                port = common.free_port()
                state_dir = None
                if flags is not None:
                    state_dir = os.path.join(root, f"{r}-{len(results[name])}")
                server = common.Server(port, state_dir, flags or [])
                try:
                    channel, stub = common.stub(port)
                    layer = stub.CreateLayer(pb.CreateLayerRequest(
                        batch_norm=pb.BatchNormConfig(num_features=shape[1])),
                        timeout=10).name
                    run_steps(stub, layer, x, dy, 20)  # Warm-up.
                    results[name] += run_steps(stub, layer, x, dy, args.steps)
                    channel.close()
                finally:
                    server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = np.percentile(results["in memory (no --state_dir)"], 50)
    print(f"training step (Forward+Backward+OptimizerStep), input "
          f"{'x'.join(map(str, shape))} float32, {args.rounds} x {args.steps} "
          f"steps per policy, state dir on {root}")
    print("| policy | p50 ms | p90 ms | p50 overhead |")
    print("|---|---|---|---|")
    for name, times in results.items():
        p50, p90 = np.percentile(times, 50), np.percentile(times, 90)
        print(f"| {name} | {p50 * 1e3:.2f} | {p90 * 1e3:.2f} | "
              f"{(p50 - base) * 1e3:+.2f} ms |")


if __name__ == "__main__":
    main()
