"""normserve.Client against the real server: every call, checked against a
float64 numpy reference of PyTorch's formulas (docs/design.md §1)."""

import uuid

import numpy as np
import pytest

import normserve

AXES = (0, 2, 3)


def unique(prefix="t"):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def batch(rng, shape, scale=2.0, shift=1.0):
    c = shape[1]
    per = np.arange(c).reshape((1, c) + (1,) * (len(shape) - 2))
    return (shift + 0.3 * per + (scale + 0.1 * per)
            * rng.standard_normal(shape)).astype(np.float32)


def reference_train(x, weight, bias, eps=1e-5):
    xd = x.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = xd.mean(axis=axes)
    var = xd.var(axis=axes)
    invstd = 1 / np.sqrt(var + eps)
    y = ((xd - mean.reshape(shape)) * invstd.reshape(shape)
         * weight.reshape(shape) + bias.reshape(shape))
    return y, mean, var, invstd


def reference_backward(x, dy, weight, eps=1e-5):
    xd, dyd = x.astype(np.float64), dy.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    n = x.size / x.shape[1]
    mean = xd.mean(axis=axes).reshape(shape)
    invstd = (1 / np.sqrt(xd.var(axis=axes) + eps)).reshape(shape)
    xhat = (xd - mean) * invstd
    sum_dy = dyd.sum(axis=axes)
    sum_dy_xhat = (dyd * xhat).sum(axis=axes)
    dx = (dyd - sum_dy.reshape(shape) / n
          - xhat * sum_dy_xhat.reshape(shape) / n) * invstd * weight.reshape(
              shape)
    return dx, sum_dy_xhat, sum_dy


def close(got, want, tol=1e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol,
                               atol=tol)


def test_layer_lifecycle_and_paging(client):
    ids = [unique("life") for _ in range(3)]
    info = client.create_layer(6, layer_id=ids[0], eps=1e-3, momentum=None,
                               affine=False, track_running_stats=True,
                               layout="NHWC", dtype="bfloat16",
                               spatial_dims=2)
    assert info.name == f"layers/{ids[0]}" and info.id == ids[0]
    assert (info.num_features, info.eps, info.momentum, info.affine) == (
        6, 1e-3, None, False)
    assert (info.layout, info.dtype, info.spatial_dims) == ("NHWC",
                                                            "bfloat16", 2)
    assert info.version >= 1 and info.num_batches_tracked == 0
    assert info.kind == "batch_norm"
    for layer_id in ids[1:]:
        client.create_layer(2, layer_id=layer_id)
    assert client.get_layer(ids[1]).momentum == pytest.approx(0.1)
    assert client.get_layer(f"layers/{ids[2]}").name == f"layers/{ids[2]}"
    names = [l.name for l in client.all_layers()]
    assert all(f"layers/{i}" in names for i in ids)
    assert names == sorted(names)
    first = client.list_layers(page_size=1)
    assert len(first.layers) == 1 and first.next_page_token
    second = client.list_layers(page_size=1, page_token=first.next_page_token)
    assert second.layers[0].name > first.layers[0].name
    with pytest.raises(normserve.InvalidArgumentError, match="not issued"):
        client.list_layers(page_size=1, page_token="made-up")
    server_chosen = client.create_layer(2)
    assert server_chosen.name.startswith("layers/")
    for name in ids + [server_chosen.name]:
        client.delete_layer(name)
    with pytest.raises(normserve.NotFoundError):
        client.get_layer(ids[0])


def test_forward_backward_numerics(client):
    rng = np.random.default_rng(2)
    name = unique("fb")
    client.create_layer(4, layer_id=name, momentum=0.1)
    weight = np.array([0.5, 1.5, -1.0, 2.0], np.float32)
    bias = np.array([0.1, -0.2, 0.3, 0.0], np.float32)
    assert client.set_parameters(name, weight=weight, bias=bias) > 0
    x = batch(rng, (6, 4, 5, 3))
    fwd = client.forward(name, x, training=True, return_stats=True)
    y, mean, var, invstd = reference_train(x, weight, bias)
    assert fwd.output.shape == x.shape and fwd.output.dtype == np.float32
    close(fwd.output, y)
    close(fwd.mean, mean)
    close(fwd.invstd, invstd)
    assert fwd.handle != 0

    dy = rng.standard_normal(x.shape).astype(np.float32)
    bwd = client.backward(name, fwd.handle, dy)
    dx, dw, db = reference_backward(x, dy, weight)
    close(bwd.grad_input, dx)
    close(bwd.grad_weight, dw, 1e-4)
    close(bwd.grad_bias, db, 1e-4)
    with pytest.raises(normserve.FailedPreconditionError):
        client.backward(name, fwd.handle, dy)  # Consumed.

    n = x.size / 4
    state = client.get_state(name)
    close(state["running_mean"], 0.1 * mean)
    close(state["running_var"], 0.9 + 0.1 * var * n / (n - 1))
    assert int(state["num_batches_tracked"]) == 1
    assert state["num_batches_tracked"].dtype == np.int64
    close(state["weight"], weight, 0)
    assert state.version > 1

    # Eval uses the running stats and saves a context for an eval backward.
    ev = client.forward(name, x, return_stats=True)
    rm, rv = state["running_mean"], state["running_var"]
    shape = (1, 4, 1, 1)
    want = ((x - rm.reshape(shape)) / np.sqrt(rv.reshape(shape) + 1e-5)
            * weight.reshape(shape) + bias.reshape(shape))
    close(ev.output, want)
    assert ev.mean.size == 0  # Running stats used: nothing to return.
    eb = client.backward(name, ev.handle, dy, skip_grad_input=True)
    assert eb.grad_input is None
    close(eb.grad_bias, dy.astype(np.float64).sum(axis=AXES), 1e-4)
    none = client.forward(name, x, save_for_backward=False)
    assert none.handle == 0
    client.delete_layer(name)


def test_nhwc_and_half_dtypes(client):
    rng = np.random.default_rng(3)
    name = unique("half")
    client.create_layer(3, layer_id=name)
    nhwc = batch(rng, (4, 3, 5, 5)).transpose(0, 2, 3, 1).copy()
    x = np.moveaxis(nhwc, -1, 1)  # Channels-last view, sent as NHWC.
    out = client.forward(name, x, training=True, save_for_backward=False)
    assert out.output.strides == x.strides  # Came back channels last.
    close(out.output, reference_train(x, np.ones(3), np.zeros(3))[0])
    for dtype, tol in (("float16", 4e-3), ("bfloat16", 3e-2)):
        fwd = client.forward(name, x, training=True, dtype=dtype)
        rounded = normserve.tensor.to_numpy(
            normserve.tensor.from_numpy(x, dtype=dtype))
        assert fwd.output.dtype == np.float32 if dtype == "bfloat16" else (
            fwd.output.dtype == np.float16)
        close(fwd.output, reference_train(rounded, np.ones(3),
                                          np.zeros(3))[0], tol)
        with pytest.raises(normserve.InvalidArgumentError,
                           match="grad_output is float32"):
            client.backward(name, fwd.handle, x)  # dtype differs
        bwd = client.backward(name, fwd.handle, np.ones_like(x), dtype=dtype,
                              layout="NHWC")
        assert np.abs(np.asarray(bwd.grad_input, np.float32)).max() < tol
    client.delete_layer(name)


def test_update_running_stats_and_cumulative_average(client):
    name = unique("urs")
    client.create_layer(2, layer_id=name, momentum=None)
    means = [np.array([1.0, -2.0]), np.array([3.0, 0.5])]
    variances = [np.array([4.0, 1.0]), np.array([2.0, 0.25])]
    for m, v in zip(means, variances):
        result = client.update_running_stats(name, m, v, count=5)
    assert result.num_batches_tracked == 2
    state = client.get_state(name)
    # Cumulative average: factor 1/1 then 1/2.
    close(state["running_mean"], (means[0] + means[1]) / 2)
    close(state["running_var"], (variances[0] + variances[1]) / 2 * 5 / 4)
    with pytest.raises(normserve.InvalidArgumentError, match="count"):
        client.update_running_stats(name, [0, 0], [1, 1], count=1)
    client.delete_layer(name)


def test_optimizer_step_matches_torch_sgd(client):
    import torch
    rng = np.random.default_rng(4)
    name = unique("sgd")
    client.create_layer(3, layer_id=name)
    weight = torch.nn.Parameter(torch.ones(3))
    bias = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([weight, bias], lr=0.05, momentum=0.9,
                          dampening=0.1, weight_decay=0.01)
    for _ in range(3):
        for _ in range(2):  # Two backwards accumulate before a step.
            x = batch(rng, (5, 3, 4))
            fwd = client.forward(name, x, training=True)
            g = rng.standard_normal(x.shape).astype(np.float32)
            bwd = client.backward(name, fwd.handle, g, accumulate_grad=True)
            weight.grad = (0 if weight.grad is None else weight.grad) + \
                torch.from_numpy(bwd.grad_weight)
            bias.grad = (0 if bias.grad is None else bias.grad) + \
                torch.from_numpy(bwd.grad_bias)
        assert client.get_layer(name).has_accumulated_grad
        client.optimizer_step(name, lr=0.05, momentum=0.9, dampening=0.1,
                              weight_decay=0.01)
        opt.step()
        opt.zero_grad()
        assert not client.get_layer(name).has_accumulated_grad
    state = client.get_state(name)
    close(state["weight"], weight.detach().numpy(), 1e-5)
    close(state["bias"], bias.detach().numpy(), 1e-5)
    assert set(state) >= {"weight_momentum_buffer", "bias_momentum_buffer"}
    with pytest.raises(normserve.FailedPreconditionError,
                       match="no accumulated gradients"):
        client.optimizer_step(name, lr=0.1)
    client.delete_layer(name)


def test_state_round_trip(client):
    name, other = unique("st"), unique("st")
    client.create_layer(3, layer_id=name)
    client.create_layer(3, layer_id=other)
    state = {"weight": np.array([1, 2, 3], np.float32),
             "bias": np.array([-1, 0, 1], np.float32),
             "running_mean": np.array([0.5, 0.25, 0.125], np.float32),
             "running_var": np.array([2, 3, 4], np.float32),
             "num_batches_tracked": np.array(17)}
    version = client.load_state(name, state)
    got = client.get_state(name)
    assert got.version == version
    for key, value in state.items():
        np.testing.assert_array_equal(got[key], value)
    client.load_state(other, got)  # What GetState returns loads back.
    assert int(client.get_state(other)["num_batches_tracked"]) == 17
    with pytest.raises(normserve.InvalidArgumentError, match="missing key"):
        client.load_state(name, {"weight": [1, 1, 1]})
    client.load_state(name, {"weight": [1, 1, 1]}, allow_missing=True)
    np.testing.assert_array_equal(client.get_state(name)["bias"], [-1, 0, 1])
    with pytest.raises(normserve.InvalidArgumentError, match="unexpected key"):
        client.load_state(name, {"running_means": [0, 0, 0]},
                          allow_missing=True)
    client.delete_layer(name)
    client.delete_layer(other)


def test_train_stream_matches_unary_calls(client):
    rng = np.random.default_rng(5)
    xs = [batch(rng, (4, 3, 3, 3)) for _ in range(4)]
    gs = [rng.standard_normal(x.shape).astype(np.float32) for x in xs]
    unary, streamed = unique("un"), unique("sm")
    for name in (unary, streamed):
        client.create_layer(3, layer_id=name)
    outputs = []
    for x, g in zip(xs, gs):
        fwd = client.forward(unary, x, training=True)
        bwd = client.backward(unary, fwd.handle, g, accumulate_grad=True)
        client.optimizer_step(unary, lr=0.1, momentum=0.5)
        outputs.append((fwd.output.copy(), bwd.grad_input.copy()))

    with client.train() as stream:
        for (x, g), (y, dx) in zip(zip(xs, gs), outputs):
            fwd = stream.forward(streamed, x, training=True)
            bwd = stream.backward(streamed, fwd.handle, g,
                                  accumulate_grad=True)
            stream.optimizer_step(streamed, lr=0.1, momentum=0.5)
            np.testing.assert_array_equal(fwd.output, y)
            np.testing.assert_array_equal(bwd.grad_input, dx)
        # Pipelined: many operations in flight, answered in order.
        futures = [stream.forward_async(streamed, x) for x in xs]
        futures.append(stream.get_state_async(streamed))
        handles = [f.result(30).handle for f in futures[:-1]]
        assert len(set(handles)) == len(handles)
        streamed_state = futures[-1].result(30)
        # A failed operation raises and the stream goes on.
        with pytest.raises(normserve.NotFoundError, match="no-such-layer"):
            stream.get_layer("no-such-layer")
        with pytest.raises(normserve.InvalidArgumentError):
            stream.forward(streamed, np.zeros((2, 5, 2, 2), np.float32))
        assert stream.get_layer(streamed).num_batches_tracked == 4
        assert stream.update_running_stats(streamed, [0, 0, 0], [1, 1, 1],
                                           2).num_batches_tracked == 5
        stream.set_parameters(streamed, bias=[1, 2, 3])
        stream.load_state(streamed, {"num_batches_tracked": 9},
                          allow_missing=True)
        assert int(stream.get_state(streamed)["num_batches_tracked"]) == 9
    unary_state = client.get_state(unary)
    for key in unary_state:
        np.testing.assert_array_equal(streamed_state[key], unary_state[key])
    with pytest.raises(normserve.CancelledError, match="closed"):
        stream.get_layer(streamed)
    client.delete_layer(unary)
    client.delete_layer(streamed)


def test_timeouts(server, client):
    name = unique("to")
    client.create_layer(8, layer_id=name)
    x = np.ones((64, 8, 64, 64), np.float32)  # 8 MiB: well over 1 ms.
    with pytest.raises(normserve.DeadlineExceededError) as err:
        client.forward(name, x, training=True, timeout=1e-3)
    assert err.value.code.name == "DEADLINE_EXCEEDED"
    quick = normserve.Client(server.address, timeout=1e-3)  # The default.
    with pytest.raises(normserve.DeadlineExceededError):
        quick.forward(name, x, training=True)
    quick.close()
    with pytest.raises(normserve.CancelledError, match="closed"):
        quick.get_layer(name)
    client.wait_ready(timeout=10)
    client.delete_layer(name)
