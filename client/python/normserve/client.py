"""normserve.Client: every call of normserve.v1.Normalization, numpy in/out.

    client = normserve.Client("127.0.0.1:50051", timeout=10)
    layer = client.create_layer(64, layer_id="bn1", momentum=None)
    fwd = client.forward("bn1", x, training=True)       # x: (N, 64, H, W)
    bwd = client.backward("bn1", fwd.handle, dy)
    state = client.get_state("bn1")                     # dict of arrays

Every method takes ``timeout=`` (seconds; default: the client's) and raises a
:class:`normserve.NormserveError` subclass carrying the gRPC status code and
the server's message. Thread-safe: calls may be made from several threads.

Mutating calls (create_layer, delete_layer, forward, backward,
update_running_stats, optimizer_step, set_parameters, load_state, and the
same on a TrainStream) take ``request_id=`` and, except create/delete,
``expected_version=``::

    rid = normserve.new_request_id()
    client.optimizer_step("bn1", lr=0.1, request_id=rid)
    client.optimizer_step("bn1", lr=0.1, request_id=rid)  # applied once
    client.set_parameters("bn1", w, expected_version=7)   # else
                                            # FailedPreconditionError

A request id is applied at most once (per layer; per tenant for create and
delete): a repeat returns the first result and changes nothing, except a
training forward or an accumulating backward, which raise AlreadyExistsError
"... was already applied" (their outputs are not kept). The unary methods
also take ``retries=N``: after UnavailableError, DeadlineExceededError or
AbortedError the call is sent again, up to N times, with the same request id
(a fresh one when none was given), so a lost reply never applies a step
twice.
"""

import concurrent.futures
import dataclasses
import queue
import threading
import time
import uuid
from typing import List, Optional, Tuple

import grpc
import numpy as np

from normserve import _wire
from normserve import errors
from normserve import tensor as _tensor
from normserve.tensor import WireTensor
from normserve.v1 import normserve_pb2 as pb

__all__ = ["Client", "TrainStream", "LayerInfo", "LayerPage", "LayerState",
           "ForwardResult", "BackwardResult", "RunningStatsResult",
           "new_request_id"]

_SERVICE = "/normserve.v1.Normalization/"
DEFAULT_TIMEOUT = 30.0
_MISSING = object()
# Longest request id the server takes.
MAX_REQUEST_ID_BYTES = 128
# Codes after which a call with a request id is sent again (retries=N).
_RETRYABLE = (errors.UnavailableError, errors.DeadlineExceededError,
              errors.AbortedError)
_RETRY_BACKOFF = 0.1  # Seconds before the first retry; doubled each time.


def new_request_id():
    """Returns a fresh request id (32 hex digits, 128 random bits)."""
    return uuid.uuid4().hex


def _with_ids(request, request_id=None, expected_version=None):
    """Sets a request's request_id / expected_version; returns it."""
    if request_id is not None:
        request_id = str(request_id)
        if len(request_id.encode()) > MAX_REQUEST_ID_BYTES:
            raise ValueError(f"request_id has {len(request_id.encode())} "
                             f"bytes; at most {MAX_REQUEST_ID_BYTES}")
        request.request_id = request_id
    if expected_version is not None:
        request.expected_version = int(expected_version)
    return request

# Field numbers of the wire path (see _wire), read from the generated
# descriptors once, at import. Where the tensor sits in each request:
_FORWARD_INPUT = _wire.length_field(pb.ForwardRequest, "input")
_BACKWARD_GRAD_OUTPUT = _wire.length_field(pb.BackwardRequest, "grad_output")
_SYNC_FORWARD_INPUT = _wire.length_field(pb.SyncForwardRequest, "input")
_SYNC_BACKWARD_GRAD_OUTPUT = _wire.length_field(pb.SyncBackwardRequest,
                                                "grad_output")
# Where the tensor bytes sit in each response (see _wire.split_data).
_FORWARD_DATA = (_wire.length_field(pb.ForwardResponse, "output"),
                 _wire.TENSOR_DATA)  # ForwardResponse.output.data
_BACKWARD_DATA = (_wire.length_field(pb.BackwardResponse, "grad_input"),
                  _wire.TENSOR_DATA)  # BackwardResponse.grad_input.data
_SYNC_FORWARD_DATA = (_wire.length_field(pb.SyncForwardResponse, "output"),
                      _wire.TENSOR_DATA)
_SYNC_BACKWARD_DATA = (
    _wire.length_field(pb.SyncBackwardResponse, "grad_input"),
    _wire.TENSOR_DATA)
# The per-channel arrays of the sync calls, read and written as packed bytes
# (see _wire.packed_arrays).
_SYNC_FORWARD_FLOATS = {
    _wire.packed_field(pb.SyncForwardResponse, name): name
    for name in ("mean", "invstd", "weight", "bias")}
_SYNC_BACKWARD_FLOATS = {
    _wire.packed_field(pb.SyncBackwardResponse, name): name
    for name in ("sum_dy", "sum_dy_xhat")}
_SYNC_MEAN = _wire.packed_field(pb.SyncForwardRequest, "mean")[0]
_SYNC_M2 = _wire.packed_field(pb.SyncForwardRequest, "m2")[0]
_SYNC_SUM_DY = _wire.packed_field(pb.SyncBackwardRequest, "sum_dy")[0]
_SYNC_SUM_DY_XHAT = _wire.packed_field(pb.SyncBackwardRequest,
                                       "sum_dy_xhat")[0]
# TrainResponse.forward.output.data, .backward.grad_input.data and the sync
# operations' tensors.
_TRAIN_DATA = {
    _wire.length_field(pb.TrainResponse, "forward"):
        {_FORWARD_DATA[0]: {_wire.TENSOR_DATA: None}},
    _wire.length_field(pb.TrainResponse, "backward"):
        {_BACKWARD_DATA[0]: {_wire.TENSOR_DATA: None}},
    _wire.length_field(pb.TrainResponse, "sync_forward"):
        {_SYNC_FORWARD_DATA[0]: {_wire.TENSOR_DATA: None}},
    _wire.length_field(pb.TrainResponse, "sync_backward"):
        {_SYNC_BACKWARD_DATA[0]: {_wire.TENSOR_DATA: None}},
}
# TrainRequest's operations (oneof arms), by field name.
_TRAIN_OPS = {name: _wire.length_field(pb.TrainRequest, name) for name in (
    "forward", "backward", "update_running_stats", "optimizer_step",
    "set_parameters", "get_state", "load_state", "get_layer",
    "sync_forward", "sync_backward")}


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A layer as the server describes it (config with defaults filled in).

    BatchNorm and InstanceNorm layers fill num_features .. spatial_dims.
    LayerNorm and RMSNorm layers fill normalized_shape, eps (None: RMSNorm's
    eps=None), affine (their elementwise_affine), bias and dtype; GroupNorm
    layers num_groups, num_features (its num_channels), eps, affine, bias
    (= affine) and dtype. Fields a kind lacks read num_features 0, momentum
    None, track_running_stats False, layout "NCHW", spatial_dims 0.
    """

    name: str  # "layers/{id}"
    num_features: int
    eps: Optional[float]
    momentum: Optional[float]  # None: cumulative average (PyTorch's None).
    affine: bool
    track_running_stats: bool
    layout: str  # "NCHW" or "NHWC": default for requests that leave it unset.
    dtype: str  # "float32", "float16" or "bfloat16": likewise.
    spatial_dims: int  # 1, 2, 3 (BatchNorm1d/2d/3d) or 0 (any rank 2..5).
    device: str
    version: int
    num_batches_tracked: int
    has_accumulated_grad: bool
    # "batch_norm", "layer_norm", "rms_norm", "group_norm" or
    # "instance_norm" (servers before kinds: assumed batch_norm).
    kind: str = "batch_norm"
    normalized_shape: Tuple[int, ...] = ()  # LayerNorm, RMSNorm.
    bias: bool = False  # LayerNorm: a bias beside the weight.
    num_groups: int = 0  # GroupNorm.
    world_size: int = 0  # SyncBatchNorm: the ranks of the group.
    barrier_timeout_ms: int = 0  # SyncBatchNorm.

    @property
    def id(self):
        return self.name.split("/", 1)[1] if "/" in self.name else self.name

    @classmethod
    def from_proto(cls, layer):
        which = layer.WhichOneof("config")
        common = dict(name=layer.name, version=layer.version,
                      num_batches_tracked=layer.num_batches_tracked,
                      has_accumulated_grad=layer.has_accumulated_grad)
        if which in ("layer_norm", "rms_norm"):
            config = getattr(layer, which)
            return cls(
                num_features=0,
                eps=config.eps if config.HasField("eps") else None,
                momentum=None, affine=config.elementwise_affine,
                track_running_stats=False, layout="NCHW",
                dtype=_tensor.dtype_name(config.dtype), spatial_dims=0,
                device=config.device, kind=layer.kind or which,
                normalized_shape=tuple(config.normalized_shape),
                bias=which == "layer_norm" and config.elementwise_affine
                and config.bias, **common)
        if which == "group_norm":
            config = layer.group_norm
            return cls(
                num_features=config.num_channels, eps=config.eps,
                momentum=None, affine=config.affine,
                track_running_stats=False, layout="NCHW",
                dtype=_tensor.dtype_name(config.dtype), spatial_dims=0,
                device=config.device, kind="group_norm", bias=config.affine,
                num_groups=config.num_groups, **common)
        sync = {}
        if which == "instance_norm":
            config = layer.instance_norm
            momentum = config.momentum
        elif which == "sync_batch_norm":
            sync = dict(world_size=layer.sync_batch_norm.world_size,
                        barrier_timeout_ms=(
                            layer.sync_batch_norm.barrier_timeout_ms))
            config = layer.sync_batch_norm.batch_norm
            momentum = (None if config.WhichOneof("momentum_policy")
                        == "cumulative_average" else config.momentum)
        else:
            config = layer.batch_norm
            momentum = (None if config.WhichOneof("momentum_policy")
                        == "cumulative_average" else config.momentum)
        return cls(
            num_features=config.num_features,
            eps=config.eps,
            momentum=momentum,
            affine=config.affine,
            track_running_stats=config.track_running_stats,
            layout=_tensor.layout_name(config.layout),
            dtype=_tensor.dtype_name(config.dtype),
            spatial_dims=config.spatial_dims,
            device=config.device,
            kind=layer.kind or which or "batch_norm", **sync, **common)


@dataclasses.dataclass(frozen=True)
class LayerPage:
    layers: List[LayerInfo]
    next_page_token: str  # "" on the last page.


@dataclasses.dataclass(frozen=True)
class ForwardResult:
    # Input's shape, dtype and layout: a read-only numpy view of the reply
    # (bfloat16 widened to float32), or a WireTensor when called with raw=True.
    output: object
    handle: int  # For backward(); 0 when nothing was saved.
    mean: np.ndarray  # Per-channel batch mean with return_stats, else empty.
    invstd: np.ndarray
    version: int


@dataclasses.dataclass(frozen=True)
class BackwardResult:
    grad_input: object  # Like ForwardResult.output; None when skipped.
    grad_weight: Optional[np.ndarray]  # float32 [C]; None when not affine.
    grad_bias: Optional[np.ndarray]
    version: int


@dataclasses.dataclass(frozen=True)
class SyncStatsResult:
    """A sync group step's statistics (SyncForward): the union's count and
    per-channel mean and invstd (float32 [C]), the layer's weight and bias
    as the step used them (None without affine); in tensor mode also this
    rank's output (like ForwardResult.output) and its handle for
    sync_backward."""
    count: int
    mean: np.ndarray
    invstd: np.ndarray
    step: int
    version: int
    weight: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None
    output: object = None
    handle: int = 0


@dataclasses.dataclass(frozen=True)
class SyncGradsResult:
    """A sync group step's backward sums (SyncBackward) over the union; in
    tensor mode also this rank's grad_input (None when skipped)."""
    count: int
    sum_dy: np.ndarray
    sum_dy_xhat: np.ndarray
    version: int
    grad_input: object = None


@dataclasses.dataclass(frozen=True)
class RunningStatsResult:
    version: int
    num_batches_tracked: int


class LayerState(dict):
    """A state dict (PyTorch's names) of numpy arrays, plus ``version``.

    weight, bias, running_mean, running_var: float32 [C];
    num_batches_tracked: int64 scalar; with SGD momentum on the server also
    weight_momentum_buffer and bias_momentum_buffer.
    """

    def __init__(self, tensors, version):
        super().__init__(tensors)
        self.version = version


def _floats(values):
    # A protobuf repeated field converts far faster through a list.
    if not isinstance(values, np.ndarray):
        values = values[:]
    return np.asarray(values, dtype=np.float32)


def _state_from_proto(state):
    out = {}
    for key, t in sorted(state.tensors.items()):
        if t.dtype == pb.DTYPE_INT64:
            out[key] = np.frombuffer(t.data, dtype="<i8").reshape(
                tuple(t.shape)).copy()
        else:
            out[key] = np.frombuffer(t.data, dtype="<f4").reshape(
                tuple(t.shape)).copy()
    return out


def _to_numpy_value(value):
    if hasattr(value, "detach"):  # A torch tensor.
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _state_to_proto(state):
    out = pb.StateDict()
    for key, value in state.items():
        array = _to_numpy_value(value)
        t = out.tensors[key]
        if key == "num_batches_tracked":  # The one int64 entry.
            array = array.astype("<i8")
            t.dtype = pb.DTYPE_INT64
        else:
            array = array.astype("<f4")
            t.dtype = pb.DTYPE_FLOAT32
        t.shape.extend(int(d) for d in array.shape)
        t.data = np.ascontiguousarray(array).tobytes()
    return out


def _per_channel(values):
    if values is None:
        return []
    array = _to_numpy_value(values).astype(np.float32, copy=False).reshape(-1)
    return array.tolist()


def _as_wire(value, dtype=None, layout=None):
    if isinstance(value, WireTensor):
        return value
    return _tensor.from_numpy(value, dtype=dtype, layout=layout)


def _forward_parts(name, wire, training, return_stats, save_for_backward,
                   request_id=None, expected_version=None):
    request = _with_ids(pb.ForwardRequest(name=name, training=bool(training),
                                          return_stats=bool(return_stats)),
                        request_id, expected_version)
    if save_for_backward is not None:
        request.save_for_backward = bool(save_for_backward)
    return _wire.message_with_tensor(request.SerializeToString(),
                                     _FORWARD_INPUT,
                                     wire.meta().SerializeToString(),
                                     wire.data)


def _backward_parts(name, handle, wire, accumulate_grad, retain_context,
                    skip_grad_input, request_id=None, expected_version=None):
    request = _with_ids(
        pb.BackwardRequest(name=name, handle=int(handle),
                           accumulate_grad=bool(accumulate_grad),
                           retain_context=bool(retain_context),
                           skip_grad_input=bool(skip_grad_input)),
        request_id, expected_version)
    return _wire.message_with_tensor(request.SerializeToString(),
                                     _BACKWARD_GRAD_OUTPUT,
                                     wire.meta().SerializeToString(),
                                     wire.data)


def _sync_forward_parts(name, step, rank, training, count, mean, m2, wire,
                        save_for_backward, request_id):
    if wire is not None and (count or mean is not None or m2 is not None):
        raise ValueError("sync_forward: input (tensor mode) and count, mean, "
                         "m2 (stats mode) are exclusive")
    request = pb.SyncForwardRequest(
        name=name, step=int(step), rank=int(rank), training=bool(training),
        request_id=request_id or "")
    if wire is None:
        request.count = int(count or 0)
        return _wire.Parts(request.SerializeToString(),
                           _wire.packed_bytes(_SYNC_MEAN, _f64(mean)),
                           _wire.packed_bytes(_SYNC_M2, _f64(m2)))
    if save_for_backward is not None:
        request.save_for_backward = bool(save_for_backward)
    return _wire.message_with_tensor(request.SerializeToString(),
                                     _SYNC_FORWARD_INPUT,
                                     wire.meta().SerializeToString(),
                                     wire.data)


def _sync_backward_parts(name, step, rank, sum_dy, sum_dy_xhat, handle, wire,
                         accumulate_grad, skip_grad_input, sgd, keep_grad,
                         request_id):
    if wire is not None and (sum_dy is not None or sum_dy_xhat is not None):
        raise ValueError("sync_backward: grad_output (tensor mode) and "
                         "sum_dy, sum_dy_xhat (stats mode) are exclusive")
    request = pb.SyncBackwardRequest(
        name=name, step=int(step), rank=int(rank),
        accumulate_grad=bool(accumulate_grad), keep_grad=bool(keep_grad),
        request_id=request_id or "")
    if sgd is not None:
        request.sgd.CopyFrom(_sgd(sgd.get("lr", 0.0), sgd.get("momentum", 0.0),
                                  sgd.get("dampening", 0.0),
                                  sgd.get("weight_decay", 0.0),
                                  sgd.get("nesterov", False)))
    if wire is None:
        return _wire.Parts(
            request.SerializeToString(),
            _wire.packed_bytes(_SYNC_SUM_DY, _f64(sum_dy)),
            _wire.packed_bytes(_SYNC_SUM_DY_XHAT, _f64(sum_dy_xhat)))
    request.handle = int(handle or 0)
    request.skip_grad_input = bool(skip_grad_input)
    return _wire.message_with_tensor(request.SerializeToString(),
                                     _SYNC_BACKWARD_GRAD_OUTPUT,
                                     wire.meta().SerializeToString(),
                                     wire.data)


def _f64(values):
    """Per-channel values as little-endian float64 (empty for None)."""
    if values is None:
        return np.empty(0, "<f8")
    return np.ascontiguousarray(_to_numpy_value(values), "<f8").reshape(-1)


def _sync_forward_result(r, data, raw):
    output = None
    if r.HasField("output"):
        output = _tensor_out(r.output, data, raw)
    # The arrays from the bytes: the repeated fields convert value by value.
    f = _wire.packed_arrays(r.SerializeToString(), _SYNC_FORWARD_FLOATS)
    return SyncStatsResult(r.count, f["mean"], f["invstd"], r.step,
                           r.version, f["weight"] if f["weight"].size else None,
                           f["bias"] if f["bias"].size else None, output,
                           r.handle)


def _sync_backward_result(r, data, raw):
    grad_input = None
    if r.HasField("grad_input"):
        grad_input = _tensor_out(r.grad_input, data, raw)
    f = _wire.packed_arrays(r.SerializeToString(), _SYNC_BACKWARD_FLOATS)
    return SyncGradsResult(r.count, f["sum_dy"], f["sum_dy_xhat"], r.version,
                           grad_input)


def _tensor_out(tensor_msg, data, raw):
    if data is None:
        data = b""
    wire = WireTensor.from_proto(tensor_msg, data)
    return wire if raw else _tensor.to_numpy(wire)


def _forward_result(response, data, raw):
    return ForwardResult(output=_tensor_out(response.output, data, raw),
                         handle=response.handle,
                         mean=_floats(response.mean),
                         invstd=_floats(response.invstd),
                         version=response.version)


def _backward_result(response, data, raw):
    grad_input = None
    if response.HasField("grad_input"):
        grad_input = _tensor_out(response.grad_input, data, raw)
    grad_weight = _floats(response.grad_weight) if response.grad_weight else None
    grad_bias = _floats(response.grad_bias) if response.grad_bias else None
    return BackwardResult(grad_input=grad_input, grad_weight=grad_weight,
                          grad_bias=grad_bias, version=response.version)


def _decode_with_data(message_type, fields):
    def decode(buf):
        rest, data = _wire.split_data(buf, fields)
        return message_type.FromString(rest), data
    return decode


def _sgd(lr, momentum, dampening, weight_decay, nesterov):
    return pb.SgdOptions(lr=float(lr), momentum=float(momentum),
                         dampening=float(dampening),
                         weight_decay=float(weight_decay),
                         nesterov=bool(nesterov))


def _create_request(num_features, layer_id, eps, momentum, affine,
                    track_running_stats, layout, dtype, spatial_dims, device):
    config = pb.BatchNormConfig(
        num_features=int(num_features), eps=float(eps), affine=bool(affine),
        track_running_stats=bool(track_running_stats),
        layout=_tensor.layout_enum(layout), dtype=_tensor.dtype_enum(dtype),
        spatial_dims=int(spatial_dims), device=device or "")
    if momentum is None:
        config.cumulative_average.SetInParent()
    else:
        config.momentum = float(momentum)
    return pb.CreateLayerRequest(layer_id=layer_id or "", batch_norm=config)


def _group_norm_request(num_groups, num_channels, layer_id, eps, affine,
                        dtype, device):
    config = pb.GroupNormConfig(
        num_groups=int(num_groups), num_channels=int(num_channels),
        eps=float(eps), affine=bool(affine), dtype=_tensor.dtype_enum(dtype),
        device=device or "")
    return pb.CreateLayerRequest(layer_id=layer_id or "", group_norm=config)


def _instance_norm_request(num_features, layer_id, eps, momentum, affine,
                           track_running_stats, layout, dtype, spatial_dims,
                           device):
    if momentum is None:
        raise ValueError("instance_norm needs a momentum in [0, 1] "
                         "(torch.nn.InstanceNorm has no cumulative average)")
    config = pb.InstanceNormConfig(
        num_features=int(num_features), eps=float(eps),
        momentum=float(momentum), affine=bool(affine),
        track_running_stats=bool(track_running_stats),
        layout=_tensor.layout_enum(layout), dtype=_tensor.dtype_enum(dtype),
        spatial_dims=int(spatial_dims), device=device or "")
    return pb.CreateLayerRequest(layer_id=layer_id or "",
                                 instance_norm=config)


def _shape_tuple(normalized_shape):
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(d) for d in normalized_shape)


def _row_norm_request(kind, normalized_shape, layer_id, eps,
                      elementwise_affine, bias, dtype, device):
    fields = dict(normalized_shape=_shape_tuple(normalized_shape),
                  elementwise_affine=bool(elementwise_affine),
                  dtype=_tensor.dtype_enum(dtype), device=device or "")
    if eps is not None:
        fields["eps"] = float(eps)
    if kind == "layer_norm":
        config = pb.LayerNormConfig(bias=bool(bias), **fields)
        return pb.CreateLayerRequest(layer_id=layer_id or "",
                                     layer_norm=config)
    return pb.CreateLayerRequest(layer_id=layer_id or "",
                                 rms_norm=pb.RMSNormConfig(**fields))


class Client:
    """A connection to a normserve server.

    address: "host:port". timeout: default deadline of every call, seconds
    (None: no deadline). metadata: (key, value) pairs sent with every call.
    credentials: grpc.ChannelCredentials for TLS (default: plaintext).
    tls_ca, tls_cert, tls_key: paths of PEM files, the same as the CLI's
    --tls_ca/--tls_cert/--tls_key: any of them (or tls=True, trusting the
    system's CAs) connects with TLS; tls_cert and tls_key give a client
    certificate for mutual TLS. Not together with credentials.
    token: bearer token for servers started with --auth_tokens, sent as
    "authorization: Bearer TOKEN" with every call (never printed).
    wait_for_ready: queue calls while the server is unreachable instead of
    failing at once with UnavailableError (the timeout still applies).
    """

    def __init__(self, address, timeout=DEFAULT_TIMEOUT, *, metadata=None,
                 credentials=None, wait_for_ready=False, options=None,
                 tls=False, tls_ca=None, tls_cert=None, tls_key=None,
                 token=None):
        self.address = address
        self.timeout = timeout
        self._metadata = tuple(metadata or ())
        if token:
            self._metadata += (("authorization", "Bearer " + token),)
        if tls or tls_ca or tls_cert or tls_key:
            if credentials is not None:
                raise ValueError("pass either credentials or the tls_* files")
            if bool(tls_cert) != bool(tls_key):
                raise ValueError("tls_cert and tls_key go together")

            def read(path):
                with open(path, "rb") as f:
                    return f.read()

            credentials = grpc.ssl_channel_credentials(
                root_certificates=read(tls_ca) if tls_ca else None,
                private_key=read(tls_key) if tls_key else None,
                certificate_chain=read(tls_cert) if tls_cert else None)
        self._wait_for_ready = wait_for_ready
        channel_options = [
            # Activations are large; the server enforces its own limit
            # (--max_message_mb) and says so in RESOURCE_EXHAUSTED.
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
        ] + list(options or ())
        if credentials is None:
            self._channel = grpc.insecure_channel(address,
                                                  options=channel_options)
        else:
            self._channel = grpc.secure_channel(address, credentials,
                                                options=channel_options)
        self._closed = False

        def unary(method, request_type, response_type):
            return self._channel.unary_unary(
                _SERVICE + method,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString)

        self._create = unary("CreateLayer", pb.CreateLayerRequest, pb.Layer)
        self._get = unary("GetLayer", pb.GetLayerRequest, pb.Layer)
        self._list = unary("ListLayers", pb.ListLayersRequest,
                           pb.ListLayersResponse)
        self._delete = unary("DeleteLayer", pb.DeleteLayerRequest,
                             pb.DeleteLayerResponse)
        self._update_stats = unary("UpdateRunningStats",
                                   pb.UpdateRunningStatsRequest,
                                   pb.UpdateRunningStatsResponse)
        self._step = unary("OptimizerStep", pb.OptimizerStepRequest,
                           pb.OptimizerStepResponse)
        self._set_params = unary("SetParameters", pb.SetParametersRequest,
                                 pb.SetParametersResponse)
        self._set_world_size = unary("SetWorldSize", pb.SetWorldSizeRequest,
                                     pb.SetWorldSizeResponse)
        self._get_state = unary("GetState", pb.GetStateRequest,
                                pb.GetStateResponse)
        self._load_state = unary("LoadState", pb.LoadStateRequest,
                                 pb.LoadStateResponse)
        # Forward, Backward, the sync calls (tensor mode) and Train carry
        # tensors: requests arrive serialized (see _wire), responses are
        # split around their data.
        def with_tensor(method, response_type, data_fields):
            return self._channel.unary_unary(
                _SERVICE + method,
                response_deserializer=_decode_with_data(response_type,
                                                        data_fields))

        self._forward = with_tensor("Forward", pb.ForwardResponse,
                                    _FORWARD_DATA)
        self._backward = with_tensor("Backward", pb.BackwardResponse,
                                     _BACKWARD_DATA)
        self._sync_forward = with_tensor(
            "SyncForward", pb.SyncForwardResponse, _SYNC_FORWARD_DATA)
        self._sync_backward = with_tensor(
            "SyncBackward", pb.SyncBackwardResponse, _SYNC_BACKWARD_DATA)
        self._train = self._channel.stream_stream(
            _SERVICE + "Train",
            response_deserializer=_decode_with_data(pb.TrainResponse,
                                                    _TRAIN_DATA))

    def __repr__(self):
        return f"normserve.Client({self.address!r}, timeout={self.timeout!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Closes the channel; later calls fail."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    # -- plumbing ----------------------------------------------------------

    def _call(self, callable_, request, method, timeout):
        if timeout is _MISSING:
            timeout = self.timeout
        try:
            return callable_(request, timeout=timeout,
                             metadata=self._metadata or None,
                             wait_for_ready=self._wait_for_ready)
        except grpc.RpcError as err:
            raise errors.error_from_rpc(err, method, self.address) from None
        except ValueError:
            if self._closed:
                raise errors.error_from_code(
                    grpc.StatusCode.CANCELLED, "the client was closed", method,
                    self.address) from None
            raise

    def _mutate(self, callable_, request, method, timeout, retries):
        """_call, sent again up to ``retries`` times after a retryable
        error; ``request`` already carries its request id."""
        backoff = _RETRY_BACKOFF
        for attempt in range(int(retries) + 1):
            try:
                return self._call(callable_, request, method, timeout)
            except _RETRYABLE:
                if attempt >= retries:
                    raise
            time.sleep(backoff)
            backoff *= 2

    @staticmethod
    def _retry_id(request_id, retries):
        """The request id to send: a fresh one when retrying without one."""
        if request_id is None and retries:
            return new_request_id()
        return request_id

    def wait_ready(self, timeout=_MISSING):
        """Waits until the channel connects; UnavailableError otherwise."""
        if timeout is _MISSING:
            timeout = self.timeout
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise errors.error_from_code(
                grpc.StatusCode.UNAVAILABLE,
                f"no connection within {timeout} s (is a normserve server "
                f"running at {self.address}?)", "wait_ready",
                self.address) from None

    # -- layers ------------------------------------------------------------

    def create_layer(self, num_features=None, *, kind="batch_norm",
                     layer_id=None, eps=_MISSING, momentum=0.1,
                     affine=_MISSING, track_running_stats=_MISSING,
                     layout=None, dtype=None, spatial_dims=0,
                     normalized_shape=None, elementwise_affine=True,
                     bias=True, num_groups=None, num_channels=None,
                     world_size=None, barrier_timeout_ms=None,
                     device=None, request_id=None, retries=0,
                     timeout=_MISSING) -> LayerInfo:
        """Creates a layer of `kind` with torch.nn's arguments for it.

        kind="batch_norm" (torch.nn.BatchNorm): num_features, eps (1e-5),
        momentum (None: cumulative average), affine, track_running_stats;
        layout/dtype: defaults for requests that leave theirs unset;
        spatial_dims: 1, 2, 3 for BatchNorm1d/2d/3d input ranks, 0 for any.
        kind="layer_norm" (torch.nn.LayerNorm): normalized_shape (an int or
        a tuple of trailing dims), eps (1e-5), elementwise_affine, bias,
        dtype. kind="rms_norm" (torch.nn.RMSNorm): normalized_shape, eps
        (None: float32's machine epsilon, as torch), elementwise_affine,
        dtype. kind="group_norm" (torch.nn.GroupNorm): num_groups,
        num_channels, eps (1e-5), affine (True), dtype.
        kind="instance_norm" (torch.nn.InstanceNorm1d/2d/3d): num_features,
        eps (1e-5), momentum (0.1; not None), affine (False),
        track_running_stats (False), layout, dtype, spatial_dims (1, 2, 3
        for InstanceNorm1d/2d/3d batched ranks 3, 4, 5; 0 for any).
        kind="sync_batch_norm" (a sync group: one BatchNorm over the union
        of world_size ranks' batches): BatchNorm's arguments plus
        world_size and barrier_timeout_ms (30000); see sync_forward.
        layer_id: "" or None lets the server choose; a taken id raises
        AlreadyExistsError.
        request_id: a create that already succeeded with this id returns the
        layer it made (also with a server-chosen id) and creates nothing;
        AlreadyExistsError if it made another layer or config, or that layer
        was deleted since. retries: see the module docstring.
        """
        if eps is _MISSING and kind != "rms_norm":
            eps = 1e-5
        if kind in ("batch_norm", "instance_norm", "sync_batch_norm"):
            if num_features is None:
                raise TypeError(f"create_layer(kind={kind!r}) needs "
                                "num_features")
            # torch's defaults: BatchNorm True, True; InstanceNorm False.
            default = kind != "instance_norm"
            make = (_instance_norm_request if kind == "instance_norm"
                    else _create_request)
            request = make(
                num_features, layer_id, eps, momentum,
                default if affine is _MISSING else affine,
                default if track_running_stats is _MISSING
                else track_running_stats, layout, dtype, spatial_dims,
                device)
            if kind == "sync_batch_norm":
                if world_size is None:
                    raise TypeError("create_layer(kind='sync_batch_norm') "
                                    "needs world_size")
                sync = pb.SyncBatchNormConfig(
                    batch_norm=request.batch_norm, world_size=int(world_size))
                if barrier_timeout_ms is not None:
                    sync.barrier_timeout_ms = int(barrier_timeout_ms)
                request = pb.CreateLayerRequest(layer_id=request.layer_id,
                                                sync_batch_norm=sync)
        elif kind == "group_norm":
            if num_groups is None or num_channels is None:
                raise TypeError("create_layer(kind='group_norm') needs "
                                "num_groups and num_channels")
            request = _group_norm_request(
                num_groups, num_channels, layer_id, eps,
                True if affine is _MISSING else affine, dtype, device)
        elif kind in ("layer_norm", "rms_norm"):
            if normalized_shape is None:
                raise TypeError(f"create_layer(kind={kind!r}) needs "
                                "normalized_shape")
            if eps is _MISSING:
                eps = None  # RMSNorm's default.
            request = _row_norm_request(kind, normalized_shape, layer_id, eps,
                                        elementwise_affine, bias, dtype,
                                        device)
        else:
            raise ValueError(f"unknown kind {kind!r}; expected 'batch_norm', "
                             "'layer_norm', 'rms_norm', 'group_norm', "
                             "'instance_norm' or 'sync_batch_norm'")
        request = _with_ids(request, self._retry_id(request_id, retries))
        return LayerInfo.from_proto(
            self._mutate(self._create, request, "CreateLayer", timeout,
                         retries))

    def get_layer(self, name, *, timeout=_MISSING) -> LayerInfo:
        return LayerInfo.from_proto(
            self._call(self._get, pb.GetLayerRequest(name=name),
                       f"GetLayer({name})", timeout))

    def list_layers(self, page_size=0, page_token="", *,
                    timeout=_MISSING) -> LayerPage:
        response = self._call(
            self._list,
            pb.ListLayersRequest(page_size=page_size, page_token=page_token),
            "ListLayers", timeout)
        return LayerPage([LayerInfo.from_proto(l) for l in response.layers],
                         response.next_page_token)

    def all_layers(self, *, timeout=_MISSING) -> List[LayerInfo]:
        """Returns every layer, following pages."""
        layers, token = [], ""
        while True:
            page = self.list_layers(1000, token, timeout=timeout)
            layers.extend(page.layers)
            token = page.next_page_token
            if not token:
                return layers

    def delete_layer(self, name, *, request_id=None, retries=0,
                     timeout=_MISSING) -> None:
        """Deletes a layer. request_id: a repeat of a delete that succeeded
        returns (instead of NotFoundError) and deletes nothing, not even a
        layer made under the same name since."""
        request = _with_ids(pb.DeleteLayerRequest(name=name),
                            self._retry_id(request_id, retries))
        self._mutate(self._delete, request, f"DeleteLayer({name})", timeout,
                     retries)

    # -- compute -----------------------------------------------------------

    def forward(self, name, input, *, training=False, return_stats=False,
                save_for_backward=None, dtype=None, layout=None,
                request_id=None, expected_version=None, retries=0,
                timeout=_MISSING, raw=False) -> ForwardResult:
        """Runs Forward on ``input`` (N, C, *spatial).

        input: a numpy array (see tensor.from_numpy for dtype/layout; a
        channels-last array goes as NHWC without a copy) or a WireTensor.
        training: batch statistics and a running-stat update; else eval.
        save_for_backward: None keeps the server's default (save, return a
        handle); False saves nothing. raw=True returns the output as a
        WireTensor over the reply's bytes. request_id, expected_version,
        retries: see the module docstring.
        """
        wire = _as_wire(input, dtype, layout)
        request = _forward_parts(name, wire, training, return_stats,
                                 save_for_backward,
                                 self._retry_id(request_id, retries),
                                 expected_version).join()
        response, data = self._mutate(self._forward, request,
                                      f"Forward({name})", timeout, retries)
        return _forward_result(response, data, raw)

    def backward(self, name, handle, grad_output, *, accumulate_grad=False,
                 retain_context=False, skip_grad_input=False, dtype=None,
                 layout=None, request_id=None, expected_version=None,
                 retries=0, timeout=_MISSING, raw=False) -> BackwardResult:
        """Runs Backward for a Forward's handle.

        grad_output must have the forward input's shape, dtype and layout
        (pass dtype=/layout= to convert). accumulate_grad adds grad_weight and
        grad_bias into the layer's gradients for optimizer_step();
        retain_context keeps the handle usable (retain_graph).
        """
        wire = _as_wire(grad_output, dtype, layout)
        request = _backward_parts(name, handle, wire, accumulate_grad,
                                  retain_context, skip_grad_input,
                                  self._retry_id(request_id, retries),
                                  expected_version).join()
        response, data = self._mutate(self._backward, request,
                                      f"Backward({name})", timeout, retries)
        return _backward_result(response, data, raw)

    def update_running_stats(self, name, mean, var, count, *,
                             request_id=None, expected_version=None,
                             retries=0,
                             timeout=_MISSING) -> RunningStatsResult:
        """Folds a batch's per-channel mean and biased var (over ``count``
        values per channel) into the running stats, as a forward would."""
        request = _with_ids(pb.UpdateRunningStatsRequest(
            name=name, mean=_per_channel(mean),
            var=_per_channel(var), count=int(count)),
            self._retry_id(request_id, retries), expected_version)
        response = self._mutate(self._update_stats, request,
                                f"UpdateRunningStats({name})", timeout,
                                retries)
        return RunningStatsResult(response.version,
                                  response.num_batches_tracked)

    def sync_forward(self, name, step, rank, count=0, mean=None, m2=None, *,
                     input=None, training=True, save_for_backward=None,
                     dtype=None, layout=None, request_id=None, retries=0,
                     timeout=_MISSING, raw=False) -> SyncStatsResult:
        """One rank's part of a sync group's step.

        Stats mode: its slice's per-channel count (values per channel, 0
        allowed), mean and M2 = sum((x - mean)^2), sent as float64. Tensor
        mode: input= its slice (N, C, *spatial) as for forward(); the server
        computes the statistics and the result carries this rank's output
        and a handle for sync_backward. Returns, once every rank of `step`
        has sent its own, the union's count, mean and invstd (eval with
        track_running_stats: the running statistics at once, no barrier).
        AbortedError when the barrier times out (naming the missing ranks).
        """
        wire = None if input is None else _as_wire(input, dtype, layout)
        request = _sync_forward_parts(
            name, step, rank, training, count, mean, m2, wire,
            save_for_backward, self._retry_id(request_id, retries)).join()
        r, data = self._mutate(
            self._sync_forward, request,
            f"SyncForward({name}, step {step}, rank {rank})", timeout, retries)
        return _sync_forward_result(r, data, raw)

    def sync_backward(self, name, step, rank, sum_dy=None, sum_dy_xhat=None,
                      *, handle=None, grad_output=None, skip_grad_input=False,
                      accumulate_grad=False, sgd=None, keep_grad=False,
                      dtype=None, layout=None, request_id=None, retries=0,
                      timeout=_MISSING, raw=False) -> SyncGradsResult:
        """One rank's backward part for the step its sync_forward completed.

        Stats mode: its per-channel sums over its slice, sum(dy) and
        sum(dy * xhat). Tensor mode: handle= of its sync_forward and
        grad_output= (the forward input's shape, dtype and layout); the
        result carries grad_input. Returns the union's sums once every rank
        sent its own. accumulate_grad adds them to the layer's gradients
        once for the step; sgd=dict(lr=..., momentum=..., ...) (every rank
        the same) also applies one SGD step to the server-held parameters
        once the step completes, then zeroes the gradients unless
        keep_grad.
        """
        wire = (None if grad_output is None
                else _as_wire(grad_output, dtype, layout))
        request = _sync_backward_parts(
            name, step, rank, sum_dy, sum_dy_xhat, handle, wire,
            accumulate_grad, skip_grad_input, sgd, keep_grad,
            self._retry_id(request_id, retries)).join()
        r, data = self._mutate(
            self._sync_backward, request,
            f"SyncBackward({name}, step {step}, rank {rank})", timeout,
            retries)
        return _sync_backward_result(r, data, raw)

    def set_world_size(self, name, world_size, *, request_id=None,
                       expected_version=None, retries=0,
                       timeout=_MISSING) -> int:
        """Changes a sync group's world_size between steps (elastic
        training); the next step waits for ranks 0 .. world_size - 1. The
        current world_size is accepted at any time, so every remaining rank
        may call it before its next step. Returns the layer's version."""
        request = _with_ids(pb.SetWorldSizeRequest(
            name=name, world_size=int(world_size)),
            self._retry_id(request_id, retries), expected_version)
        return self._mutate(self._set_world_size, request,
                            f"SetWorldSize({name})", timeout,
                            retries).version

    def optimizer_step(self, name, *, lr, momentum=0.0, dampening=0.0,
                       weight_decay=0.0, nesterov=False, keep_grad=False,
                       request_id=None, expected_version=None, retries=0,
                       timeout=_MISSING) -> int:
        """torch.optim.SGD's step on the layer's accumulated gradients;
        zeroes them unless keep_grad. Returns the layer's version."""
        request = _with_ids(pb.OptimizerStepRequest(
            name=name, sgd=_sgd(lr, momentum, dampening, weight_decay,
                                nesterov), keep_grad=bool(keep_grad)),
            self._retry_id(request_id, retries), expected_version)
        return self._mutate(self._step, request, f"OptimizerStep({name})",
                            timeout, retries).version

    def set_parameters(self, name, weight=None, bias=None, *,
                       request_id=None, expected_version=None, retries=0,
                       timeout=_MISSING) -> int:
        """Sets weight and/or bias ([C] each). Returns the version."""
        request = _with_ids(pb.SetParametersRequest(
            name=name, weight=_per_channel(weight),
            bias=_per_channel(bias)),
            self._retry_id(request_id, retries), expected_version)
        return self._mutate(self._set_params, request,
                            f"SetParameters({name})", timeout,
                            retries).version

    def get_state(self, name, *, timeout=_MISSING) -> LayerState:
        """Returns the layer's state dict (PyTorch's names) as numpy arrays."""
        response = self._call(self._get_state, pb.GetStateRequest(name=name),
                              f"GetState({name})", timeout)
        return LayerState(_state_from_proto(response.state), response.version)

    def load_state(self, name, state, *, allow_missing=False,
                   request_id=None, expected_version=None, retries=0,
                   timeout=_MISSING) -> int:
        """Loads a state dict (arrays, torch tensors or lists by PyTorch's
        names; all-or-nothing). allow_missing: load_state_dict(strict=False)
        for missing keys; unknown keys are always an error."""
        request = _with_ids(
            pb.LoadStateRequest(name=name, state=_state_to_proto(state),
                                allow_missing=bool(allow_missing)),
            self._retry_id(request_id, retries), expected_version)
        return self._mutate(self._load_state, request, f"LoadState({name})",
                            timeout, retries).version

    def train(self, *, timeout=None) -> "TrainStream":
        """Opens a Train stream (one training run; operations answered in
        order). timeout: deadline of the whole stream (default: none)."""
        return TrainStream(self, timeout)


_END = object()


class TrainStream:
    """One Train stream: the unary calls' operations, answered in order.

    Each ``op(...)`` blocks for its answer; ``op_async(...)`` returns a
    concurrent.futures.Future at once, so several operations can be in
    flight. A failed operation raises (or sets) its NormserveError and the
    stream goes on. Use as a context manager or call close(). Mutating
    operations take request_id= and expected_version= as the unary calls do
    (no retries: a broken stream ends every operation on it).
    """

    def __init__(self, client, timeout):
        self._client = client
        self._lock = threading.Lock()
        self._pending = {}
        self._next_id = 1
        self._closing = False
        self._ended = False
        self._error = None
        self._queue = queue.SimpleQueue()
        try:
            self._responses = client._train(
                iter(self._queue.get, _END), timeout=timeout,
                metadata=client._metadata or None,
                wait_for_ready=client._wait_for_ready)
        except grpc.RpcError as err:
            raise errors.error_from_rpc(err, "Train", client.address) from None
        self._reader = threading.Thread(target=self._read,
                                        name="normserve-train", daemon=True)
        self._reader.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self):
        error = None
        try:
            for response, data in self._responses:
                with self._lock:
                    entry = self._pending.pop(response.request_id, None)
                if entry is None:
                    continue
                future, decode, method = entry
                if response.status.code != 0:
                    future.set_exception(errors.error_from_code(
                        response.status.code, response.status.message, method,
                        self._client.address))
                    continue
                try:
                    future.set_result(decode(response, data))
                except Exception as err:  # A malformed answer.
                    future.set_exception(err)
        except grpc.RpcError as err:
            error = errors.error_from_rpc(err, "Train", self._client.address)
        except Exception as err:
            error = errors.error_from_code(grpc.StatusCode.INTERNAL,
                                           f"Train stream failed: {err}",
                                           "Train", self._client.address)
        with self._lock:
            self._ended = True
            self._error = error
            pending, self._pending = self._pending, {}
        for future, _, method in pending.values():
            future.set_exception(error or errors.error_from_code(
                grpc.StatusCode.UNKNOWN,
                "the Train stream ended before answering", method,
                self._client.address))

    def _submit(self, op, payload, decode, method):
        """Sends ``payload`` as TrainRequest's field ``op`` (a name)."""
        future = concurrent.futures.Future()
        with self._lock:
            if self._ended or self._closing:
                raise self._error or errors.error_from_code(
                    grpc.StatusCode.CANCELLED, "the Train stream is closed",
                    method, self._client.address)
            request_id = self._next_id
            self._next_id += 1
            self._pending[request_id] = (future, decode, method)
            message = _wire.Parts(
                pb.TrainRequest(request_id=request_id).SerializeToString())
            message.append_field(_TRAIN_OPS[op], payload)
            self._queue.put(message.join())
        return future

    def _wait(self, future, timeout, method):
        if timeout is _MISSING:
            timeout = self._client.timeout
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise errors.error_from_code(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer on the Train stream within {timeout} s", method,
                self._client.address) from None

    @staticmethod
    def _message(message):
        return _wire.Parts(message.SerializeToString())

    # Each operation: NAME_async returns a Future; NAME waits for it.

    def forward_async(self, name, input, *, training=False, return_stats=False,
                      save_for_backward=None, dtype=None, layout=None,
                      request_id=None, expected_version=None, raw=False):
        wire = _as_wire(input, dtype, layout)
        return self._submit(
            "forward",
            _forward_parts(name, wire, training, return_stats,
                           save_for_backward, request_id, expected_version),
            lambda r, data: _forward_result(r.forward, data, raw),
            f"Train.Forward({name})")

    def forward(self, name, input, *, timeout=_MISSING, **kwargs):
        return self._wait(self.forward_async(name, input, **kwargs), timeout,
                          f"Train.Forward({name})")

    def backward_async(self, name, handle, grad_output, *,
                       accumulate_grad=False, retain_context=False,
                       skip_grad_input=False, dtype=None, layout=None,
                       request_id=None, expected_version=None, raw=False):
        wire = _as_wire(grad_output, dtype, layout)
        return self._submit(
            "backward",
            _backward_parts(name, handle, wire, accumulate_grad,
                            retain_context, skip_grad_input, request_id,
                            expected_version),
            lambda r, data: _backward_result(r.backward, data, raw),
            f"Train.Backward({name})")

    def backward(self, name, handle, grad_output, *, timeout=_MISSING,
                 **kwargs):
        return self._wait(
            self.backward_async(name, handle, grad_output, **kwargs), timeout,
            f"Train.Backward({name})")

    def update_running_stats_async(self, name, mean, var, count, *,
                                   request_id=None, expected_version=None):
        request = _with_ids(pb.UpdateRunningStatsRequest(
            name=name, mean=_per_channel(mean),
            var=_per_channel(var), count=int(count)),
            request_id, expected_version)
        return self._submit(
            "update_running_stats", self._message(request),
            lambda r, _: RunningStatsResult(
                r.update_running_stats.version,
                r.update_running_stats.num_batches_tracked),
            f"Train.UpdateRunningStats({name})")

    def update_running_stats(self, name, mean, var, count, *,
                             timeout=_MISSING, **kwargs):
        return self._wait(self.update_running_stats_async(name, mean, var,
                                                          count, **kwargs),
                          timeout, f"Train.UpdateRunningStats({name})")

    def optimizer_step_async(self, name, *, lr, momentum=0.0, dampening=0.0,
                             weight_decay=0.0, nesterov=False,
                             keep_grad=False, request_id=None,
                             expected_version=None):
        request = _with_ids(pb.OptimizerStepRequest(
            name=name, sgd=_sgd(lr, momentum, dampening, weight_decay,
                                nesterov), keep_grad=bool(keep_grad)),
            request_id, expected_version)
        return self._submit("optimizer_step", self._message(request),
                            lambda r, _: r.optimizer_step.version,
                            f"Train.OptimizerStep({name})")

    def optimizer_step(self, name, *, timeout=_MISSING, **kwargs):
        return self._wait(self.optimizer_step_async(name, **kwargs), timeout,
                          f"Train.OptimizerStep({name})")

    def set_parameters_async(self, name, weight=None, bias=None, *,
                             request_id=None, expected_version=None):
        request = _with_ids(pb.SetParametersRequest(
            name=name, weight=_per_channel(weight),
            bias=_per_channel(bias)), request_id, expected_version)
        return self._submit("set_parameters", self._message(request),
                            lambda r, _: r.set_parameters.version,
                            f"Train.SetParameters({name})")

    def set_parameters(self, name, weight=None, bias=None, *,
                       timeout=_MISSING, **kwargs):
        return self._wait(self.set_parameters_async(name, weight, bias,
                                                    **kwargs),
                          timeout, f"Train.SetParameters({name})")

    def get_state_async(self, name):
        return self._submit(
            "get_state", self._message(pb.GetStateRequest(name=name)),
            lambda r, _: LayerState(_state_from_proto(r.get_state.state),
                                    r.get_state.version),
            f"Train.GetState({name})")

    def get_state(self, name, *, timeout=_MISSING):
        return self._wait(self.get_state_async(name), timeout,
                          f"Train.GetState({name})")

    def load_state_async(self, name, state, *, allow_missing=False,
                         request_id=None, expected_version=None):
        request = _with_ids(
            pb.LoadStateRequest(name=name, state=_state_to_proto(state),
                                allow_missing=bool(allow_missing)),
            request_id, expected_version)
        return self._submit("load_state", self._message(request),
                            lambda r, _: r.load_state.version,
                            f"Train.LoadState({name})")

    def load_state(self, name, state, *, timeout=_MISSING, **kwargs):
        return self._wait(self.load_state_async(name, state, **kwargs),
                          timeout, f"Train.LoadState({name})")

    def get_layer_async(self, name):
        return self._submit("get_layer",
                            self._message(pb.GetLayerRequest(name=name)),
                            lambda r, _: LayerInfo.from_proto(r.get_layer),
                            f"Train.GetLayer({name})")

    def get_layer(self, name, *, timeout=_MISSING):
        return self._wait(self.get_layer_async(name), timeout,
                          f"Train.GetLayer({name})")

    def sync_forward_async(self, name, step, rank, count=0, mean=None,
                           m2=None, *, input=None, training=True,
                           save_for_backward=None, dtype=None, layout=None,
                           request_id=None, raw=False):
        """Client.sync_forward on the stream. The stream's later answers
        wait behind it (they come in order), so a rank sends its step's
        sync calls where nothing else must overtake them."""
        wire = None if input is None else _as_wire(input, dtype, layout)
        return self._submit(
            "sync_forward",
            _sync_forward_parts(name, step, rank, training, count, mean, m2,
                                wire, save_for_backward, request_id),
            lambda r, data: _sync_forward_result(r.sync_forward, data, raw),
            f"Train.SyncForward({name}, step {step}, rank {rank})")

    def sync_forward(self, name, step, rank, count=0, mean=None, m2=None, *,
                     timeout=_MISSING, **kwargs):
        return self._wait(
            self.sync_forward_async(name, step, rank, count, mean, m2,
                                    **kwargs), timeout,
            f"Train.SyncForward({name}, step {step}, rank {rank})")

    def sync_backward_async(self, name, step, rank, sum_dy=None,
                            sum_dy_xhat=None, *, handle=None,
                            grad_output=None, skip_grad_input=False,
                            accumulate_grad=False, sgd=None, keep_grad=False,
                            dtype=None, layout=None, request_id=None,
                            raw=False):
        wire = (None if grad_output is None
                else _as_wire(grad_output, dtype, layout))
        return self._submit(
            "sync_backward",
            _sync_backward_parts(name, step, rank, sum_dy, sum_dy_xhat, handle,
                                 wire, accumulate_grad, skip_grad_input, sgd,
                                 keep_grad, request_id),
            lambda r, data: _sync_backward_result(r.sync_backward, data, raw),
            f"Train.SyncBackward({name}, step {step}, rank {rank})")

    def sync_backward(self, name, step, rank, sum_dy=None, sum_dy_xhat=None,
                      *, timeout=_MISSING, **kwargs):
        return self._wait(
            self.sync_backward_async(name, step, rank, sum_dy, sum_dy_xhat,
                                     **kwargs), timeout,
            f"Train.SyncBackward({name}, step {step}, rank {rank})")

    def close(self, timeout=_MISSING):
        """Half-closes the stream and waits for the answers in flight."""
        with self._lock:
            if not self._closing:
                self._closing = True
                self._queue.put(_END)
        if timeout is _MISSING:
            timeout = self._client.timeout
        self._reader.join(timeout)
        if self._reader.is_alive():
            self.cancel()
            self._reader.join()

    def cancel(self):
        """Cancels the stream; operations in flight fail with CancelledError."""
        self._responses.cancel()
