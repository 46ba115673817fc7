"""Errors reach Python as exceptions carrying the gRPC status and the
server's message: an unreachable server, a dead layer, a wrong shape, and
the rest of the API's error cases."""

import socket

import grpc
import numpy as np
import pytest
import torch

import normserve
import normserve.torch as nst
from normserve_pytest import ServerProcess


def closed_port_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_server():
    address = closed_port_address()
    client = normserve.Client(address, timeout=5)
    with pytest.raises(normserve.UnavailableError) as err:
        client.create_layer(4)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert address in str(err.value)
    assert "is a normserve server running" in str(err.value)
    assert err.value.method == "CreateLayer"
    with pytest.raises(normserve.UnavailableError):
        nst.BatchNorm2d(4, client=address)
    with pytest.raises(normserve.UnavailableError, match="no connection"):
        client.wait_ready(timeout=0.2)
    with pytest.raises(normserve.UnavailableError):
        with client.train() as stream:
            stream.get_layer("x")
    client.close()


def test_server_that_went_away():
    # A connected idle Python channel does not answer the server's shutdown
    # ping, which holds the drain for ~5 s; a short grace ends it sooner.
    server = ServerProcess(args=["--shutdown_grace_s=1"]).start()
    client = normserve.Client(server.address, timeout=5)
    bn = nst.BatchNorm1d(3, client=client)
    bn(torch.randn(4, 3))
    assert server.stop() == 0
    with pytest.raises(normserve.UnavailableError):
        bn(torch.randn(4, 3))
    client.close()


def test_dead_layer(client):
    bn = nst.BatchNorm2d(3, client=client)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    y = bn(x)
    client.delete_layer(bn.layer_name)
    with pytest.raises(normserve.NotFoundError) as err:
        y.sum().backward()
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert bn.layer_name in err.value.details
    with pytest.raises(normserve.NotFoundError, match=bn.layer_name):
        bn(x)
    with pytest.raises(LookupError):  # NotFoundError is a LookupError.
        bn.running_mean
    with pytest.raises(normserve.NotFoundError):
        bn.close()


def test_wrong_shapes(client):
    bn = nst.BatchNorm2d(4, client=client)
    with pytest.raises(normserve.InvalidArgumentError) as err:
        bn(torch.randn(2, 3, 5, 5))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input has 3 channels" in err.value.details
    assert "layer expects 4" in err.value.details
    assert isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="Expected more than 1 value per "
                       "channel when training"):
        bn(torch.randn(1, 4, 1, 1))
    bn.close()

    name = client.create_layer(4, spatial_dims=2).name
    with pytest.raises(normserve.InvalidArgumentError,
                       match=r"expected 4D input \(got 3D input\)"):
        client.forward(name, np.zeros((2, 4, 3), np.float32))
    good = normserve.WireTensor((2, 4, 3, 3), normserve.tensor.pb.DTYPE_FLOAT32,
                                normserve.tensor.pb.LAYOUT_NCHW, b"\0" * 100)
    with pytest.raises(normserve.InvalidArgumentError, match="data has 100 "
                       "bytes"):
        client.forward(name, good)
    fwd = client.forward(name, np.ones((2, 4, 3, 3), np.float32) *
                         np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1) +
                         np.random.default_rng(0).random((2, 4, 3, 3),
                                                         np.float32),
                         training=True)
    with pytest.raises(normserve.InvalidArgumentError, match="grad_output has "
                       "shape"):
        client.backward(name, fwd.handle, np.zeros((2, 4, 3, 2), np.float32))
    with pytest.raises(normserve.InvalidArgumentError, match="NCHW"):
        client.backward(name, fwd.handle, np.zeros((2, 4, 3, 3), np.float32),
                        layout="NHWC")
    # Rejected requests leave the handle usable.
    client.backward(name, fwd.handle, np.zeros((2, 4, 3, 3), np.float32))
    with pytest.raises(normserve.FailedPreconditionError):
        client.backward(name, fwd.handle, np.zeros((2, 4, 3, 3), np.float32))
    with pytest.raises(normserve.InvalidArgumentError, match="weight has 2 "
                       "values"):
        client.set_parameters(name, weight=[1, 2])
    client.delete_layer(name)


def test_config_and_name_errors(client):
    with pytest.raises(normserve.InvalidArgumentError, match="num_features"):
        client.create_layer(0)
    with pytest.raises(normserve.InvalidArgumentError, match="momentum"):
        client.create_layer(2, momentum=1.5)
    with pytest.raises(normserve.InvalidArgumentError, match="eps"):
        nst.BatchNorm1d(2, eps=0.0, client=client)
    with pytest.raises(normserve.NotFoundError, match="no-such"):
        client.delete_layer("no-such")
    layer = client.create_layer(2, affine=False)
    with pytest.raises(normserve.FailedPreconditionError, match="affine"):
        client.optimizer_step(layer.name, lr=0.1)
    client.delete_layer(layer.name)
    layer = client.create_layer(2)
    with pytest.raises(normserve.InvalidArgumentError, match="Nesterov"):
        client.optimizer_step(layer.name, lr=0.1, nesterov=True)
    client.delete_layer(layer.name)


def test_error_attributes():
    err = normserve.error_from_code(5, "gone", "GetLayer(x)", "h:1")
    assert isinstance(err, normserve.NotFoundError)
    assert err.code == grpc.StatusCode.NOT_FOUND and err.details == "gone"
    assert str(err) == "GetLayer(x) (h:1): NOT_FOUND: gone"
    assert isinstance(normserve.error_from_code(99, "?"),
                      normserve.NormserveError)
