"""LayerNorm and RMSNorm layers against torch.nn.LayerNorm and a float64
RMSNorm reference (Debian's torch 1.13 has no nn.RMSNorm): 20 SGD training
steps plus eval, state dicts both ways, server-held parameters, bad input
over the wire, and a restart from the state directory."""

import shutil
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

import normserve
import normserve.torch as nst
from normserve_pytest import ServerProcess

F32_EPS = float(np.finfo(np.float32).eps)


class RMSNormRef(nn.Module):
    """torch.nn.RMSNorm's math, written out (float64 when the module is)."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.weight = (nn.Parameter(torch.ones(self.normalized_shape))
                       if elementwise_affine else None)

    def forward(self, x):
        dims = tuple(range(-len(self.normalized_shape), 0))
        eps = F32_EPS if self.eps is None else self.eps
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        return y if self.weight is None else y * self.weight


def make(kind, shape, client, **kwargs):
    if kind == "layer_norm":
        return (nst.LayerNorm(shape, client=client, **kwargs),
                nn.LayerNorm(shape, **{k: v for k, v in kwargs.items()
                                       if k != "bias"}))
    return nst.RMSNorm(shape, client=client, **kwargs), RMSNormRef(
        shape, **kwargs)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


CASES = [
    # kind, input shape, normalized_shape, kwargs
    ("layer_norm", (5, 7), 7, {}),
    ("layer_norm", (3, 4, 5), (4, 5), {}),
    ("layer_norm", (2, 3, 127), 127, {"eps": 1e-3}),
    ("layer_norm", (1, 13), 13, {}),
    ("layer_norm", (2, 2, 3, 5), (2, 3, 5), {}),
    ("layer_norm", (6, 11), 11, {"elementwise_affine": False}),
    ("rms_norm", (5, 7), 7, {}),
    ("rms_norm", (3, 4, 5), (4, 5), {"eps": 1e-6}),
    ("rms_norm", (1, 97), 97, {}),
    ("rms_norm", (4, 1), 1, {}),
    ("rms_norm", (6, 11), 11, {"elementwise_affine": False}),
]


@pytest.mark.parametrize("kind,xshape,nshape,kwargs", CASES)
def test_twenty_steps_and_eval_match_torch(client, kind, xshape, nshape,
                                           kwargs):
    torch.manual_seed(7)
    ours, ref32 = make(kind, nshape, client, **kwargs)
    ref64 = (nn.LayerNorm(nshape, **kwargs) if kind == "layer_norm" else
             RMSNormRef(nshape, **kwargs)).double()
    if ref32.weight is not None:
        with torch.no_grad():
            start = torch.rand(ref32.weight.shape) + 0.5
            for m in (ours, ref32, ref64):
                m.weight.copy_(start)
    params = lambda m: [p for p in m.parameters()]  # noqa: E731
    opts = [torch.optim.SGD(params(m), lr=0.05, momentum=0.9)
            for m in (ours, ref32, ref64) if params(m)]
    for step in range(20):
        x = torch.randn(xshape) * 3 + 2
        x32 = x.clone().requires_grad_(True)
        x_ours = x.clone().requires_grad_(True)
        x64 = x.double().requires_grad_(True)
        y_ours, y32, y64 = ours(x_ours), ref32(x32), ref64(x64)
        err_torch = max_err(y32, y64)
        assert max_err(y_ours, y64) <= 4 * err_torch + 1e-6, step
        g = torch.randn(xshape)
        for y in (y_ours, y32):
            y.backward(g)
        y64.backward(g.double())
        assert max_err(x_ours.grad, x64.grad) <= (
            4 * max_err(x32.grad, x64.grad) + 1e-5), step
        if ref32.weight is not None:
            assert ours.weight.grad.shape == ref32.weight.grad.shape
            assert max_err(ours.weight.grad, ref64.weight.grad) <= (
                4 * max_err(ref32.weight.grad, ref64.weight.grad) + 1e-5)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    ours.eval()
    with torch.no_grad():
        x = torch.randn(xshape)
        assert max_err(ours(x), ref64(x.double())) <= (
            4 * max_err(ref32(x), ref64(x.double())) + 1e-6)
    ours.close()


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_float32_statistics(client, kind, dtype):
    torch.manual_seed(1)
    ours, ref32 = make(kind, 64, client)
    x = torch.randn(8, 64) * 2 + 1
    ref64 = (nn.LayerNorm(64) if kind == "layer_norm" else
             RMSNormRef(64)).double()
    y = ours(x.to(dtype))
    assert y.dtype == dtype
    # One rounding of the output to the half type, as torch's own kernels.
    want = ref64(x.to(dtype).double())
    torch.testing.assert_close(y.double(), want.to(dtype).double(),
                               rtol=0, atol=2 * float(torch.finfo(dtype).eps)
                               * want.abs().max().item())
    ours.close()


def test_state_dict_both_ways_with_torch(client):
    torch.manual_seed(2)
    ref = nn.LayerNorm((3, 4))
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    ours = nst.LayerNorm((3, 4), client=client)
    ours.load_state_dict(ref.state_dict())
    server = client.get_state(ours.layer_name)
    assert sorted(server) == ["bias", "weight"]
    assert server["weight"].shape == (3, 4)
    np.testing.assert_array_equal(server["weight"], ref.weight.detach())
    back = nn.LayerNorm((3, 4))
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.bias, ref.bias)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        ours.load_state_dict(nn.LayerNorm(12).state_dict())
    ours.close()


def test_layer_norm_without_bias_has_only_a_weight(client):
    ours = nst.LayerNorm(6, bias=False, client=client)
    assert ours.bias is None
    assert sorted(client.get_state(ours.layer_name)) == ["weight"]
    info = client.get_layer(ours.layer_name)
    assert (info.kind, info.normalized_shape, info.bias) == (
        "layer_norm", (6,), False)
    x = torch.randn(4, 6, requires_grad=True)
    y = ours(x)
    y.sum().backward()
    ref = nn.functional.layer_norm(x.detach(), (6,))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert ours.weight.grad.shape == (6,)
    ours.close()


def test_rms_norm_eps_none_is_float32_epsilon(client):
    ours = nst.RMSNorm(5, client=client)
    info = client.get_layer(ours.layer_name)
    assert info.kind == "rms_norm" and info.eps is None and not info.bias
    x = torch.full((2, 5), 1e-4)  # Small enough that eps matters.
    want = RMSNormRef(5).double()(x.double())
    torch.testing.assert_close(ours(x).double(), want, rtol=1e-6, atol=0)
    ours.close()


def test_server_parameters_step_as_torch_sgd(client):
    torch.manual_seed(4)
    ours = nst.LayerNorm(8, client=client, server_parameters=True)
    ref = nn.LayerNorm(8)
    server_opt = nst.ServerSGD([ours], lr=0.1, momentum=0.5)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5)
    for _ in range(3):
        x = torch.randn(5, 8)
        g = torch.randn(5, 8)
        ours(x).backward(g)
        ref(x).backward(g)
        server_opt.step()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(ours.weight, ref.weight.detach(), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(ours.bias, ref.bias.detach(), rtol=1e-5,
                               atol=1e-6)
    ours.close()


def test_bad_input_over_the_wire(client):
    info = client.create_layer(kind="layer_norm", normalized_shape=(4, 5))
    with pytest.raises(normserve.InvalidArgumentError,
                       match=r"Given normalized_shape=\[4, 5\], expected "
                             r"input with shape \[\*, 4, 5\], but got input "
                             r"of size\[2, 5, 4\]"):
        client.forward(info.name, np.zeros((2, 5, 4), np.float32))
    with pytest.raises(normserve.InvalidArgumentError, match="NHWC"):
        client.forward(info.name, np.zeros((2, 3, 4, 5), np.float32),
                       layout="NHWC")
    with pytest.raises(normserve.InvalidArgumentError, match="bytes"):
        client.forward(info.name, normserve.WireTensor(
            (2, 4, 5), normserve.v1.normserve_pb2.DTYPE_FLOAT32,
            normserve.v1.normserve_pb2.LAYOUT_NCHW, b"\0" * 12))
    with pytest.raises(normserve.UnimplementedError,
                       match="no running statistics"):
        client.update_running_stats(info.name, [0.0] * 20, [1.0] * 20, 4)
    client.delete_layer(info.name)
    for bad, match in [(dict(normalized_shape=()), "normalized_shape"),
                       (dict(normalized_shape=(3, 0)), "every dim > 0"),
                       (dict(normalized_shape=4, eps=0.0), "eps"),
                       (dict(normalized_shape=(1,) * 9), "1 to 8")]:
        with pytest.raises(normserve.InvalidArgumentError, match=match):
            client.create_layer(kind="layer_norm", **bad)
    with pytest.raises(normserve.InvalidArgumentError, match="eps"):
        client.create_layer(kind="rms_norm", normalized_shape=4, eps=-1.0)
    with pytest.raises(ValueError, match="unknown kind"):
        client.create_layer(kind="batch_renorm")


def test_layers_survive_a_restart():
    state_dir = tempfile.mkdtemp(prefix="normserve-rownorm-")
    args = ["--device=cpu", "--cpu_threads=1", "--workers=2",
            f"--state_dir={state_dir}"]
    try:
        process = ServerProcess(args=args).start()
        client = normserve.Client(process.address, timeout=20)
        client.create_layer(kind="layer_norm", normalized_shape=(2, 3),
                            layer_id="ln", eps=1e-4)
        client.create_layer(kind="rms_norm", normalized_shape=6,
                            layer_id="rms")
        weight = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
        client.set_parameters("ln", weight=weight, bias=-weight)
        client.set_parameters("rms", weight=weight.reshape(-1) + 1)
        before = {n: (client.get_state(n), client.get_layer(n))
                  for n in ("ln", "rms")}
        client.close()
        assert process.stop() == 0
        process = ServerProcess(args=args).start()
        client = normserve.Client(process.address, timeout=20)
        for name, (state, info) in before.items():
            after = client.get_state(name)
            assert sorted(after) == sorted(state)
            for key in state:
                np.testing.assert_array_equal(after[key], state[key])
                assert after[key].shape == state[key].shape
            assert client.get_layer(name) == info
        client.close()
        assert process.stop() == 0
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def test_train_stream_runs_row_norms(client):
    ln = client.create_layer(kind="layer_norm", normalized_shape=5)
    rms = client.create_layer(kind="rms_norm", normalized_shape=5)
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    with client.train() as stream:
        fwd = stream.forward(ln.name, x, training=True)
        bwd = stream.backward(ln.name, fwd.handle, np.ones_like(x),
                              accumulate_grad=True)
        stream.optimizer_step(ln.name, lr=0.5)
        out = stream.forward(rms.name, x).output
    want = torch.nn.functional.layer_norm(torch.from_numpy(x), (5,))
    np.testing.assert_allclose(fwd.output, want, atol=1e-5)
    np.testing.assert_allclose(bwd.grad_bias, [3.0] * 5)
    state = client.get_state(ln.name)
    np.testing.assert_allclose(state["bias"], [-1.5] * 5)
    want = RMSNormRef(5)(torch.from_numpy(x)).detach()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    for info in (ln, rms):
        client.delete_layer(info.name)
