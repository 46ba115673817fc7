#!/usr/bin/env node
// Example normserve client: creates a BatchNorm2d layer, trains it for a few
// steps (forward, backward, server-side SGD step) over a Train stream, runs
// an eval forward, prints the layer's state and deletes the layer.
//
// usage: node example.js [--address=HOST:PORT] [--steps=N]
//   (default address: $NORMSERVE_ADDRESS or 127.0.0.1:50051)
'use strict';

const { Client, tensor } = require('./index');

function flag(name, fallback) {
  const prefix = `--${name}=`;
  const arg = process.argv.slice(2).find((a) => a.startsWith(prefix));
  return arg ? arg.slice(prefix.length) : fallback;
}

// Deterministic standard normal values (xorshift32 and Box-Muller).
function randomNormal(count, seed) {
  let state = seed >>> 0 || 1;
  const uniform = () => {
    state ^= state << 13; state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5; state >>>= 0;
    return (state + 1) / 4294967297;
  };
  const out = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const r = Math.sqrt(-2 * Math.log(uniform()));
    const a = 2 * Math.PI * uniform();
    out[i] = r * Math.cos(a);
    if (i + 1 < count) out[i + 1] = r * Math.sin(a);
  }
  return out;
}

// Per-channel mean and standard deviation of an NCHW float32 tensor.
function channelStats(t) {
  const [n, c] = t.shape;
  const inner = t.shape.slice(2).reduce((a, b) => a * b, 1);
  const stats = [];
  for (let ch = 0; ch < c; ++ch) {
    let sum = 0;
    let sq = 0;
    for (let i = 0; i < n; ++i) {
      for (let j = 0; j < inner; ++j) {
        const v = t.data[(i * c + ch) * inner + j];
        sum += v;
        sq += v * v;
      }
    }
    const count = n * inner;
    const mean = sum / count;
    stats.push({ mean, std: Math.sqrt(Math.max(sq / count - mean * mean, 0)) });
  }
  return stats;
}

const fmt = (values) => `[${Array.from(values, (v) => v.toFixed(4)).join(', ')}]`;

async function main() {
  const address = flag('address',
                       process.env.NORMSERVE_ADDRESS || '127.0.0.1:50051');
  const steps = Number(flag('steps', '3'));
  const client = new Client(address, { timeoutMs: 20000 });
  const shape = [8, 4, 5, 5];
  const count = shape.reduce((a, b) => a * b, 1);

  const layer = await client.createLayer(4, {
    layerId: `node-example-${process.pid}`, momentum: 0.1, spatialDims: 2 });
  console.log(`created ${layer.name} (num_features=${layer.numFeatures}, ` +
              `momentum=${layer.momentum})`);
  try {
    const stream = client.train();
    for (let step = 1; step <= steps; ++step) {
      const x = randomNormal(count, step);
      for (let i = 0; i < count; ++i) x[i] = 2 * x[i] + 1;  // mean 1, std 2
      const fwd = await stream.forward(layer.name, tensor(shape, x),
                                       { training: true });
      const dy = randomNormal(count, 100 + step);
      const bwd = await stream.backward(layer.name, fwd.handle,
                                        tensor(shape, dy),
                                        { accumulateGrad: true });
      await stream.optimizerStep(layer.name, { lr: 0.01, momentum: 0.9 });
      const stats = channelStats(fwd.output);
      console.log(`step ${step}/${steps}: output mean ` +
                  fmt(stats.map((s) => s.mean)) + ' std ' +
                  fmt(stats.map((s) => s.std)));
      console.log(`  grad_weight=${fmt(bwd.gradWeight)} ` +
                  `grad_bias=${fmt(bwd.gradBias)}`);
    }
    await stream.end();

    const x = randomNormal(count, 999);
    const ev = await client.forward(layer.name, tensor(shape, x),
                                    { saveForBackward: false });
    const stats = channelStats(ev.output);
    console.log('eval forward (running statistics): output mean ' +
                fmt(stats.map((s) => s.mean)));
    const state = await client.getState(layer.name);
    for (const key of Object.keys(state.tensors).sort()) {
      const value = state.tensors[key];
      console.log(`  ${key} = ${typeof value === 'number' ? value : fmt(value)}`);
    }
  } finally {
    await client.deleteLayer(layer.name);
    console.log(`deleted ${layer.name}`);
    client.close();
  }
}

main().catch((err) => {
  console.error(`error: ${err.message}`);
  process.exit(1);
});
