"""A damaged state directory: the server starts, reports, serves what was valid.

Builds a state directory holding a snapshot (layers a, b) and a log after it
(more steps on a, layer c created and stepped), recording every state each
layer went through. Then, on copies of it: the log cut at several points,
bytes flipped in the log, bytes flipped in the snapshot, the snapshot cut,
garbage files. For each the server must start, print a WARNING naming what
it cut or skipped, serve only states that existed (every restored layer's
(version, state) was recorded: no garbage), keep what lies before the damage,
accept a new mutation, and start cleanly (no WARNING) the next time.
"""
import os
import shutil
import sys
import tempfile

import grpc
import numpy as np

import common
from common import pb

C = 4


def snapshot_of(stub, name):
    r = stub.GetState(pb.GetStateRequest(name=name), timeout=5)
    return r.version, common.state_arrays(r)


def key(state):
    return tuple(sorted((k, v.tobytes()) for k, v in state.items()))


def step(stub, name, i, history):
    rng = np.random.default_rng(i)
    x = rng.standard_normal((3, C, 2)).astype(np.float32)
    stub.Forward(pb.ForwardRequest(name=name, input=common.tensor(x),
                                   training=True, save_for_backward=False,
                                   request_id=f"s{i}"), timeout=5)
    v, state = snapshot_of(stub, name)
    history.setdefault(name, {})[v] = key(state)


def build(state_dir, history):
    port = common.free_port()
    server = common.Server(port, state_dir)
    _, stub = common.stub(port)
    for layer in ("a", "b"):
        stub.CreateLayer(pb.CreateLayerRequest(
            layer_id=layer, batch_norm=pb.BatchNormConfig(num_features=C)),
            timeout=5)
        v, state = snapshot_of(stub, f"layers/{layer}")
        history.setdefault(f"layers/{layer}", {})[v] = key(state)
        for i in range(3):
            step(stub, f"layers/{layer}", i, history)
    server.kill()
    # The restart writes the snapshot (a, b) and truncates the log.
    server = common.Server(port, state_dir)
    _, stub = common.stub(port)
    for i in range(3, 8):
        step(stub, "layers/a", i, history)
    stub.CreateLayer(pb.CreateLayerRequest(
        layer_id="c", batch_norm=pb.BatchNormConfig(num_features=C)), timeout=5)
    v, state = snapshot_of(stub, "layers/c")
    history["layers/c"] = {v: key(state)}
    for i in range(8, 12):
        step(stub, "layers/c", i, history)
    server.kill()  # The log keeps a's steps 3..7 and c.


def check(name, state_dir, history, expect_present, expect_warning=True):
    port = common.free_port()
    server = common.Server(port, state_dir)
    out = server.output()
    try:
        if expect_warning and "WARNING" not in out:
            raise AssertionError(f"{name}: no WARNING in\n{out}")
        _, stub = common.stub(port)
        layers = stub.ListLayers(pb.ListLayersRequest(), timeout=5).layers
        present = {l.name for l in layers}
        missing = set(expect_present) - present
        if missing:
            raise AssertionError(f"{name}: lost {missing}; output\n{out}")
        for layer in present:
            v, state = snapshot_of(stub, layer)
            if history.get(layer, {}).get(v) != key(state):
                raise AssertionError(
                    f"{name}: {layer} at version {v} holds a state it never "
                    f"had\n{out}")
        # It serves: a new mutation works.
        step(stub, expect_present[0], 100, {})
    finally:
        server.kill()
    # The damage was cut for good: the next start is clean.
    server = common.Server(port, state_dir)
    try:
        if "WARNING" in server.output():
            raise AssertionError(f"{name}: second start still warns:\n"
                                 f"{server.output()}")
    finally:
        server.stop()
    print(f"{name}: ok ({out.count('WARNING')} warning(s), "
          f"{len(present)} layers served)")


def flip(path, offset, count=1):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for i in range(count):
            data[(offset + i) % len(data)] ^= 0xFF
        f.seek(0)
        f.write(data)


def cut(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def main():
    root = tempfile.mkdtemp(prefix="normserve-corrupt-")
    try:
        base = os.path.join(root, "base")
        history = {}
        build(base, history)
        wal = lambda d: os.path.join(d, "wal.log")
        snap = lambda d: os.path.join(d, "snapshot")
        wal_size = os.path.getsize(wal(base))
        snap_size = os.path.getsize(snap(base))
        assert wal_size > 100 and snap_size > 100, (wal_size, snap_size)

        cases = [
            # (name, damage, layers that must survive, warning expected)
            ("intact", lambda d: None, ["layers/a", "layers/b", "layers/c"],
             False),
            ("log cut by 1 byte", lambda d: cut(wal(d), wal_size - 1),
             ["layers/a", "layers/b", "layers/c"], True),
            ("log cut mid-file", lambda d: cut(wal(d), wal_size // 2),
             ["layers/a", "layers/b"], True),
            ("log cut inside its header", lambda d: cut(wal(d), 3),
             ["layers/a", "layers/b"], True),
            ("log byte flipped mid-file", lambda d: flip(wal(d), wal_size // 2),
             ["layers/a", "layers/b"], True),
            ("log length field flipped", lambda d: flip(wal(d), 8 + 3),
             ["layers/a", "layers/b"], True),
            ("log replaced by garbage",
             lambda d: open(wal(d), "wb").write(os.urandom(4096)),
             ["layers/a", "layers/b"], True),
            ("snapshot byte flipped", lambda d: flip(snap(d), snap_size - 20),
             ["layers/a", "layers/c"], True),
            ("snapshot cut", lambda d: cut(snap(d), snap_size - 7),
             ["layers/a", "layers/c"], True),
            ("snapshot magic damaged", lambda d: flip(snap(d), 0),
             ["layers/a", "layers/c"], True),
        ]
        for name, damage, present, warn in cases:
            d = os.path.join(root, name.replace(" ", "_"))
            shutil.copytree(base, d)
            damage(d)
            check(name, d, history, present, warn)
        print("corrupt state dir test passed")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
