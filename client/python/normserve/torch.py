"""torch.nn.BatchNorm1d/2d/3d, LayerNorm, RMSNorm, GroupNorm and
InstanceNorm1d/2d/3d whose layer lives on a normserve server.

    client = normserve.Client("127.0.0.1:50051")
    bn = normserve.torch.BatchNorm2d(64, client=client)   # nn.BatchNorm2d's args
    model = nn.Sequential(conv, bn, nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)      # works as usual

Each module creates one server layer (or attaches to one with ``layer=``) and
runs forward and backward there through a torch.autograd.Function. What
lives where:

- running_mean, running_var, num_batches_tracked: on the server. Reading
  them (``bn.running_mean``) fetches them; assigning pushes them. They are
  not module buffers, but ``state_dict()``/``load_state_dict()`` carry them
  under PyTorch's keys, so a local nn.BatchNorm's state dict loads here and
  ours loads there.
- weight and bias, default: local nn.Parameters (so torch.optim works);
  their gradients come from the server's backward, and the module pushes the
  current values to the server (SetParameters) before a forward whenever they
  changed.
- weight and bias with ``server_parameters=True``: on the server only (for
  clients sharing one layer). backward accumulates their gradients on the
  server; :class:`ServerSGD` (or ``bn.server_step(...)``) applies
  torch.optim.SGD's update there (OptimizerStep). ``bn.weight``/``bn.bias``
  read them from the server.

Inputs may be float32, float16 or bfloat16 (parameters and statistics stay
float32, as in PyTorch's mixed-precision BatchNorm), contiguous or
channels_last (sent as NHWC without a layout copy), on any device (moved
through the CPU). With grad disabled, or when neither the input nor a
parameter needs a gradient, the server keeps nothing for backward (run
inference under torch.no_grad(); otherwise each forward's saved context waits
on the server for a backward until the server evicts it).

Limits: one backward per forward (no retain_graph: a second backward raises
RuntimeError), no double backward, no torch.jit, no pickling of the module
(save its state_dict); copy.deepcopy creates a new server layer with the same
state. The layer's config (eps, momentum, affine, track_running_stats) is
fixed when it is created.

InstanceNorm1d/2d/3d hold running statistics as BatchNorm does (with
track_running_stats=True; torch's default is False), and take unbatched
inputs as torch does (sent with a batch dim of 1). LayerNorm, RMSNorm and
GroupNorm have no running statistics; their weight and bias work as above.
"""

import os
import threading
import warnings
import weakref

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from normserve import errors
from normserve import tensor as _tensor
from normserve.client import Client
from normserve.tensor import WireTensor
from normserve.v1 import normserve_pb2 as pb

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm",
           "RMSNorm", "SyncBatchNorm", "ServerSGD", "convert_sync_batchnorm",
           "default_client", "to_wire", "from_wire"]


_WIRE_DTYPE = {torch.float32: pb.DTYPE_FLOAT32,
               torch.float16: pb.DTYPE_FLOAT16,
               torch.bfloat16: pb.DTYPE_BFLOAT16}
_TORCH_DTYPE = {v: k for k, v in _WIRE_DTYPE.items()}
# Same-size integer types: numpy has no bfloat16, so bytes go through these.
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}
_REMOTE_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_PARAMS = ("weight", "bias")

_frombuffer_warned = False
_default_client = None
_default_lock = threading.Lock()


def default_client():
    """Returns a shared Client for $NORMSERVE_ADDRESS (127.0.0.1:50051)."""
    global _default_client
    with _default_lock:
        if _default_client is None:
            _default_client = Client(
                os.environ.get("NORMSERVE_ADDRESS", "127.0.0.1:50051"))
        return _default_client


def _channels_last_order(x):
    return x.dim() >= 3 and x.movedim(1, -1).is_contiguous()


def to_wire(x, layout=None):
    """Returns a WireTensor over a CPU tensor's memory (N, C, *spatial).

    layout None: NCHW when contiguous, NHWC when channels-last (no copy);
    otherwise copies to NCHW. A given layout converts when needed.
    """
    if x.dtype not in _WIRE_DTYPE:
        raise TypeError(f"normserve: {x.dtype} tensors cannot be sent; "
                        "expected float32, float16 or bfloat16")
    x = x.detach()
    if layout is None or layout == pb.LAYOUT_UNSPECIFIED:
        layout = (pb.LAYOUT_NHWC if not x.is_contiguous()
                  and _channels_last_order(x) else pb.LAYOUT_NCHW)
    if layout == pb.LAYOUT_NHWC and x.dim() >= 3:
        memory = x.movedim(1, -1).contiguous()
    else:
        memory = x.contiguous()
    if memory.numel() == 0:
        data = b""
    else:
        data = memoryview(memory.view(_BITS[x.dtype]).numpy()).cast("B")
    return WireTensor(tuple(x.shape), _WIRE_DTYPE[x.dtype], layout, data)


def _frombuffer(data, dtype, count):
    """torch.frombuffer without its one-time warning that the reply's bytes
    are not writable: nothing else holds them (see from_wire)."""
    global _frombuffer_warned
    if _frombuffer_warned:
        return torch.frombuffer(data, dtype=dtype, count=count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = torch.frombuffer(data, dtype=dtype, count=count)
    _frombuffer_warned = True
    return out


def from_wire(wire, device=None):
    """Returns a tensor over a WireTensor's bytes (no copy on the CPU).

    An NHWC tensor comes back channels-last. The result is not a view (so
    in-place ops after a custom Function are allowed). It shares memory with
    ``wire.data``: for a reply that is the bytes object the gRPC runtime
    created for this message alone and that only this tensor references, so
    writing through the tensor is safe although Python bytes are immutable.
    """
    dtype = _TORCH_DTYPE[wire.dtype]
    shape = tuple(wire.shape)
    memory = _tensor.memory_shape(shape, wire.layout)
    strides = [1] * len(memory)
    for i in range(len(memory) - 2, -1, -1):
        strides[i] = strides[i + 1] * memory[i + 1]
    if wire.layout == pb.LAYOUT_NHWC and len(shape) >= 3:
        strides.insert(1, strides.pop())
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0:
        out = torch.empty(shape, dtype=dtype)
    else:
        flat = _frombuffer(wire.data, dtype, numel)
        out = torch.empty(0, dtype=dtype).set_(flat.storage(), 0, shape,
                                               tuple(strides))
    if device is not None and torch.device(device).type != "cpu":
        out = out.to(device)
    return out


class _Remote:
    """What the autograd Function needs to reach a layer."""

    __slots__ = ("client", "name", "timeout", "server_parameters",
                 "grad_pending", "layout")

    def __init__(self, client, name, timeout, server_parameters, layout=None):
        self.client = client
        self.name = name
        self.timeout = timeout
        self.server_parameters = server_parameters
        self.grad_pending = False
        # None: NCHW or NHWC as the input's memory is (BatchNorm); row
        # normalizations send their shape's order (pb.LAYOUT_NCHW).
        self.layout = layout

    def kwargs(self):
        return {} if self.timeout is None else {"timeout": self.timeout}


class _BatchNormFunction(torch.autograd.Function):
    """y = layer(x) on the server (any kind: BatchNorm, LayerNorm, RMSNorm);
    backward calls the server's Backward.

    Inputs: x, weight, bias (local parameters or None), anchor (a tensor that
    requires grad so that backward runs for server-held parameters, or None),
    the _Remote, training, save_for_backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, remote, training, save):
        device = x.device
        wire = to_wire(x.detach().cpu(), layout=remote.layout)
        result = remote.client.forward(remote.name, wire, training=training,
                                       save_for_backward=save, raw=True,
                                       **remote.kwargs())
        ctx.remote = remote
        ctx.handle = result.handle
        ctx.consumed = False
        ctx.dtype = x.dtype
        ctx.layout = wire.layout
        ctx.device = device
        ctx.param = ((weight.dtype, weight.device, weight.shape)
                     if weight is not None else (torch.float32, device, None))
        return from_wire(result.output, device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        remote = ctx.remote
        if ctx.consumed:
            raise RuntimeError(
                f"normserve: a second backward through {remote.name}; the "
                "server frees what a forward saved at its first backward "
                "(retain_graph=True is not supported)")
        if not ctx.handle:
            raise RuntimeError(
                f"normserve: the forward of {remote.name} saved nothing for "
                "backward (grad was disabled or nothing required grad then)")
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        accumulate = remote.server_parameters
        if not (needs_input or needs_weight or needs_bias or accumulate):
            return (None,) * 7
        # The server wants grad_output in the forward input's dtype and layout.
        grad = grad_output.detach().to(device="cpu", dtype=ctx.dtype)
        wire = to_wire(grad, layout=ctx.layout)
        ctx.consumed = True  # The server frees the context at this Backward.
        result = remote.client.backward(remote.name, ctx.handle, wire,
                                        accumulate_grad=accumulate,
                                        skip_grad_input=not needs_input,
                                        raw=True, **remote.kwargs())
        if accumulate:
            remote.grad_pending = True
        grad_input = (from_wire(result.grad_input, ctx.device)
                      if needs_input else None)
        dtype, device, shape = ctx.param
        grad_weight = grad_bias = None
        if needs_weight and result.grad_weight is not None:
            grad_weight = torch.from_numpy(result.grad_weight).to(
                device, dtype).reshape(shape)
        if needs_bias and result.grad_bias is not None:
            grad_bias = torch.from_numpy(result.grad_bias).to(
                device, dtype).reshape(shape)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _delete_layer_quietly(client, name):
    try:
        client.delete_layer(name, timeout=5)
    except Exception:  # Best effort at garbage collection.
        pass


def _load_error(full, value, want):
    """PyTorch's message for a state_dict entry that cannot load, or None."""
    if not torch.is_tensor(value):
        return (f'While copying the parameter named "{full}", expected '
                "torch.Tensor or Tensor-like object from checkpoint but "
                f"received {type(value)}")
    if tuple(value.shape) != tuple(want):
        return (f"size mismatch for {full}: copying a param with shape "
                f"{value.shape} from checkpoint, the shape in current model "
                f"is {torch.Size(want)}.")
    return None


class _RemoteModule(nn.Module):
    """What every normserve.torch module shares: its server layer (created
    or attached), weight and bias as local nn.Parameters or server-held
    (server_parameters=True), the push of changed local parameters before a
    forward, state dicts under PyTorch's keys, and the forward through
    _BatchNormFunction. Subclasses say their kind, config and keys."""

    _kind = None
    # Server-held state besides the parameters (BatchNorm's buffers).
    _remote_buffers = ()

    def _connect(self, client, layer_id, layer, server_parameters, timeout,
                 device, dtype, create_kwargs, layout=None):
        """Creates (or attaches to) the layer and makes the parameters."""
        if client is None:
            client = default_client()
        elif isinstance(client, str):
            client = Client(client)
        self._config = self._config_tuple()
        kwargs = {} if timeout is None else {"timeout": timeout}
        if layer is None:
            info = client.create_layer(kind=self._kind, layer_id=layer_id,
                                       **create_kwargs, **kwargs)
        else:
            info = client.get_layer(layer, **kwargs)
            self._check_attached(info)
        self._remote = _Remote(client, info.name, timeout, server_parameters,
                               layout=layout)
        self._finalizer = None
        if layer is None:
            self._finalizer = weakref.finalize(self, _delete_layer_quietly,
                                               client, info.name)
            self._finalizer.atexit = False
        self._pushed = None
        self._anchor = None
        keys = self._param_keys()
        if keys and not server_parameters:
            for key in ("weight", "bias"):
                if key not in keys:
                    self.register_parameter(key, None)
                    continue
                init = torch.ones if key == "weight" else torch.zeros
                setattr(self, key, nn.Parameter(init(
                    self._param_shape(), device=device, dtype=dtype)))
            if layer is not None:  # Start from the layer's values.
                state = client.get_state(info.name, **kwargs)
                with torch.no_grad():
                    for key in keys:
                        getattr(self, key).copy_(torch.from_numpy(state[key]))
            self._pushed = self._parameter_values()
        else:
            if keys:
                # Makes backward run when only server-held parameters need it.
                self._anchor = torch.zeros(0, requires_grad=True)
            else:
                self.register_parameter("weight", None)
                self.register_parameter("bias", None)
        self._ready = True

    # -- identity ------------------------------------------------------------

    @property
    def client(self):
        return self._remote.client

    @property
    def layer_name(self):
        """The server layer's name, "layers/{id}"."""
        return self._remote.name

    @property
    def server_parameters(self):
        return self._remote.server_parameters

    def close(self):
        """Deletes the server layer this module created (not an attached
        one). The module is unusable afterwards."""
        if self._finalizer is not None and self._finalizer.alive:
            self._finalizer.detach()
            self._remote.client.delete_layer(self._remote.name,
                                             **self._remote.kwargs())

    def _remote_repr(self):
        text = f", layer={self._remote.name}"
        if self._remote.server_parameters:
            text += ", server_parameters=True"
        return text

    # -- server-held attributes ----------------------------------------------

    def _remote_keys(self):
        """The keys read from the server: its buffers and, with
        server_parameters, the parameters."""
        keys = list(self._buffer_keys())
        if self._remote.server_parameters:
            keys += self._param_keys()
        return keys

    def _buffer_keys(self):
        return []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if not self.__dict__.get("_ready"):
                raise
            if name in self._remote_buffers or (
                    name in _PARAMS and self._remote.server_parameters):
                if name not in self._state_keys():
                    return None
                return self._remote_state()[name]
            raise

    def __setattr__(self, name, value):
        if self.__dict__.get("_ready") and (
                name in self._remote_buffers or
                (name in _PARAMS and self._remote.server_parameters)):
            self._write_remote(name, value)
            return
        super().__setattr__(name, value)

    def _write_remote(self, name, value):
        if name in _PARAMS:
            if value is None or name not in self._param_keys():
                raise AttributeError(f"normserve: {name} of this "
                                     "server-parameter layer cannot be set")
            self._remote.client.set_parameters(self._remote.name,
                                               **{name: value},
                                               **self._remote.kwargs())
            return
        if name not in self._buffer_keys():
            if value is None:
                return
            raise AttributeError(
                f"normserve: {name} cannot be set: the layer was created with "
                "track_running_stats=False")
        self._remote.client.load_state(self._remote.name, {name: value},
                                       allow_missing=True,
                                       **self._remote.kwargs())

    def _remote_state(self):
        """Returns the server's state as tensors (PyTorch's names)."""
        state = self._remote.client.get_state(self._remote.name,
                                              **self._remote.kwargs())
        weight = self._parameters.get("weight")
        device = weight.device if weight is not None else torch.device("cpu")
        out = {}
        for key, value in state.items():
            if key == "num_batches_tracked":
                out[key] = torch.tensor(int(value), dtype=torch.long,
                                        device=device)
            else:
                out[key] = torch.from_numpy(value).to(device)
        return out

    # -- parameters ----------------------------------------------------------

    def _parameter_values(self):
        return tuple(getattr(self, k).detach().to("cpu", torch.float32).clone()
                     for k in self._param_keys())

    def _push_parameters(self):
        """Sends local weight/bias to the server when they changed since the
        last push (compared by value: in-place updates through .data do not
        bump the tensor version)."""
        if not self._param_keys() or self._remote.server_parameters:
            return
        values = self._parameter_values()
        if self._pushed is not None and all(
                torch.equal(a, b) for a, b in zip(values, self._pushed)):
            return
        self._remote.client.set_parameters(
            self._remote.name,
            **{k: v.numpy() for k, v in zip(self._param_keys(), values)},
            **self._remote.kwargs())
        self._pushed = values

    def _reset_param_values(self):
        keys = self._param_keys()
        if not keys:
            return
        if self._remote.server_parameters:
            values = {"weight": torch.ones(self._param_shape())}
            if "bias" in keys:
                values["bias"] = torch.zeros(self._param_shape())
            self._remote.client.set_parameters(self._remote.name, **values,
                                               **self._remote.kwargs())
        else:
            nn.init.ones_(self.weight)
            if "bias" in keys:
                nn.init.zeros_(self.bias)

    def server_step(self, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                    nesterov=False):
        """Applies torch.optim.SGD's update to the server-held weight and bias
        (OptimizerStep) and zeroes the gradients accumulated there."""
        if not self._remote.server_parameters:
            raise RuntimeError("normserve: server_step() needs "
                               "server_parameters=True; use a torch.optim "
                               "optimizer on the local parameters")
        version = self._remote.client.optimizer_step(
            self._remote.name, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov,
            **self._remote.kwargs())
        self._remote.grad_pending = False
        return version

    # -- state dict ----------------------------------------------------------

    def _state_keys(self):
        return list(self._param_keys()) + list(self._buffer_keys())

    def _state_shape(self, key):
        return () if key == "num_batches_tracked" else self._param_shape()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        keys = self._state_keys()
        state = self._remote_state() if any(
            k in self._remote_keys() for k in keys) else {}
        for key in keys:
            param = self._parameters.get(key)
            if param is not None:
                destination[prefix + key] = param if keep_vars else (
                    param.detach())
            else:
                destination[prefix + key] = state[key]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        keys = self._state_keys()
        upload = {}
        for key in keys:
            full = prefix + key
            if full not in state_dict:
                missing_keys.append(full)
                continue
            value = state_dict[full]
            error = _load_error(full, value, self._state_shape(key))
            if error:
                error_msgs.append(error)
                continue
            param = self._parameters.get(key)
            if param is not None:
                with torch.no_grad():
                    param.copy_(value)
            upload[key] = value.detach().cpu()
        if strict:
            for full in state_dict:
                if full.startswith(prefix) and full[len(prefix):].split(
                        ".", 1)[0] not in keys:
                    unexpected_keys.append(full)
        if upload:
            try:
                self._remote.client.load_state(self._remote.name, upload,
                                               allow_missing=True,
                                               **self._remote.kwargs())
            except errors.NormserveError as err:
                error_msgs.append(str(err))
                return
            if self._param_keys() and not self._remote.server_parameters:
                self._pushed = self._parameter_values()

    def __deepcopy__(self, memo):
        args, kwargs = self._init_args()
        copy = type(self)(*args, **kwargs, client=self._remote.client,
                          server_parameters=self._remote.server_parameters,
                          timeout=self._remote.timeout)
        memo[id(self)] = copy
        copy.train(self.training)
        copy.load_state_dict(self.state_dict())
        for key, param in self._parameters.items():
            if param is not None:
                copy._parameters[key].requires_grad_(param.requires_grad)
        return copy

    def __getstate__(self):
        raise TypeError(
            "normserve modules hold a server connection and cannot be "
            "pickled; save module.state_dict() instead")

    # -- compute -------------------------------------------------------------

    def _remote_forward(self, input):
        if self._config_tuple() != self._config:
            raise RuntimeError(
                "normserve: the config changed after the server layer was "
                f"created (now {self._config_tuple()}, layer has "
                f"{self._config}); create a new module instead")
        if input.dtype not in _WIRE_DTYPE:
            raise TypeError(f"normserve: input dtype {input.dtype} is not "
                            "supported; expected float32, float16 or bfloat16")
        self._push_parameters()
        weight = self._parameters.get("weight")
        bias = self._parameters.get("bias")
        anchor = self._anchor
        grad = torch.is_grad_enabled()
        save = grad and (
            input.requires_grad or anchor is not None
            or any(p is not None and p.requires_grad for p in (weight, bias)))
        return _BatchNormFunction.apply(input, weight, bias,
                                        anchor if grad else None,
                                        self._remote, self.training, save)


class _BatchNorm(_RemoteModule):
    """Base of BatchNorm1d/2d/3d; see the module docstring."""

    _version = 2  # nn.BatchNorm's state_dict version.
    _spatial_dims = 0
    _kind = "batch_norm"
    _remote_buffers = _REMOTE_BUFFERS

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *,
                 client=None, layer_id=None, layer=None,
                 server_parameters=False, timeout=None):
        """torch.nn.BatchNorm's arguments, plus:

        client: a normserve.Client, an address, or None for default_client().
        layer_id: id for the new server layer (None: the server picks one).
        layer: attach to this existing layer ("layers/{id}" or "{id}")
          instead of creating one; its config must match. An attached layer
          is not deleted by close().
        server_parameters: weight and bias live and are updated on the
          server (see ServerSGD) instead of being local nn.Parameters.
        timeout: deadline of each call in seconds (None: the client's).
        """
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self._connect(client, layer_id, layer, server_parameters, timeout,
                      device, dtype, dict(
                          num_features=num_features, eps=eps,
                          momentum=momentum, affine=affine,
                          track_running_stats=track_running_stats,
                          spatial_dims=self._spatial_dims))

    def extra_repr(self):
        return ("{num_features}, eps={eps}, momentum={momentum}, "
                "affine={affine}, track_running_stats={track_running_stats}"
                .format(**self.__dict__)) + self._remote_repr()

    def _config_tuple(self):
        return (self.num_features, self.eps, self.momentum, self.affine,
                self.track_running_stats)

    def _init_args(self):
        return self._config_tuple(), {}

    def _param_keys(self):
        return list(_PARAMS) if self.affine else []

    def _param_shape(self):
        return (self.num_features,)

    def _buffer_keys(self):
        return list(_REMOTE_BUFFERS) if self.track_running_stats else []

    def _check_attached(self, info):
        momentum = info.momentum
        mismatches = []
        if info.kind != self._kind:
            mismatches.append(f"kind {info.kind}")
        if info.num_features != self.num_features:
            mismatches.append(f"num_features {info.num_features}")
        if abs(info.eps - self.eps) > 1e-12 * max(1.0, abs(self.eps)):
            mismatches.append(f"eps {info.eps}")
        if (momentum is None) != (self.momentum is None) or (
                momentum is not None and abs(momentum - self.momentum) > 1e-12):
            mismatches.append(f"momentum {momentum}")
        if info.affine != self.affine:
            mismatches.append(f"affine {info.affine}")
        if info.track_running_stats != self.track_running_stats:
            mismatches.append(
                f"track_running_stats {info.track_running_stats}")
        if info.spatial_dims not in (0, self._spatial_dims):
            mismatches.append(f"spatial_dims {info.spatial_dims}")
        if mismatches:
            raise ValueError(
                f"normserve: layer {info.name} has " + ", ".join(mismatches)
                + f"; this {type(self).__name__} was given "
                + ", ".join(f"{k}={v}" for k, v in zip(
                    ("num_features", "eps", "momentum", "affine",
                     "track_running_stats"), self._config_tuple())))

    def reset_running_stats(self):
        if self.track_running_stats:
            self._remote.client.load_state(
                self._remote.name,
                {"running_mean": torch.zeros(self.num_features),
                 "running_var": torch.ones(self.num_features),
                 "num_batches_tracked": torch.tensor(0)},
                allow_missing=True, **self._remote.kwargs())

    def reset_parameters(self):
        self.reset_running_stats()
        self._reset_param_values()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        nbt_key = prefix + "num_batches_tracked"
        if ((version is None or version < 2) and self.track_running_stats
                and nbt_key not in state_dict):
            # As nn.BatchNorm: state dicts before version 2 lack the counter.
            state_dict[nbt_key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_input_dim(self, input):
        raise NotImplementedError

    def forward(self, input):
        self._check_input_dim(input)
        return self._remote_forward(input)


class BatchNorm1d(_BatchNorm):
    """torch.nn.BatchNorm1d on a normserve server: input (N, C) or (N, C, L)."""

    _spatial_dims = 1

    def _check_input_dim(self, input):
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(
                f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_BatchNorm):
    """torch.nn.BatchNorm2d on a normserve server: input (N, C, H, W)."""

    _spatial_dims = 2

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(_BatchNorm):
    """torch.nn.BatchNorm3d on a normserve server: input (N, C, D, H, W)."""

    _spatial_dims = 3

    def _check_input_dim(self, input):
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


class _RowNorm(_RemoteModule):
    """Base of LayerNorm and RMSNorm (and GroupNorm, whose parameters are
    per channel): no running statistics; weight (and bias) of shape
    normalized_shape are local nn.Parameters by default, or live on the
    server with server_parameters=True, as for BatchNorm (module
    docstring)."""

    def __init__(self, normalized_shape, eps, elementwise_affine, bias,
                 device, dtype, *, client, layer_id, layer, server_parameters,
                 timeout):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(d) for d in normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self._has_bias = bool(elementwise_affine and bias)
        self._connect(client, layer_id, layer, server_parameters, timeout,
                      device, dtype, self._create_kwargs(),
                      layout=pb.LAYOUT_NCHW)

    @property
    def affine(self):
        return self.elementwise_affine

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}"
                + self._remote_repr())

    def _config_tuple(self):
        return (self.normalized_shape, self.eps, self.elementwise_affine)

    def _create_kwargs(self):
        return dict(normalized_shape=self.normalized_shape, eps=self.eps,
                    elementwise_affine=self.elementwise_affine,
                    bias=self._has_bias)

    def _init_args(self):
        return (), self._init_kwargs()

    def _check_input(self, input):
        k = len(self.normalized_shape)
        if tuple(input.shape[input.dim() - k:]) != self.normalized_shape or (
                input.dim() < k):
            expected = ", ".join(["*"] + [str(d) for d in
                                          self.normalized_shape])
            raise RuntimeError(
                f"Given normalized_shape={list(self.normalized_shape)}, "
                f"expected input with shape [{expected}], but got input of "
                f"size{list(input.shape)}")

    def _param_keys(self):
        if not self.elementwise_affine:
            return []
        return ["weight", "bias"] if self._has_bias else ["weight"]

    def _param_shape(self):
        return self.normalized_shape

    def _check_attached(self, info):
        mismatches = []
        if info.kind != self._kind:
            mismatches.append(f"kind {info.kind}")
        if tuple(info.normalized_shape) != self.normalized_shape:
            mismatches.append(f"normalized_shape {info.normalized_shape}")
        if (info.eps is None) != (self.eps is None) or (
                self.eps is not None and info.eps is not None
                and abs(info.eps - self.eps) > 1e-12 * max(1.0, self.eps)):
            mismatches.append(f"eps {info.eps}")
        if info.affine != self.elementwise_affine:
            mismatches.append(f"elementwise_affine {info.affine}")
        if info.bias != self._has_bias:
            mismatches.append(f"bias {info.bias}")
        if mismatches:
            raise ValueError(
                f"normserve: layer {info.name} has " + ", ".join(mismatches)
                + f"; this {type(self).__name__} was given normalized_shape="
                f"{self.normalized_shape}, eps={self.eps}, elementwise_affine="
                f"{self.elementwise_affine}, bias={self._has_bias}")

    def reset_parameters(self):
        self._reset_param_values()

    def forward(self, input):
        self._check_input(input)
        return self._remote_forward(input)


class LayerNorm(_RowNorm):
    """torch.nn.LayerNorm on a normserve server (its arguments, bias as in
    torch 2.1+, plus client=, layer_id=, layer=, server_parameters=,
    timeout= as BatchNorm2d takes them)."""

    _kind = "layer_norm"

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True,
                 bias=True, device=None, dtype=None, *, client=None,
                 layer_id=None, layer=None, server_parameters=False,
                 timeout=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias,
                         device, dtype, client=client, layer_id=layer_id,
                         layer=layer, server_parameters=server_parameters,
                         timeout=timeout)

    def _init_kwargs(self):
        return dict(normalized_shape=self.normalized_shape, eps=self.eps,
                    elementwise_affine=self.elementwise_affine,
                    bias=self._has_bias)


class RMSNorm(_RowNorm):
    """torch.nn.RMSNorm on a normserve server: y = x / sqrt(mean(x^2) + eps)
    * weight over normalized_shape; eps=None is float32's machine epsilon
    (torch's default for float32, float16 and bfloat16 inputs). Plus
    client=, layer_id=, layer=, server_parameters=, timeout=."""

    _kind = "rms_norm"

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True,
                 device=None, dtype=None, *, client=None, layer_id=None,
                 layer=None, server_parameters=False, timeout=None):
        super().__init__(normalized_shape, eps, elementwise_affine, False,
                         device, dtype, client=client, layer_id=layer_id,
                         layer=layer, server_parameters=server_parameters,
                         timeout=timeout)

    def _init_kwargs(self):
        return dict(normalized_shape=self.normalized_shape, eps=self.eps,
                    elementwise_affine=self.elementwise_affine)


class GroupNorm(_RowNorm):
    """torch.nn.GroupNorm on a normserve server: input (N, C, *), C =
    num_channels in num_groups groups, each (sample, group) normalized over
    its channels and positions; per-channel weight and bias (affine). Plus
    client=, layer_id=, layer=, server_parameters=, timeout=."""

    _kind = "group_norm"

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True,
                 device=None, dtype=None, *, client=None, layer_id=None,
                 layer=None, server_parameters=False, timeout=None):
        if num_channels % num_groups != 0:
            raise ValueError("num_channels must be divisible by num_groups")
        self.num_groups = num_groups
        self.num_channels = num_channels
        super().__init__((num_channels,), eps, affine, affine, device, dtype,
                         client=client, layer_id=layer_id, layer=layer,
                         server_parameters=server_parameters, timeout=timeout)

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"affine={self.affine}" + self._remote_repr())

    def _config_tuple(self):
        return (self.num_groups, self.num_channels, self.eps,
                self.elementwise_affine)

    def _init_kwargs(self):
        return dict(num_groups=self.num_groups,
                    num_channels=self.num_channels, eps=self.eps,
                    affine=self.elementwise_affine)

    _create_kwargs = _init_kwargs  # create_layer takes the same arguments.

    def _check_attached(self, info):
        mismatches = []
        if info.kind != self._kind:
            mismatches.append(f"kind {info.kind}")
        if info.num_groups != self.num_groups:
            mismatches.append(f"num_groups {info.num_groups}")
        if info.num_features != self.num_channels:
            mismatches.append(f"num_channels {info.num_features}")
        if info.eps is None or abs(info.eps - self.eps) > 1e-12 * max(
                1.0, self.eps):
            mismatches.append(f"eps {info.eps}")
        if info.affine != self.elementwise_affine:
            mismatches.append(f"affine {info.affine}")
        if mismatches:
            raise ValueError(
                f"normserve: layer {info.name} has " + ", ".join(mismatches)
                + f"; this GroupNorm was given num_groups={self.num_groups}, "
                f"num_channels={self.num_channels}, eps={self.eps}, "
                f"affine={self.elementwise_affine}")

    def _check_input(self, input):
        if input.dim() < 2:
            raise RuntimeError("Expected at least 2 dimensions for input "
                               f"tensor but received {input.dim()}")


class _InstanceNorm(_BatchNorm):
    """Base of InstanceNorm1d/2d/3d: BatchNorm's module with torch.nn
    InstanceNorm's defaults (affine and track_running_stats False) and its
    unbatched inputs (rank spatial_dims + 1, sent with a batch dim of 1)."""

    _kind = "instance_norm"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, device=None, dtype=None, *,
                 client=None, layer_id=None, layer=None,
                 server_parameters=False, timeout=None):
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, device, dtype, client=client,
                         layer_id=layer_id, layer=layer,
                         server_parameters=server_parameters, timeout=timeout)

    def _check_input_dim(self, input):
        d = self._spatial_dims
        if input.dim() not in (d + 1, d + 2):
            raise ValueError(f"expected {d + 1}D or {d + 2}D input (got "
                             f"{input.dim()}D input)")

    def forward(self, input):
        self._check_input_dim(input)
        if input.dim() == self._spatial_dims + 1:
            return super().forward(input.unsqueeze(0)).squeeze(0)
        return super().forward(input)


class InstanceNorm1d(_InstanceNorm):
    """torch.nn.InstanceNorm1d on a normserve server: input (N, C, L) or
    (C, L)."""

    _spatial_dims = 1


class InstanceNorm2d(_InstanceNorm):
    """torch.nn.InstanceNorm2d on a normserve server: input (N, C, H, W) or
    (C, H, W)."""

    _spatial_dims = 2


class InstanceNorm3d(_InstanceNorm):
    """torch.nn.InstanceNorm3d on a normserve server: input (N, C, D, H, W)
    or (C, D, H, W)."""

    _spatial_dims = 3


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = BatchNorm(x) with the statistics of a sync group's union (stats
    mode): the slice's count, mean and M2 go to the server, the union's
    mean and invstd come back, and x is normalized here; backward sends
    the slice's sums of dy and dy * xhat and gets the union's. The local
    math runs on torch's own CPU BatchNorm kernels where they fit (the
    slice's statistics, the backward sums; never on empty slices, which
    they do not take) and float32 passes elsewhere."""

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, module, step):
        ctx.module = module
        ctx.step = step
        if module.mode == "tensor":
            return _SyncBatchNormFunction._tensor_forward(ctx, x, module, step)
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.detach().to("cpu", torch.float32)
        count = xf.numel() // c
        if count > 0:
            # The slice's mean and biased variance (running stats unused).
            mean, var = torch.batch_norm_update_stats(xf, None, None, 0.0)
            mean = mean.double()
            m2 = var.double() * count
        else:
            mean = m2 = torch.zeros(c, dtype=torch.float64)
        remote = module._remote
        if step is None:  # Eval with running statistics: no barrier.
            r = remote.client.sync_forward(remote.name, 0, module.rank, 0,
                                           mean.numpy(), m2.numpy(),
                                           training=False,
                                           timeout=module._call_timeout())
        else:
            r = remote.client.sync_forward(remote.name, step, module.rank,
                                           count, mean.numpy(), m2.numpy(),
                                           training=module.training,
                                           timeout=module._call_timeout())
        mean_g = torch.from_numpy(r.mean)
        invstd_g = torch.from_numpy(r.invstd)
        alpha = invstd_g.double()
        beta = -mean_g.double() * alpha
        if weight is None and r.weight is not None:
            # Server-held parameters: as the step used them.
            weight = torch.from_numpy(r.weight)
            bias = torch.from_numpy(r.bias)
        if weight is not None:
            w = weight.detach().cpu().double()
            alpha = alpha * w
            beta = beta * w + bias.detach().cpu().double()
        y = torch.mul(xf, alpha.float().view(shape))
        y.add_(beta.float().view(shape))
        ctx.save_for_backward(x, weight)
        ctx.stats = (mean_g, invstd_g)
        return y.to(device=x.device, dtype=x.dtype)

    @staticmethod
    def _tensor_forward(ctx, x, module, step):
        """Tensor mode: the slice goes to the server, which normalizes it
        with the union's statistics once every rank has joined."""
        remote = module._remote
        wire = to_wire(x.detach().cpu())
        r = remote.client.sync_forward(
            remote.name, 0 if step is None else step, module.rank,
            input=wire, training=module.training and step is not None,
            raw=True, timeout=module._call_timeout())
        ctx.handle = r.handle
        ctx.dtype = x.dtype
        ctx.layout = wire.layout
        ctx.device = x.device
        return from_wire(r.output, x.device)

    @staticmethod
    def _tensor_backward(ctx, grad_output):
        module = ctx.module
        remote = module._remote
        needs_input = ctx.needs_input_grad[0]
        if not ctx.handle and not grad_output.numel():
            # An empty slice's eval forward saved nothing: nothing to do.
            zeros = torch.zeros(grad_output.shape[1]).numpy()
            return torch.zeros_like(grad_output), zeros, zeros
        grad = grad_output.detach().to(device="cpu", dtype=ctx.dtype)
        r = remote.client.sync_backward(
            remote.name, 0 if ctx.step is None else ctx.step, module.rank,
            handle=ctx.handle, grad_output=to_wire(grad, layout=ctx.layout),
            skip_grad_input=not needs_input,
            accumulate_grad=remote.server_parameters, raw=True,
            timeout=module._call_timeout())
        if remote.server_parameters:
            remote.grad_pending = True
        grad_input = (from_wire(r.grad_input, ctx.device)
                      if needs_input else None)
        return grad_input, r.sum_dy_xhat, r.sum_dy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        module = ctx.module
        if module.mode == "tensor":
            grad_input, g_dy_xhat, g_dy = (
                _SyncBatchNormFunction._tensor_backward(ctx, grad_output))
            g_dy_xhat = torch.from_numpy(g_dy_xhat)
            g_dy = torch.from_numpy(g_dy)
            return (grad_input,) + module._param_grads(
                ctx.needs_input_grad, g_dy_xhat, g_dy) + (None, None, None)
        x, weight = ctx.saved_tensors
        mean_g, invstd_g = ctx.stats
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.detach().to("cpu", torch.float32)
        dy = grad_output.detach().to("cpu", torch.float32)
        if dy.numel():
            # Σdy·x̂ and Σdy with the union's statistics, by aten's kernel.
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                dy, xf, None, None, None, mean_g, invstd_g, True, module.eps,
                [False, True, True])
            sum_dy, sum_dy_xhat = sum_dy.double(), sum_dy_xhat.double()
        else:
            sum_dy = sum_dy_xhat = torch.zeros(c, dtype=torch.float64)
        w = (weight.detach().cpu().double() if weight is not None
             else torch.ones(c, dtype=torch.float64))
        invstd = invstd_g.double()
        if ctx.step is None:  # Eval: the slice's own gradients.
            g_dy, g_dy_xhat = sum_dy, sum_dy_xhat
            dx = dy * (invstd * w).float().view(shape)
        else:
            remote = module._remote
            r = remote.client.sync_backward(
                remote.name, ctx.step, module.rank, sum_dy.numpy(),
                sum_dy_xhat.numpy(), accumulate_grad=remote.server_parameters,
                timeout=module._call_timeout())
            if remote.server_parameters:
                remote.grad_pending = True
            g_dy = torch.from_numpy(r.sum_dy).double()
            g_dy_xhat = torch.from_numpy(r.sum_dy_xhat).double()
            n = max(r.count, 1)
            # dx = (dy - Σdy/n - x̂·Σdy·x̂/n)·invstd·w
            #    = dy·a + (x - mean)·b + c, per channel.
            a = invstd * w
            b = -invstd * invstd * w * g_dy_xhat / n
            c0 = -a * g_dy / n
            # x - mean goes to a buffer the module keeps (fresh memory
            # costs a page fault per 4 KiB on first touch).
            xm = torch.sub(xf, mean_g.view(shape),
                           out=module._buffer("xm", xf))
            dx = torch.mul(xm, b.float().view(shape))
            dx.add_(c0.float().view(shape))
            dx.addcmul_(dy, a.float().view(shape))
        grad_input = (dx.to(device=x.device, dtype=x.dtype)
                      if ctx.needs_input_grad[0] else None)
        return (grad_input,) + module._param_grads(
            ctx.needs_input_grad, g_dy_xhat, g_dy) + (None, None, None)


class SyncBatchNorm(_BatchNorm):
    """One BatchNorm over the union of the batches of `world_size`
    participants, any mix of processes, languages and machines, each
    holding a slice (torch.nn.SyncBatchNorm without torch.distributed).

    Every participant constructs it with the same `group` (the server
    layer's id) and config, and its own `rank` (0 .. world_size - 1): the
    first creates the layer, the others attach (another config raises
    ValueError naming the difference). mode="stats" keeps the activations
    here: a training forward sends the slice's
    per-channel count, mean and M2 and blocks until every rank has sent its
    own, then normalizes with the union's statistics; backward does the
    same with the sums of dy and dy * xhat. mode="tensor" sends the slice
    itself and gets its output (and grad_input) back, for participants
    that would rather not compute; ranks of one group may use either mode.
    The module counts its own steps
    (from `step`, default 0: a rank replacing one that left starts at the
    group's next step); every rank must run the same number of training
    forwards. Slices may
    be empty (they still join the step). Eval with track_running_stats uses
    the server's running statistics without waiting. weight and bias are
    local nn.Parameters whose gradients are the union's (the same on every
    rank, so identical optimizers keep them identical; tensor mode sends
    them to the server when they changed), or with server_parameters=True
    the layer's own: their gradients accumulate there once per step and a
    ServerSGD steps them once per step (on rank 0).
    """

    _kind = "sync_batch_norm"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *,
                 client=None, group, rank, world_size, mode="stats",
                 barrier_timeout=30.0, timeout=None, step=0,
                 server_parameters=False):
        if mode not in ("stats", "tensor"):
            raise ValueError(
                f"normserve: SyncBatchNorm mode={mode!r}; expected 'stats' "
                "or 'tensor'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0 .. {world_size - 1}")
        _RemoteModule.__init__(self)
        if client is None:
            client = default_client()
        elif isinstance(client, str):
            client = Client(client)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.mode = mode
        self.barrier_timeout = barrier_timeout
        # The next training step; a rank that replaces one which left starts
        # at the group's next step (step=).
        self._step = int(step)
        create = dict(num_features=num_features, eps=eps, momentum=momentum,
                      affine=affine, track_running_stats=track_running_stats,
                      world_size=world_size,
                      barrier_timeout_ms=max(1, int(barrier_timeout * 1000)))
        try:
            self._connect(client, group, None, server_parameters, timeout,
                          device, dtype, create)
        except errors.AlreadyExistsError:
            self._connect(client, None, group, server_parameters, timeout,
                          device, dtype, create)

    def extra_repr(self):
        return (super().extra_repr()
                + f", group={self.group}, rank={self.rank}, "
                f"world_size={self.world_size}, mode={self.mode}")

    def resize(self, world_size, rank):
        """Elastic training: from the next step on this module is rank
        `rank` of `world_size` (after a participant left or joined). Every
        remaining participant calls it, with its new rank, before its next
        step; the first call changes the group's world_size on the server,
        the others find it changed. A participant that joins constructs a
        SyncBatchNorm with the new world_size and step= the group's next
        step."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0 .. {world_size - 1}")
        self._remote.client.set_world_size(self._remote.name, world_size,
                                           **self._remote.kwargs())
        self.world_size = world_size
        self.rank = rank

    def _param_grads(self, needs_input_grad, g_dy_xhat, g_dy):
        """grad_weight, grad_bias for local parameters (the union's sums),
        and None for the server-held ones' anchor."""
        weight = self._parameters.get("weight")
        grad_weight = grad_bias = None
        if weight is not None:
            if needs_input_grad[1]:
                grad_weight = g_dy_xhat.to(weight.device, weight.dtype)
            if needs_input_grad[2]:
                grad_bias = g_dy.to(weight.device, weight.dtype)
        return grad_weight, grad_bias

    def _init_args(self):
        raise TypeError("normserve: a SyncBatchNorm is one rank of a group "
                        "and cannot be copied; construct another rank")

    def _check_attached(self, info):
        if info.world_size != self.world_size and info.kind == self._kind:
            raise ValueError(
                f"normserve: layer {info.name} has world_size "
                f"{info.world_size}; this SyncBatchNorm was given "
                f"world_size={self.world_size}")
        super()._check_attached(info)

    def _buffer(self, key, like):
        """A float32 CPU tensor shaped like `like`, kept between steps."""
        buffers = self.__dict__.setdefault("_buffers_cpu", {})
        buf = buffers.get(key)
        if buf is None or buf.shape != like.shape:
            buf = buffers[key] = torch.empty(like.shape, dtype=torch.float32)
        return buf

    def _call_timeout(self):
        """Each call may wait for the slowest rank: the barrier's timeout
        plus slack, or the module's timeout when it was given one."""
        if self._remote.timeout is not None:
            return self._remote.timeout
        return self.barrier_timeout + 30.0

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(
                f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        self._check_input_dim(input)
        if self._config_tuple() != self._config:
            raise RuntimeError("normserve: the config changed after the "
                               "server layer was created")
        if input.dtype not in _WIRE_DTYPE:
            raise TypeError(f"normserve: input dtype {input.dtype} is not "
                            "supported; expected float32, float16 or bfloat16")
        step = None
        if self.training or not self.track_running_stats:
            step = self._step
            self._step += 1
        if self.mode == "tensor":
            self._push_parameters()  # The server normalizes with them.
        weight = self._parameters.get("weight")
        bias = self._parameters.get("bias")
        anchor = self._anchor if torch.is_grad_enabled() else None
        return _SyncBatchNormFunction.apply(input, weight, bias, anchor, self,
                                            step)


def convert_sync_batchnorm(module, *, client, rank, world_size, prefix,
                           mode="stats", barrier_timeout=30.0):
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm for normserve: every
    torch.nn BatchNorm1d/2d/3d in `module` becomes a SyncBatchNorm of group
    `prefix` + its module path (e.g. "resnet-layer1.0.bn1"), with its
    state copied, on every participant alike. Returns the converted module
    (the module itself when it is not a BatchNorm)."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, _RemoteModule):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum,
                            module.affine, module.track_running_stats,
                            client=client, group=prefix.rstrip("."),
                            rank=rank, world_size=world_size, mode=mode,
                            barrier_timeout=barrier_timeout)
        if rank == 0:
            out.load_state_dict(module.state_dict())
        elif module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
        out.train(module.training)
        return out
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(
            child, client=client, rank=rank, world_size=world_size,
            prefix=f"{prefix}{name}.",
            mode=mode, barrier_timeout=barrier_timeout))
    return out


class ServerSGD:
    """torch.optim.SGD for the weight and bias of server_parameters modules.

    step() runs OptimizerStep (the server applies SGD to the gradients
    backward accumulated there, then zeroes them) on every module whose
    backward ran since its last step. zero_grad() discards gradients
    accumulated without a step. Use a torch.optim optimizer for the rest of
    the model as usual.
    """

    def __init__(self, modules, lr, momentum=0.0, dampening=0.0,
                 weight_decay=0.0, nesterov=False):
        if isinstance(modules, nn.Module):
            modules = modules.modules()
        self.modules = [m for m in modules
                        if isinstance(m, (_BatchNorm, _RowNorm))
                        and m.affine and m.server_parameters]
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening")
        self.options = dict(lr=lr, momentum=momentum, dampening=dampening,
                            weight_decay=weight_decay, nesterov=nesterov)

    def step(self):
        for module in self.modules:
            if not module._remote.grad_pending:
                continue
            if isinstance(module, SyncBatchNorm) and module.rank != 0:
                # The group's gradients are one sum on the server: rank 0
                # steps them, once per step.
                module._remote.grad_pending = False
                continue
            module.server_step(**self.options)

    def zero_grad(self, set_to_none=True):
        for module in self.modules:
            remote = module._remote
            if (remote.grad_pending and isinstance(module, SyncBatchNorm)
                    and module.rank != 0):
                remote.grad_pending = False  # Rank 0 clears the group's.
            if remote.grad_pending:
                # A step with lr 0 and no momentum or decay leaves the
                # parameters as they are and clears the gradients.
                remote.client.optimizer_step(remote.name, lr=0.0,
                                             **remote.kwargs())
                remote.grad_pending = False
