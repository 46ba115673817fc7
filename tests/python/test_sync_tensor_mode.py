"""Sync groups beyond the stats-mode basics: tensor mode at the client
level (outputs and grad_input against float64 torch, empty slices, bad
input), server-held parameters stepped once per step (SyncBackward's sgd,
and ServerSGD with server_parameters=True SyncBatchNorms), a cancelled
call's part leaving its step, sync calls on Train streams, and world_size
changed between steps (elastic). The
20-step parity of both modes and their mix is in test_sync_groups.py."""

import shutil
import tempfile
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import normserve
import normserve.torch as nst
from normserve_pytest import ServerProcess
from test_sync_groups import group_name, max_err, run_ranks


def reference(xs, gs, weight=None, bias=None):
    """One float64 BatchNorm2d over the concatenated slices: outputs and
    grad_input per slice, grad_weight, grad_bias."""
    c, dim = xs[0].shape[1], len(xs[0].shape)
    bn = (nn.BatchNorm1d if dim < 4 else nn.BatchNorm2d)(c).double()
    if weight is not None:
        with torch.no_grad():
            bn.weight.copy_(torch.as_tensor(weight))
            bn.bias.copy_(torch.as_tensor(bias))
    x = torch.cat([torch.as_tensor(a).double() for a in xs]).requires_grad_()
    y = bn(x)
    y.backward(torch.cat([torch.as_tensor(g).double() for g in gs]))
    sizes = [len(a) for a in xs]
    return (torch.split(y.detach(), sizes), torch.split(x.grad, sizes),
            bn.weight.grad, bn.bias.grad)


def test_tensor_mode_slices_of_every_size_match_one_batchnorm(client):
    sizes = [0, 1, 2, 7, 32]
    k, c = len(sizes), 4
    info = client.create_layer(c, kind="sync_batch_norm", world_size=k,
                               layer_id=group_name("tensor"))
    rng = np.random.default_rng(5)
    xs = [(rng.standard_normal((n, c, 3, 2)) * 2 + 1).astype(np.float32)
          for n in sizes]
    gs = [rng.standard_normal((n, c, 3, 2)).astype(np.float32) for n in sizes]

    def rank(r):
        f = client.sync_forward(info.name, 0, r, input=xs[r])
        b = client.sync_backward(info.name, 0, r, handle=f.handle,
                                 grad_output=gs[r], accumulate_grad=True)
        return f, b

    results = run_ranks(rank, k)
    ys, dxs, gw, gb = reference(xs, gs)
    for r in range(k):
        f, b = results[r]
        assert f.count == sum(sizes) * 6 and f.handle != 0
        assert f.output.shape == xs[r].shape
        assert max_err(torch.from_numpy(np.array(f.output)), ys[r]) < 1e-5
        assert max_err(torch.from_numpy(np.array(b.grad_input)),
                       dxs[r]) < 1e-5
        assert max_err(torch.from_numpy(b.sum_dy_xhat), gw) < 1e-3
        assert max_err(torch.from_numpy(b.sum_dy), gb) < 1e-3
    # Accumulated once for the step, not once per rank.
    layer = client.get_layer(info.name)
    assert layer.has_accumulated_grad
    np.testing.assert_allclose(
        client.get_state(info.name)["running_var"],
        0.9 + 0.1 * torch.cat([torch.from_numpy(x) for x in xs]).double()
        .var(dim=(0, 2, 3)).numpy(), rtol=1e-5)


def test_tensor_mode_mixes_dtypes_and_layouts_with_stats_ranks(client):
    c = 3
    info = client.create_layer(c, kind="sync_batch_norm", world_size=3,
                               layer_id=group_name("mix"))
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((n, c, 4, 4)).astype(np.float32)
          for n in (3, 5, 4)]
    gs = [rng.standard_normal(x.shape).astype(np.float32) for x in xs]
    # Rank 0: bfloat16 NHWC tensor; rank 1: float32 tensor; rank 2: stats.
    x0 = torch.from_numpy(xs[0]).bfloat16().float()
    xs[0] = x0.numpy()
    wire0 = nst.to_wire(torch.from_numpy(xs[0]).bfloat16().contiguous(
        memory_format=torch.channels_last))

    def rank(r):
        if r == 0:
            f = client.sync_forward(info.name, 0, 0, input=wire0, raw=True)
            g = nst.to_wire(torch.from_numpy(gs[0]).bfloat16().contiguous(
                memory_format=torch.channels_last))
            b = client.sync_backward(info.name, 0, 0, handle=f.handle,
                                     grad_output=g)
            return f, b
        if r == 1:
            f = client.sync_forward(info.name, 0, 1, input=xs[1])
            b = client.sync_backward(info.name, 0, 1, handle=f.handle,
                                     grad_output=gs[1])
            return f, b
        x = torch.from_numpy(xs[2]).double()
        n = x.numel() // c
        mean = x.mean(dim=(0, 2, 3))
        m2 = ((x - mean.view(1, c, 1, 1)) ** 2).sum(dim=(0, 2, 3))
        f = client.sync_forward(info.name, 0, 2, n, mean.numpy(), m2.numpy())
        # Its slice's grad is zero here: the sums of zeros.
        client.sync_backward(info.name, 0, 2, np.zeros(c), np.zeros(c))
        return f, None

    results = run_ranks(rank, 3)
    gs[0] = torch.from_numpy(gs[0]).bfloat16().float().numpy()
    # Rank 2 (stats mode) sent no grad: its backward sums are zero here,
    # so compare against a reference with zero grad for its slice.
    ys, dxs, _, _ = reference(xs, [gs[0], gs[1], np.zeros_like(gs[2])])
    out0 = nst.from_wire(results[0][0].output)
    assert out0.dtype == torch.bfloat16
    assert out0.is_contiguous(memory_format=torch.channels_last)
    assert max_err(out0.float(), ys[0]) <= 2.0**-7 * ys[0].abs().max()
    assert max_err(torch.from_numpy(np.array(results[1][0].output)),
                   ys[1]) < 1e-5
    for r in (0, 1):
        assert results[r][0].count == results[2][0].count == 12 * 16


def test_stats_rank_backward_completes_a_tensor_step(client):
    """A stats rank's sums and a tensor rank's grad_output meet in one
    backward step; each gets the union's sums."""
    c = 2
    info = client.create_layer(c, kind="sync_batch_norm", world_size=2,
                               layer_id=group_name("mixbwd"))
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((n, c, 5)).astype(np.float32) for n in (4, 6)]
    gs = [rng.standard_normal(x.shape).astype(np.float32) for x in xs]

    def rank(r):
        if r == 0:
            f = client.sync_forward(info.name, 0, 0, input=xs[0])
            return client.sync_backward(info.name, 0, 0, handle=f.handle,
                                        grad_output=gs[0])
        x, g = torch.from_numpy(xs[1]).double(), torch.from_numpy(gs[1])
        mean = x.mean(dim=(0, 2))
        m2 = ((x - mean.view(1, c, 1)) ** 2).sum(dim=(0, 2))
        f = client.sync_forward(info.name, 0, 1, x.numel() // c,
                                mean.numpy(), m2.numpy())
        xhat = ((x - torch.from_numpy(f.mean).double().view(1, c, 1))
                * torch.from_numpy(f.invstd).double().view(1, c, 1))
        return client.sync_backward(
            info.name, 0, 1, g.double().sum(dim=(0, 2)).numpy(),
            (g.double() * xhat).sum(dim=(0, 2)).numpy())

    b0, b1 = run_ranks(rank, 2)
    _, dxs, gw, gb = reference(xs, gs)
    np.testing.assert_allclose(b0.sum_dy, b1.sum_dy, rtol=1e-6)
    assert max_err(torch.from_numpy(b0.sum_dy_xhat), gw) < 1e-4
    assert max_err(torch.from_numpy(b0.sum_dy), gb) < 1e-4
    assert max_err(torch.from_numpy(np.array(b0.grad_input)), dxs[0]) < 1e-5
    assert b1.grad_input is None


def test_tensor_mode_bad_input(client):
    c = 2
    info = client.create_layer(c, kind="sync_batch_norm", world_size=1,
                               layer_id=group_name("tbad"))
    x = np.random.default_rng(1).standard_normal((4, c, 3)).astype(np.float32)
    with pytest.raises(normserve.InvalidArgumentError, match="has 3 channels"):
        client.sync_forward(info.name, 0, 0,
                            input=np.zeros((4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="exclusive"):
        client.sync_forward(info.name, 0, 0, 4, [0.0, 0.0], input=x)
    f = client.sync_forward(info.name, 1, 0, input=x)
    with pytest.raises(normserve.InvalidArgumentError,
                       match="grad_output has shape"):
        client.sync_backward(info.name, 1, 0, handle=f.handle,
                             grad_output=x[:2])
    with pytest.raises(normserve.InvalidArgumentError,
                       match="the SyncForward of step 1; this call is for "
                             "step 2"):
        client.sync_backward(info.name, 2, 0, handle=f.handle, grad_output=x)
    with pytest.raises(normserve.FailedPreconditionError,
                       match="unknown forward handle"):
        client.sync_backward(info.name, 1, 0, handle=f.handle + 999,
                             grad_output=x)
    # After the rejections the handle still works.
    b = client.sync_backward(info.name, 1, 0, handle=f.handle, grad_output=x)
    assert b.grad_input.shape == x.shape
    # Eval with running statistics: no barrier, and its backward none.
    e = client.sync_forward(info.name, 0, 0, input=x, training=False)
    with pytest.raises(normserve.InvalidArgumentError,
                       match="an eval-mode forward is no step"):
        client.sync_backward(info.name, 0, 0, handle=e.handle, grad_output=x,
                             sgd=dict(lr=0.1))
    eb = client.sync_backward(info.name, 0, 0, handle=e.handle, grad_output=x)
    invstd = 1 / np.sqrt(client.get_state(info.name)["running_var"] + 1e-5)
    np.testing.assert_allclose(eb.grad_input, x * invstd.reshape(1, c, 1),
                               rtol=1e-5)


def test_sync_backward_sgd_steps_once_per_step(client):
    c, k, lr = 3, 3, 0.5
    info = client.create_layer(c, kind="sync_batch_norm", world_size=k,
                               layer_id=group_name("sgd"))
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((n, c, 4)).astype(np.float32) for n in (2, 3, 4)]
    gs = [rng.standard_normal(x.shape).astype(np.float32) for x in xs]

    def rank(r, sgd):
        f = client.sync_forward(info.name, 0, r, input=xs[r])
        return client.sync_backward(info.name, 0, r, handle=f.handle,
                                    grad_output=gs[r], sgd=sgd)

    results = run_ranks(lambda r: rank(r, dict(lr=lr)), k)
    state = client.get_state(info.name)
    np.testing.assert_allclose(state["weight"],
                               1 - lr * results[0].sum_dy_xhat, rtol=1e-6)
    np.testing.assert_allclose(state["bias"], -lr * results[0].sum_dy,
                               rtol=1e-6)
    assert not client.get_layer(info.name).has_accumulated_grad

    # Ranks that disagree on the options fail the one that differs.
    def disagree(r):
        f = client.sync_forward(info.name, 1, r, input=xs[r])
        try:
            client.sync_backward(info.name, 1, r, handle=f.handle,
                                 grad_output=gs[r],
                                 sgd=dict(lr=lr if r == 0 else lr / 2),
                                 timeout=3)
        except normserve.NormserveError as err:
            return err
        return None

    info2 = client.create_layer(c, kind="sync_batch_norm", world_size=2,
                                layer_id=group_name("sgd2"),
                                barrier_timeout_ms=500)
    info = info2
    errs = run_ranks(disagree, 2)
    assert any(isinstance(e, normserve.InvalidArgumentError)
               and "other sgd options" in str(e) for e in errs), errs
    plain = client.create_layer(c, kind="sync_batch_norm", world_size=1,
                                affine=False, layer_id=group_name("sgd3"))
    f = client.sync_forward(plain.name, 0, 0, input=xs[0])
    with pytest.raises(normserve.FailedPreconditionError,
                       match="no parameters"):
        client.sync_backward(plain.name, 0, 0, handle=f.handle,
                             grad_output=gs[0], sgd=dict(lr=0.1))


@pytest.mark.parametrize("mode", ["stats", "tensor"])
def test_server_parameters_step_once_per_step_with_server_sgd(server, mode):
    k, c, steps = 2, 3, 5
    group = group_name(f"sp-{mode}")
    torch.manual_seed(11)
    data = [[(torch.randn(n, c, 3, 3), torch.randn(n, c, 3, 3))
             for n in (3, 5)] for _ in range(steps)]
    ready = threading.Barrier(k, timeout=60)

    def rank(r):
        client = normserve.Client(server.address, timeout=60)
        m = nst.SyncBatchNorm(c, client=client, group=group, rank=r,
                              world_size=k, mode=mode,
                              server_parameters=True)
        assert not list(m.parameters())  # The server holds them.
        opt = nst.ServerSGD(m, lr=0.1, momentum=0.9)
        ready.wait()
        outs = []
        for step in range(steps):
            x, g = data[step][r]
            x = x.clone().requires_grad_(True)
            opt.zero_grad()
            y = m(x)
            y.backward(g)
            opt.step()
            outs.append((y.detach(), x.grad))
            ready.wait()  # Rank 0's step lands before the next forward.
        state = m.state_dict()
        ready.wait()
        return outs, state

    results = run_ranks(rank, k)
    ref = nn.BatchNorm2d(c).double()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        x = torch.cat([data[step][r][0] for r in range(k)]).double()
        g = torch.cat([data[step][r][1] for r in range(k)]).double()
        x.requires_grad_(True)
        opt.zero_grad()
        y = ref(x)
        y.backward(g)
        opt.step()
        got = torch.cat([results[r][0][step][0] for r in range(k)])
        assert max_err(got, y) < 1e-4, step
        dx = torch.cat([results[r][0][step][1] for r in range(k)])
        assert max_err(dx, x.grad) < 1e-4, step
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert max_err(torch.as_tensor(results[0][1][key]),
                       getattr(ref, key)) < 1e-4, key


def test_a_cancelled_call_withdraws_its_part(client):
    c = 2
    info = client.create_layer(c, kind="sync_batch_norm", world_size=2,
                               layer_id=group_name("cancel"))
    stats = dict(mean=[1.0, 2.0], m2=[3.0, 3.0])
    # Rank 0 gives up (its deadline) while rank 1 is missing.
    with pytest.raises(normserve.DeadlineExceededError):
        client.sync_forward(info.name, 0, 0, 4, timeout=0.3, **stats)
    # The server learns of the cancellation on its own time: once the part
    # is out, no step is in flight, and world_size may change.
    deadline = time.time() + 20
    while True:
        try:
            client.set_world_size(info.name, 3)
            break
        except normserve.FailedPreconditionError:
            assert time.time() < deadline, "the part never left its step"
            time.sleep(0.05)
    client.set_world_size(info.name, 2)
    # Its part left the step: a new call for rank 0 (another request id)
    # is no duplicate, and the union counts only the new parts.
    results = run_ranks(
        lambda r: client.sync_forward(info.name, 0, r, 6 if r == 0 else 2,
                                      **stats), 2)
    assert [r.count for r in results] == [8, 8]
    assert int(client.get_state(info.name)["num_batches_tracked"]) == 1


def test_sync_calls_on_train_streams(server):
    k, c = 2, 3
    client = normserve.Client(server.address, timeout=30)
    info = client.create_layer(c, kind="sync_batch_norm", world_size=k,
                               layer_id=group_name("stream"))
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((n, c, 6)).astype(np.float32) for n in (4, 2)]
    gs = [rng.standard_normal(x.shape).astype(np.float32) for x in xs]

    def rank(r):
        with normserve.Client(server.address, timeout=30) as own:
            stream = own.train()
            try:
                out = []
                for step in range(3):
                    f = stream.sync_forward(info.name, step, r, input=xs[r])
                    b = stream.sync_backward(info.name, step, r,
                                             handle=f.handle,
                                             grad_output=gs[r])
                    out.append((np.array(f.output), np.array(b.grad_input)))
                return out
            finally:
                stream.close()

    results = run_ranks(rank, k)
    ys, dxs, _, _ = reference(xs, gs)
    for r in range(k):
        for y, dx in results[r]:
            assert max_err(torch.from_numpy(y), ys[r]) < 1e-5
            assert max_err(torch.from_numpy(dx), dxs[r]) < 1e-5
    assert int(client.get_state(info.name)["num_batches_tracked"]) == 3


def test_world_size_changes_between_steps_and_survives_a_restart():
    """Elastic training: 3 ranks step, rank 2 leaves and the others resize
    to 2 (a new step waits for 2), then a newcomer grows the group to 3
    again; the world_size is journaled like any mutation."""
    state_dir = tempfile.mkdtemp(prefix="normserve-elastic-")
    args = ["--device=cpu", "--cpu_threads=1", f"--state_dir={state_dir}"]
    c = 2
    part = dict(count=4, mean=[0.5, -0.5], m2=[3.0, 6.0])
    try:
        process = ServerProcess(args=args).start()
        client = normserve.Client(process.address, timeout=20)
        modules = [nst.SyncBatchNorm(c, client=client, group="elastic",
                                     rank=r, world_size=3)
                   for r in range(3)]
        x = torch.randn(4, c, 3)
        run_ranks(lambda r: modules[r](x), 3)  # Step 0 with 3 ranks.
        assert client.get_layer("elastic").world_size == 3
        # Rank 2 leaves; ranks 0 and 1 resize before their next step.
        run_ranks(lambda r: modules[r].resize(2, r), 2)
        assert client.get_layer("elastic").world_size == 2
        out = run_ranks(lambda r: client.sync_forward("elastic", 1, r, **part),
                        2)
        assert [o.count for o in out] == [8, 8]
        with pytest.raises(normserve.InvalidArgumentError,
                           match=r"rank 2 is outside 0 \.\. 1"):
            client.sync_forward("elastic", 2, 2, **part)
        # Only between steps (the current value is fine at any time).
        info = client.create_layer(c, kind="sync_batch_norm", world_size=2,
                                   barrier_timeout_ms=3000,
                                   layer_id="elastic-busy")
        stuck = []

        def wait_alone():
            try:
                client.sync_forward(info.name, 0, 0, **part)
            except normserve.AbortedError as err:
                stuck.append(err)

        t = threading.Thread(target=wait_alone)
        t.start()
        time.sleep(0.5)  # Rank 0 waits in step 0 (its barrier: 3 s).
        with pytest.raises(normserve.FailedPreconditionError,
                           match=r"SyncForward step 0 is in progress, waiting "
                                 r"for ranks \[1\]"):
            client.set_world_size(info.name, 3)
        assert client.set_world_size(info.name, 2) >= 1  # Same: fine.
        t.join()
        assert stuck, "the lone rank should have timed out"
        with pytest.raises(normserve.InvalidArgumentError,
                           match="expected 1 to 1024"):
            client.set_world_size(info.name, 0)
        plain = client.create_layer(c, layer_id="elastic-plain")
        with pytest.raises(normserve.UnimplementedError,
                           match="not a sync group"):
            client.set_world_size(plain.name, 2)
        # A newcomer: the group grows back to 3 and it joins at step 2.
        client.set_world_size("elastic", 3)
        version = client.get_layer("elastic").version
        client.close()
        assert process.stop() == 0

        process = ServerProcess(args=args).start()
        client = normserve.Client(process.address, timeout=20)
        layer = client.get_layer("elastic")
        assert (layer.world_size, layer.version) == (3, version)
        out = run_ranks(lambda r: client.sync_forward("elastic", 2, r, **part),
                        3)
        assert [o.count for o in out] == [12] * 3
        assert int(client.get_state("elastic")["num_batches_tracked"]) == 3
        client.close()
        assert process.stop() == 0
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
