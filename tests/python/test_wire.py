"""Wire encoding without a server: hand-built messages equal protobuf's,
tensors keep their bytes and layouts, bfloat16 rounds like torch."""

import numpy as np
import pytest
import torch

import normserve
from normserve import _wire
from normserve import client as client_module
from normserve import tensor as T
from normserve.v1 import normserve_pb2 as pb
import normserve.torch as nst


def _address(array):
    return np.frombuffer(array, dtype=np.uint8).ctypes.data


def test_forward_request_matches_protobuf():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(
        np.float32)
    wire = T.from_numpy(x)
    encoded = client_module._forward_parts("layers/a", wire, True, True,
                                           False).join()
    expected = pb.ForwardRequest(name="layers/a", training=True,
                                 return_stats=True, save_for_backward=False,
                                 input=wire.to_proto())
    assert pb.ForwardRequest.FromString(encoded) == expected


def test_train_request_nests_tensor():
    wire = T.from_numpy(np.ones((4, 2), np.float16))
    message = _wire.Parts(pb.TrainRequest(request_id=7).SerializeToString())
    message.append_field(3, client_module._backward_parts(
        "b", 11, wire, True, False, True))
    decoded = pb.TrainRequest.FromString(message.join())
    assert decoded.request_id == 7
    assert decoded.backward.handle == 11
    assert decoded.backward.accumulate_grad and decoded.backward.skip_grad_input
    assert decoded.backward.grad_output == wire.to_proto()


def _number(message_type, name):
    return message_type.DESCRIPTOR.fields_by_name[name].number


def test_wire_field_numbers_are_the_descriptors():
    data = _number(pb.Tensor, "data")
    assert _wire.TENSOR_DATA == data == pb.Tensor.DATA_FIELD_NUMBER
    assert client_module._FORWARD_INPUT == _number(pb.ForwardRequest, "input")
    assert client_module._BACKWARD_GRAD_OUTPUT == _number(pb.BackwardRequest,
                                                          "grad_output")
    assert client_module._FORWARD_DATA == (
        _number(pb.ForwardResponse, "output"), data)
    assert client_module._BACKWARD_DATA == (
        _number(pb.BackwardResponse, "grad_input"), data)
    assert client_module._TRAIN_DATA == {
        _number(pb.TrainResponse, "forward"):
            {_number(pb.ForwardResponse, "output"): {data: None}},
        _number(pb.TrainResponse, "backward"):
            {_number(pb.BackwardResponse, "grad_input"): {data: None}},
        _number(pb.TrainResponse, "sync_forward"):
            {_number(pb.SyncForwardResponse, "output"): {data: None}},
        _number(pb.TrainResponse, "sync_backward"):
            {_number(pb.SyncBackwardResponse, "grad_input"): {data: None}},
    }
    assert client_module._SYNC_FORWARD_INPUT == _number(
        pb.SyncForwardRequest, "input")
    assert client_module._SYNC_BACKWARD_GRAD_OUTPUT == _number(
        pb.SyncBackwardRequest, "grad_output")
    # Every operation of a Train stream, each at its descriptor's number.
    arms = pb.TrainRequest.DESCRIPTOR.oneofs_by_name["op"].fields
    assert client_module._TRAIN_OPS == {f.name: f.number for f in arms}


@pytest.mark.parametrize("op", sorted(client_module._TRAIN_OPS))
def test_train_ops_encode_their_arm(op):
    message = _wire.Parts(pb.TrainRequest(request_id=5).SerializeToString())
    message.append_field(client_module._TRAIN_OPS[op], _wire.Parts())
    decoded = pb.TrainRequest.FromString(message.join())
    assert decoded.request_id == 5 and decoded.WhichOneof("op") == op


def test_length_field_refuses_other_fields():
    assert (_wire.length_field(pb.ForwardRequest, "input") ==
            pb.ForwardRequest.INPUT_FIELD_NUMBER)
    with pytest.raises(TypeError, match="normserve.v1.Tensor.shape"):
        _wire.length_field(pb.Tensor, "shape")  # Repeated.
    with pytest.raises(TypeError, match="ForwardRequest.training"):
        _wire.length_field(pb.ForwardRequest, "training")  # A varint.
    with pytest.raises(KeyError):
        _wire.length_field(pb.Tensor, "no_such_field")


@pytest.mark.parametrize("size", [0, 1, 200, 70000])
def test_split_data_cuts_bytes_field(size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    response = pb.TrainResponse(
        request_id=3, status=pb.OpStatus(code=0),
        forward=pb.ForwardResponse(
            output=pb.Tensor(shape=[size], dtype=pb.DTYPE_FLOAT16,
                             layout=pb.LAYOUT_NHWC, data=data),
            handle=9, mean=[1.5, 2.5], invstd=[3.0], version=4))
    buf = response.SerializeToString()
    rest, cut = _wire.split_data(buf, client_module._TRAIN_DATA)
    parsed = pb.TrainResponse.FromString(rest)
    assert parsed.forward.output.data == b""
    assert bytes(cut if cut is not None else b"") == data
    parsed.forward.output.data = data
    assert parsed == response
    if size:
        assert _address(cut) >= _address(buf)  # A view of buf, no copy.


def test_split_data_without_field_and_malformed():
    response = pb.ForwardResponse(handle=1, version=2)
    rest, data = _wire.split_data(response.SerializeToString(), (1, 4))
    assert data is None and pb.ForwardResponse.FromString(rest) == response
    with pytest.raises(ValueError, match="truncated"):
        _wire.split_data(response.SerializeToString()[:-1] + b"\x0a\x05",
                         (1, 4))


def test_numpy_layouts():
    rng = np.random.default_rng(1)
    nhwc = rng.standard_normal((2, 4, 5, 3)).astype(np.float32)
    x = np.moveaxis(nhwc, -1, 1)  # Logical (2, 3, 4, 5), channels last.
    wire = T.from_numpy(x)
    assert wire.layout == pb.LAYOUT_NHWC and wire.shape == (2, 3, 4, 5)
    assert _address(wire.data) == nhwc.ctypes.data  # No copy.
    back = T.to_numpy(wire)
    assert np.array_equal(back, x) and back.strides == x.strides
    contiguous = T.from_numpy(np.ascontiguousarray(x))
    assert contiguous.layout == pb.LAYOUT_NCHW
    forced = T.from_numpy(np.ascontiguousarray(x), layout="NHWC")
    assert bytes(forced.data) == nhwc.tobytes()
    odd = T.from_numpy(x[:, :, ::2])  # Neither layout: copied to NCHW.
    assert odd.layout == pb.LAYOUT_NCHW
    assert np.array_equal(T.to_numpy(odd), x[:, :, ::2])


def test_numpy_dtypes_and_bfloat16_rounding():
    values = np.array([[1.0, -2.5, 3.14159, 1e-3, 65504.0, 1.00390625,
                        1.01171875, np.inf, -np.inf, 0.0]],
                      dtype=np.float32)
    bits = T.float32_to_bfloat16_bits(values)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(
        torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bits, expected)
    nan_bits = T.float32_to_bfloat16_bits(np.array([np.nan], np.float32))
    assert np.isnan(T.bfloat16_bits_to_float32(nan_bits)).all()
    wire = T.from_numpy(values, dtype="bfloat16")
    assert wire.dtype == pb.DTYPE_BFLOAT16
    assert np.array_equal(T.to_numpy(wire, bfloat16="raw"), bits)
    assert T.from_numpy(values.astype(np.float16)).dtype == pb.DTYPE_FLOAT16
    assert T.from_numpy(values.astype(np.float64)).dtype == pb.DTYPE_FLOAT32
    with pytest.raises(ValueError, match="unknown dtype"):
        T.from_numpy(values, dtype="int8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 2, 4, 5), (4, 3, 7),
                                   (6, 3)])
def test_torch_round_trip_without_copies(dtype, shape):
    x = torch.randn(shape).to(dtype)
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif len(shape) == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    wire = nst.to_wire(x)
    channels_last = len(shape) >= 4
    assert wire.layout == (pb.LAYOUT_NHWC if channels_last
                           else pb.LAYOUT_NCHW)
    assert _address(wire.data) == x.data_ptr()  # Sent without a copy.
    back = nst.from_wire(wire)
    assert back.dtype == dtype and back.shape == x.shape
    assert back.stride() == x.stride() and back.data_ptr() == x.data_ptr()
    assert torch.equal(back, x)
    assert back._base is None  # Not a view: in-place ops stay allowed.
    nchw = nst.to_wire(x, layout=pb.LAYOUT_NCHW)
    assert torch.equal(nst.from_wire(nchw), x)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        nst.to_wire(torch.zeros(shape, dtype=torch.float64))


def test_missing_stubs_message(monkeypatch, tmp_path):
    from normserve import _stubs
    monkeypatch.setenv("NORMSERVE_PYTHON_STUBS", str(tmp_path))
    monkeypatch.setattr("sys.path", [str(tmp_path)])
    monkeypatch.setattr(_stubs, "__file__", str(tmp_path / "a/b/c/d.py"))
    with pytest.raises(ImportError, match="Run `make`"):
        _stubs.extend_package_path([])


def test_package_exports():
    assert normserve.Client is client_module.Client
    assert normserve.torch.BatchNorm2d is nst.BatchNorm2d
    assert issubclass(normserve.InvalidArgumentError, ValueError)
    assert issubclass(normserve.NotFoundError, normserve.NormserveError)


def test_packed_arrays_read_what_protobuf_wrote():
    rng = np.random.default_rng(3)
    mean, invstd = rng.random(5).astype(np.float32), rng.random(5)
    msg = pb.SyncForwardResponse(count=7, mean=mean.tolist(),
                                 invstd=invstd.tolist(), step=3)
    fields = client_module._SYNC_FORWARD_FLOATS
    got = _wire.packed_arrays(msg.SerializeToString(), fields)
    np.testing.assert_array_equal(got["mean"], mean)
    np.testing.assert_array_equal(got["invstd"], invstd.astype(np.float32))
    assert got["weight"].size == 0 and got["bias"].size == 0  # Absent.
    assert got["mean"].flags.writeable
    # Two serialized messages back to back are one message whose repeated
    # fields are both parts, in order.
    more = pb.SyncForwardResponse(mean=[9.0]).SerializeToString()
    got = _wire.packed_arrays(msg.SerializeToString() + more, fields)
    np.testing.assert_array_equal(got["mean"], np.append(mean, 9.0))
    with pytest.raises(ValueError, match="truncated"):
        _wire.packed_arrays(msg.SerializeToString()[:-3], fields)


def test_sync_requests_encode_their_arrays_packed():
    mean, m2 = np.array([0.5, -1.25, 3.0]), [1.0, 2.0, 4.0]
    raw = client_module._sync_forward_parts("g", 4, 1, True, 12, mean, m2,
                                            None, None, "id").join()
    decoded = pb.SyncForwardRequest.FromString(raw)
    assert (decoded.name, decoded.step, decoded.rank, decoded.count,
            decoded.request_id) == ("g", 4, 1, 12, "id")
    assert list(decoded.mean) == mean.tolist()
    assert list(decoded.m2) == m2
    raw = client_module._sync_backward_parts(
        "g", 4, 1, [1.0, 2.0], np.float32([0.5, 0.25]), None, None, True,
        False, dict(lr=0.1), False, "").join()
    decoded = pb.SyncBackwardRequest.FromString(raw)
    assert list(decoded.sum_dy) == [1.0, 2.0]
    assert list(decoded.sum_dy_xhat) == [0.5, 0.25]
    assert decoded.accumulate_grad and decoded.sgd.lr == 0.1
    # No arrays at all (an empty slice's stats) encode as absent fields.
    raw = client_module._sync_forward_parts("g", 0, 0, True, 0, None, None,
                                            None, None, "").join()
    assert len(pb.SyncForwardRequest.FromString(raw).mean) == 0
