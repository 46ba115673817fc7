"""Sync groups (sync_batch_norm layers, stats and tensor modes, mixed):
K ranks, each a thread
with its own connection and slice, train one BatchNorm over the union of
their batches. Oracle: one torch.nn.BatchNorm over the concatenated batch,
float64, with float32 torch's own error as the yardstick. Also the
barrier's rules (timeouts naming the missing ranks, duplicate and stale
ranks, retries, count 1 and 0), no deadlock with --workers 1 and 64
waiters, attach checks, bad input, and the running statistics surviving a
restart."""

import shutil
import tempfile
import threading

import numpy as np
import pytest
import torch
from torch import nn

import normserve
import normserve.torch as nst
from normserve_pytest import ServerProcess


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def run_ranks(fn, k):
    """Runs fn(rank) on k threads; re-raises the first failure."""
    errors = [None] * k
    results = [None] * k

    def body(r):
        try:
            results[r] = fn(r)
        except BaseException as err:  # noqa: BLE001 - reported below.
            errors[r] = err

    threads = [threading.Thread(target=body, args=(r,)) for r in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for err in errors:
        if err is not None:
            raise err
    return results


_group_ids = iter(range(10**6))


def group_name(tag):
    return f"sync-{tag}-{next(_group_ids)}"


CASES = [
    # sizes per rank, per-rank dtype, per-rank channels_last, BN kwargs
    ([5], None, None, {}),
    ([3, 4], None, None, {}),
    ([0, 7, 2], None, None, {}),
    ([2, 1, 7, 32, 0, 2, 1, 7], None, None, {}),
    ([7, 2, 1], [torch.float32, torch.bfloat16, torch.float32],
     [False, True, False], {}),
    ([4, 3], None, [True, False], {"momentum": None}),
    ([2, 5], None, None, {"affine": False}),
    ([6, 1], None, None, {"track_running_stats": False}),
]


def rank_mode(mode, r):
    """The mode rank r uses: one for all, or "mixed": odd ranks tensor."""
    if mode == "mixed":
        return "tensor" if r % 2 else "stats"
    return mode


@pytest.mark.parametrize("mode", ["stats", "tensor", "mixed"])
@pytest.mark.parametrize("sizes,dtypes,channels_last,kwargs", CASES)
def test_twenty_steps_and_eval_match_one_batchnorm(server, sizes, dtypes,
                                                   channels_last, kwargs,
                                                   mode):
    k, c = len(sizes), 3
    dtypes = dtypes or [torch.float32] * k
    channels_last = channels_last or [False] * k
    torch.manual_seed(sum(sizes) * 31 + k)
    steps = 20
    data = [[(torch.randn(n, c, 4, 5) * 3 + 1.5, torch.randn(n, c, 4, 5))
             for n in sizes] for _ in range(steps)]
    eval_x = [torch.randn(n, c, 4, 5) for n in sizes]
    ref32 = nn.BatchNorm2d(c, **kwargs)
    ref64 = nn.BatchNorm2d(c, **kwargs).double()
    w0 = torch.rand(c) + 0.5
    b0 = torch.randn(c)
    if ref32.affine:
        with torch.no_grad():
            for m in (ref32, ref64):
                m.weight.copy_(w0)
                m.bias.copy_(b0)
    group = group_name("parity")
    ready = threading.Barrier(k, timeout=60)  # A failed rank fails all.

    def rank(r):
        client = normserve.Client(server.address, timeout=60)
        m = nst.SyncBatchNorm(c, client=client, group=group, rank=r,
                              world_size=k, barrier_timeout=30,
                              mode=rank_mode(mode, r), **kwargs)
        if m.affine:
            with torch.no_grad():
                m.weight.copy_(w0)
                m.bias.copy_(b0)
        opt = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
               if m.affine else None)
        ready.wait()  # Every rank attached before any step.
        out = []
        for step in range(steps):
            x, g = data[step][r]
            x = x.to(dtypes[r], copy=True)
            if channels_last[r]:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            y = m(x)
            y.backward(g.to(dtypes[r]))
            out.append((y.detach().float(), x.grad.float(),
                        None if m.weight is None else m.weight.grad.clone()))
            if opt:
                opt.step()
                opt.zero_grad()
        m.eval()
        with torch.no_grad():
            out.append(m(eval_x[r].to(dtypes[r])).float())
        state = m.state_dict()
        ready.wait()  # The creator's module must outlive the others' use.
        return out, state

    results = run_ranks(rank, k)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
            for m in (ref32, ref64) if m.affine]
    # bfloat16 ranks round their outputs: those cases may differ from the
    # reference by one bfloat16 rounding (2^-8 relative) of the largest
    # value; their inputs are the same rounded values on both sides.
    half = any(d != torch.float32 for d in dtypes)

    def rounding(ref):
        return 2.0**-8 * ref.abs().max().item() if half else 0.0
    for step in range(steps):
        x = torch.cat([data[step][r][0].detach().to(dtypes[r]).float()
                       for r in range(k)])
        g = torch.cat([data[step][r][1].to(dtypes[r]).float()
                       for r in range(k)])
        x32 = x.clone().requires_grad_(True)
        x64 = x.double().requires_grad_(True)
        y32, y64 = ref32(x32), ref64(x64)
        y32.backward(g)
        y64.backward(g.double())
        y = torch.cat([results[r][0][step][0] for r in range(k)])
        dx = torch.cat([results[r][0][step][1] for r in range(k)])
        assert max_err(y, y64) <= (
            4 * max_err(y32, y64) + rounding(y64) + 1e-6), step
        assert max_err(dx, x64.grad) <= (
            4 * max_err(x32.grad, x64.grad) + rounding(x64.grad) + 1e-5), step
        if ref32.affine:
            for r in range(k):
                gw = results[r][0][step][2]
                assert max_err(gw, ref64.weight.grad) <= (
                    4 * max_err(ref32.weight.grad, ref64.weight.grad)
                    + 1e-5), (step, r)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for m in (ref32, ref64):
        m.eval()
    x = torch.cat([eval_x[r].to(dtypes[r]).float() for r in range(k)])
    with torch.no_grad():
        y = torch.cat([results[r][0][-1] for r in range(k)])
        want = ref64(x.double())
        assert max_err(y, want) <= (
            4 * max_err(ref32(x), want) + rounding(want) + 1e-6)
    if ref32.track_running_stats:
        state = results[0][1]
        for key in ("running_mean", "running_var"):
            assert max_err(state[key], getattr(ref64, key)) <= (
                4 * max_err(getattr(ref32, key), getattr(ref64, key))
                + 1e-6), key
        assert int(state["num_batches_tracked"]) == steps


def test_barrier_timeout_names_missing_ranks_and_changes_nothing(client):
    info = client.create_layer(2, kind="sync_batch_norm", world_size=3,
                               barrier_timeout_ms=300,
                               layer_id=group_name("timeout"))
    assert (info.kind, info.world_size, info.barrier_timeout_ms) == (
        "sync_batch_norm", 3, 300)
    stats = dict(count=4, mean=[0.0, 1.0], m2=[4.0, 4.0])

    def arrive(r):
        with pytest.raises(normserve.AbortedError,
                           match=r"step 0 timed out after 300 ms waiting for "
                                 r"ranks \[1\] of 3"):
            client.sync_forward(info.name, 0, r, **stats)

    run_ranks(lambda r: arrive(2 * r), 2)  # Ranks 0 and 2.
    state = client.get_state(info.name)
    np.testing.assert_array_equal(state["running_mean"], [0, 0])
    assert int(state["num_batches_tracked"]) == 0
    # The straggler finds the step passed; the next step proceeds.
    with pytest.raises(normserve.FailedPreconditionError,
                       match="step 0 has passed; the group is at step 0"):
        client.sync_forward(info.name, 0, 1, **stats)
    results = run_ranks(lambda r: client.sync_forward(info.name, 1, r,
                                                      **stats), 3)
    assert all(res.count == 12 for res in results)
    np.testing.assert_allclose(results[0].mean, [0, 1])
    assert int(client.get_state(info.name)["num_batches_tracked"]) == 1
    client.delete_layer(info.name)


def test_duplicate_ranks_retries_and_steps_out_of_order(client):
    info = client.create_layer(1, kind="sync_batch_norm", world_size=2,
                               layer_id=group_name("dup"))
    stats = dict(count=2, mean=[1.0], m2=[2.0])
    answers = {}

    def first(tag, request_id):
        answers[tag] = client.sync_forward(info.name, 5, 0, **stats,
                                           request_id=request_id)

    t1 = threading.Thread(target=first, args=("a", "id-1"))
    t1.start()
    # Another call of rank 0 for the waiting step: ALREADY_EXISTS, unless
    # it is a retry (same request_id), which waits for the same answer.
    import time
    time.sleep(0.3)
    with pytest.raises(normserve.AlreadyExistsError,
                       match="rank 0 has already joined step 5"):
        client.sync_forward(info.name, 5, 0, **stats, request_id="id-2")
    t2 = threading.Thread(target=first, args=("b", "id-1"))
    t2.start()
    time.sleep(0.3)
    with pytest.raises(normserve.FailedPreconditionError,
                       match=r"step 5 is in progress, waiting for ranks \[1\]"):
        client.sync_forward(info.name, 6, 1, **stats)
    last = client.sync_forward(info.name, 5, 1, **stats, request_id="r1")
    t1.join()
    t2.join()
    assert answers["a"] == answers["b"]
    assert answers["a"].count == last.count == 4
    # A retry of the completed step's rank gets its answer again; a new id
    # finds the step passed.
    again = client.sync_forward(info.name, 5, 1, **stats, request_id="r1")
    assert again == last
    with pytest.raises(normserve.FailedPreconditionError,
                       match="step 5 has passed; the group is at step 5"):
        client.sync_forward(info.name, 5, 1, **stats, request_id="r2")
    assert int(client.get_state(info.name)["num_batches_tracked"]) == 1
    client.delete_layer(info.name)


def test_deleting_a_group_answers_its_waiters(client):
    info = client.create_layer(1, kind="sync_batch_norm", world_size=2,
                               layer_id=group_name("delete"))
    answer = {}

    def wait():
        try:
            client.sync_forward(info.name, 0, 0, 2, [0.0], [1.0])
        except normserve.NormserveError as err:
            answer["err"] = err

    waiter = threading.Thread(target=wait)
    waiter.start()
    import time
    time.sleep(0.3)
    client.delete_layer(info.name)
    waiter.join(20)
    assert not waiter.is_alive()
    assert isinstance(answer["err"], (normserve.AbortedError,
                                      normserve.NotFoundError))


def test_pytorch_rules_for_counts_one_and_zero(client):
    info = client.create_layer(2, kind="sync_batch_norm", world_size=2,
                               layer_id=group_name("counts"))
    one = dict(count=1, mean=[1.0, 2.0], m2=[0.0, 0.0])
    zero = dict(count=0, mean=[], m2=[])

    def rank(r, step, parts):
        try:
            return client.sync_forward(info.name, step, r, **parts[r])
        except normserve.InvalidArgumentError as err:
            return err

    got = run_ranks(lambda r: rank(r, 0, [one, zero]), 2)
    for err in got:
        assert isinstance(err, normserve.InvalidArgumentError)
        assert "Expected more than 1 value per channel when training" in str(
            err)
    # No values at all: no running-stat update, zero gradients.
    got = run_ranks(lambda r: rank(r, 1, [zero, zero]), 2)
    assert all(res.count == 0 for res in got)
    state = client.get_state(info.name)
    assert int(state["num_batches_tracked"]) == 0
    grads = run_ranks(lambda r: client.sync_backward(
        info.name, 1, r, [0.0, 0.0], [0.0, 0.0], accumulate_grad=True), 2)
    np.testing.assert_array_equal(grads[0].sum_dy, [0, 0])
    # A backward for a step whose forward failed.
    with pytest.raises(normserve.FailedPreconditionError,
                       match="step 0 has no completed SyncForward"):
        client.sync_backward(info.name, 0, 0, [0.0, 0.0], [0.0, 0.0])
    client.delete_layer(info.name)


def test_many_waiters_with_one_worker_do_not_deadlock():
    process = ServerProcess(args=["--device=cpu", "--workers=1",
                                  "--cpu_threads=1"]).start()
    try:
        client = normserve.Client(process.address, timeout=60)
        groups = [client.create_layer(4, kind="sync_batch_norm",
                                      world_size=k, layer_id=f"g{i}").name
                  for i, k in enumerate((64, 16, 16))]
        calls = [(g, r) for g, k in zip(groups, (64, 16, 16))
                 for r in range(k)]
        stats = dict(count=3, mean=[0.5] * 4, m2=[2.0] * 4)
        results = run_ranks(
            lambda i: client.sync_forward(calls[i][0], 0, calls[i][1],
                                          **stats), len(calls))
        assert [res.count for res in results] == (
            [192] * 64 + [48] * 32)
        client.close()
        assert process.stop() == 0
    finally:
        process.stop()


def test_attach_checks_the_config_and_eval_needs_no_barrier(client):
    group = group_name("attach")
    first = nst.SyncBatchNorm(3, client=client, group=group, rank=0,
                              world_size=2)
    with pytest.raises(ValueError, match="world_size 2"):
        nst.SyncBatchNorm(3, client=client, group=group, rank=1, world_size=3)
    with pytest.raises(ValueError, match="eps"):
        nst.SyncBatchNorm(3, eps=1e-3, client=client, group=group, rank=1,
                          world_size=2)
    second = nst.SyncBatchNorm(3, client=client, group=group, rank=1,
                               world_size=2)
    # Eval with running statistics: each rank alone, at once.
    first.eval()
    x = torch.randn(4, 3, 2)
    torch.testing.assert_close(first(x), nn.BatchNorm1d(3).eval()(x))
    assert "world_size=2" in repr(second)
    with pytest.raises(ValueError, match="expected 'stats' or 'tensor'"):
        nst.SyncBatchNorm(3, client=client, group=group, rank=0, world_size=2,
                          mode="activations")
    # Eval in tensor mode: the server normalizes with the running stats.
    third = nst.SyncBatchNorm(3, client=client, group=group, rank=1,
                              world_size=2, mode="tensor").eval()
    torch.testing.assert_close(third(x), nn.BatchNorm1d(3).eval()(x))
    first.close()


def test_convert_sync_batchnorm_copies_state(client):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    model[1](torch.randn(6, 4, 3, 3))  # Moves the running statistics.
    converted = nst.convert_sync_batchnorm(
        model, client=client, rank=0, world_size=1,
        prefix=group_name("convert") + "-")
    bn = converted[1]
    assert isinstance(bn, nst.SyncBatchNorm)
    assert bn.layer_name.endswith("-1")
    ref = nn.BatchNorm2d(4)
    ref.load_state_dict(model[1].state_dict())
    torch.testing.assert_close(bn.running_var, ref.running_var)
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(bn(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    bn.close()


def test_bad_input_over_the_wire(client):
    info = client.create_layer(2, kind="sync_batch_norm", world_size=2,
                               layer_id=group_name("bad"))
    for kwargs, error, match in [
            (dict(rank=2), normserve.InvalidArgumentError,
             r"rank 2 is outside 0 .. 1 \(world_size 2\)"),
            (dict(m2=[1.0, -1.0]), normserve.InvalidArgumentError,
             "m2 holds -1; expected finite values >= 0"),
            (dict(mean=[1.0]), normserve.InvalidArgumentError,
             "mean has 1 values; the layer has 2 channels"),
            (dict(step=-1), normserve.InvalidArgumentError, "step is -1"),
    ]:
        args = dict(step=0, rank=0, count=3, mean=[0.0, 0.0], m2=[1.0, 1.0])
        args.update(kwargs)
        with pytest.raises(error, match=match):
            client.sync_forward(info.name, **args)
    with pytest.raises(normserve.FailedPreconditionError,
                       match="its training Forward is SyncForward"):
        client.forward(info.name, np.zeros((2, 2), np.float32), training=True)
    with pytest.raises(normserve.UnimplementedError,
                       match="not a sync group"):
        plain = client.create_layer(2)
        client.sync_forward(plain.name, 0, 0, 3, [0.0, 0.0], [1.0, 1.0])
    for bad, match in [(dict(world_size=0), "world_size is 0"),
                       (dict(world_size=2, barrier_timeout_ms=0),
                        "barrier_timeout_ms is 0")]:
        with pytest.raises(normserve.InvalidArgumentError, match=match):
            client.create_layer(2, kind="sync_batch_norm", **bad)
    client.delete_layer(info.name)
    client.delete_layer(plain.name)


def test_running_stats_survive_a_restart():
    state_dir = tempfile.mkdtemp(prefix="normserve-sync-")
    args = ["--device=cpu", "--cpu_threads=1", f"--state_dir={state_dir}"]
    try:
        process = ServerProcess(args=args).start()
        client = normserve.Client(process.address, timeout=20)
        client.create_layer(2, kind="sync_batch_norm", world_size=2,
                            layer_id="sg")
        parts = [dict(count=3, mean=[1.0, 2.0], m2=[3.0, 1.0]),
                 dict(count=5, mean=[0.0, -1.0], m2=[2.0, 8.0])]
        run_ranks(lambda r: client.sync_forward("sg", 0, r, **parts[r]), 2)
        run_ranks(lambda r: client.sync_backward(
            "sg", 0, r, [1.0, 2.0], [0.5, -0.5], accumulate_grad=True), 2)
        before = client.get_state("sg")
        info = client.get_layer("sg")
        client.close()
        assert process.stop() == 0
        process = ServerProcess(args=args).start()
        client = normserve.Client(process.address, timeout=20)
        after = client.get_state("sg")
        for key in before:
            np.testing.assert_array_equal(after[key], before[key])
        assert int(after["num_batches_tracked"]) == 1
        assert client.get_layer("sg") == info
        # The merged statistics: n = 8, mean = (3*1 + 5*0)/8.
        np.testing.assert_allclose(after["running_mean"][0],
                                   0.1 * 3 / 8, rtol=1e-6)
        client.close()
        assert process.stop() == 0
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def test_a_rank_that_dies_mid_step_is_replaced(server):
    """Rank 1 dies after its forward of step 0 (its process would be gone);
    rank 0's backward of step 0 times out naming it; a replacement rank 1
    joins at step 1 and the group trains on."""
    group = group_name("replace")
    c = 2
    clients = [normserve.Client(server.address, timeout=30) for _ in range(3)]
    torch.manual_seed(9)
    x0, x1 = torch.randn(4, c), torch.randn(3, c)
    mods = [nst.SyncBatchNorm(c, client=clients[r], group=group, rank=r,
                              world_size=2, barrier_timeout=0.3)
            for r in range(2)]
    xs = [x0.clone().requires_grad_(True), x1.clone().requires_grad_(True)]
    ys = run_ranks(lambda r: mods[r](xs[r]), 2)
    with pytest.raises(normserve.AbortedError,
                       match=r"SyncBackward on layers/.*: step 0 timed out "
                             r"after 300 ms waiting for ranks \[1\] of 2"):
        ys[0].sum().backward()  # Rank 1 never sends its backward.
    replacement = nst.SyncBatchNorm(c, client=clients[2], group=group,
                                    rank=1, world_size=2, barrier_timeout=5,
                                    step=1)
    mods[0].barrier_timeout = 5
    survivors = [mods[0], replacement]
    outs = run_ranks(lambda r: survivors[r](torch.randn(5, c)), 2)
    assert all(o.shape == (5, c) for o in outs)
    state = clients[0].get_state(group)
    assert int(state["num_batches_tracked"]) == 2
    for m in mods + [replacement]:
        m.close()


def test_server_killed_mid_step_restarts_with_nothing_half_applied():
    state_dir = tempfile.mkdtemp(prefix="normserve-sync-kill-")
    args = ["--device=cpu", "--cpu_threads=1", f"--state_dir={state_dir}"]
    try:
        process = ServerProcess(args=args).start()
        client = normserve.Client(process.address, timeout=20)
        client.create_layer(2, kind="sync_batch_norm", world_size=2,
                            layer_id="sk", barrier_timeout_ms=60000)
        part = dict(count=4, mean=[1.0, -1.0], m2=[4.0, 2.0])
        run_ranks(lambda r: client.sync_forward("sk", 0, r, **part), 2)
        before = client.get_state("sk")
        # Step 1: one rank in, then SIGKILL while it waits.
        waiter = threading.Thread(
            target=lambda: pytest.raises(normserve.NormserveError,
                                         client.sync_forward, "sk", 1, 0,
                                         **part))
        waiter.start()
        import time
        time.sleep(0.3)
        process.process.kill()
        process.process.wait(10)
        waiter.join(30)
        process = ServerProcess(args=args).start()
        client = normserve.Client(process.address, timeout=20)
        after = client.get_state("sk")
        for key in before:
            np.testing.assert_array_equal(after[key], before[key])
        # Training goes on (a restarted group accepts any next step).
        results = run_ranks(lambda r: client.sync_forward("sk", 1, r, **part),
                            2)
        assert results[0].count == 8
        assert int(client.get_state("sk")["num_batches_tracked"]) == 2
        client.close()
        assert process.stop() == 0
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def test_shutdown_does_not_wait_for_a_barrier():
    """SIGTERM while a step waits (barrier timeout 10 minutes): the drain
    cancels the waiting call after its grace and the server exits 0."""
    process = ServerProcess(args=["--device=cpu",
                                  "--shutdown_grace_s=1"]).start()
    client = normserve.Client(process.address, timeout=60)
    client.create_layer(1, kind="sync_batch_norm", world_size=2,
                        layer_id="drain", barrier_timeout_ms=600000)
    answer = {}

    def wait():
        try:
            client.sync_forward("drain", 0, 0, 2, [0.0], [1.0])
        except normserve.NormserveError as err:
            answer["err"] = err

    waiter = threading.Thread(target=wait)
    waiter.start()
    import time
    time.sleep(0.3)
    start = time.monotonic()
    assert process.stop(timeout=20) == 0
    assert time.monotonic() - start < 10
    waiter.join(20)
    assert isinstance(answer.get("err"), normserve.NormserveError)
