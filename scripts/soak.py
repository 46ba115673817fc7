#!/usr/bin/env python3
"""Soak test (`make soak`, not in CI): starts normserve, drives it for a
given time with several client threads -- training steps on long-lived
layers, create/delete churn, calls with deadlines too short to make,
abandoned (cancelled) Train streams, deletes under load -- and samples the
server's RSS. Fails when the RSS grew by 10 MB or more between the end of
the warm-up (the first 20% of the run, at least 30 s) and the end.

usage: soak.py BIN_DIR SECONDS
"""
import os
import random
import subprocess
import sys
import threading
import time

import numpy as np

import normserve

LIMIT_MB = 10.0


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main():
    bin_dir, seconds = sys.argv[1], float(sys.argv[2])
    server = subprocess.Popen(
        [os.path.join(bin_dir, "normserve"), "--address=127.0.0.1:0",
         "--device=cpu", "--max_saved_contexts=256", "--shutdown_grace_s=5"],
        stdout=subprocess.PIPE, text=True)
    address = None
    for line in server.stdout:
        if line.startswith("normserve listening on "):
            address = line.split()[3]
            break
    if address is None:
        sys.exit("soak: the server did not start")
    threading.Thread(target=lambda: [None for _ in server.stdout],
                     daemon=True).start()
    client = normserve.Client(address, timeout=30)
    # SOAK_NO_CANCEL=1: churn without short deadlines and abandoned streams
    # (to tell their cost apart when the RSS grows).
    cancels = os.environ.get("SOAK_NO_CANCEL", "") != "1"
    stop = threading.Event()
    counts = {"ok": 0, "expected_errors": 0}
    unexpected = []
    lock = threading.Lock()

    def count(key):
        with lock:
            counts[key] += 1

    def trainer(k):
        rng = np.random.default_rng(k)
        name = f"soak-steady-{k}"
        client.create_layer(16, layer_id=name)
        while not stop.is_set():
            x = rng.standard_normal((8, 16, 12, 12), dtype=np.float32)
            fwd = client.forward(name, x, training=True)
            client.backward(name, fwd.handle, np.ones_like(x),
                            accumulate_grad=True)
            client.optimizer_step(name, lr=0.01)
            count("ok")

    def churner(k):
        rng = random.Random(k)
        i = 0
        while not stop.is_set():
            i += 1
            name = f"soak-churn-{k}-{i % 7}"
            try:
                client.create_layer(rng.choice([4, 32, 64]), layer_id=name)
                x = np.ones((4, client.get_layer(name).num_features, 9),
                            dtype=np.float32) * rng.random()
                client.forward(name, x, training=True)
                # A forward left without its backward: its saved context
                # must go with the layer.
                client.forward(name, x, training=True)
                if cancels and rng.random() < 0.5:
                    # Deadline too short to make: dropped on the server.
                    try:
                        client.forward(name, x, training=True, timeout=1e-4)
                    except normserve.NormserveError:
                        count("expected_errors")
                if cancels and rng.random() < 0.3:
                    # A stream abandoned with work in flight.
                    stream = client.train()
                    stream.forward_async(name, x, training=True)
                    stream.cancel()
                client.delete_layer(name)
                count("ok")
            except normserve.NormserveError as err:
                if isinstance(err, (normserve.NotFoundError,
                                    normserve.AlreadyExistsError)):
                    count("expected_errors")
                else:
                    unexpected.append(repr(err))
                try:
                    client.delete_layer(name)
                except normserve.NormserveError:
                    pass

    threads = [threading.Thread(target=trainer, args=(k,), daemon=True)
               for k in range(2)]
    threads += [threading.Thread(target=churner, args=(k,), daemon=True)
                for k in range(3)]
    for t in threads:
        t.start()
    start = time.time()
    warm_at = start + max(30.0, 0.2 * seconds)
    warm_rss = None
    samples = []
    while time.time() - start < seconds:
        time.sleep(5)
        rss = rss_mb(server.pid)
        samples.append((time.time() - start, rss))
        if warm_rss is None and time.time() >= warm_at:
            warm_rss = rss
        print(f"soak: t={time.time() - start:6.0f}s rss={rss:8.1f} MB "
              f"calls ok={counts['ok']} expected_errors="
              f"{counts['expected_errors']} unexpected={len(unexpected)}",
              flush=True)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    end_rss = rss_mb(server.pid)
    server.terminate()
    rc = server.wait(timeout=30)
    growth = end_rss - (warm_rss if warm_rss is not None else samples[0][1])
    print(f"soak: RSS after warm-up {warm_rss:.1f} MB, at the end "
          f"{end_rss:.1f} MB, growth {growth:+.1f} MB (limit {LIMIT_MB} MB); "
          f"server exit {rc}")
    if unexpected:
        print("soak: unexpected errors:", *unexpected[:10], sep="\n  ")
    if growth >= LIMIT_MB or unexpected or rc != 0:
        sys.exit("soak: FAILED")
    print("soak: passed")


if __name__ == "__main__":
    main()
