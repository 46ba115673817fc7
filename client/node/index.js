// Node.js client for normserve (service normserve.v1.Normalization).
//
// The API is loaded at run time from normserve/v1/normserve.proto with
// @grpc/proto-loader, under the first of: $NORMSERVE_PROTO_DIR, proto/ beside
// this file (the npm package carries it there; scripts/node-pack.sh copies
// it in), the repository's proto/ (running from a checkout).
// Every call returns a Promise, takes an optional { timeoutMs } (default: the
// client's), and rejects with a NormserveError carrying the gRPC status code
// and the server's message.
//
//   const { Client, tensor } = require('./client/node');
//   const client = new Client('127.0.0.1:50051', { timeoutMs: 10000 });
//   const layer = await client.createLayer(4, { layerId: 'bn1' });
//   const x = tensor([8, 4, 5, 5], new Float32Array(8 * 4 * 5 * 5));
//   const fwd = await client.forward('bn1', x, { training: true });
//   const bwd = await client.backward('bn1', fwd.handle, dy);
//
// Mutating calls (createLayer, deleteLayer, forward, backward,
// updateRunningStats, optimizerStep, setParameters, loadState) also take
// { requestId, expectedVersion, retries } in their options: a request id
// makes a retry return the first result and change nothing (the server
// keeps ids across restarts with --state_dir; a retried training forward or
// accumulating backward gets ALREADY_EXISTS, its outputs not being kept);
// expectedVersion makes the call fail with FAILED_PRECONDITION when the
// layer has moved on (not on createLayer/deleteLayer); retries: N resends a
// unary call after UNAVAILABLE, DEADLINE_EXCEEDED or ABORTED, always with
// the same request id (a fresh one from newRequestId() when none was given).
// syncForward and syncBackward take { requestId, retries } (a retry of a
// rank's part with its id gets the first answer), not expectedVersion.
//
// Tensors are { shape, dtype, layout, data }: shape in PyTorch's logical
// order (N, C, ...spatial), dtype 'float32' | 'float16' | 'bfloat16', layout
// 'NCHW' | 'NHWC' (the order of the bytes), data a Float32Array (float32) or
// Uint16Array of raw bits (float16, bfloat16) or a Buffer. Results come back
// the same way, as views of the reply's bytes where alignment allows.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_FILE = 'normserve/v1/normserve.proto';

// The proto root: $NORMSERVE_PROTO_DIR, else the package's own copy, else
// the repository's (one source of truth: the copy is made at pack time).
function protoRoot() {
  if (process.env.NORMSERVE_PROTO_DIR) return process.env.NORMSERVE_PROTO_DIR;
  const packaged = path.join(__dirname, 'proto');
  if (fs.existsSync(path.join(packaged, PROTO_FILE))) return packaged;
  return path.join(__dirname, '..', '..', 'proto');
}

let cachedPackage = null;

// Returns the loaded normserve.v1 package (services and message types).
function loadApi() {
  if (cachedPackage === null) {
    const definition = protoLoader.loadSync(PROTO_FILE, {
      includeDirs: [protoRoot()],
      keepCase: true, // Field names as in the .proto (snake_case).
      longs: String, // 64-bit integers exactly; converted below where small.
      enums: String,
      defaults: true,
      oneofs: true,
    });
    cachedPackage = grpc.loadPackageDefinition(definition).normserve.v1;
  }
  return cachedPackage;
}

const STATUS_NAMES = Object.fromEntries(
  Object.entries(grpc.status).map(([name, code]) => [code, name]));

// A failed call: code (number, grpc.status), codeName ('NOT_FOUND'),
// details (the server's message), method.
class NormserveError extends Error {
  constructor(code, details, method, address) {
    const codeName = STATUS_NAMES[code] || 'UNKNOWN';
    const where = address ? `${method} (${address})` : method;
    super(`${where}: ${codeName}: ${details}`);
    this.name = 'NormserveError';
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.method = method;
  }
}

const DTYPES = { float32: 'DTYPE_FLOAT32', float16: 'DTYPE_FLOAT16',
                 bfloat16: 'DTYPE_BFLOAT16' };
const DTYPE_NAMES = { DTYPE_FLOAT32: 'float32', DTYPE_FLOAT16: 'float16',
                      DTYPE_BFLOAT16: 'bfloat16', DTYPE_INT64: 'int64',
                      DTYPE_UNSPECIFIED: 'unspecified' };
const LAYOUTS = { NCHW: 'LAYOUT_NCHW', NHWC: 'LAYOUT_NHWC' };
const LAYOUT_NAMES = { LAYOUT_NCHW: 'NCHW', LAYOUT_NHWC: 'NHWC',
                       LAYOUT_UNSPECIFIED: 'unspecified' };

// Returns a tensor object; dtype defaults to float32, layout to NCHW.
function tensor(shape, data, { dtype = 'float32', layout = 'NCHW' } = {}) {
  return { shape: Array.from(shape), dtype, layout, data };
}

function enumValue(table, value, what) {
  if (value === undefined || value === null) return undefined;
  const out = table[value] || (Object.values(table).includes(value) && value);
  if (!out) {
    throw new TypeError(`unknown ${what} ${value}; expected one of ` +
                        Object.keys(table).join(', '));
  }
  return out;
}

function bytesOf(data) {
  if (Buffer.isBuffer(data)) return data;
  if (ArrayBuffer.isView(data)) {
    return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  }
  throw new TypeError('tensor data must be a typed array or a Buffer');
}

function tensorToProto(t) {
  return {
    shape: t.shape.map(Number),
    dtype: enumValue(DTYPES, t.dtype || 'float32', 'dtype'),
    layout: enumValue(LAYOUTS, t.layout || 'NCHW', 'layout'),
    data: bytesOf(t.data),
  };
}

// A typed array over `buffer` without a copy when it is aligned.
function typedView(Type, buffer) {
  const count = buffer.byteLength / Type.BYTES_PER_ELEMENT;
  if (buffer.byteOffset % Type.BYTES_PER_ELEMENT === 0) {
    return new Type(buffer.buffer, buffer.byteOffset, count);
  }
  const copy = new Type(count);
  new Uint8Array(copy.buffer).set(buffer);
  return copy;
}

function tensorFromProto(t) {
  const dtype = DTYPE_NAMES[t.dtype];
  return {
    shape: t.shape.map(Number),
    dtype,
    layout: LAYOUT_NAMES[t.layout],
    data: typedView(dtype === 'float32' ? Float32Array : Uint16Array, t.data),
  };
}

function layerFromProto(layer) {
  const common = {
    name: layer.name,
    kind: layer.kind || 'batch_norm',
    version: Number(layer.version),
    numBatchesTracked: Number(layer.num_batches_tracked),
    hasAccumulatedGrad: layer.has_accumulated_grad,
  };
  if (layer.config === 'layer_norm' || layer.config === 'rms_norm') {
    // LayerNorm, RMSNorm: eps null is RMSNorm's eps=None.
    const c = layer[layer.config];
    return {
      ...common,
      normalizedShape: c.normalized_shape.map(Number),
      eps: c.eps === undefined || c.eps === null ? null : c.eps,
      elementwiseAffine: c.elementwise_affine,
      bias: layer.config === 'layer_norm' && c.elementwise_affine && c.bias,
      dtype: DTYPE_NAMES[c.dtype],
      device: c.device,
    };
  }
  if (layer.config === 'group_norm') {
    const g = layer.group_norm;
    return {
      ...common,
      numGroups: Number(g.num_groups),
      numChannels: Number(g.num_channels),
      eps: g.eps,
      affine: g.affine,
      dtype: DTYPE_NAMES[g.dtype],
      device: g.device,
    };
  }
  // BatchNorm, InstanceNorm (whose momentum is always a number) and
  // SyncBatchNorm (a BatchNorm with worldSize and barrierTimeoutMs).
  let c = layer.config === 'instance_norm' ? layer.instance_norm
                                           : layer.batch_norm;
  if (layer.config === 'sync_batch_norm') {
    const sync = layer.sync_batch_norm;
    c = sync.batch_norm;
    common.worldSize = sync.world_size;
    common.barrierTimeoutMs = Number(sync.barrier_timeout_ms);
  }
  return {
    ...common,
    numFeatures: Number(c.num_features),
    eps: c.eps,
    momentum: c.momentum_policy === 'cumulative_average' ? null : c.momentum,
    affine: c.affine,
    trackRunningStats: c.track_running_stats,
    layout: LAYOUT_NAMES[c.layout],
    dtype: DTYPE_NAMES[c.dtype],
    spatialDims: c.spatial_dims,
    device: c.device,
  };
}

// State dicts: { key: Float32Array } plus num_batches_tracked as a Number.
function stateFromProto(state) {
  const out = {};
  for (const [key, t] of Object.entries(state.tensors)) {
    out[key] = t.dtype === 'DTYPE_INT64'
      ? Number(t.data.readBigInt64LE(0))
      : Float32Array.from(typedView(Float32Array, t.data));
  }
  return out;
}

function stateToProto(state) {
  const tensors = {};
  for (const [key, value] of Object.entries(state)) {
    if (key === 'num_batches_tracked') {
      const data = Buffer.alloc(8);
      data.writeBigInt64LE(BigInt(value));
      tensors[key] = { shape: [], dtype: 'DTYPE_INT64', data };
    } else {
      const values = Float32Array.from(value);
      tensors[key] = { shape: [values.length], dtype: 'DTYPE_FLOAT32',
                       data: bytesOf(values) };
    }
  }
  return { tensors };
}

// A fresh request id: 128 random bits in hex.
function newRequestId() {
  return crypto.randomBytes(16).toString('hex');
}

// Operations that change a layer, and whether they take expectedVersion.
const MUTATING = { forward: true, backward: true, updateRunningStats: true,
                   optimizerStep: true, setParameters: true, loadState: true,
                   CreateLayer: false, DeleteLayer: false,
                   syncForward: false, syncBackward: false,
                   SetWorldSize: true };
const RETRYABLE = new Set([grpc.status.UNAVAILABLE,
                           grpc.status.DEADLINE_EXCEEDED,
                           grpc.status.ABORTED]);
const RETRY_BACKOFF_MS = 50;

// Adds options.requestId / options.expectedVersion to `request` (op is an
// OPS key, or 'CreateLayer' / 'DeleteLayer').
function withIds(op, request, o) {
  const given = (v) => v !== undefined && v !== null;
  if (!(op in MUTATING) && (given(o.requestId) || given(o.expectedVersion))) {
    throw new TypeError(`${op} changes nothing: no requestId or ` +
                        'expectedVersion');
  }
  if (o.requestId !== undefined && o.requestId !== null) {
    request.request_id = String(o.requestId);
  }
  if (o.expectedVersion !== undefined && o.expectedVersion !== null) {
    if (!MUTATING[op]) {
      throw new TypeError(`expectedVersion does not apply to ${op}`);
    }
    request.expected_version = String(o.expectedVersion);
  }
  return request;
}

// Options with a request id when retries are asked for without one.
function withRetryId(op, options) {
  if (!(op in MUTATING) || !options.retries ||
      (options.requestId !== undefined && options.requestId !== null)) {
    return options;
  }
  return { ...options, requestId: newRequestId() };
}

const floats = (values) => Float32Array.from(values || []);
const list = (values) => (values ? Array.from(values, Number) : []);
const floatsOrNull = (values) => (values.length ? floats(values) : null);

// torch.optim.SGD's options: { lr, momentum, dampening, weightDecay,
// nesterov }.
function sgdToProto(o) {
  return { lr: o.lr, momentum: o.momentum || 0, dampening: o.dampening || 0,
           weight_decay: o.weightDecay || 0, nesterov: !!o.nesterov };
}

function createRequest(numFeatures, options) {
  const o = options || {};
  const config = {
    num_features: numFeatures,
    eps: o.eps === undefined ? 1e-5 : o.eps,
    affine: o.affine === undefined ? true : o.affine,
    track_running_stats:
      o.trackRunningStats === undefined ? true : o.trackRunningStats,
    layout: enumValue(LAYOUTS, o.layout, 'layout'),
    dtype: enumValue(DTYPES, o.dtype, 'dtype'),
    spatial_dims: o.spatialDims || 0,
    device: o.device || '',
  };
  if (o.momentum === null) {
    config.cumulative_average = {};
  } else {
    config.momentum = o.momentum === undefined ? 0.1 : o.momentum;
  }
  return { layer_id: o.layerId || '', batch_norm: config };
}

// torch.nn.GroupNorm's arguments.
function groupNormRequest(numGroups, numChannels, options) {
  const o = options || {};
  return {
    layer_id: o.layerId || '',
    group_norm: {
      num_groups: numGroups,
      num_channels: numChannels,
      eps: o.eps === undefined ? 1e-5 : o.eps,
      affine: o.affine === undefined ? true : o.affine,
      dtype: enumValue(DTYPES, o.dtype, 'dtype'),
      device: o.device || '',
    },
  };
}

// torch.nn.InstanceNorm's arguments and defaults (affine and
// trackRunningStats false; momentum a number).
function instanceNormRequest(numFeatures, options) {
  const o = options || {};
  if (o.momentum === null) {
    throw new Error('instance_norm needs a momentum in [0, 1] ' +
                    '(torch.nn.InstanceNorm has no cumulative average)');
  }
  return {
    layer_id: o.layerId || '',
    instance_norm: {
      num_features: numFeatures,
      eps: o.eps === undefined ? 1e-5 : o.eps,
      momentum: o.momentum === undefined ? 0.1 : o.momentum,
      affine: !!o.affine,
      track_running_stats: !!o.trackRunningStats,
      layout: enumValue(LAYOUTS, o.layout, 'layout'),
      dtype: enumValue(DTYPES, o.dtype, 'dtype'),
      spatial_dims: o.spatialDims || 0,
      device: o.device || '',
    },
  };
}

// kind 'layer_norm' or 'rms_norm'; normalizedShape a number or an array.
function rowNormRequest(kind, normalizedShape, options) {
  const o = options || {};
  const config = {
    normalized_shape: list([].concat(normalizedShape)),
    elementwise_affine:
      o.elementwiseAffine === undefined ? true : o.elementwiseAffine,
    dtype: enumValue(DTYPES, o.dtype, 'dtype'),
    device: o.device || '',
  };
  if (o.eps !== undefined && o.eps !== null) {
    config.eps = o.eps;
  } else if (kind === 'layer_norm') {
    config.eps = 1e-5;
  }
  if (kind === 'layer_norm') {
    config.bias = o.bias === undefined ? true : o.bias;
  }
  return { layer_id: o.layerId || '', [kind]: config };
}

// Request builders and result decoders shared by unary calls and streams.
const OPS = {
  forward: {
    field: 'forward',
    request: (name, input, o = {}) => {
      const request = { name, input: tensorToProto(input),
                        training: !!o.training,
                        return_stats: !!o.returnStats };
      if (o.saveForBackward !== undefined) {
        request.save_for_backward = !!o.saveForBackward;
      }
      return request;
    },
    result: (r) => ({ output: tensorFromProto(r.output), handle: r.handle,
                      mean: floats(r.mean), invstd: floats(r.invstd),
                      version: Number(r.version) }),
  },
  backward: {
    field: 'backward',
    request: (name, handle, gradOutput, o = {}) => ({
      name, handle: String(handle), grad_output: tensorToProto(gradOutput),
      accumulate_grad: !!o.accumulateGrad, retain_context: !!o.retainContext,
      skip_grad_input: !!o.skipGradInput }),
    result: (r) => ({
      gradInput: r.grad_input ? tensorFromProto(r.grad_input) : null,
      gradWeight: floatsOrNull(r.grad_weight),
      gradBias: floatsOrNull(r.grad_bias),
      version: Number(r.version) }),
  },
  updateRunningStats: {
    field: 'update_running_stats',
    request: (name, mean, variance, count) => ({
      name, mean: list(mean), var: list(variance), count }),
    result: (r) => ({ version: Number(r.version),
                      numBatchesTracked: Number(r.num_batches_tracked) }),
  },
  optimizerStep: {
    field: 'optimizer_step',
    request: (name, o = {}) => ({
      name, sgd: sgdToProto(o), keep_grad: !!o.keepGrad }),
    result: (r) => Number(r.version),
  },
  setParameters: {
    field: 'set_parameters',
    request: (name, { weight, bias } = {}) => ({
      name, weight: list(weight), bias: list(bias) }),
    result: (r) => Number(r.version),
  },
  getState: {
    field: 'get_state',
    request: (name) => ({ name }),
    result: (r) => ({ tensors: stateFromProto(r.state),
                      version: Number(r.version) }),
  },
  loadState: {
    field: 'load_state',
    request: (name, state, { allowMissing = false } = {}) => ({
      name, state: stateToProto(state), allow_missing: allowMissing }),
    result: (r) => Number(r.version),
  },
  getLayer: {
    field: 'get_layer',
    request: (name) => ({ name }),
    result: layerFromProto,
  },
  // One rank's part of a sync group's step. Stats mode: { count, mean, m2 }
  // (per channel, arrays of numbers: the slice's values per channel, their
  // mean and sum of squared deviations). Tensor mode: { input } (a tensor,
  // as for forward; an empty slice such as [0, C, 4] joins with count 0)
  // and { saveForBackward } (default true). Both: { training } (default
  // true). Resolves, once every rank of the step sent its own (eval with
  // running statistics: at once), to { count, mean, invstd, step, version,
  // weight, bias (the layer's as the step used them; null without affine),
  // output (tensor mode: this rank's slice, else null), handle (as
  // forward's; '0' when nothing was saved) }.
  syncForward: {
    field: 'sync_forward',
    request: (name, step, rank, o = {}) => {
      const request = {
        name, step, rank,
        training: o.training === undefined ? true : !!o.training,
        count: o.count || 0, mean: list(o.mean), m2: list(o.m2) };
      if (o.input) request.input = tensorToProto(o.input);
      if (o.saveForBackward !== undefined) {
        request.save_for_backward = !!o.saveForBackward;
      }
      return request;
    },
    result: (r) => ({
      count: Number(r.count), mean: floats(r.mean), invstd: floats(r.invstd),
      step: Number(r.step), version: Number(r.version),
      weight: floatsOrNull(r.weight), bias: floatsOrNull(r.bias),
      output: r.output ? tensorFromProto(r.output) : null,
      handle: r.handle }),
  },
  // One rank's backward part for the step its syncForward completed. Stats
  // mode: { sumDy, sumDyXhat } (per channel, over its slice). Tensor mode:
  // { handle, gradOutput (the input's shape, dtype and layout),
  // skipGradInput }. Both: { accumulateGrad, sgd: { lr, momentum,
  // dampening, weightDecay, nesterov }, keepGrad }: with sgd (the same on
  // every rank) the server adds the union's gradients to the layer's and
  // steps its weight and bias once for the step, then zeroes the gradients
  // unless keepGrad. Resolves to the union's { count, sumDy, sumDyXhat,
  // version } and gradInput (tensor mode, unless skipped; else null).
  syncBackward: {
    field: 'sync_backward',
    request: (name, step, rank, o = {}) => {
      const request = {
        name, step, rank, sum_dy: list(o.sumDy),
        sum_dy_xhat: list(o.sumDyXhat),
        accumulate_grad: !!o.accumulateGrad, handle: String(o.handle || 0),
        skip_grad_input: !!o.skipGradInput, keep_grad: !!o.keepGrad };
      if (o.gradOutput) request.grad_output = tensorToProto(o.gradOutput);
      if (o.sgd) request.sgd = sgdToProto(o.sgd);
      return request;
    },
    result: (r) => ({
      count: Number(r.count), sumDy: floats(r.sum_dy),
      sumDyXhat: floats(r.sum_dy_xhat), version: Number(r.version),
      gradInput: r.grad_input ? tensorFromProto(r.grad_input) : null }),
  },
};

const RPC_NAMES = {
  forward: 'Forward', backward: 'Backward',
  updateRunningStats: 'UpdateRunningStats', optimizerStep: 'OptimizerStep',
  setParameters: 'SetParameters', getState: 'GetState',
  loadState: 'LoadState', getLayer: 'GetLayer',
  syncForward: 'SyncForward', syncBackward: 'SyncBackward',
};

// Number of leading arguments each operation takes before its options.
const ARITY = { forward: 2, backward: 3, updateRunningStats: 4,
                optimizerStep: 1, setParameters: 1, getState: 1,
                loadState: 2, getLayer: 1, syncForward: 3,
                syncBackward: 3 };

function splitArgs(op, args) {
  const n = ARITY[op];
  const options = args.length > n && args[n] ? args[n] : {};
  return { args: args.slice(0, n), options };
}

class Client {
  // address: 'host:port'. timeoutMs: default deadline of each call.
  constructor(address, { timeoutMs = 30000, credentials, channelOptions } =
                {}) {
    const api = loadApi();
    this.address = address;
    this.timeoutMs = timeoutMs;
    this._stub = new api.Normalization(
      address, credentials || grpc.credentials.createInsecure(), {
        // Activations are large; the server enforces its own limit.
        'grpc.max_send_message_length': -1,
        'grpc.max_receive_message_length': -1,
        ...channelOptions,
      });
    for (const op of Object.keys(OPS)) {
      this[op] = (...all) => {
        const split = splitArgs(op, all);
        const options = withRetryId(op, split.options);
        const request = withIds(op, OPS[op].request(...split.args, options),
                                options);
        return this._unary(RPC_NAMES[op], request, options, split.args[0])
          .then(OPS[op].result);
      };
    }
  }

  // One unary call, resent up to options.retries times after a retryable
  // status (the request carries its request id, so a resend is safe).
  async _unary(method, request, options = {}, layer) {
    const retries = Number(options.retries || 0);
    let backoff = RETRY_BACKOFF_MS;
    for (let attempt = 0; ; ++attempt) {
      try {
        return await this._unaryOnce(method, request, options, layer);
      } catch (err) {
        if (attempt >= retries || !RETRYABLE.has(err.code)) throw err;
      }
      await new Promise((resolve) => setTimeout(resolve, backoff));
      backoff *= 2;
    }
  }

  _unaryOnce(method, request, options, layer) {
    const timeoutMs = options.timeoutMs === undefined
      ? this.timeoutMs : options.timeoutMs;
    const callOptions = timeoutMs ? { deadline: Date.now() + timeoutMs } : {};
    const label = layer ? `${method}(${layer})` : method;
    return new Promise((resolve, reject) => {
      this._stub[method](request, callOptions, (err, response) => {
        if (err) {
          reject(new NormserveError(err.code, err.details || err.message,
                                    label, this.address));
        } else {
          resolve(response);
        }
      });
    });
  }

  // Creates a BatchNorm layer with torch.nn.BatchNorm's arguments:
  // { layerId, eps, momentum (null: cumulative average), affine,
  //   trackRunningStats, layout, dtype, spatialDims, device, timeoutMs,
  //   requestId, retries }.
  async createLayer(numFeatures, options = {}) {
    const o = withRetryId('CreateLayer', options);
    return layerFromProto(await this._unary(
      'CreateLayer', withIds('CreateLayer', createRequest(numFeatures, o), o),
      o));
  }

  // Creates a LayerNorm layer with torch.nn.LayerNorm's arguments:
  // normalizedShape (a number or an array of trailing dims), { layerId,
  // eps (1e-5), elementwiseAffine, bias, dtype, device, timeoutMs,
  // requestId, retries }.
  async createLayerNorm(normalizedShape, options = {}) {
    return this._createRowNorm('layer_norm', normalizedShape, options);
  }

  // Creates an RMSNorm layer (torch.nn.RMSNorm): as createLayerNorm without
  // bias; eps unset or null is torch's eps=None (float32's epsilon).
  async createRmsNorm(normalizedShape, options = {}) {
    return this._createRowNorm('rms_norm', normalizedShape, options);
  }

  async _createRowNorm(kind, normalizedShape, options) {
    return this._create(
      (o) => rowNormRequest(kind, normalizedShape, o), options);
  }

  // Creates a GroupNorm layer (torch.nn.GroupNorm): numGroups, numChannels,
  // { layerId, eps (1e-5), affine (true), dtype, device, timeoutMs,
  // requestId, retries }.
  async createGroupNorm(numGroups, numChannels, options = {}) {
    return this._create(
      (o) => groupNormRequest(numGroups, numChannels, o), options);
  }

  // Creates an InstanceNorm layer (torch.nn.InstanceNorm1d/2d/3d):
  // numFeatures, { layerId, eps, momentum (0.1), affine (false),
  // trackRunningStats (false), layout, dtype, spatialDims (1, 2, 3 or 0),
  // device, timeoutMs, requestId, retries }. Inputs are batched: rank 3 to
  // 5 (add a batch dim of 1 to an unbatched one).
  async createInstanceNorm(numFeatures, options = {}) {
    return this._create((o) => instanceNormRequest(numFeatures, o), options);
  }

  async _create(makeRequest, options) {
    const o = withRetryId('CreateLayer', options);
    return layerFromProto(await this._unary(
      'CreateLayer', withIds('CreateLayer', makeRequest(o), o), o));
  }

  async listLayers({ pageSize = 0, pageToken = '', timeoutMs } = {}) {
    const r = await this._unary('ListLayers',
                                { page_size: pageSize, page_token: pageToken },
                                { timeoutMs });
    return { layers: r.layers.map(layerFromProto),
             nextPageToken: r.next_page_token };
  }

  // options: { timeoutMs, requestId, retries }.
  async deleteLayer(name, options = {}) {
    const o = withRetryId('DeleteLayer', options);
    await this._unary('DeleteLayer', withIds('DeleteLayer', { name }, o), o,
                      name);
  }

  // Creates a sync group (sync_batch_norm): BatchNorm's options plus
  // { barrierTimeoutMs }; see SyncBatchNorm for joining it.
  async createSyncBatchNorm(numFeatures, worldSize, options = {}) {
    return this._create((o) => {
      const bn = createRequest(numFeatures, o);
      const sync = { batch_norm: bn.batch_norm, world_size: worldSize };
      if (o.barrierTimeoutMs !== undefined) {
        sync.barrier_timeout_ms = o.barrierTimeoutMs;
      }
      return { layer_id: bn.layer_id, sync_batch_norm: sync };
    }, options);
  }

  // syncForward(name, step, rank, options) and syncBackward(name, step,
  // rank, options), as the other operations, come from OPS (see there).

  // Changes a sync group's world_size between steps (elastic training);
  // its current value is accepted at any time, so every remaining rank may
  // send it before its next step. options: { timeoutMs, requestId,
  // expectedVersion, retries }. Resolves to the layer's version.
  async setWorldSize(name, worldSize, options = {}) {
    const o = withRetryId('SetWorldSize', options);
    const r = await this._unary(
      'SetWorldSize',
      withIds('SetWorldSize', { name, world_size: worldSize }, o), o, name);
    return Number(r.version);
  }

  // Opens a Train stream: the same operations as methods, answered in order.
  train({ timeoutMs } = {}) {
    return new TrainStream(this, timeoutMs);
  }

  close() {
    this._stub.close();
  }
}

// One rank of a sync group (torch.nn.SyncBatchNorm for any clients):
// join(), then forward(x, shape) and backward(dy) on float32 NCHW data
// (Float32Array, shape [N, C, ...]; N may be 0). mode 'stats' (default):
// the statistics go to the server, the activations stay here. mode
// 'tensor': x and dy go to the server, which answers with the output and
// grad_input (ranks of one group may use either mode). weight and bias are
// local Float32Arrays whose gradients are the union's (identical on every
// rank, so identical optimizers keep them identical). In tensor mode the
// server normalizes with its own copy: a forward first pushes weight and
// bias with setParameters when they changed since the last push or
// refresh (every rank pushes the same values when they run identical
// optimizers; ranks that disagree leave the last push). With sgd ({ lr,
// momentum, dampening, weightDecay, nesterov }, the same on every rank)
// the server holds the parameters: backward has it step them once per
// step, and each forward refreshes weight and bias from the server's (in
// stats mode it normalizes with those).
class SyncBatchNorm {
  constructor(client, { group, rank, worldSize, numFeatures,
                        barrierTimeoutMs, timeoutMs, mode = 'stats',
                        sgd = null } = {}) {
    if (mode !== 'stats' && mode !== 'tensor') {
      throw new TypeError(`SyncBatchNorm mode ${mode}; expected 'stats' ` +
                          "or 'tensor'");
    }
    Object.assign(this, { client, group, rank, worldSize, numFeatures,
                          barrierTimeoutMs, timeoutMs, mode, sgd });
    this.step = 0;
    this.training = true;
  }

  // Creates the layer, or attaches to it when another rank did.
  async join() {
    try {
      this.layer = await this.client.createSyncBatchNorm(
        this.numFeatures, this.worldSize,
        { layerId: this.group, barrierTimeoutMs: this.barrierTimeoutMs });
    } catch (err) {
      if (err.code !== grpc.status.ALREADY_EXISTS) throw err;
      this.layer = await this.client.getLayer(this.group);
    }
    const { tensors } = await this.client.getState(this.layer.name);
    this._setParameters(tensors.weight, tensors.bias);
    return this;
  }

  // Local weight and bias, and the server's copy as far as we know it.
  _setParameters(weight, bias) {
    this.weight = Float32Array.from(weight);
    this.bias = Float32Array.from(bias);
    this._pushed = [Float32Array.from(weight), Float32Array.from(bias)];
  }

  // Sends weight and bias when they changed since the server last had them
  // (compared by value: they may have been updated in place).
  async _pushParameters() {
    const same = (a, b) => a.length === b.length &&
      a.every((v, i) => Object.is(v, b[i]));
    if (same(this.weight, this._pushed[0]) &&
        same(this.bias, this._pushed[1])) {
      return;
    }
    await this.client.setParameters(
      this.layer.name,
      { weight: this.weight, bias: this.bias, timeoutMs: this.timeoutMs });
    this._pushed = [Float32Array.from(this.weight),
                    Float32Array.from(this.bias)];
  }

  _extents(shape) {
    const c = shape[1];
    const s = shape.slice(2).reduce((a, b) => a * b, 1);
    return { n: shape[0], c, s };
  }

  async forward(x, shape) {
    // Eval with running statistics is no step of the group (no barrier).
    const counted = this.training || !this.layer.trackRunningStats;
    const step = counted ? this.step++ : this.step;
    const options = { training: this.training, timeoutMs: this.timeoutMs };
    if (this.mode === 'tensor' || this.sgd) await this._pushParameters();
    if (this.mode === 'tensor') {
      const r = await this.client.syncForward(
        this.layer.name, step, this.rank,
        { ...options, input: tensor(shape, x) });
      if (this.sgd && r.weight) this._setParameters(r.weight, r.bias);
      this._saved = { shape, step, handle: r.handle };
      return r.output.data;
    }
    const { n, c, s } = this._extents(shape);
    const mean = new Float64Array(c);
    const m2 = new Float64Array(c);
    const count = n * s;
    for (let i = 0; i < n; ++i) {
      for (let ch = 0; ch < c; ++ch) {
        for (let j = 0; j < s; ++j) mean[ch] += x[(i * c + ch) * s + j];
      }
    }
    if (count > 0) for (let ch = 0; ch < c; ++ch) mean[ch] /= count;
    for (let i = 0; i < n; ++i) {
      for (let ch = 0; ch < c; ++ch) {
        for (let j = 0; j < s; ++j) {
          const d = x[(i * c + ch) * s + j] - mean[ch];
          m2[ch] += d * d;
        }
      }
    }
    const r = await this.client.syncForward(this.layer.name, step, this.rank,
                                            { ...options, count, mean, m2 });
    // Server-held parameters: normalize with the ones the step used.
    if (this.sgd && r.weight) this._setParameters(r.weight, r.bias);
    const { weight, bias } = this;
    this._saved = { x, shape, step, counted, mean: r.mean, invstd: r.invstd,
                    weight };
    const y = new Float32Array(x.length);
    for (let i = 0; i < n; ++i) {
      for (let ch = 0; ch < c; ++ch) {
        for (let j = 0; j < s; ++j) {
          const k = (i * c + ch) * s + j;
          y[k] = (x[k] - r.mean[ch]) * r.invstd[ch] * weight[ch] + bias[ch];
        }
      }
    }
    return y;
  }

  // Resolves to { gradInput, gradWeight, gradBias } (the union's sums).
  async backward(dy) {
    const options = { timeoutMs: this.timeoutMs };
    if (this.sgd) options.sgd = this.sgd;
    if (this.mode === 'tensor') {
      const { shape, step, handle } = this._saved;
      const r = await this.client.syncBackward(
        this.layer.name, step, this.rank,
        { ...options, handle, gradOutput: tensor(shape, dy) });
      return { gradInput: r.gradInput.data, gradWeight: r.sumDyXhat,
               gradBias: r.sumDy };
    }
    const { x, shape, step, counted, mean, invstd, weight } = this._saved;
    const { n, c, s } = this._extents(shape);
    const xhat = (k, ch) => (x[k] - mean[ch]) * invstd[ch];
    const sumDy = new Float64Array(c);
    const sumDyXhat = new Float64Array(c);
    for (let i = 0; i < n; ++i) {
      for (let ch = 0; ch < c; ++ch) {
        for (let j = 0; j < s; ++j) {
          const k = (i * c + ch) * s + j;
          sumDy[ch] += dy[k];
          sumDyXhat[ch] += dy[k] * xhat(k, ch);
        }
      }
    }
    // An eval forward with running statistics was no step of the group:
    // its gradients are this slice's own (dx = dy * invstd * weight).
    const r = counted
      ? await this.client.syncBackward(this.layer.name, step, this.rank,
                                       { ...options, sumDy, sumDyXhat })
      : { count: 0, sumDy: Float32Array.from(sumDy),
          sumDyXhat: Float32Array.from(sumDyXhat) };
    const count = Math.max(r.count, 1);
    const gradInput = new Float32Array(dy.length);
    for (let i = 0; i < n; ++i) {
      for (let ch = 0; ch < c; ++ch) {
        for (let j = 0; j < s; ++j) {
          const k = (i * c + ch) * s + j;
          const g = counted ? dy[k] - r.sumDy[ch] / count -
                                  xhat(k, ch) * r.sumDyXhat[ch] / count
                            : dy[k];
          gradInput[k] = g * invstd[ch] * weight[ch];
        }
      }
    }
    return { gradInput, gradWeight: r.sumDyXhat, gradBias: r.sumDy };
  }
}

// One Train stream. Each operation returns a Promise; several may be in
// flight. A failed operation rejects and the stream goes on. end() closes
// the stream after the answers in flight.
class TrainStream {
  constructor(client, timeoutMs) {
    this._client = client;
    this._pending = new Map();
    this._nextId = 1;
    this._error = null;
    const options = timeoutMs ? { deadline: Date.now() + timeoutMs } : {};
    this._call = client._stub.Train(options);
    this._call.on('data', (response) => this._answer(response));
    this._call.on('error', (err) => {
      this._error = new NormserveError(err.code, err.details || err.message,
                                       'Train', client.address);
      this._failAll(this._error);
    });
    this._ended = new Promise((resolve) => this._call.on('end', resolve));
    this._call.on('end', () => this._failAll(new NormserveError(
      grpc.status.UNKNOWN, 'the Train stream ended before answering',
      'Train', client.address)));
    // Request ids and expected versions work as in unary calls; retries
    // don't apply (resend on a new stream).
    for (const op of Object.keys(OPS)) {
      this[op] = (...all) => {
        const { args, options } = splitArgs(op, all);
        if (options.retries) {
          return Promise.reject(new TypeError(
            'retries applies to unary calls; a stream op fails alone'));
        }
        let request;
        try {
          request = withIds(op, OPS[op].request(...args, options), options);
        } catch (err) {
          return Promise.reject(err);
        }
        return this._submit(op, request, args[0]);
      };
    }
  }

  _submit(op, request, layer) {
    if (this._error) return Promise.reject(this._error);
    const requestId = this._nextId++;
    return new Promise((resolve, reject) => {
      this._pending.set(String(requestId), {
        resolve, reject, op, label: `Train.${RPC_NAMES[op]}(${layer})` });
      this._call.write({ request_id: requestId, [OPS[op].field]: request });
    });
  }

  _answer(response) {
    const entry = this._pending.get(String(response.request_id));
    if (!entry) return;
    this._pending.delete(String(response.request_id));
    if (response.status && response.status.code !== 0) {
      entry.reject(new NormserveError(response.status.code,
                                      response.status.message, entry.label,
                                      this._client.address));
      return;
    }
    try {
      entry.resolve(OPS[entry.op].result(response[OPS[entry.op].field]));
    } catch (err) {
      entry.reject(err);
    }
  }

  _failAll(error) {
    for (const entry of this._pending.values()) entry.reject(error);
    this._pending.clear();
  }

  // Half-closes the stream; resolves once the server has answered and ended.
  end() {
    this._call.end();
    return this._ended;
  }
}

module.exports = { Client, TrainStream, SyncBatchNorm, NormserveError,
                   tensor, loadApi,
                   newRequestId, status: grpc.status };
