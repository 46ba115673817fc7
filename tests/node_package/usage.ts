// A TypeScript program over the installed normserve-client package: it must
// compile with `tsc --strict` against index.d.ts (test_node_package.py, with
// no Node types: the declarations are self-contained), and its compiled
// JavaScript runs against a real server and prints one JSON line. Each
// `@ts-expect-error` line is a mistake the declarations must catch (tsc
// fails when one compiles).
//
// usage: node usage.js HOST:PORT
import {
  Client, NormserveError, SyncBatchNorm, TrainStream, newRequestId, status,
  tensor,
} from 'normserve-client';
import type {
  BackwardResult, ForwardResult, Layer, OutputTensor, StateDict,
  StatusName,
} from 'normserve-client';

// The bits of Node this program uses (no @types/node here).
declare const console: { log(...args: unknown[]): void;
                         error(...args: unknown[]): void };
declare const process: { argv: string[]; exitCode?: number };

function describe(layer: Layer): string {
  switch (layer.kind) {
    case 'batch_norm':
    case 'instance_norm':
    case 'sync_batch_norm':
      return `${layer.kind}:${layer.numFeatures}`;
    case 'layer_norm':
    case 'rms_norm':
      return `${layer.kind}:${layer.normalizedShape.join('x')}`;
    case 'group_norm':
      return `${layer.kind}:${layer.numGroups}/${layer.numChannels}`;
  }
}

function mean(t: OutputTensor): number {
  let sum = 0;
  for (let i = 0; i < t.data.length; ++i) sum += t.data[i];
  return sum / t.data.length;
}

async function main(address: string): Promise<Record<string, unknown>> {
  const client = new Client(address, { timeoutMs: 20000 });
  const out: Record<string, unknown> = {};
  const shape = [4, 3, 2, 2];
  const count = shape.reduce((a, b) => a * b, 1);
  const x = Float32Array.from({ length: count }, (_, i) => (i % 7) - 3);
  const dy = new Float32Array(count).fill(0.5);

  const bn = await client.createLayer(3, {
    layerId: `ts-bn-${newRequestId().slice(0, 8)}`, momentum: null,
    spatialDims: 2, requestId: newRequestId(), retries: 2 });
  const momentum: number | null = bn.momentum;
  out.bnMomentum = momentum;
  const fwd: ForwardResult = await client.forward(
    bn.name, tensor(shape, x), { training: true, returnStats: true });
  out.forwardMean = Math.abs(mean(fwd.output)) < 1e-5;
  out.statsLength = fwd.mean.length;
  const bwd: BackwardResult = await client.backward(
    bn.name, fwd.handle, tensor(shape, dy),
    { accumulateGrad: true, expectedVersion: fwd.version });
  out.gradBias = bwd.gradBias ? Array.from(bwd.gradBias) : null;
  const stepped: number = await client.optimizerStep(
    bn.name, { lr: 0.1, momentum: 0.9, retries: 1 });
  out.steppedVersion = stepped;

  const state = await client.getState(bn.name);
  const tensors: StateDict = state.tensors;
  out.numBatchesTracked = tensors.num_batches_tracked;
  out.stateKeys = Object.keys(tensors).sort();
  await client.loadState(bn.name, tensors, { allowMissing: false });
  await client.setParameters(bn.name, { weight: [1, 2, 3], bias: [0, 0, 0] });
  const running = await client.updateRunningStats(
    bn.name, [0, 0, 0], [1, 1, 1], 8);
  out.afterRunning = running.numBatchesTracked;

  // The same calls over a Train stream; an output goes back in as an input.
  const stream: TrainStream = client.train({ timeoutMs: 20000 });
  const f2 = await stream.forward(bn.name, fwd.output, { training: true });
  const b2 = await stream.backward(bn.name, f2.handle, tensor(shape, dy));
  out.streamGradInput = b2.gradInput !== null && b2.gradInput.dtype;
  await stream.end();

  // The other kinds, narrowed on kind.
  const ln = await client.createLayerNorm([2, 2], { bias: false });
  const rms = await client.createRmsNorm(4, { eps: null });
  const gn = await client.createGroupNorm(1, 3, { affine: true });
  const inorm = await client.createInstanceNorm(3, { momentum: 0.2 });
  const fetched: Layer = await client.getLayer(rms.name);
  out.kinds = [bn, ln, rms, gn, inorm].map(describe);
  out.rmsEps = fetched.kind === 'rms_norm' ? fetched.eps : 'not rms';
  const half = tensor([1, 4], new Uint16Array([0x3c00, 0x4000, 0x4200, 0x4400]),
                      { dtype: 'float16' });
  const hf = await client.forward(rms.name, half);
  out.halfOutput = hf.output.dtype;

  // A sync group of one rank, in stats mode.
  const group = `ts-sync-${newRequestId().slice(0, 8)}`;
  const rank = await new SyncBatchNorm(client, {
    group, rank: 0, worldSize: 1, numFeatures: 3, mode: 'stats' }).join();
  const y: Float32Array = await rank.forward(x, shape);
  const grads = await rank.backward(dy);
  out.syncOutput = y.length === count && grads.gradInput.length === count;
  const groupName = rank.layer ? rank.layer.name : `layers/${group}`;
  out.worldSizeVersion = await client.setWorldSize(groupName, 1) > 0;

  // Errors carry a status code the declarations know.
  try {
    await client.getLayer('layers/does-not-exist');
    out.error = 'none';
  } catch (err) {
    if (err instanceof NormserveError && err.code === status.NOT_FOUND) {
      const name: StatusName = err.codeName;
      out.error = name;
    } else {
      throw err;
    }
  }

  const listed = await client.listLayers({ pageSize: 100 });
  out.listed = listed.layers.length;
  for (const layer of [bn, ln, rms, gn, inorm]) {
    await client.deleteLayer(layer.name, { retries: 1 });
  }
  await client.deleteLayer(groupName);
  client.close();
  return out;
}

// Mistakes the declarations catch; never called.
async function mistakes(client: Client, stream: TrainStream): Promise<void> {
  // @ts-expect-error numFeatures is a number
  await client.createLayer('4');
  // @ts-expect-error spatialDims is 0, 1, 2 or 3
  await client.createLayer(4, { spatialDims: 4 });
  // @ts-expect-error no such option
  await client.createLayer(4, { momentun: 0.1 });
  // @ts-expect-error create takes no expectedVersion
  await client.createGroupNorm(2, 4, { expectedVersion: 3 });
  // @ts-expect-error the layout is NCHW or NHWC
  tensor([1, 4], new Float32Array(4), { layout: 'CHWN' });
  // @ts-expect-error float16 data is a Uint16Array of raw bits
  tensor([1, 4], new Float32Array(4), { dtype: 'float16' });
  // @ts-expect-error a tensor, not a bare array
  await client.forward('layers/x', new Float32Array(4));
  // @ts-expect-error optimizerStep needs the learning rate
  await client.optimizerStep('layers/x', { momentum: 0.9 });
  // @ts-expect-error a Train stream has no retries
  await stream.forward('layers/x', tensor([1], new Float32Array(1)), { retries: 2 });
  // @ts-expect-error reads change nothing: no request id
  await client.getState('layers/x', { requestId: 'r1' });
  // @ts-expect-error sync calls take no expectedVersion
  await client.syncForward('layers/g', 0, 0, { expectedVersion: 1 });
  const fwd = await client.forward('layers/x', tensor([1], new Float32Array(1)));
  // @ts-expect-error the output is a tensor, its data a typed array
  const n: number = fwd.output;
  // @ts-expect-error forward resolves to a result, not a number
  const v: number = await client.forward('layers/x', tensor([1], new Float32Array(1)));
  // @ts-expect-error gradWeight may be null (no affine)
  const g: Float32Array = (await client.backward('layers/x', fwd.handle, fwd.output)).gradWeight;
  const layer = await client.getLayer('layers/x');
  // @ts-expect-error only BatchNorm-like layers have numFeatures
  const c: number = layer.numFeatures;
  // @ts-expect-error codeName is a status name
  const s: StatusName = 'NOT_A_STATUS';
  // @ts-expect-error SyncBatchNorm needs group, rank, worldSize, numFeatures
  new SyncBatchNorm(client, { group: 'g', rank: 0 });
  // @ts-expect-error deleteLayer resolves to nothing
  const d: number = await client.deleteLayer('layers/x');
  void [n, v, g, c, s, d];
}
void mistakes;

main(process.argv[2]).then(
  (out) => console.log(JSON.stringify(out)),
  (err: unknown) => {
    console.error(`error: ${err instanceof Error ? err.message : err}`);
    process.exitCode = 1;
  });
