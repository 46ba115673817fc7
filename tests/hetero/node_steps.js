// One training step on a shared normserve layer from the Node client, for
// test_hetero.py: training Forward of a raw float32 NCHW input, Backward
// with accumulate_grad, and a server-side SGD step; writes the output and
// grad_input as raw float32 and prints a JSON summary.
//
// usage: node node_steps.js CLIENT_DIR --address=A --layer=L --shape=N,C,H,W
//          --input=X.bin --grad=G.bin --output=Y.bin --grad_input=DX.bin
//          --lr=LR --momentum=M
'use strict';

const fs = require('fs');
const path = require('path');

const clientDir = path.resolve(process.argv[2]);
const { Client, tensor } = require(clientDir);

function flag(name) {
  const prefix = `--${name}=`;
  const arg = process.argv.slice(3).find((a) => a.startsWith(prefix));
  if (!arg) throw new Error(`missing --${name}`);
  return arg.slice(prefix.length);
}

async function main() {
  const client = new Client(flag('address'), { timeoutMs: 30000 });
  const layer = flag('layer');
  const shape = flag('shape').split(',').map(Number);
  const x = tensor(shape, fs.readFileSync(flag('input')));
  const dy = tensor(shape, fs.readFileSync(flag('grad')));
  const fwd = await client.forward(layer, x, { training: true });
  const bwd = await client.backward(layer, fwd.handle, dy,
                                    { accumulateGrad: true });
  const version = await client.optimizerStep(layer, {
    lr: Number(flag('lr')), momentum: Number(flag('momentum')) });
  fs.writeFileSync(flag('output'), Buffer.from(fwd.output.data.buffer,
                                               fwd.output.data.byteOffset,
                                               fwd.output.data.byteLength));
  const gi = bwd.gradInput.data;
  fs.writeFileSync(flag('grad_input'),
                   Buffer.from(gi.buffer, gi.byteOffset, gi.byteLength));
  const info = await client.getLayer(layer);
  console.log(JSON.stringify({
    handle: fwd.handle, version, outputShape: fwd.output.shape,
    outputDtype: fwd.output.dtype, numBatchesTracked: info.numBatchesTracked,
  }));
  client.close();
}

main().catch((err) => {
  console.error(`error: ${err.message}`);
  process.exit(1);
});
