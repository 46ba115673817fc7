"""GroupNorm and InstanceNorm1d/2d/3d layers against torch.nn: 20 SGD
training steps plus eval, judged against float64 torch no worse than
float32 torch's own error; running statistics of tracked InstanceNorm;
state dicts both ways; unbatched inputs; half inputs; bad input over the
wire; the Train stream; and a restart from the state directory."""

import shutil
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

import normserve
import normserve.torch as nst
from normserve_pytest import ServerProcess


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def make(kind, client, args, kwargs):
    ours = getattr(nst, kind)(*args, client=client, **kwargs)
    ref32 = getattr(nn, kind)(*args, **kwargs)
    ref64 = getattr(nn, kind)(*args, **kwargs).double()
    return ours, ref32, ref64


CASES = [
    # module, constructor args, input shape, kwargs, channels_last
    ("GroupNorm", (3, 6), (2, 6, 5, 7), {}, False),
    ("GroupNorm", (1, 5), (3, 5, 11), {}, False),           # G = 1
    ("GroupNorm", (7, 7), (2, 7, 3, 3), {}, False),         # G = C
    ("GroupNorm", (2, 4), (1, 4, 13), {"eps": 1e-3}, False),  # N = 1
    ("GroupNorm", (4, 8), (5, 8), {}, False),               # no spatial dims
    ("GroupNorm", (2, 6), (3, 6, 2, 3, 5), {"affine": False}, False),
    ("InstanceNorm1d", (5,), (3, 5, 17), {}, False),
    ("InstanceNorm1d", (3,), (4, 3, 9),
     {"affine": True, "track_running_stats": True}, False),
    ("InstanceNorm2d", (4,), (2, 4, 5, 7),
     {"affine": True, "track_running_stats": True, "momentum": 0.3}, False),
    ("InstanceNorm2d", (6,), (3, 6, 4, 5), {"affine": True}, True),  # NHWC
    ("InstanceNorm2d", (3,), (1, 3, 2, 1), {"track_running_stats": True},
     False),
    ("InstanceNorm3d", (2,), (2, 2, 3, 4, 5),
     {"affine": True, "track_running_stats": True}, False),
]


@pytest.mark.parametrize("kind,args,xshape,kwargs,channels_last", CASES)
def test_twenty_steps_and_eval_match_torch(client, kind, args, xshape, kwargs,
                                           channels_last):
    torch.manual_seed(11)
    ours, ref32, ref64 = make(kind, client, args, kwargs)
    if ref32.weight is not None:
        with torch.no_grad():
            w = torch.rand(ref32.weight.shape) + 0.5
            b = torch.randn(ref32.bias.shape)
            for m in (ours, ref32, ref64):
                m.weight.copy_(w)
                m.bias.copy_(b)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
            for m in (ours, ref32, ref64) if list(m.parameters())]
    for step in range(20):
        x = torch.randn(xshape) * 3 + 2
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x_ours = x.clone().requires_grad_(True)
        x32 = x.clone().requires_grad_(True)
        x64 = x.double().requires_grad_(True)
        y_ours, y32, y64 = ours(x_ours), ref32(x32), ref64(x64)
        assert y_ours.shape == y32.shape
        assert max_err(y_ours, y64) <= 4 * max_err(y32, y64) + 1e-6, step
        g = torch.randn(xshape)
        y_ours.backward(g)
        y32.backward(g)
        y64.backward(g.double())
        assert max_err(x_ours.grad, x64.grad) <= (
            4 * max_err(x32.grad, x64.grad) + 1e-5), step
        if ref32.weight is not None:
            for name in ("weight", "bias"):
                got = getattr(ours, name).grad
                want32 = getattr(ref32, name).grad
                want64 = getattr(ref64, name).grad
                assert max_err(got, want64) <= (
                    4 * max_err(want32, want64) + 1e-5), (step, name)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        if getattr(ref32, "track_running_stats", False):
            for name in ("running_mean", "running_var"):
                got = getattr(ours, name)
                assert max_err(got, getattr(ref64, name)) <= (
                    4 * max_err(getattr(ref32, name), getattr(ref64, name))
                    + 1e-6), (step, name)
    if getattr(ref32, "track_running_stats", False):
        assert int(ours.num_batches_tracked) == int(ref32.num_batches_tracked)
    for m in (ours, ref32, ref64):
        m.eval()
    with torch.no_grad():
        x = torch.randn(xshape)
        assert max_err(ours(x), ref64(x.double())) <= (
            4 * max_err(ref32(x), ref64(x.double())) + 1e-6)
    ours.close()


@pytest.mark.parametrize("kind", ["InstanceNorm1d", "InstanceNorm2d",
                                  "InstanceNorm3d"])
def test_unbatched_input_as_torch(client, kind):
    torch.manual_seed(3)
    d = int(kind[-2])
    ours, ref, _ = make(kind, client, (3,), {"affine": True,
                                             "track_running_stats": True})
    x = torch.randn((3,) + (4,) * d, requires_grad=True)
    y = ours(x)
    want = ref(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    with pytest.raises(ValueError, match=rf"expected {d + 1}D or {d + 2}D "
                                         rf"input \(got {d + 3}D input\)"):
        ours(torch.randn((1, 3) + (4,) * (d + 1)))
    ours.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["GroupNorm", "InstanceNorm2d"])
def test_half_inputs_keep_float32_statistics(client, kind, dtype):
    torch.manual_seed(5)
    args = (2, 8) if kind == "GroupNorm" else (8,)
    ours, _, ref64 = make(kind, client, args, {})
    x = (torch.randn(3, 8, 6, 5) * 2 + 1).to(dtype)
    y = ours(x)
    assert y.dtype == dtype
    want = ref64(x.double())
    torch.testing.assert_close(y.double(), want.to(dtype).double(), rtol=0,
                               atol=2 * float(torch.finfo(dtype).eps)
                               * want.abs().max().item())
    ours.close()


def test_state_dicts_both_ways_with_torch(client):
    torch.manual_seed(6)
    ref = nn.GroupNorm(2, 6)
    inst = nn.InstanceNorm2d(6, affine=True, track_running_stats=True)
    with torch.no_grad():
        for m in (ref, inst):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
    inst(torch.randn(4, 6, 5, 5))  # Moves the running statistics.
    ours = nst.GroupNorm(2, 6, client=client)
    ours.load_state_dict(ref.state_dict())
    assert sorted(client.get_state(ours.layer_name)) == ["bias", "weight"]
    back = nn.GroupNorm(2, 6)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, ref.weight)
    ours_inst = nst.InstanceNorm2d(6, affine=True, track_running_stats=True,
                                   client=client)
    ours_inst.load_state_dict(inst.state_dict())
    assert sorted(ours_inst.state_dict()) == sorted(inst.state_dict())
    for key, value in inst.state_dict().items():
        assert torch.equal(ours_inst.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        ours.load_state_dict(nn.GroupNorm(2, 4).state_dict())
    assert nst.InstanceNorm1d(3, client=client).state_dict() == {}
    ours.close()
    ours_inst.close()


def test_server_parameters_step_as_torch_sgd(client):
    torch.manual_seed(8)
    ours = nst.GroupNorm(2, 4, client=client, server_parameters=True)
    ref = nn.GroupNorm(2, 4)
    server_opt = nst.ServerSGD([ours], lr=0.1, momentum=0.5)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5)
    for _ in range(3):
        x = torch.randn(3, 4, 5)
        g = torch.randn(3, 4, 5)
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


def test_attach_checks_the_config(client):
    first = nst.GroupNorm(2, 4, client=client)
    same = nst.GroupNorm(2, 4, client=client, layer=first.layer_name)
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(same(x), first(x))
    with pytest.raises(ValueError, match="num_groups 2"):
        nst.GroupNorm(4, 4, client=client, layer=first.layer_name)
    with pytest.raises(ValueError, match="kind group_norm"):
        nst.InstanceNorm1d(4, client=client, layer=first.layer_name)
    first.close()


def test_bad_input_over_the_wire(client):
    gn = client.create_layer(kind="group_norm", num_groups=2, num_channels=4)
    assert (gn.kind, gn.num_groups, gn.num_features, gn.affine) == (
        "group_norm", 2, 4, True)
    for shape, match in [
            ((3, 6, 5), r"Expected weight to be a vector of size equal to the "
                        r"number of channels in input, but got weight of "
                        r"shape \[4\] and input of shape \[3, 6, 5\]"),
            ((4,), "Expected at least 2 dimensions for input tensor but "
                   "received 1")]:
        with pytest.raises(normserve.InvalidArgumentError, match=match):
            client.forward(gn.name, np.zeros(shape, np.float32))
    with pytest.raises(normserve.InvalidArgumentError, match="NHWC"):
        client.forward(gn.name, np.zeros((2, 4, 3, 3), np.float32),
                       layout="NHWC")
    plain = client.create_layer(kind="group_norm", num_groups=2,
                                num_channels=4, affine=False)
    with pytest.raises(normserve.InvalidArgumentError,
                       match=r"Expected number of channels in input to be "
                             r"divisible by num_groups, but got input of "
                             r"shape \[2, 5, 3\] and num_groups=2"):
        client.forward(plain.name, np.zeros((2, 5, 3), np.float32))
    # Without affine, any C divisible by G runs, as in torch.
    out = client.forward(plain.name, np.ones((2, 6, 3), np.float32)).output
    np.testing.assert_array_equal(out, np.zeros((2, 6, 3), np.float32))
    with pytest.raises(normserve.InvalidArgumentError,
                       match="num_channels must be divisible by num_groups"):
        client.create_layer(kind="group_norm", num_groups=3, num_channels=4)
    inst = client.create_layer(kind="instance_norm", num_features=3,
                               track_running_stats=True, spatial_dims=2)
    assert (inst.kind, inst.affine, inst.track_running_stats) == (
        "instance_norm", False, True)
    with pytest.raises(normserve.InvalidArgumentError,
                       match=r"Expected more than 1 spatial element when "
                             r"training, got input size \[2, 3, 1, 1\]"):
        client.forward(inst.name, np.zeros((2, 3, 1, 1), np.float32),
                       training=True)
    with pytest.raises(normserve.InvalidArgumentError,
                       match=r"expected 4D input \(got 3D input\) for "
                             r"InstanceNorm2d"):
        client.forward(inst.name, np.zeros((3, 4, 4), np.float32))
    with pytest.raises(normserve.InvalidArgumentError, match="channels"):
        client.forward(inst.name, np.zeros((2, 4, 3, 3), np.float32))
    with pytest.raises(normserve.UnimplementedError,
                       match="UpdateRunningStats is for batch_norm"):
        client.update_running_stats(inst.name, [0.0] * 3, [1.0] * 3, 4)
    with pytest.raises(ValueError, match="momentum"):
        client.create_layer(kind="instance_norm", num_features=3,
                            momentum=None)
    # The failed calls changed nothing.
    state = client.get_state(inst.name)
    np.testing.assert_array_equal(state["running_var"], np.ones(3))
    assert int(state["num_batches_tracked"]) == 0
    for info in (gn, plain, inst):
        client.delete_layer(info.name)


def test_train_stream_runs_group_and_instance_norms(client):
    gn = client.create_layer(kind="group_norm", num_groups=2, num_channels=4)
    inst = client.create_layer(kind="instance_norm", num_features=4,
                               affine=True)
    x = np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32)
    with client.train() as stream:
        fwd = stream.forward(gn.name, x, training=True)
        bwd = stream.backward(gn.name, fwd.handle, np.ones_like(x),
                              accumulate_grad=True)
        stream.optimizer_step(gn.name, lr=0.5)
        out = stream.forward(inst.name, x, training=True).output
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(fwd.output, nn.functional.group_norm(xt, 2),
                               atol=1e-5)
    np.testing.assert_allclose(bwd.grad_bias, [15.0] * 4)
    np.testing.assert_allclose(client.get_state(gn.name)["bias"], [-7.5] * 4)
    np.testing.assert_allclose(out, nn.functional.instance_norm(xt),
                               atol=1e-5)
    for info in (gn, inst):
        client.delete_layer(info.name)


def test_layers_survive_a_restart():
    state_dir = tempfile.mkdtemp(prefix="normserve-gnin-")
    args = ["--device=cpu", "--cpu_threads=1", "--workers=2",
            f"--state_dir={state_dir}"]
    try:
        process = ServerProcess(args=args).start()
        client = normserve.Client(process.address, timeout=20)
        client.create_layer(kind="group_norm", num_groups=3, num_channels=6,
                            layer_id="gn", eps=1e-4)
        client.create_layer(kind="instance_norm", num_features=2,
                            layer_id="in", affine=True,
                            track_running_stats=True, momentum=0.25,
                            layout="NHWC", spatial_dims=2)
        client.set_parameters("gn", weight=np.arange(6, dtype=np.float32),
                              bias=-np.ones(6, np.float32))
        client.forward("in", np.random.default_rng(2).standard_normal(
            (3, 2, 4, 4)).astype(np.float32), training=True)
        before = {n: (client.get_state(n), client.get_layer(n))
                  for n in ("gn", "in")}
        client.close()
        assert process.stop() == 0
        process = ServerProcess(args=args).start()
        client = normserve.Client(process.address, timeout=20)
        for name, (state, info) in before.items():
            after = client.get_state(name)
            assert sorted(after) == sorted(state)
            for key in state:
                np.testing.assert_array_equal(after[key], state[key])
            assert client.get_layer(name) == info
        client.close()
        assert process.stop() == 0
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
