"""request_id and expected_version, in memory and across a restart."""
import shutil
import sys
import tempfile

import grpc
import numpy as np

import common
from common import pb

LAYER = "layers/r"


def expect_error(code, text, fn, *args):
    try:
        fn(*args, timeout=5)
    except grpc.RpcError as e:
        assert e.code() == code, (e.code(), e.details())
        assert text in e.details(), e.details()
        return
    raise AssertionError(f"expected {code}")


def run(state_dir):
    port = common.free_port()
    server = common.Server(port, state_dir)
    channel, stub = common.stub(port)
    stub.CreateLayer(pb.CreateLayerRequest(
        layer_id="r", batch_norm=pb.BatchNormConfig(num_features=2)), timeout=5)
    urs = pb.UpdateRunningStatsRequest(name=LAYER, mean=[1, 2], var=[3, 4],
                                       count=4, request_id="u1")
    first = stub.UpdateRunningStats(urs, timeout=5)
    again = stub.UpdateRunningStats(urs, timeout=5)
    assert (again.version, again.num_batches_tracked) == (
        first.version, first.num_batches_tracked) == (2, 1), (first, again)
    x = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    fwd = pb.ForwardRequest(name=LAYER, input=common.tensor(x), training=True,
                            request_id="f1")
    assert stub.Forward(fwd, timeout=5).version == 3
    expect_error(grpc.StatusCode.ALREADY_EXISTS, "already applied",
                 stub.Forward, fwd)
    # The same id for another operation.
    expect_error(grpc.StatusCode.ALREADY_EXISTS, "another operation",
                 stub.SetParameters,
                 pb.SetParametersRequest(name=LAYER, weight=[1, 1],
                                         request_id="u1"))
    expect_error(grpc.StatusCode.FAILED_PRECONDITION, "expected version 2",
                 stub.SetParameters,
                 pb.SetParametersRequest(name=LAYER, weight=[2, 2],
                                         expected_version=2))
    ok = stub.SetParameters(pb.SetParametersRequest(
        name=LAYER, weight=[2, 2], expected_version=3), timeout=5)
    assert ok.version == 4
    assert stub.GetLayer(pb.GetLayerRequest(name=LAYER), timeout=5).version == 4
    if state_dir:
        server.kill()
        channel.close()
        server = common.Server(port, state_dir)
        channel, stub = common.stub(port)
        assert stub.UpdateRunningStats(urs, timeout=5).version == 2
        expect_error(grpc.StatusCode.ALREADY_EXISTS, "already applied",
                     stub.Forward, fwd)
        layer = stub.GetLayer(pb.GetLayerRequest(name=LAYER), timeout=5)
        assert (layer.version, layer.num_batches_tracked) == (4, 2), layer
    channel.close()  # An open channel delays the drain.
    server.stop()


def main():
    run(None)
    state_dir = tempfile.mkdtemp(prefix="normserve-rid-")
    try:
        run(state_dir)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    print("request_id test passed (in memory and across a restart)")


if __name__ == "__main__":
    sys.exit(main())
