"""Writes tests/persistence/fixtures/v1: a state directory as the release
before the layer-kind change (commit 4098b4a) wrote it, and expected.json,
what that release served from it. fixture_test.py loads it with today's
server and compares bit for bit.

The directory holds both files the journal writes: `snapshot` (the layers
of a first run, ended by SIGTERM) and `wal.log` (a second run's records,
ended by SIGKILL, so they are not yet in a snapshot). Layers cover every
config field and every kind of durable state: a cumulative-average momentum,
affine off, track_running_stats off, NHWC/float16 defaults, spatial_dims,
accumulated gradients, SGD momentum buffers, two tenants holding the same
id, per-layer request ids, and create/delete request ids (a deleted layer).

Run once, with the old build; kept for the record:
  NORMSERVE_SERVER=/path/to/old/normserve PYTHONPATH=<old build>/python:. \
      /usr/bin/python3 tests/persistence/make_fixture.py OUT_DIR
"""
import json
import os
import shutil
import sys

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import pb  # noqa: E402

TOKENS = "alice-token-0123456789 alice\nbob-token-0123456789 bob\n"


def md(tenant):
    return (("authorization", f"Bearer {tenant}-token-0123456789"),)


def call(stub, method, request, tenant):
    return getattr(stub, method)(request, timeout=10, metadata=md(tenant))


def tensor(array, dtype=pb.DTYPE_FLOAT32, layout=pb.LAYOUT_UNSPECIFIED):
    if dtype == pb.DTYPE_FLOAT16:
        data = np.ascontiguousarray(array, np.float16).tobytes()
    else:
        data = np.ascontiguousarray(array, np.float32).tobytes()
    return pb.Tensor(shape=list(array.shape), dtype=dtype, layout=layout,
                     data=data)


# (tenant, id, config)
LAYERS = [
    ("alice", "bn2d", pb.BatchNormConfig(num_features=6, spatial_dims=2)),
    ("alice", "cumulative", pb.BatchNormConfig(
        num_features=5, cumulative_average=pb.CumulativeAverage(),
        affine=False, layout=pb.LAYOUT_NHWC, dtype=pb.DTYPE_FLOAT16,
        eps=1e-3)),
    ("alice", "notrack", pb.BatchNormConfig(
        num_features=3, track_running_stats=False, spatial_dims=1,
        momentum=0.25)),
    ("alice", "shared", pb.BatchNormConfig(num_features=4, momentum=0.5)),
    ("bob", "shared", pb.BatchNormConfig(num_features=4, eps=2e-5)),
    ("bob", "gone", pb.BatchNormConfig(num_features=2)),
]


def train_steps(stub, tenant, layer, c, steps, seed, dims=2, request_ids=False,
                accumulate=True, dtype=pb.DTYPE_FLOAT32):
    rng = np.random.default_rng(seed)
    for i in range(steps):
        shape = (4, c, 3, 3)[:dims + 2] if dims else (4, c)
        x = rng.standard_normal(shape).astype(np.float32) * (1 + i) + i
        fwd = pb.ForwardRequest(name=f"layers/{layer}",
                                input=tensor(x, dtype), training=True)
        if request_ids:
            fwd.request_id = f"{layer}-fwd-{seed}-{i}"
        out = call(stub, "Forward", fwd, tenant)
        dy = rng.standard_normal(shape).astype(np.float32)
        bwd = pb.BackwardRequest(name=f"layers/{layer}", handle=out.handle,
                                 grad_output=tensor(dy, dtype),
                                 accumulate_grad=accumulate)
        call(stub, "Backward", bwd, tenant)


def first_run(stub):
    for tenant, layer_id, config in LAYERS:
        request = pb.CreateLayerRequest(layer_id=layer_id, batch_norm=config)
        if layer_id == "gone":
            request.request_id = "create-gone"
        call(stub, "CreateLayer", request, tenant)
    train_steps(stub, "alice", "bn2d", 6, 3, seed=1, request_ids=True)
    call(stub, "OptimizerStep", pb.OptimizerStepRequest(
        name="layers/bn2d", sgd=pb.SgdOptions(lr=0.1, momentum=0.9,
                                             weight_decay=1e-4),
        request_id="bn2d-step-1"), "alice")
    # cumulative: affine off, float16 NHWC by default.
    rng = np.random.default_rng(7)
    for i in range(3):
        x = rng.standard_normal((2, 3, 3, 5)).astype(np.float32) + i
        call(stub, "Forward", pb.ForwardRequest(
            name="layers/cumulative",
            input=pb.Tensor(shape=[2, 5, 3, 3],
                            data=x.astype(np.float16).tobytes()),
            training=True, save_for_backward=False), "alice")
    call(stub, "UpdateRunningStats", pb.UpdateRunningStatsRequest(
        name="layers/cumulative", mean=[0.5, 1, 1.5, 2, 2.5],
        var=[1, 2, 3, 4, 5], count=10, request_id="cum-urs-1"), "alice")
    train_steps(stub, "alice", "notrack", 3, 2, seed=3, dims=0)
    call(stub, "SetParameters", pb.SetParametersRequest(
        name="layers/notrack", weight=[0.5, 2, 3], request_id="nt-set-1"),
        "alice")
    train_steps(stub, "alice", "shared", 4, 2, seed=4, dims=1)
    train_steps(stub, "bob", "shared", 4, 1, seed=5, dims=3)
    call(stub, "OptimizerStep", pb.OptimizerStepRequest(
        name="layers/shared", sgd=pb.SgdOptions(lr=0.5, momentum=0.5,
                                               nesterov=True),
        keep_grad=True), "bob")
    call(stub, "DeleteLayer", pb.DeleteLayerRequest(
        name="layers/gone", request_id="delete-gone"), "bob")


def second_run(stub):
    """Records that stay in wal.log (the server is SIGKILLed after)."""
    train_steps(stub, "alice", "bn2d", 6, 2, seed=11, request_ids=True)
    call(stub, "SetParameters", pb.SetParametersRequest(
        name="layers/bn2d", bias=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        request_id="bn2d-set-2", expected_version=None), "alice")
    state = pb.StateDict()
    state.tensors["running_mean"].CopyFrom(
        tensor(np.array([1, -1, 2, -2], np.float32)))
    call(stub, "LoadState", pb.LoadStateRequest(
        name="layers/shared", state=state, allow_missing=True,
        request_id="shared-load-1"), "alice")
    call(stub, "CreateLayer", pb.CreateLayerRequest(
        layer_id="late", batch_norm=pb.BatchNormConfig(num_features=3),
        request_id="create-late"), "bob")
    train_steps(stub, "bob", "late", 3, 1, seed=12, dims=0, accumulate=False)


def hexfloats(values):
    return [float(v).hex() for v in values]


def dump(stub):
    """What the server serves: every layer's info and state, exactly."""
    out = {}
    for tenant in ("alice", "bob"):
        layers = call(stub, "ListLayers", pb.ListLayersRequest(), tenant)
        for layer in layers.layers:
            state = call(stub, "GetState", pb.GetStateRequest(name=layer.name),
                         tenant)
            arrays = {}
            for key, t in sorted(state.state.tensors.items()):
                if t.dtype == pb.DTYPE_INT64:
                    arrays[key] = int(np.frombuffer(t.data, np.int64)[0])
                else:
                    arrays[key] = hexfloats(np.frombuffer(t.data, np.float32))
            cfg = layer.batch_norm
            out[f"{tenant}/{layer.name}"] = {
                "version": layer.version,
                "num_batches_tracked": layer.num_batches_tracked,
                "has_accumulated_grad": layer.has_accumulated_grad,
                "config": {
                    "num_features": cfg.num_features, "eps": cfg.eps.hex(),
                    "momentum": (cfg.momentum.hex() if cfg.HasField("momentum")
                                 else None),
                    "affine": cfg.affine,
                    "track_running_stats": cfg.track_running_stats,
                    "layout": cfg.layout, "dtype": cfg.dtype,
                    "spatial_dims": cfg.spatial_dims,
                },
                "state": arrays,
            }
    return out


def replays(stub):
    """Answers to retries of request ids the directory remembers, then an
    optimizer step on each layer holding gradients (which reads them)."""
    out = {}

    def attempt(label, method, request, tenant):
        try:
            reply = call(stub, method, request, tenant)
            out[label] = {"code": "OK",
                          "version": getattr(reply, "version", None)}
        except grpc.RpcError as e:
            out[label] = {"code": e.code().name, "details": e.details()}

    attempt("retry bn2d-set-2", "SetParameters", pb.SetParametersRequest(
        name="layers/bn2d", bias=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        request_id="bn2d-set-2"), "alice")
    attempt("retry bn2d-step-1", "OptimizerStep", pb.OptimizerStepRequest(
        name="layers/bn2d", sgd=pb.SgdOptions(lr=0.1, momentum=0.9,
                                             weight_decay=1e-4),
        request_id="bn2d-step-1"), "alice")
    attempt("retry cum-urs-1", "UpdateRunningStats",
            pb.UpdateRunningStatsRequest(
                name="layers/cumulative", mean=[0.5, 1, 1.5, 2, 2.5],
                var=[1, 2, 3, 4, 5], count=10, request_id="cum-urs-1"),
            "alice")
    attempt("retry create-gone", "CreateLayer", pb.CreateLayerRequest(
        layer_id="gone", batch_norm=pb.BatchNormConfig(num_features=2),
        request_id="create-gone"), "bob")
    attempt("retry delete-gone", "DeleteLayer", pb.DeleteLayerRequest(
        name="layers/gone", request_id="delete-gone"), "bob")
    attempt("retry create-late", "CreateLayer", pb.CreateLayerRequest(
        layer_id="late", batch_norm=pb.BatchNormConfig(num_features=3),
        request_id="create-late"), "bob")
    attempt("alice step bn2d", "OptimizerStep", pb.OptimizerStepRequest(
        name="layers/bn2d", sgd=pb.SgdOptions(lr=0.05, momentum=0.9)),
        "alice")
    attempt("bob step shared", "OptimizerStep", pb.OptimizerStepRequest(
        name="layers/shared", sgd=pb.SgdOptions(lr=0.5, momentum=0.5,
                                               nesterov=True)), "bob")
    attempt("alice step notrack", "OptimizerStep", pb.OptimizerStepRequest(
        name="layers/notrack", sgd=pb.SgdOptions(lr=1.0)), "alice")
    return out


def main():
    out_dir = sys.argv[1]
    state_dir = os.path.join(out_dir, "state")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    tokens = os.path.join(out_dir, "tokens")
    with open(tokens, "w") as f:
        f.write(TOKENS)
    extra = ["--auth_tokens", tokens, "--snapshot_every", "100000"]
    port = common.free_port()
    server = common.Server(port, state_dir, extra)
    channel, stub = common.stub(port)
    first_run(stub)
    channel.close()
    server.stop()
    server = common.Server(port, state_dir, extra)
    channel, stub = common.stub(port)
    second_run(stub)
    channel.close()
    server.kill()
    assert os.path.getsize(os.path.join(state_dir, "wal.log")) > 8
    # What the old server serves from the directory (on a copy: a start
    # rewrites the snapshot).
    probe = os.path.join(out_dir, "probe")
    shutil.copytree(state_dir, probe)
    server = common.Server(port, probe, extra)
    channel, stub = common.stub(port)
    expected = {"layers": dump(stub), "replays": replays(stub)}
    expected["after_replays"] = dump(stub)
    channel.close()
    server.kill()
    shutil.rmtree(probe)
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {out_dir}: {len(expected['layers'])} layers")


if __name__ == "__main__":
    main()
