// TypeScript declarations for normserve-client (index.js).
//
// Self-contained: no import of @grpc/grpc-js or @types/node, so they check
// with any TypeScript from 4.5 on, with or without Node's types. A Buffer is
// a Uint8Array, so a Buffer is accepted wherever raw bytes are.

// --- Tensors ---------------------------------------------------------------

/** Element types of tensors. float16 and bfloat16 travel as raw 16-bit words. */
export type DType = 'float32' | 'float16' | 'bfloat16';
/** The order of a tensor's bytes; its shape is always (N, C, ...spatial). */
export type Layout = 'NCHW' | 'NHWC';

/** Numbers the client copies with Array.from (an array or a typed array). */
export type Numbers = ArrayLike<number> | Iterable<number>;

/** A float32 tensor to send: data a Float32Array, or its bytes (a Buffer). */
export interface Float32Tensor {
  shape: readonly number[];
  dtype?: 'float32';
  layout?: Layout;
  data: Float32Array | Uint8Array;
}

/** A float16/bfloat16 tensor to send: data the raw bits, or their bytes. */
export interface HalfTensor {
  shape: readonly number[];
  dtype: 'float16' | 'bfloat16';
  layout?: Layout;
  data: Uint16Array | Uint8Array;
}

/** A tensor as calls take it (tensor() builds one; dtype default float32,
 * layout default NCHW). A result tensor is one too. */
export type Tensor = Float32Tensor | HalfTensor;

/** A tensor as results carry it: a view of the reply's bytes (or a copy
 * where they are unaligned). */
export type OutputTensor =
  | { shape: number[]; dtype: 'float32'; layout: Layout; data: Float32Array }
  | { shape: number[]; dtype: 'float16' | 'bfloat16'; layout: Layout;
      data: Uint16Array };

/** Returns { shape, dtype, layout, data }; dtype defaults to float32 and
 * layout to NCHW. */
export declare function tensor(
  shape: Iterable<number> | ArrayLike<number>,
  data: Float32Array | Uint8Array,
  options?: { dtype?: 'float32'; layout?: Layout }): Float32Tensor & {
    dtype: 'float32'; layout: Layout; shape: number[] };
export declare function tensor(
  shape: Iterable<number> | ArrayLike<number>,
  data: Uint16Array | Uint8Array,
  options: { dtype: 'float16' | 'bfloat16'; layout?: Layout }): HalfTensor & {
    layout: Layout; shape: number[] };

// --- Status codes and errors -----------------------------------------------

/** gRPC status codes (grpc-js's `status`, the same numbers). */
export declare const status: {
  readonly OK: 0;
  readonly CANCELLED: 1;
  readonly UNKNOWN: 2;
  readonly INVALID_ARGUMENT: 3;
  readonly DEADLINE_EXCEEDED: 4;
  readonly NOT_FOUND: 5;
  readonly ALREADY_EXISTS: 6;
  readonly PERMISSION_DENIED: 7;
  readonly RESOURCE_EXHAUSTED: 8;
  readonly FAILED_PRECONDITION: 9;
  readonly ABORTED: 10;
  readonly OUT_OF_RANGE: 11;
  readonly UNIMPLEMENTED: 12;
  readonly INTERNAL: 13;
  readonly UNAVAILABLE: 14;
  readonly DATA_LOSS: 15;
  readonly UNAUTHENTICATED: 16;
};
export type StatusName = keyof typeof status;
export type StatusCode = (typeof status)[StatusName];

/** A failed call. message: "METHOD(layer) (address): CODE_NAME: details". */
export declare class NormserveError extends Error {
  constructor(code: number, details: string, method: string,
              address?: string);
  name: 'NormserveError';
  /** The gRPC status code (compare with status.NOT_FOUND etc.). */
  code: StatusCode;
  /** Its name, e.g. 'NOT_FOUND'. */
  codeName: StatusName;
  /** The server's message. */
  details: string;
  /** The call, e.g. 'Forward(layers/bn1)' or 'Train.Backward(layers/bn1)'. */
  method: string;
}

/** A fresh request id: 128 random bits in hex. */
export declare function newRequestId(): string;

// --- Layers ----------------------------------------------------------------

interface LayerBase {
  /** "layers/{id}". */
  name: string;
  /** Bumped by every mutation. */
  version: number;
  /** 0 for kinds without running statistics. */
  numBatchesTracked: number;
  /** Gradients accumulated on the server and not yet applied. */
  hasAccumulatedGrad: boolean;
  /** '' (the server's default), 'cpu', 'cuda:N'. */
  device: string;
  dtype: DType;
}

interface BatchNormFields extends LayerBase {
  numFeatures: number;
  eps: number;
  /** null: cumulative average (torch's momentum=None). */
  momentum: number | null;
  affine: boolean;
  trackRunningStats: boolean;
  layout: Layout;
  /** 1, 2, 3 (BatchNorm1d/2d/3d) or 0 (any rank). */
  spatialDims: number;
}

export interface BatchNormLayer extends BatchNormFields {
  kind: 'batch_norm';
}

export interface InstanceNormLayer extends BatchNormFields {
  kind: 'instance_norm';
  momentum: number;
}

export interface SyncBatchNormLayer extends BatchNormFields {
  kind: 'sync_batch_norm';
  worldSize: number;
  barrierTimeoutMs: number;
}

export interface LayerNormLayer extends LayerBase {
  kind: 'layer_norm';
  normalizedShape: number[];
  eps: number;
  elementwiseAffine: boolean;
  /** Whether it has a bias (false without elementwiseAffine). */
  bias: boolean;
}

export interface RmsNormLayer extends LayerBase {
  kind: 'rms_norm';
  normalizedShape: number[];
  /** null: torch's eps=None (float32's machine epsilon). */
  eps: number | null;
  elementwiseAffine: boolean;
  bias: false;
}

export interface GroupNormLayer extends LayerBase {
  kind: 'group_norm';
  numGroups: number;
  numChannels: number;
  eps: number;
  affine: boolean;
}

/** A layer of any kind; narrow it on `kind`. */
export type Layer = BatchNormLayer | InstanceNormLayer | SyncBatchNormLayer |
  LayerNormLayer | RmsNormLayer | GroupNormLayer;
export type LayerKind = Layer['kind'];

// --- Options -----------------------------------------------------------------

/** Options every unary call takes. */
export interface CallOptions {
  /** Deadline of this call in ms (default: the client's; 0: none). */
  timeoutMs?: number;
}

/** Read-only unary calls: retries resend after UNAVAILABLE,
 * DEADLINE_EXCEEDED or ABORTED. */
export interface ReadOptions extends CallOptions {
  retries?: number;
}

/** A request id: a retry with it returns the first result, changing
 * nothing. */
export interface RequestIdOptions {
  requestId?: string | null;
}

/** Fail with FAILED_PRECONDITION when the layer's version differs. */
export interface ExpectedVersionOptions {
  expectedVersion?: number | string | bigint | null;
}

/** Unary calls that create or delete: a request id and retries (always with
 * the same id; a fresh one from newRequestId() when none was given). */
export interface CreateDeleteOptions extends ReadOptions, RequestIdOptions {}

/** Unary calls that change a layer. */
export interface MutationOptions extends CreateDeleteOptions,
  ExpectedVersionOptions {}

/** torch.optim.SGD's options. */
export interface SgdOptions {
  lr: number;
  momentum?: number;
  dampening?: number;
  weightDecay?: number;
  nesterov?: boolean;
}

/** torch.nn.BatchNorm's arguments. */
export interface BatchNormOptions extends CreateDeleteOptions {
  /** [a-z0-9][a-z0-9_.-]{0,62}; default: the server picks one. */
  layerId?: string;
  /** Default 1e-5. */
  eps?: number;
  /** Default 0.1; null: cumulative average. */
  momentum?: number | null;
  /** Default true. */
  affine?: boolean;
  /** Default true. */
  trackRunningStats?: boolean;
  layout?: Layout;
  dtype?: DType;
  /** 1, 2, 3 for BatchNorm1d/2d/3d; 0 (default) accepts ranks 2 to 5. */
  spatialDims?: 0 | 1 | 2 | 3;
  /** '' (the server's default), 'cpu', 'cuda:N'. */
  device?: string;
}

/** torch.nn.InstanceNorm's arguments: BatchNorm's, but affine and
 * trackRunningStats default false and momentum is a number. */
export interface InstanceNormOptions
    extends Omit<BatchNormOptions, 'momentum'> {
  momentum?: number;
}

/** torch.nn.RMSNorm's arguments. */
export interface RmsNormOptions extends CreateDeleteOptions {
  layerId?: string;
  /** Unset or null: torch's eps=None. */
  eps?: number | null;
  /** Default true. */
  elementwiseAffine?: boolean;
  dtype?: DType;
  device?: string;
}

/** torch.nn.LayerNorm's arguments. */
export interface LayerNormOptions extends RmsNormOptions {
  /** With elementwiseAffine, also a bias. Default true. */
  bias?: boolean;
}

/** torch.nn.GroupNorm's arguments. */
export interface GroupNormOptions extends CreateDeleteOptions {
  layerId?: string;
  eps?: number;
  affine?: boolean;
  dtype?: DType;
  device?: string;
}

/** A sync group: BatchNorm's options plus the barrier timeout. */
export interface SyncBatchNormCreateOptions extends BatchNormOptions {
  /** Default 30000; 1 to 3600000. */
  barrierTimeoutMs?: number;
}

export interface ListLayersOptions extends CallOptions {
  /** Default 100, at most 1000. */
  pageSize?: number;
  pageToken?: string;
}

export interface ClientOptions {
  /** Default deadline of each call in ms (default 30000; 0: none). */
  timeoutMs?: number;
  /** grpc-js channel credentials (grpc.credentials.createSsl(...));
   * default insecure. */
  credentials?: ChannelCredentials;
  /** grpc-js channel options, e.g. { 'grpc.keepalive_time_ms': 10000 }. */
  channelOptions?: { [option: string]: unknown };
}

/** The part of grpc-js's ChannelCredentials this declaration relies on (so
 * that it needs no import of grpc-js's types). */
export interface ChannelCredentials {
  _isSecure(): boolean;
}

// --- Operations' options and results ----------------------------------------

export interface ForwardOptions {
  /** Batch statistics (and running-stat updates); default false (eval). */
  training?: boolean;
  /** Also return the batch mean and invstd. */
  returnStats?: boolean;
  /** Keep the context for backward (the server's default: training). */
  saveForBackward?: boolean;
}

export interface ForwardResult {
  output: OutputTensor;
  /** The saved context for backward ('0' when nothing was saved). */
  handle: string;
  mean: Float32Array;
  invstd: Float32Array;
  version: number;
}

/** A forward's handle: a uint64 as a decimal string (as forward returns it),
 * a number or a bigint. */
export type Handle = string | number | bigint;

export interface BackwardOptions {
  /** Add grad_weight/grad_bias to the layer's for optimizerStep. */
  accumulateGrad?: boolean;
  /** Keep the forward's context for another backward. */
  retainContext?: boolean;
  /** No gradInput (parameter gradients only). */
  skipGradInput?: boolean;
}

export interface BackwardResult {
  gradInput: OutputTensor | null;
  /** null without affine parameters. */
  gradWeight: Float32Array | null;
  gradBias: Float32Array | null;
  version: number;
}

export interface UpdateRunningStatsResult {
  version: number;
  numBatchesTracked: number;
}

export interface OptimizerStepOptions extends SgdOptions {
  /** Keep the accumulated gradients after the step. */
  keepGrad?: boolean;
}

export interface SetParametersOptions {
  weight?: Numbers;
  bias?: Numbers;
}

/** A state dict as getState returns it: PyTorch's keys (weight, bias,
 * running_mean, running_var, weight_momentum_buffer, bias_momentum_buffer)
 * as Float32Arrays, num_batches_tracked as a number. */
export interface StateDict {
  weight?: Float32Array;
  bias?: Float32Array;
  running_mean?: Float32Array;
  running_var?: Float32Array;
  weight_momentum_buffer?: Float32Array;
  bias_momentum_buffer?: Float32Array;
  num_batches_tracked?: number;
  [key: string]: Float32Array | number | undefined;
}

/** A state dict as loadState takes it. */
export interface StateDictInput {
  num_batches_tracked?: number | bigint;
  [key: string]: Numbers | number | bigint | undefined;
}

export interface GetStateResult {
  tensors: StateDict;
  version: number;
}

export interface LoadStateOptions {
  /** Keys the dict lacks keep their values. Default false. */
  allowMissing?: boolean;
}

/** One rank's part of a sync group's forward step. Stats mode: count, mean,
 * m2 (per channel: the slice's count, mean and sum of squared deviations).
 * Tensor mode: input (and saveForBackward, default true). */
export interface SyncForwardOptions {
  /** Default true. */
  training?: boolean;
  count?: number;
  mean?: Numbers;
  m2?: Numbers;
  input?: Tensor;
  saveForBackward?: boolean;
}

export interface SyncForwardResult {
  /** The union's count. */
  count: number;
  mean: Float32Array;
  invstd: Float32Array;
  step: number;
  version: number;
  /** The layer's parameters as the step used them; null without affine. */
  weight: Float32Array | null;
  bias: Float32Array | null;
  /** Tensor mode: this rank's output slice; else null. */
  output: OutputTensor | null;
  /** As forward's; '0' when nothing was saved. */
  handle: string;
}

/** One rank's backward part. Stats mode: sumDy, sumDyXhat (per channel,
 * over its slice). Tensor mode: handle, gradOutput, skipGradInput. With sgd
 * (the same on every rank) the server steps the parameters once per step. */
export interface SyncBackwardOptions {
  sumDy?: Numbers;
  sumDyXhat?: Numbers;
  handle?: Handle;
  gradOutput?: Tensor;
  skipGradInput?: boolean;
  accumulateGrad?: boolean;
  sgd?: SgdOptions;
  keepGrad?: boolean;
}

export interface SyncBackwardResult {
  count: number;
  sumDy: Float32Array;
  sumDyXhat: Float32Array;
  version: number;
  /** Tensor mode, unless skipped; else null. */
  gradInput: OutputTensor | null;
}

/**
 * The operations a Client (unary calls) and a TrainStream share.
 * Read: options of read-only calls; Mut: of mutating calls; Sync: of sync
 * calls (a request id, no expected version).
 */
export interface LayerOperations<Read, Mut, Sync> {
  forward(name: string, input: Tensor,
          options?: ForwardOptions & Mut): Promise<ForwardResult>;
  backward(name: string, handle: Handle, gradOutput: Tensor,
           options?: BackwardOptions & Mut): Promise<BackwardResult>;
  /** Folds externally computed batch statistics into the running ones
   * (count > 1). */
  updateRunningStats(name: string, mean: Numbers, variance: Numbers,
                     count: number,
                     options?: Mut): Promise<UpdateRunningStatsResult>;
  /** One SGD step with the accumulated gradients; resolves to the version. */
  optimizerStep(name: string,
                options: OptimizerStepOptions & Mut): Promise<number>;
  /** Sets weight and/or bias; resolves to the version. */
  setParameters(name: string,
                options: SetParametersOptions & Mut): Promise<number>;
  getState(name: string, options?: Read): Promise<GetStateResult>;
  /** Resolves to the version. */
  loadState(name: string, state: StateDictInput,
            options?: LoadStateOptions & Mut): Promise<number>;
  getLayer(name: string, options?: Read): Promise<Layer>;
  /** Resolves once every rank of the step sent its part (eval with running
   * statistics: at once). */
  syncForward(name: string, step: number, rank: number,
              options?: SyncForwardOptions & Sync): Promise<SyncForwardResult>;
  syncBackward(name: string, step: number, rank: number,
               options?: SyncBackwardOptions & Sync):
    Promise<SyncBackwardResult>;
}

// --- Client -------------------------------------------------------------------

/** The loaded normserve.v1 package (grpc-js's GrpcObject). */
export interface ApiPackage {
  readonly Normalization: new (address: string,
                               credentials: ChannelCredentials,
                               options?: { [option: string]: unknown })
    => unknown;
  readonly [name: string]: unknown;
}

/** Loads (once) and returns the normserve.v1 package from the proto. */
export declare function loadApi(): ApiPackage;

/** A connection to one server. Every call returns a Promise and rejects with
 * a NormserveError. */
export declare class Client {
  /** address: 'host:port'. */
  constructor(address: string, options?: ClientOptions);
  readonly address: string;
  /** The default deadline of each call in ms. */
  timeoutMs: number;

  /** A BatchNorm layer (torch.nn.BatchNorm's arguments). */
  createLayer(numFeatures: number,
              options?: BatchNormOptions): Promise<BatchNormLayer>;
  /** A LayerNorm layer over the trailing normalizedShape dims. */
  createLayerNorm(normalizedShape: number | readonly number[],
                  options?: LayerNormOptions): Promise<LayerNormLayer>;
  /** An RMSNorm layer (torch.nn.RMSNorm). */
  createRmsNorm(normalizedShape: number | readonly number[],
                options?: RmsNormOptions): Promise<RmsNormLayer>;
  /** A GroupNorm layer (torch.nn.GroupNorm). */
  createGroupNorm(numGroups: number, numChannels: number,
                  options?: GroupNormOptions): Promise<GroupNormLayer>;
  /** An InstanceNorm layer (torch.nn.InstanceNorm1d/2d/3d). */
  createInstanceNorm(numFeatures: number,
                     options?: InstanceNormOptions):
    Promise<InstanceNormLayer>;
  /** A sync group of worldSize ranks (see SyncBatchNorm to join it). */
  createSyncBatchNorm(numFeatures: number, worldSize: number,
                      options?: SyncBatchNormCreateOptions):
    Promise<SyncBatchNormLayer>;
  listLayers(options?: ListLayersOptions):
    Promise<{ layers: Layer[]; nextPageToken: string }>;
  deleteLayer(name: string, options?: CreateDeleteOptions): Promise<void>;
  /** Changes a sync group's world size between steps; resolves to the
   * layer's version. */
  setWorldSize(name: string, worldSize: number,
               options?: MutationOptions): Promise<number>;
  /** Opens a Train stream (the same operations, answered in order). */
  train(options?: { timeoutMs?: number }): TrainStream;
  close(): void;
}
export interface Client extends
  LayerOperations<ReadOptions, MutationOptions, CreateDeleteOptions> {}

/**
 * One Train stream: the operations as methods, each returning a Promise;
 * several may be in flight. A failed operation rejects alone and the stream
 * goes on. Request ids and expected versions work as in unary calls; no
 * retries (resend on a new stream) and no per-operation deadline (the
 * stream's, from train({ timeoutMs })).
 */
export declare class TrainStream {
  constructor(client: Client, timeoutMs?: number);
  /** Half-closes the stream; resolves once the server has answered and
   * ended. */
  end(): Promise<void>;
}
export interface TrainStream extends LayerOperations<NoOptions,
  RequestIdOptions & ExpectedVersionOptions, RequestIdOptions> {}

/** No options (a stream's reads take none). */
export interface NoOptions { [option: string]: never; }

// --- SyncBatchNorm --------------------------------------------------------------

export interface SyncBatchNormOptions {
  /** The sync group's layer id (created by the first rank to join). */
  group: string;
  rank: number;
  worldSize: number;
  numFeatures: number;
  barrierTimeoutMs?: number;
  timeoutMs?: number;
  /** 'stats' (default): statistics to the server, activations stay here;
   * 'tensor': x and dy go to the server. */
  mode?: 'stats' | 'tensor';
  /** Server-held parameters stepped once per step (the same on every
   * rank). */
  sgd?: SgdOptions | null;
}

export interface SyncBatchNormGradients {
  gradInput: Float32Array;
  /** The union's sums (identical on every rank). */
  gradWeight: Float32Array;
  gradBias: Float32Array;
}

/** One rank of a sync group (torch.nn.SyncBatchNorm for any clients), on
 * float32 NCHW data. */
export declare class SyncBatchNorm {
  constructor(client: Client, options: SyncBatchNormOptions);
  readonly client: Client;
  readonly group: string;
  readonly rank: number;
  readonly worldSize: number;
  readonly numFeatures: number;
  readonly barrierTimeoutMs: number | undefined;
  readonly timeoutMs: number | undefined;
  readonly mode: 'stats' | 'tensor';
  readonly sgd: SgdOptions | null;
  /** The next training step's number. */
  step: number;
  /** Training (default) or eval. */
  training: boolean;
  /** The group's layer, once joined. */
  layer?: Layer;
  /** Local parameters (the server's with sgd), once joined. */
  weight: Float32Array;
  bias: Float32Array;
  /** Creates the layer, or attaches to it when another rank did. */
  join(): Promise<this>;
  /** x of shape [N, C, ...] (N may be 0); resolves to the output. */
  forward(x: Float32Array, shape: readonly number[]): Promise<Float32Array>;
  /** dy of the last forward's shape. */
  backward(dy: Float32Array): Promise<SyncBatchNormGradients>;
}
