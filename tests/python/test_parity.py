"""normserve.torch.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d.

Each case trains both modules side by side for 20 steps (forward in training
mode, backward with a random grad_output, an SGD step on weight and bias so
that the server sees updated parameters) and then runs one eval forward and
backward, comparing outputs, grad_input, grad_weight, grad_bias at every step
and running_mean, running_var, num_batches_tracked (and the whole state_dict)
at the end.

Tolerances, as rtol = atol (|got - want| <= atol + rtol * |want|; see
TOLERANCE), with the worst values seen when they were set:
- float32: 2e-5 on outputs and grad_input (seen 5e-6), 1e-4 on grad_weight
  and grad_bias, sums over the batch (seen 1.1e-5), 1e-5 on running stats
  (seen 3e-7).
- bfloat16: the reference is torch's own mixed-precision BatchNorm (bfloat16
  input, float32 parameters and statistics). Outputs and grad_input are
  bfloat16, 8 significant bits: 3e-2, about two units in the last place
  (seen 1.8e-2). grad_weight/grad_bias 5e-2: torch 1.13 sums grad_bias in
  bfloat16 on the CPU where normserve sums in float32 (seen 3.2e-2; 2e-6 on
  grad_weight). Running stats 1e-5 (float32 statistics of the same values).
- float16: torch 1.13 has no float16 BatchNorm on the CPU, so the reference
  is torch's float32 BatchNorm applied to the same float16 values, with its
  output and grad_input rounded to float16 (11 significant bits): 2e-3 on
  outputs and grad_input (seen 6.7e-4), 1e-4 on grad_weight/grad_bias and
  1e-5 on running stats (both float32 on both sides).
"""

import itertools
import zlib

import pytest
import torch
from torch import nn

import normserve.torch as nst

STEPS = 20
C = 5
KINDS = {
    # name: (reference class, normserve class, input shape)
    "1d-NC": (nn.BatchNorm1d, nst.BatchNorm1d, (12, C)),
    "1d-NCL": (nn.BatchNorm1d, nst.BatchNorm1d, (6, C, 7)),
    "2d": (nn.BatchNorm2d, nst.BatchNorm2d, (6, C, 4, 3)),
    "3d": (nn.BatchNorm3d, nst.BatchNorm3d, (3, C, 3, 2, 4)),
}
# (output/grad_input, grad_weight/grad_bias, running stats): (rtol, atol).
TOLERANCE = {
    torch.float32: ((2e-5, 2e-5), (1e-4, 1e-4), (1e-5, 1e-5)),
    torch.bfloat16: ((3e-2, 3e-2), (5e-2, 5e-2), (1e-5, 1e-5)),
    torch.float16: ((2e-3, 2e-3), (1e-4, 1e-4), (1e-5, 1e-5)),
}


def cases():
    out = []
    flags = list(itertools.product([0.1, None], [True, False], [True, False]))
    for kind, (_, _, shape) in KINDS.items():
        layouts = ["contiguous"] + (["channels_last"] if len(shape) > 2
                                    else [])
        for layout, (momentum, affine, track) in itertools.product(layouts,
                                                                   flags):
            out.append((kind, torch.float32, layout, momentum, affine, track))
    # Half precision: every flag on 2d, the plain configuration elsewhere.
    for dtype in (torch.bfloat16, torch.float16):
        for kind in KINDS:
            layouts = ["contiguous"] + (["channels_last"]
                                        if len(KINDS[kind][2]) > 2 else [])
            for layout in layouts:
                for momentum, affine, track in (
                        flags if kind == "2d" else [(0.1, True, True)]):
                    out.append((kind, dtype, layout, momentum, affine, track))
    return out


def case_id(case):
    kind, dtype, layout, momentum, affine, track = case
    return (f"{kind}-{str(dtype).split('.')[1]}-{layout}-m{momentum}-"
            f"affine{int(affine)}-track{int(track)}")


def to_layout(x, layout):
    if layout == "contiguous":
        return x.contiguous()
    # Channels last for any rank: (N, *spatial, C) in memory.
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def make_input(generator, shape, dtype, layout):
    c = shape[1]
    view = (1, c) + (1,) * (len(shape) - 2)
    scale = torch.linspace(0.5, 3.0, c).view(view)
    shift = torch.linspace(-2.0, 2.0, c).view(view)
    x = torch.randn(shape, generator=generator) * scale + shift
    return to_layout(x.to(dtype), layout)


def reference_forward(module, x):
    if x.dtype == torch.float16:  # No CPU float16 BatchNorm in torch 1.13.
        return module(x.float()).half()
    return module(x)


def assert_close(got, want, tol, what):
    rtol, atol = tol
    assert got is not None and want is not None, what
    assert got.shape == want.shape, what
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol,
                               atol=atol, msg=lambda m: f"{what}: {m}")


def check_step(ref, ours, x, generator, tol, step):
    xr = x.clone().requires_grad_()
    xo = x.clone().requires_grad_()
    yr = reference_forward(ref, xr)
    yo = ours(xo)
    assert yo.dtype == x.dtype and yo.shape == x.shape
    if not x.is_contiguous():  # Channels last in, channels last out.
        assert yo.stride() == x.stride()
    assert_close(yo, yr, tol[0], f"{step}: output")
    g = torch.randn(x.shape, generator=generator).to(x.dtype)
    yr.backward(g)
    yo.backward(g)
    assert xo.grad.dtype == x.dtype
    assert_close(xo.grad, xr.grad, tol[0], f"{step}: grad_input")
    if ref.affine:
        assert_close(ours.weight.grad, ref.weight.grad, tol[1],
                     f"{step}: grad_weight")
        assert_close(ours.bias.grad, ref.bias.grad, tol[1],
                     f"{step}: grad_bias")
    else:
        assert ours.weight is None and ours.bias is None


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_parity(client, case):
    kind, dtype, layout, momentum, affine, track = case
    ref_cls, our_cls, shape = KINDS[kind]
    generator = torch.Generator().manual_seed(zlib.crc32(case_id(case)
                                                         .encode()))
    tol = TOLERANCE[dtype]
    ref = ref_cls(C, momentum=momentum, affine=affine,
                  track_running_stats=track)
    ours = our_cls(C, momentum=momentum, affine=affine,
                   track_running_stats=track, client=client)
    try:
        if affine:
            with torch.no_grad():
                weight = torch.rand(C, generator=generator) + 0.5
                bias = torch.randn(C, generator=generator)
                for module in (ref, ours):
                    module.weight.copy_(weight)
                    module.bias.copy_(bias)
            optimizers = [torch.optim.SGD(m.parameters(), lr=0.05)
                          for m in (ref, ours)]
        for step in range(STEPS):
            x = make_input(generator, shape, dtype, layout)
            check_step(ref, ours, x, generator, tol, f"step {step}")
            if affine:
                for opt in optimizers:
                    opt.step()
                    opt.zero_grad()

        ref_state, our_state = ref.state_dict(), ours.state_dict()
        assert list(our_state) == list(ref_state)
        for key in ref_state:
            if key == "num_batches_tracked":
                assert our_state[key].dtype == torch.long
                assert int(our_state[key]) == int(ref_state[key]) == STEPS
            else:
                assert_close(our_state[key], ref_state[key],
                             tol[2] if key.startswith("running") else tol[1],
                             key)
        if track:
            assert_close(ours.running_mean, ref.running_mean, tol[2],
                         "running_mean")
            assert_close(ours.running_var, ref.running_var, tol[2],
                         "running_var")
            assert int(ours.num_batches_tracked) == STEPS
        else:
            assert ours.running_mean is None and ours.running_var is None
            assert ours.num_batches_tracked is None

        ref.eval()
        ours.eval()
        x = make_input(generator, shape, dtype, layout)
        check_step(ref, ours, x, generator, tol, "eval")
        if track:  # Eval changes nothing.
            assert int(ours.num_batches_tracked) == STEPS
    finally:
        ours.close()
