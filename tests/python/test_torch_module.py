"""normserve.torch modules beyond numerical parity: state dicts both ways,
parameter pushes, what the server is asked to keep, server-held parameters,
attaching, copying and releasing layers."""

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import normserve
import normserve.torch as nst


def trained_reference(steps=3, channels=4):
    torch.manual_seed(3)
    ref = nn.BatchNorm2d(channels, momentum=None)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    for _ in range(steps):
        ref(torch.randn(5, channels, 3, 3) * 2 + 1)
    return ref


def test_state_dict_both_ways(client):
    ref = trained_reference()
    ours = nst.BatchNorm2d(4, momentum=None, client=client)
    ours.load_state_dict(ref.state_dict())
    server = client.get_state(ours.layer_name)
    for key, value in ref.state_dict().items():
        np.testing.assert_array_equal(server[key], value.numpy())
    assert torch.equal(ours.weight.detach(), ref.weight.detach())

    x = torch.randn(6, 4, 3, 3)
    ours.train()
    ref.train()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    back = nn.BatchNorm2d(4, momentum=None)
    back.load_state_dict(ours.state_dict())  # And ours loads into torch's.
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=1e-6,
                                   atol=1e-6)
    assert int(back.num_batches_tracked) == 4

    keep = ours.state_dict(keep_vars=True)
    assert keep["weight"] is ours.weight and keep["weight"].requires_grad
    # Nested in a model, with prefixes.
    model = nn.Sequential(nn.Conv2d(4, 4, 1), ours)
    reference_model = nn.Sequential(nn.Conv2d(4, 4, 1), ref)
    assert list(model.state_dict()) == list(reference_model.state_dict())
    model.load_state_dict(reference_model.state_dict())
    ours.close()


def test_load_state_dict_errors(client):
    ours = nst.BatchNorm2d(4, client=client)
    state = trained_reference().state_dict()
    del state["running_var"]
    state["extra"] = torch.zeros(4)
    with pytest.raises(RuntimeError) as err:
        ours.load_state_dict(state)
    assert 'Missing key(s) in state_dict: "running_var"' in str(err.value)
    assert 'Unexpected key(s) in state_dict: "extra"' in str(err.value)
    result = ours.load_state_dict(state, strict=False)
    assert result.missing_keys == ["running_var"]
    assert result.unexpected_keys == ["extra"]
    assert int(ours.num_batches_tracked) == 3  # The rest was loaded.
    with pytest.raises(RuntimeError, match="size mismatch for running_mean"):
        ours.load_state_dict({**trained_reference().state_dict(),
                              "running_mean": torch.zeros(5)})
    bad = trained_reference().state_dict()
    bad["running_var"] = torch.full((4,), float("nan"))
    with pytest.raises(RuntimeError, match="non-finite"):
        ours.load_state_dict(bad)
    # A version-1 state dict has no num_batches_tracked: loads as 0.
    old = trained_reference().state_dict()
    del old["num_batches_tracked"]
    old._metadata = {"": {"version": 1}}
    ours.load_state_dict(old)
    assert int(ours.num_batches_tracked) == 0
    ours.close()


def test_untracked_and_non_affine_state_dicts(client):
    for kwargs in ({"affine": False}, {"track_running_stats": False},
                   {"affine": False, "track_running_stats": False}):
        ref = nn.BatchNorm1d(3, **kwargs)
        ours = nst.BatchNorm1d(3, client=client, **kwargs)
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict())
        ref.load_state_dict(ours.state_dict())
        if not ours.track_running_stats:
            assert ours.running_mean is None and ours.num_batches_tracked is None
            with pytest.raises(AttributeError, match="track_running_stats"):
                ours.running_mean = torch.zeros(3)
        ours.close()


def test_parameters_are_pushed_when_changed(client):
    bn = nst.BatchNorm1d(3, client=client)
    calls = []
    original = client.set_parameters

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    client.set_parameters = spy
    try:
        x = torch.randn(8, 3)
        bn(x)
        assert calls == []  # Fresh layer: server already has ones/zeros.
        bn.weight.data.mul_(3)  # Through .data: no version bump.
        y = bn(x)
        assert len(calls) == 1
        np.testing.assert_allclose(client.get_state(bn.layer_name)["weight"],
                                   [3, 3, 3])
        torch.testing.assert_close(
            y, 3 * nn.functional.batch_norm(x, None, None, training=True))
        bn(x)
        assert len(calls) == 1  # Unchanged: no push.
        bn.bias = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        bn(x)
        assert len(calls) == 2
        np.testing.assert_allclose(client.get_state(bn.layer_name)["bias"],
                                   [1, 2, 3])
    finally:
        del client.set_parameters
    bn.close()


def test_server_keeps_nothing_without_grad(server):
    spy_client = normserve.Client(server.address)
    seen = []
    original = spy_client.forward

    def spy(name, input, **kwargs):
        result = original(name, input, **kwargs)
        seen.append((kwargs["save_for_backward"], result.handle))
        return result

    spy_client.forward = spy
    bn = nst.BatchNorm2d(2, client=spy_client)
    x = torch.randn(3, 2, 2, 2)
    with torch.no_grad():
        bn(x)
    bn.eval()
    for p in bn.parameters():
        p.requires_grad_(False)
    y = bn(x)  # Nothing requires grad.
    assert not y.requires_grad
    assert seen == [(False, 0), (False, 0)]
    seen.clear()
    xg = x.clone().requires_grad_()
    bn(xg).sum().backward()  # Eval backward is supported.
    assert seen[0][0] is True and seen[0][1] != 0
    scale = 1 / torch.sqrt(bn.running_var + 1e-5)  # Weight is 1.
    torch.testing.assert_close(xg.grad,
                               scale.view(1, 2, 1, 1).expand_as(x))
    bn.close()
    spy_client.close()


def test_second_backward_and_bad_inputs(client):
    bn = nst.BatchNorm2d(2, client=client)
    x = torch.randn(3, 2, 2, 2, requires_grad=True)
    y = bn(x).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        y.backward()
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bn(torch.randn(3, 2, 2))
    with pytest.raises(TypeError, match="float64"):
        bn(torch.randn(3, 2, 2, 2, dtype=torch.float64))
    bn.momentum = 0.5
    with pytest.raises(RuntimeError, match="changed after the server layer"):
        bn(x)
    bn.momentum = 0.1
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(bn)
    bn.close()


def test_running_stats_live_on_the_server(client):
    bn = nst.BatchNorm2d(3, client=client)
    assert dict(bn.named_buffers()) == {}
    bn.running_mean = torch.tensor([1.0, 2.0, 3.0])
    bn.num_batches_tracked = torch.tensor(7)
    state = client.get_state(bn.layer_name)
    np.testing.assert_array_equal(state["running_mean"], [1, 2, 3])
    assert int(state["num_batches_tracked"]) == 7
    client.update_running_stats(bn.layer_name, [0, 0, 0], [1, 1, 1], 2)
    assert int(bn.num_batches_tracked) == 8  # Another client's update shows.
    bn.reset_running_stats()
    assert torch.equal(bn.running_var, torch.ones(3))
    assert int(bn.num_batches_tracked) == 0
    with torch.no_grad():
        bn.weight.fill_(2)
    bn.reset_parameters()
    assert torch.equal(bn.weight.detach(), torch.ones(3))
    bn.close()


def test_server_parameters_match_torch_sgd(client):
    torch.manual_seed(5)
    ref = nn.BatchNorm2d(3)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ours = nst.BatchNorm2d(3, client=client, server_parameters=True)
    assert list(ours.parameters()) == []
    server_opt = nst.ServerSGD(nn.Sequential(ours), lr=0.1, momentum=0.9)
    assert server_opt.modules == [ours]
    for _ in range(4):
        x = torch.randn(4, 3, 2, 2)  # Needs no grad: parameters still learn.
        g = torch.randn(4, 3, 2, 2)
        yr, yo = ref(x), ours(x)
        torch.testing.assert_close(yo, yr, rtol=1e-5, atol=1e-5)
        yr.backward(g)
        yo.backward(g)
        opt.step()
        opt.zero_grad()
        server_opt.step()
    torch.testing.assert_close(ours.weight, ref.weight.detach(), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(ours.bias, ref.bias.detach(), rtol=1e-5,
                               atol=1e-6)
    assert list(ours.state_dict()) == list(ref.state_dict())
    torch.testing.assert_close(ours.state_dict()["bias"], ref.bias.detach(),
                               rtol=1e-5, atol=1e-6)
    # zero_grad discards what a backward accumulated without a step.
    ours(torch.randn(4, 3, 2, 2)).sum().backward()
    assert client.get_layer(ours.layer_name).has_accumulated_grad
    server_opt.zero_grad()
    assert not client.get_layer(ours.layer_name).has_accumulated_grad
    torch.testing.assert_close(ours.weight, ref.weight.detach(), rtol=1e-5,
                               atol=1e-6)
    ours.weight = torch.full((3,), 2.0)  # Assigning sets it on the server.
    assert torch.equal(ours.weight, torch.full((3,), 2.0))
    with pytest.raises(RuntimeError, match="server_parameters=True"):
        nst.BatchNorm2d(3, client=client).server_step(lr=0.1)
    ours.close()


def test_attach_copy_and_release(client):
    owner = nst.BatchNorm2d(3, momentum=None, client=client,
                            layer_id="attach-owner")
    assert owner.layer_name == "layers/attach-owner"
    with torch.no_grad():
        owner.weight.fill_(2)
    owner(torch.randn(4, 3, 2, 2))  # Pushes weight 2, one training step.
    attached = nst.BatchNorm2d(3, momentum=None, client=client,
                               layer="attach-owner")
    assert torch.equal(attached.weight.detach(), torch.full((3,), 2.0))
    assert int(attached.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="momentum None"):
        nst.BatchNorm2d(3, client=client, layer="attach-owner")
    with pytest.raises(ValueError, match="num_features 3"):
        nst.BatchNorm2d(4, momentum=None, client=client, layer="attach-owner")
    with pytest.raises(normserve.AlreadyExistsError):
        nst.BatchNorm2d(3, client=client, layer_id="attach-owner")

    twin = copy.deepcopy(owner)
    assert twin.layer_name != owner.layer_name
    assert int(twin.num_batches_tracked) == 1
    twin(torch.randn(4, 3, 2, 2))
    assert int(twin.num_batches_tracked) == 2
    assert int(owner.num_batches_tracked) == 1  # Independent.

    attached.close()  # Attached: leaves the layer.
    client.get_layer("attach-owner")
    owner.close()
    with pytest.raises(normserve.NotFoundError):
        client.get_layer("attach-owner")
    name = twin.layer_name
    del twin  # Garbage collection releases the layer too.
    import gc
    gc.collect()
    with pytest.raises(normserve.NotFoundError):
        client.get_layer(name)


def test_default_client_from_environment(server, monkeypatch):
    monkeypatch.setenv("NORMSERVE_ADDRESS", server.address)
    monkeypatch.setattr(nst, "_default_client", None)
    bn = nst.BatchNorm1d(2)
    assert bn.client.address == server.address
    assert nst.default_client() is bn.client
    bn.close()
    bn.client.close()
    by_address = nst.BatchNorm1d(2, client=server.address)
    assert by_address.client.address == server.address
    by_address.close()
