"""A client of release 0.1.0: only that release's generated stubs, no
normserve package. Run by test_proto_compat.py with PYTHONPATH set to the
stubs generated from proto/compat/normserve-v1-0.1.0.pb:

    old_release_client.py ADDRESS LAYER_ID INPUT.npy GRAD.npy

Creates a BatchNorm2d layer, runs a training forward and backward (grads
accumulated), one SGD step, an eval forward, exports the state, imports it
into a second layer, runs one forward over the Train stream, and prints
everything as JSON.
"""

import json
import sys

import grpc
import numpy as np

from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc


def tensor(array):
    return pb.Tensor(shape=list(array.shape), dtype=pb.DTYPE_FLOAT32,
                     layout=pb.LAYOUT_NCHW,
                     data=np.ascontiguousarray(array, "<f4").tobytes())


def array(t):
    return np.frombuffer(t.data, "<f4").reshape(tuple(t.shape)).tolist()


def main():
    address, layer_id, x_path, g_path = sys.argv[1:]
    x, g = np.load(x_path), np.load(g_path)
    stub = pb_grpc.NormalizationStub(grpc.insecure_channel(address))
    out = {}
    layer = stub.CreateLayer(pb.CreateLayerRequest(
        layer_id=layer_id,
        batch_norm=pb.BatchNormConfig(num_features=x.shape[1], momentum=0.1,
                                      spatial_dims=2)), timeout=30)
    out["created"] = layer.name
    fwd = stub.Forward(pb.ForwardRequest(name=layer.name, input=tensor(x),
                                         training=True, return_stats=True),
                       timeout=30)
    out["output"] = array(fwd.output)
    out["mean"] = list(fwd.mean)
    bwd = stub.Backward(pb.BackwardRequest(name=layer.name,
                                           handle=fwd.handle,
                                           grad_output=tensor(g),
                                           accumulate_grad=True), timeout=30)
    out["grad_input"] = array(bwd.grad_input)
    out["grad_weight"] = list(bwd.grad_weight)
    out["grad_bias"] = list(bwd.grad_bias)
    stub.OptimizerStep(pb.OptimizerStepRequest(
        name=layer.name, sgd=pb.SgdOptions(lr=0.5)), timeout=30)
    evaluated = stub.Forward(pb.ForwardRequest(
        name=layer.name, input=tensor(x), training=False,
        save_for_backward=False), timeout=30)
    out["eval_output"] = array(evaluated.output)
    state = stub.GetState(pb.GetStateRequest(name=layer.name), timeout=30)
    out["state_keys"] = sorted(state.state.tensors.keys())
    out["state"] = {
        k: np.frombuffer(v.data, "<f4").tolist()
        for k, v in state.state.tensors.items() if v.dtype == pb.DTYPE_FLOAT32}

    copy = stub.CreateLayer(pb.CreateLayerRequest(
        layer_id=layer_id + "-copy",
        batch_norm=pb.BatchNormConfig(num_features=x.shape[1],
                                      spatial_dims=2)), timeout=30)
    stub.LoadState(pb.LoadStateRequest(name=copy.name, state=state.state),
                   timeout=30)
    info = stub.GetLayer(pb.GetLayerRequest(name=copy.name), timeout=30)
    out["copy_num_batches_tracked"] = info.num_batches_tracked
    responses = stub.Train(iter([pb.TrainRequest(
        request_id=7, forward=pb.ForwardRequest(
            name=copy.name, input=tensor(x), training=False,
            save_for_backward=False))]), timeout=30)
    (response,) = list(responses)
    out["stream_request_id"] = response.request_id
    out["stream_ok"] = response.status.code == 0
    out["stream_output"] = array(response.forward.output)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
