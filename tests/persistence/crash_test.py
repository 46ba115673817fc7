"""Crash test: SIGKILL the server at random points during training.

A client runs training steps (training Forward, UpdateRunningStats,
SetParameters with expected_version, LoadState of SGD momentum buffers), each
with a request id, against a server with --state_dir --fsync always. A killer
SIGKILLs the server after a random number of acknowledged operations (and a
random delay), at least --kills times, and restarts it on the same port; the
client retries the operation it was in with the same request id. After each
restart: the layer's version is the last acknowledged one or one more (the
unacknowledged operation in flight may have landed), never less (nothing
acknowledged lost) and never more (nothing applied twice). At the end the
state equals, bit for bit, that of the same steps on a server never killed,
and the version equals the number of operations + 1.

usage: crash_test.py [--kills 22] [--steps 100] [--seed 1] [--snapshot_every 5]
"""
import argparse
import random
import shutil
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

import common
from common import pb

C = 8
LAYER = "layers/crash"
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED}


def ops_of_step(i):
    """The operations of training step i: (method, request) pairs."""
    rng = np.random.default_rng(1000 + i)
    x = rng.standard_normal((4, C, 3, 3)).astype(np.float32) * (1 + i % 3)
    ops = [("Forward", pb.ForwardRequest(
        name=LAYER, input=common.tensor(x), training=True,
        save_for_backward=False, request_id=f"fwd-{i}"))]
    ops.append(("UpdateRunningStats", pb.UpdateRunningStatsRequest(
        name=LAYER, mean=rng.standard_normal(C).astype(np.float32).tolist(),
        var=rng.random(C).astype(np.float32).tolist(), count=16,
        request_id=f"urs-{i}")))
    if i % 3 == 0:
        # expected_version is filled in at send time (the version we know).
        ops.append(("SetParameters", pb.SetParametersRequest(
            name=LAYER, weight=(rng.random(C) + 0.5).astype(np.float32).tolist(),
            bias=rng.standard_normal(C).astype(np.float32).tolist(),
            request_id=f"set-{i}")))
    if i % 5 == 0:
        state = pb.StateDict()
        state.tensors["weight_momentum_buffer"].CopyFrom(
            common.tensor(rng.standard_normal(C).astype(np.float32)))
        state.tensors["bias_momentum_buffer"].CopyFrom(
            common.tensor(rng.standard_normal(C).astype(np.float32)))
        ops.append(("LoadState", pb.LoadStateRequest(
            name=LAYER, state=state, allow_missing=True,
            request_id=f"load-{i}")))
    return ops


class Client:
    def __init__(self, port):
        self.port = port
        self.channel, self.stub = common.stub(port)
        self.acked_version = 1  # Version after the last acknowledged op.
        self.acked_ops = 0
        self.retries = 0
        self.replays = 0

    def call(self, method, request, retry):
        give_up = time.time() + 60
        while True:
            try:
                return getattr(self.stub, method)(request, timeout=10)
            except grpc.RpcError as e:
                if (not retry or e.code() not in RETRYABLE or
                        time.time() > give_up):
                    raise
                self.retries += 1
                time.sleep(0.02)

    def run_op(self, method, request, retry):
        if method == "SetParameters":
            request.expected_version = self.acked_version
        try:
            response = self.call(method, request, retry)
            version = response.version
        except grpc.RpcError as e:
            # A retried training Forward that the server had already applied.
            if (e.code() == grpc.StatusCode.ALREADY_EXISTS and
                    "already applied" in e.details()):
                self.replays += 1
                version = self.acked_version + 1
            else:
                raise
        if version != self.acked_version + 1:
            raise AssertionError(
                f"{method} {request.request_id}: version {version}, expected "
                f"{self.acked_version + 1} (an op applied twice or lost)")
        self.acked_version = version
        self.acked_ops += 1

    def state(self):
        response = self.call("GetState", pb.GetStateRequest(name=LAYER), True)
        return response.version, common.state_arrays(response)


def create(client):
    client.call("CreateLayer", pb.CreateLayerRequest(
        layer_id="crash", batch_norm=pb.BatchNormConfig(num_features=C)), True)


def reference(steps):
    port = common.free_port()
    server = common.Server(port)
    try:
        client = Client(port)
        create(client)
        for i in range(steps):
            for method, request in ops_of_step(i):
                client.run_op(method, request, retry=False)
        result = client.state()
        client.channel.close()  # An open channel delays the drain.
        return result
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=22)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    # Small values make kills land during snapshots and log truncation too.
    parser.add_argument("--snapshot_every", type=int, default=5)
    args = parser.parse_args()
    rnd = random.Random(args.seed)
    t0 = time.time()

    want_version, want_state = reference(args.steps)
    state_dir = tempfile.mkdtemp(prefix="normserve-crash-")
    port = common.free_port(outside_ephemeral=True)
    extra = ["--snapshot_every", str(args.snapshot_every)]
    server = common.Server(port, state_dir, extra)
    client = Client(port)
    create(client)
    done = threading.Event()
    failure = []

    def train():
        try:
            for i in range(args.steps):
                for method, request in ops_of_step(i):
                    client.run_op(method, request, retry=True)
        except BaseException as e:  # Reported by the main thread.
            failure.append(e)
        done.set()

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    kills = 0
    try:
        while not done.is_set():
            if kills >= args.kills:
                done.wait(0.1)
                continue
            target = client.acked_ops + rnd.randint(1, 12)
            stall = time.time() + 60
            while client.acked_ops < target and not done.is_set():
                if time.time() > stall:
                    raise AssertionError(
                        f"no progress for 60 s after {kills} kills, "
                        f"{client.acked_ops} ops")
                time.sleep(0.001)
            if done.is_set():
                break
            time.sleep(rnd.random() * 0.004)
            acked_before = client.acked_version
            server.kill()
            kills += 1
            print(f"kill {kills} after {client.acked_ops} ops",
                  file=sys.stderr, flush=True)
            for attempt in range(5):
                try:
                    server = common.Server(port, state_dir, extra)
                    break
                except RuntimeError as e:
                    # Only a taken port may be retried.
                    if "could not listen" not in str(e) or attempt == 4:
                        raise
                    time.sleep(0.5)
            if "restored" not in server.output():
                raise AssertionError("no restore report:\n" + server.output())
            # The client is blocked in a retry or mid-call: the layer holds
            # every acknowledged op and at most the one in flight.
            probe_channel, probe = common.stub(port)
            try:
                v = probe.GetLayer(pb.GetLayerRequest(name=LAYER),
                                   timeout=10, wait_for_ready=True).version
            except grpc.RpcError as e:
                raise AssertionError(
                    f"probe after kill {kills}: {e.code()} {e.details()}; "
                    f"server exit status {server.proc.poll()}, output:\n"
                    f"{server.output()}")
            probe_channel.close()
            if not acked_before <= v <= client.acked_version + 1:
                raise AssertionError(
                    f"after kill {kills}: version {v}, acknowledged "
                    f"{acked_before}..{client.acked_version}")
        thread.join()
        if failure:
            raise failure[0]
        if kills < args.kills:
            raise AssertionError(f"only {kills} kills; raise --steps")
        version, state = client.state()
        if version != want_version:
            raise AssertionError(f"final version {version}, want {want_version}")
        for key, want in want_state.items():
            if not np.array_equal(state.get(key), want):
                raise AssertionError(f"{key}: {state.get(key)} != {want}")
        if set(state) != set(want_state):
            raise AssertionError(f"keys {sorted(state)} != {sorted(want_state)}")
        print(f"crash test passed: {kills} SIGKILLs, {client.acked_ops} ops "
              f"acknowledged, {client.retries} retries, {client.replays} "
              f"forward retries answered 'already applied', final version "
              f"{version} equals the uninterrupted run, "
              f"{time.time() - t0:.1f} s")
    finally:
        client.channel.close()
        server.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
