"""A full state directory, as an operator meets it: the server keeps serving
reads and eval, refuses each mutation with UNAVAILABLE naming the directory
and the cause and applies nothing, accepts the same requests (same request
ids) once space is back, and starts on a full disk with what it has.

The directory is a small tmpfs mounted for the test; without the privilege
to mount one the test is skipped (exit 77, shown as skipped by ctest).
"""
import os
import shutil
import subprocess
import sys
import tempfile

import grpc
import numpy as np

import common
from common import pb

C = 8
LAYER = "layers/full"
SKIP = 77


def fill(path):
    """Writes a file until the filesystem is full."""
    with open(path, "wb") as f:
        chunk = b"\0" * 65536
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    # Byte by byte into the last page.
    with open(path + ".tail", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass


def unfill(path):
    for p in (path, path + ".tail"):
        if os.path.exists(p):
            os.remove(p)


def forward(stub, i, request_id=None):
    x = np.random.default_rng(i).standard_normal((4, C, 3, 3)).astype(
        np.float32) + i
    return stub.Forward(pb.ForwardRequest(
        name=LAYER, input=common.tensor(x), training=True,
        save_for_backward=False, request_id=request_id or f"fwd-{i}"),
        timeout=10)


def expect_unavailable(fn, what):
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, (what, e.code(),
                                                         e.details())
        assert "No space left on device" in e.details(), e.details()
        assert "state_dir" in e.details(), e.details()
        return e.details()
    raise AssertionError(f"{what}: expected UNAVAILABLE on a full disk")


def layer(stub):
    return stub.GetLayer(pb.GetLayerRequest(name=LAYER), timeout=10)


def run(mount):
    state_dir = os.path.join(mount, "state")
    filler = os.path.join(mount, "filler")
    port = common.free_port()
    extra = ["--snapshot_every", "1000000"]
    server = common.Server(port, state_dir, extra)
    channel, stub = common.stub(port)
    stub.CreateLayer(pb.CreateLayerRequest(
        layer_id="full", batch_norm=pb.BatchNormConfig(num_features=C)),
        timeout=10)
    forward(stub, 0)
    x0 = np.random.default_rng(99).standard_normal((4, C, 3, 3)).astype(
        np.float32)
    saved = stub.Forward(pb.ForwardRequest(
        name=LAYER, input=common.tensor(x0), training=False), timeout=10)
    backward = pb.BackwardRequest(
        name=LAYER, handle=saved.handle, grad_output=common.tensor(x0),
        accumulate_grad=True, request_id="bwd-1")

    # 1. The disk fills up. Appends may still fit into the log's last page
    # for a few records; then each mutation is refused and not applied.
    fill(filler)
    i = 1
    message = None
    while message is None and i < 200:
        before = layer(stub)
        try:
            forward(stub, i)
            i += 1
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
            message = e.details()
    assert message is not None, "the log never ran out of space"
    print("refused:", message)
    assert "not applied" in message, message
    after = layer(stub)
    assert (after.version, after.num_batches_tracked) == (
        before.version, before.num_batches_tracked), (before, after)
    # Reads and eval go on.
    state = stub.GetState(pb.GetStateRequest(name=LAYER), timeout=10)
    x = np.ones((2, C, 2, 2), np.float32)
    stub.Forward(pb.ForwardRequest(name=LAYER, input=common.tensor(x),
                                   training=False), timeout=10)
    # Every kind of mutation is refused the same way, and none is applied.
    expect_unavailable(lambda: stub.SetParameters(pb.SetParametersRequest(
        name=LAYER, weight=[2.0] * C, request_id="set-1"), timeout=10),
        "SetParameters")
    # An accumulating backward: its gradients are undone, its saved context
    # kept for the retry.
    expect_unavailable(lambda: stub.Backward(backward, timeout=10), "Backward")
    assert not layer(stub).has_accumulated_grad
    expect_unavailable(lambda: stub.CreateLayer(pb.CreateLayerRequest(
        layer_id="new", batch_norm=pb.BatchNormConfig(num_features=2),
        request_id="create-new"), timeout=10), "CreateLayer")
    try:
        stub.GetLayer(pb.GetLayerRequest(name="layers/new"), timeout=10)
        raise AssertionError("a create that could not be logged exists")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e.details()
    expect_unavailable(lambda: stub.DeleteLayer(pb.DeleteLayerRequest(
        name=LAYER, request_id="delete-1"), timeout=10), "DeleteLayer")
    assert layer(stub).version == after.version, "the delete was undone"
    again = stub.GetState(pb.GetStateRequest(name=LAYER), timeout=10)
    assert again.state == state.state and again.version == state.version

    # 2. Space is back: the same requests (same ids) are applied, once.
    unfill(filler)
    applied = forward(stub, i)
    assert applied.version == after.version + 1, (applied, after)
    stub.SetParameters(pb.SetParametersRequest(
        name=LAYER, weight=[2.0] * C, request_id="set-1"), timeout=10)
    stub.Backward(backward, timeout=10)
    assert layer(stub).has_accumulated_grad
    stub.CreateLayer(pb.CreateLayerRequest(
        layer_id="new", batch_norm=pb.BatchNormConfig(num_features=2),
        request_id="create-new"), timeout=10)
    live = layer(stub)
    live_state = stub.GetState(pb.GetStateRequest(name=LAYER), timeout=10)
    channel.close()
    server.kill()

    # 3. What was acknowledged is what a restart finds.
    server = common.Server(port, state_dir, extra)
    channel, stub = common.stub(port)
    restarted = layer(stub)
    assert (restarted.version, restarted.num_batches_tracked) == (
        live.version, live.num_batches_tracked), (restarted, live)
    assert stub.GetState(pb.GetStateRequest(name=LAYER),
                         timeout=10).state == live_state.state
    layer_names = [l.name for l in stub.ListLayers(
        pb.ListLayersRequest(), timeout=10).layers]
    assert layer_names == [LAYER, "layers/new"], layer_names
    channel.close()
    server.kill()

    # 4. A start on a full disk serves what the directory holds.
    fill(filler)
    server = common.Server(port, state_dir, extra)
    assert "could not write a snapshot at start-up" in server.output(), \
        server.output()
    channel, stub = common.stub(port)
    assert layer(stub).version == live.version
    stub.Forward(pb.ForwardRequest(name=LAYER, input=common.tensor(x),
                                   training=False), timeout=10)
    j = i + 1
    while j < i + 200:
        try:
            forward(stub, j)
            j += 1
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
            break
    else:
        raise AssertionError("the log never ran out of space after a restart")
    unfill(filler)
    forward(stub, j)
    final = layer(stub)
    channel.close()
    server.stop()  # The shutdown snapshot has room now.
    server = common.Server(port, state_dir, extra)
    assert "WARNING" not in server.output(), server.output()
    channel, stub = common.stub(port)
    assert layer(stub).version == final.version
    channel.close()
    server.stop()
    print(f"full_disk_test: passed ({j - 1} forwards, refusals while full)")


def main():
    mount = tempfile.mkdtemp(prefix="normserve-full-")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mount],
        capture_output=True, text=True)
    if mounted.returncode != 0:
        print("full_disk_test: SKIPPED: cannot mount a tmpfs here "
              f"({mounted.stderr.strip()}); run as root to test a full disk")
        os.rmdir(mount)
        sys.exit(SKIP)
    try:
        run(mount)
    finally:
        subprocess.run(["umount", "-l", mount])
        shutil.rmtree(mount, ignore_errors=True)


if __name__ == "__main__":
    main()
