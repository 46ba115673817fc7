"""Heterogeneous clients sharing one server layer.

The C++ client (normserve-cli), the Python client and the Node client
(tests/hetero/node_steps.js over client/node) take turns on one layer:
C++ runs training forwards (NHWC), Python and Node run forward, backward with
accumulate_grad and a server-side SGD step (NCHW). A single Python client
then does the same steps on a fresh layer. The two layers' states (running
statistics, num_batches_tracked, weight, bias, SGD momentum buffers) and
every output must be identical, and both must match torch.

Also runs the Node example client (client/node/example.js).

Needs: NORMSERVE_CLI (normserve-cli), node (NORMSERVE_NODE) and the Node
client's packages (`npm ci` in client/node, done by scripts/install-deps.sh).
"""

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from normserve_pytest import REPO, tool

SHAPE = (8, 4, 5, 5)
LR, MOMENTUM = 0.05, 0.9
# Who runs each step: the C++ CLI (forward only), Python, Node.
SEQUENCE = ["cpp", "python", "node", "cpp", "python", "node", "node",
            "python", "cpp"]


@pytest.fixture(scope="module")
def node():
    binary = tool("NORMSERVE_NODE", "node")
    client_dir = os.environ.get("NORMSERVE_NODE_CLIENT",
                                os.path.join(REPO, "client", "node"))
    for package in ("@grpc/grpc-js", "@grpc/proto-loader"):
        if not os.path.isdir(os.path.join(client_dir, "node_modules",
                                          package)):
            pytest.fail(f"{package} is not installed in {client_dir}; run "
                        "scripts/install-deps.sh (npm ci there)")
    return binary, client_dir


@pytest.fixture(scope="module")
def cli():
    return tool("NORMSERVE_CLI", os.path.join(REPO, "build", "bin",
                                              "normserve-cli"))


def run(args, timeout=60):
    result = subprocess.run(args, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result.stdout


def batches(count):
    rng = np.random.default_rng(11)
    per = np.arange(SHAPE[1], dtype=np.float32).reshape(1, -1, 1, 1)
    xs = [(0.5 * per - 1 + (1 + 0.5 * per) * rng.standard_normal(SHAPE))
          .astype(np.float32) for _ in range(count)]
    gs = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(count)]
    return xs, gs


def nhwc_view(nhwc_bytes):
    memory = np.frombuffer(nhwc_bytes, np.float32).reshape(
        SHAPE[0], SHAPE[2], SHAPE[3], SHAPE[1])
    return np.moveaxis(memory, -1, 1)


def test_clients_share_one_layer(server, client, cli, node, tmp_path):
    node_binary, node_dir = node
    xs, gs = batches(len(SEQUENCE))
    shared = client.create_layer(SHAPE[1], layer_id="hetero-shared",
                                 momentum=0.1, spatial_dims=2).name
    single = client.create_layer(SHAPE[1], layer_id="hetero-single",
                                 momentum=0.1, spatial_dims=2).name
    step_kwargs = dict(lr=LR, momentum=MOMENTUM)
    for step, (who, x, g) in enumerate(zip(SEQUENCE, xs, gs)):
        x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        # The single client: the same operation, the same layout.
        if who == "cpp":
            want = client.forward(single, np.moveaxis(x_nhwc, -1, 1),
                                  training=True, save_for_backward=False)
            want_dx = None
        else:
            want = client.forward(single, x, training=True)
            want_dx = client.backward(single, want.handle, g,
                                      accumulate_grad=True).grad_input
            client.optimizer_step(single, **step_kwargs)

        out = tmp_path / f"y{step}.bin"
        if who == "cpp":
            path = tmp_path / f"x{step}.bin"
            path.write_bytes(x_nhwc.tobytes())
            text = run([cli, f"--address={server.address}", "forward",
                        "hetero-shared", "--shape=" + ",".join(map(str, SHAPE)),
                        f"--input={path}", "--layout=nhwc", "--training",
                        f"--output={out}"])
            assert "mode: training" in text
            got = nhwc_view(out.read_bytes())
            got_dx = None
        elif who == "python":
            fwd = client.forward(shared, x, training=True)
            got = fwd.output
            got_dx = client.backward(shared, fwd.handle, g,
                                     accumulate_grad=True).grad_input
            client.optimizer_step(shared, **step_kwargs)
        else:
            paths = {k: tmp_path / f"{k}{step}.bin" for k in ("x", "g", "dx")}
            paths["x"].write_bytes(x.tobytes())
            paths["g"].write_bytes(g.tobytes())
            text = run([node_binary, os.path.join(os.path.dirname(__file__),
                                                  "node_steps.js"), node_dir,
                        f"--address={server.address}", "--layer=hetero-shared",
                        "--shape=" + ",".join(map(str, SHAPE)),
                        f"--input={paths['x']}", f"--grad={paths['g']}",
                        f"--output={out}", f"--grad_input={paths['dx']}",
                        f"--lr={LR}", f"--momentum={MOMENTUM}"])
            summary = json.loads(text)
            assert summary["outputShape"] == list(SHAPE)
            assert summary["outputDtype"] == "float32"
            assert summary["numBatchesTracked"] == step + 1
            got = np.frombuffer(out.read_bytes(), np.float32).reshape(SHAPE)
            got_dx = np.frombuffer(paths["dx"].read_bytes(),
                                   np.float32).reshape(SHAPE)
        np.testing.assert_array_equal(got, want.output,
                                      err_msg=f"step {step} ({who}) output")
        if want_dx is not None:
            np.testing.assert_array_equal(got_dx, want_dx,
                                          err_msg=f"step {step} grad_input")

    shared_state = client.get_state(shared)
    single_state = client.get_state(single)
    assert sorted(shared_state) == sorted(single_state) == [
        "bias", "bias_momentum_buffer", "num_batches_tracked", "running_mean",
        "running_var", "weight", "weight_momentum_buffer"]
    for key in single_state:
        np.testing.assert_array_equal(shared_state[key], single_state[key],
                                      err_msg=key)
    assert int(shared_state["num_batches_tracked"]) == len(SEQUENCE)

    # And both equal torch doing the same steps.
    ref = torch.nn.BatchNorm2d(SHAPE[1], momentum=0.1)
    opt = torch.optim.SGD(ref.parameters(), **step_kwargs)
    for who, x, g in zip(SEQUENCE, xs, gs):
        y = ref(torch.from_numpy(x))
        if who != "cpp":
            y.backward(torch.from_numpy(g))
            opt.step()
            opt.zero_grad()
    for key, value in ref.state_dict().items():
        np.testing.assert_allclose(shared_state[key], value.numpy(),
                                   rtol=1e-5, atol=1e-5, err_msg=key)
    for name in (shared, single):
        client.delete_layer(name)


def test_node_example(server, client, node):
    node_binary, node_dir = node
    text = run([node_binary, os.path.join(node_dir, "example.js"),
                f"--address={server.address}", "--steps=3"])
    for line in ("created layers/node-example-", "step 1/3: output mean",
                 "step 3/3", "grad_weight=", "eval forward",
                 "num_batches_tracked = 3", "deleted layers/node-example-"):
        assert line in text, text
    # Training output is normalized in the first step.
    first = text.split("step 1/3: output mean ")[1].split("\n")[0]
    means = [float(v) for v in first.split("]")[0].strip("[").split(",")]
    assert max(abs(m) for m in means) < 1e-3
    assert not [l for l in client.all_layers()
                if l.name.startswith("layers/node-example-")]


def test_node_client_errors(server, node, tmp_path):
    node_binary, node_dir = node
    script = tmp_path / "errors.js"
    script.write_text(f"""
const {{ Client, tensor, status }} = require({json.dumps(node_dir)});
(async () => {{
  const out = {{}};
  const c = new Client({json.dumps(server.address)}, {{ timeoutMs: 10000 }});
  try {{ await c.getLayer('no-such-layer'); }}
  catch (e) {{ out.notFound = [e.code === status.NOT_FOUND, e.codeName, e.details]; }}
  const layer = await c.createLayer(3);
  try {{ await c.forward(layer.name, tensor([2, 4], new Float32Array(8))); }}
  catch (e) {{ out.shape = [e.codeName, e.details]; }}
  const s = c.train();
  try {{ await s.getLayer('gone'); }} catch (e) {{ out.stream = e.codeName; }}
  out.after = (await s.getLayer(layer.name)).numFeatures;
  await s.end();
  await c.deleteLayer(layer.name);
  const dead = new Client('127.0.0.1:1', {{ timeoutMs: 5000 }});
  try {{ await dead.getLayer('x'); }} catch (e) {{ out.dead = e.codeName; }}
  console.log(JSON.stringify(out));
  c.close(); dead.close();
}})().catch((e) => {{ console.error(e); process.exit(1); }});
""")
    out = json.loads(run([node_binary, str(script)]))
    assert out["notFound"][:2] == [True, "NOT_FOUND"]
    assert "no-such-layer" in out["notFound"][2]
    assert out["shape"][0] == "INVALID_ARGUMENT"
    assert "input has 4 channels" in out["shape"][1]
    assert out["stream"] == "NOT_FOUND" and out["after"] == 3
    assert out["dead"] == "UNAVAILABLE"


def test_node_request_ids(server, node, tmp_path):
    """Request ids, expected versions and retries through the Node client."""
    node_binary, node_dir = node
    script = tmp_path / "ids.js"
    script.write_text(f"""
const {{ Client, newRequestId }} = require({json.dumps(node_dir)});
(async () => {{
  const out = {{}};
  const c = new Client({json.dumps(server.address)}, {{ timeoutMs: 10000 }});
  const createId = newRequestId();
  const a = await c.createLayer(3, {{ requestId: createId }});
  const b = await c.createLayer(3, {{ requestId: createId }});
  out.create = [a.name, b.name, createId.length];
  const name = a.name;
  out.set1 = await c.setParameters(name, {{ weight: [1, 2, 3],
                                            bias: [0, 0, 0],
                                            requestId: 'set-1' }});
  out.set1Retry = await c.setParameters(name, {{ weight: [4, 5, 6],
                                                 bias: [1, 1, 1],
                                                 requestId: 'set-1' }});
  out.weight = Array.from((await c.getState(name)).tensors.weight);
  try {{
    await c.setParameters(name, {{ weight: [7, 7, 7],
                                   expectedVersion: out.set1 - 1 }});
  }} catch (e) {{ out.stale = [e.codeName, e.details]; }}
  out.match = await c.setParameters(name, {{ weight: [7, 7, 7],
                                             bias: [0, 0, 0],
                                             expectedVersion: out.set1 }});
  const s = c.train();
  const u1 = await s.updateRunningStats(name, [0, 0, 0], [1, 1, 1], 4,
                                        {{ requestId: 'urs-1' }});
  const u2 = await s.updateRunningStats(name, [5, 5, 5], [2, 2, 2], 4,
                                        {{ requestId: 'urs-1' }});
  try {{ await s.getLayer(name, {{ retries: 1 }}); }}
  catch (e) {{ out.streamRetries = e instanceof TypeError; }}
  await s.end();
  out.stream = [u1.version, u2.version, u1.numBatchesTracked,
                u2.numBatchesTracked];
  out.runningMean = Array.from((await c.getState(name)).tensors.running_mean);
  out.retried = await c.setParameters(name, {{ weight: [1, 1, 1],
                                               bias: [0, 0, 0], retries: 2 }});
  try {{ await c.getLayer(name, {{ requestId: 'x' }}); }}
  catch (e) {{ out.readId = e instanceof TypeError; }}
  try {{ await c.deleteLayer(name, {{ expectedVersion: 1 }}); }}
  catch (e) {{ out.deleteVersion = e instanceof TypeError; }}
  const deleteId = newRequestId();
  await c.deleteLayer(name, {{ requestId: deleteId }});
  await c.deleteLayer(name, {{ requestId: deleteId }});
  try {{ await c.getLayer(name); }} catch (e) {{ out.gone = e.codeName; }}
  console.log(JSON.stringify(out));
  c.close();
}})().catch((e) => {{ console.error(e); process.exit(1); }});
""")
    out = json.loads(run([node_binary, str(script)]))
    # A retried create returns the layer the first attempt made.
    assert out["create"][0] == out["create"][1]
    assert out["create"][2] == 32
    # A retry returns the first result and changes nothing.
    assert out["set1Retry"] == out["set1"]
    assert out["weight"] == [1, 2, 3]
    assert out["stale"][0] == "FAILED_PRECONDITION"
    assert f"at version {out['set1']}" in out["stale"][1]
    assert f"expected version {out['set1'] - 1}" in out["stale"][1]
    assert out["match"] == out["set1"] + 1
    # On the stream too: the retry's answer is the first one, applied once.
    assert out["stream"][0] == out["stream"][1]
    assert out["stream"][2] == out["stream"][3] == 1
    assert out["runningMean"] == [0, 0, 0]
    assert out["streamRetries"] is True
    assert out["retried"] == out["stream"][0] + 1
    assert out["readId"] is True and out["deleteVersion"] is True
    assert out["gone"] == "NOT_FOUND"


def test_node_layer_norm_and_rms_norm(server, client, node, tmp_path):
    """Node creates LayerNorm and RMSNorm layers and runs them; the results
    match torch.nn.functional.layer_norm and RMSNorm's formula, and the
    Python client sees the layers Node made."""
    node_binary, node_dir = node
    script = tmp_path / "row_norm.js"
    script.write_text(f"""
const {{ Client, tensor }} = require({json.dumps(node_dir)});
(async () => {{
  const c = new Client({json.dumps(server.address)}, {{ timeoutMs: 10000 }});
  const ln = await c.createLayerNorm([2, 3], {{ layerId: 'node-ln' }});
  const rms = await c.createRmsNorm(6, {{ layerId: 'node-rms' }});
  const data = Float32Array.from({{ length: 24 }}, (_, i) => (i * 7) % 11 - 5);
  const x = tensor([4, 2, 3], data);
  const y = await c.forward(ln.name, x, {{ training: true }});
  const r = await c.forward(rms.name, tensor([4, 6], data));
  const bwd = await c.backward(ln.name, y.handle,
                               tensor([4, 2, 3], new Float32Array(24).fill(1)));
  console.log(JSON.stringify({{
    ln, rms, y: Array.from(y.output.data), r: Array.from(r.output.data),
    gw: Array.from(bwd.gradWeight || []), gb: Array.from(bwd.gradBias || []),
  }}));
  c.close();
}})().catch((e) => {{ console.error(e); process.exit(1); }});
""")
    out = json.loads(run([node_binary, str(script)]))
    try:
        assert out["ln"]["kind"] == "layer_norm"
        assert out["ln"]["normalizedShape"] == [2, 3] and out["ln"]["bias"]
        assert out["rms"]["kind"] == "rms_norm" and out["rms"]["eps"] is None
        x = torch.tensor([(i * 7) % 11 - 5 for i in range(24)],
                         dtype=torch.float64)
        want = torch.nn.functional.layer_norm(x.reshape(4, 2, 3), (2, 3))
        np.testing.assert_allclose(out["y"], want.reshape(-1), atol=1e-5)
        x6 = x.reshape(4, 6)
        eps = float(np.finfo(np.float32).eps)
        want = x6 * torch.rsqrt(x6.pow(2).mean(-1, keepdim=True) + eps)
        np.testing.assert_allclose(out["r"], want.reshape(-1), atol=1e-5)
        xhat = torch.nn.functional.layer_norm(x.reshape(4, 2, 3), (2, 3))
        np.testing.assert_allclose(out["gw"], xhat.sum(0).reshape(-1),
                                   atol=1e-4)
        np.testing.assert_allclose(out["gb"], [4.0] * 6)
        info = client.get_layer("node-ln")
        assert info.kind == "layer_norm" and info.normalized_shape == (2, 3)
    finally:
        for name in ("node-ln", "node-rms"):
            client.delete_layer(name)


def test_node_group_norm_and_instance_norm(server, client, node, tmp_path):
    """Node creates GroupNorm and tracked InstanceNorm layers and trains a
    step; the results match torch.nn.functional.group_norm/instance_norm,
    and the Python client sees the running statistics Node's step moved."""
    node_binary, node_dir = node
    script = tmp_path / "group_instance.js"
    script.write_text(f"""
const {{ Client, tensor }} = require({json.dumps(node_dir)});
(async () => {{
  const c = new Client({json.dumps(server.address)}, {{ timeoutMs: 10000 }});
  const gn = await c.createGroupNorm(2, 4, {{ layerId: 'node-gn' }});
  const inst = await c.createInstanceNorm(4, {{
    layerId: 'node-in', trackRunningStats: true, spatialDims: 1 }});
  const data = Float32Array.from({{ length: 24 }}, (_, i) => (i * 7) % 11 - 5);
  const y = await c.forward(gn.name, tensor([2, 4, 3], data),
                            {{ training: true }});
  const bwd = await c.backward(gn.name, y.handle,
                               tensor([2, 4, 3], new Float32Array(24).fill(1)));
  const z = await c.forward(inst.name, tensor([2, 4, 3], data),
                            {{ training: true }});
  console.log(JSON.stringify({{
    gn, inst, y: Array.from(y.output.data), z: Array.from(z.output.data),
    gb: Array.from(bwd.gradBias || []),
  }}));
  c.close();
}})().catch((e) => {{ console.error(e); process.exit(1); }});
""")
    out = json.loads(run([node_binary, str(script)]))
    try:
        assert out["gn"]["kind"] == "group_norm"
        assert (out["gn"]["numGroups"], out["gn"]["numChannels"]) == (2, 4)
        assert out["inst"]["kind"] == "instance_norm"
        assert out["inst"]["trackRunningStats"] and not out["inst"]["affine"]
        x = torch.tensor([(i * 7) % 11 - 5 for i in range(24)],
                         dtype=torch.float64).reshape(2, 4, 3)
        want = torch.nn.functional.group_norm(x, 2)
        np.testing.assert_allclose(out["y"], want.reshape(-1), atol=1e-5)
        np.testing.assert_allclose(out["gb"], [6.0] * 4)
        rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(
            4, dtype=torch.float64)
        want = torch.nn.functional.instance_norm(x, rm, rv, use_input_stats=True)
        np.testing.assert_allclose(out["z"], want.reshape(-1), atol=1e-5)
        state = client.get_state("node-in")
        np.testing.assert_allclose(state["running_var"], rv, rtol=1e-6)
        assert int(state["num_batches_tracked"]) == 0
    finally:
        for name in ("node-gn", "node-in"):
            client.delete_layer(name)


@pytest.mark.parametrize("cpp_mode", ["stats", "tensor"])
def test_one_sync_group_of_cpp_python_and_node_ranks(server, client, node,
                                                     tmp_path, cpp_mode):
    """A C++ rank (RemoteSyncBatchNorm in normserve-sync-rank, stats or
    tensor mode), a Python rank (normserve.torch.SyncBatchNorm) and a Node
    rank (SyncBatchNorm of the Node client), as processes with slices of 2,
    3 and 1 samples, train one sync group for 3 steps: every rank's output,
    grad_input and grad_weight equal one torch.nn.BatchNorm2d's over the
    concatenated batch."""
    import torch
    import normserve.torch as nst
    sync_rank = tool("NORMSERVE_SYNC_RANK",
                     os.path.join(REPO, "build", "bin", "normserve-sync-rank"))
    node_binary, node_dir = node
    c, s, steps, group = 3, 20, 3, f"hetero-sync-{cpp_mode}"
    sizes = {"cpp": 2, "python": 3, "node": 1}
    rng = np.random.default_rng(5)
    data = {who: [(rng.standard_normal((n, c, s)).astype(np.float32) * 2 + 1,
                   rng.standard_normal((n, c, s)).astype(np.float32))
                  for _ in range(steps)] for who, n in sizes.items()}
    for who in ("cpp", "node"):
        with open(tmp_path / f"{who}.in", "wb") as f:
            for x, dy in data[who]:
                f.write(x.tobytes() + dy.tobytes())
    script = tmp_path / "sync_rank.js"
    script.write_text(f"""
const fs = require('fs');
const {{ Client, SyncBatchNorm }} = require({json.dumps(node_dir)});
(async () => {{
  const c = new Client({json.dumps(server.address)}, {{ timeoutMs: 60000 }});
  const bn = await new SyncBatchNorm(c, {{ group: '{group}', rank: 2,
                                           worldSize: 3, numFeatures: {c} }})
    .join();
  const input = fs.readFileSync({json.dumps(str(tmp_path / "node.in"))});
  const all = new Float32Array(input.buffer, input.byteOffset,
                               input.length / 4);
  const numel = {sizes["node"] * c * s};
  const out = [];
  for (let step = 0; step < {steps}; ++step) {{
    const x = all.slice(2 * step * numel, (2 * step + 1) * numel);
    const dy = all.slice((2 * step + 1) * numel, (2 * step + 2) * numel);
    const y = await bn.forward(x, [{sizes["node"]}, {c}, {s}]);
    const g = await bn.backward(dy);
    out.push(Array.from(y), Array.from(g.gradInput),
             Array.from(g.gradWeight));
  }}
  console.log(JSON.stringify(out));
  c.close();
}})().catch((e) => {{ console.error(e); process.exit(1); }});
""")
    procs = {
        "cpp": subprocess.Popen(
            [sync_rank, server.address, group, "0", "3", str(c),
             str(sizes["cpp"]), str(s), str(steps),
             str(tmp_path / "cpp.in"), str(tmp_path / "cpp.out"), cpp_mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "node": subprocess.Popen([node_binary, str(script)],
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True),
    }
    try:
        bn = nst.SyncBatchNorm(c, client=client, group=group, rank=1,
                               world_size=3, barrier_timeout=30)
        ours = {"python": []}
        for x, dy in data["python"]:
            xt = torch.from_numpy(x).reshape(-1, c, 4, 5).requires_grad_(True)
            y = bn(xt)
            y.backward(torch.from_numpy(dy).reshape(xt.shape))
            ours["python"] += [y.detach().reshape(-1).numpy(),
                               xt.grad.reshape(-1).numpy(),
                               bn.weight.grad.numpy().copy()]
            bn.weight.grad = None
        for who, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"{who}: {stderr}"
            if who == "node":
                ours["node"] = [np.asarray(v, np.float32)
                                for v in json.loads(stdout)]
        raw = np.fromfile(tmp_path / "cpp.out", dtype=np.float32)
        numel = sizes["cpp"] * c * s
        per_step = 2 * numel + c
        ours["cpp"] = []
        for step in range(steps):
            chunk = raw[step * per_step:(step + 1) * per_step]
            ours["cpp"] += [chunk[:numel], chunk[numel:2 * numel],
                            chunk[2 * numel:]]
        ref = torch.nn.BatchNorm1d(c).double()
        order = ["cpp", "python", "node"]  # Ranks 0, 1, 2.
        for step in range(steps):
            x = torch.cat([torch.from_numpy(data[w][step][0]).double()
                           for w in order]).requires_grad_(True)
            dy = torch.cat([torch.from_numpy(data[w][step][1]).double()
                            for w in order])
            y = ref(x)
            y.backward(dy)
            start = 0
            for who in order:
                n = sizes[who]
                got_y, got_dx, got_gw = ours[who][3 * step:3 * step + 3]
                np.testing.assert_allclose(
                    got_y, y[start:start + n].detach().reshape(-1),
                    atol=2e-5, err_msg=f"{who} y step {step}")
                np.testing.assert_allclose(
                    got_dx, x.grad[start:start + n].reshape(-1), atol=2e-5,
                    err_msg=f"{who} grad_input step {step}")
                np.testing.assert_allclose(got_gw, ref.weight.grad,
                                           rtol=1e-5, atol=1e-4,
                                           err_msg=f"{who} grad_weight")
                start += n
            ref.weight.grad = None
            x.grad = None
        state = client.get_state(group)
        np.testing.assert_allclose(state["running_var"],
                                   ref.running_var.numpy(), rtol=1e-6)
        assert int(state["num_batches_tracked"]) == steps
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        client.delete_layer(group)


def test_node_sync_group_tensor_mode_sgd_and_stream(server, client, node,
                                                    tmp_path):
    """Node's sync calls in tensor mode, against float64 torch over the
    concatenated batch. Group A (BatchNorm1d): a Node rank in tensor mode, a
    Python normserve.torch.SyncBatchNorm rank and a Node rank in stats mode,
    3 steps, each stepping its local weight and bias with plain SGD (the
    tensor-mode rank pushes them before each forward). Group B
    (BatchNorm2d, server-held parameters): Node SyncBatchNorms with sgd in
    tensor and stats mode and a raw Python tensor-mode rank, 2 steps, then a
    step with Node's rank 0 on a Train stream and rank 1 an empty slice,
    then an eval forward and its backward (no barrier)."""
    import normserve.torch as nst
    node_binary, node_dir = node
    c, lr, momentum = 3, 0.1, 0.9
    group_a, group_b = "hetero-tensor-a", "hetero-tensor-b"
    rng = np.random.default_rng(17)

    def slices(shapes, steps):
        return [[(rng.standard_normal(s).astype(np.float32) * 2 + 1,
                  rng.standard_normal(s).astype(np.float32))
                 for s in shapes] for _ in range(steps)]

    data_a = slices([(2, c, 4), (3, c, 4), (1, c, 4)], 3)
    data_b = slices([(2, c, 2, 3), (1, c, 2, 3), (2, c, 2, 3)], 2)
    data_b += slices([(2, c, 2, 3), (0, c, 2, 3), (2, c, 2, 3)], 1)
    eval_x, eval_dy = slices([(2, c, 2, 3)], 1)[0][0]

    def wire(steps):
        return [[dict(x=x.ravel().tolist(), dy=dy.ravel().tolist(),
                      shape=list(x.shape)) for x, dy in ranks]
                for ranks in steps]

    (tmp_path / "data.json").write_text(json.dumps(dict(
        a=wire(data_a), b=wire(data_b),
        eval=wire([[(eval_x, eval_dy)]])[0][0])))
    client.create_layer(c, kind="sync_batch_norm", world_size=3,
                        layer_id=group_b)
    script = tmp_path / "sync_tensor.js"
    script.write_text(f"""
const fs = require('fs');
const {{ Client, SyncBatchNorm, tensor }} = require({json.dumps(node_dir)});
const data = JSON.parse(fs.readFileSync(
  {json.dumps(str(tmp_path / "data.json"))}));
const f32 = (a) => Float32Array.from(a);
const arr = (a) => Array.from(a);
(async () => {{
  const c = new Client({json.dumps(server.address)}, {{ timeoutMs: 30000 }});
  const out = {{ a: [[], [], []], b: [[], [], []] }};
  const join = (group, rank, options) => new SyncBatchNorm(c, {{
    group, rank, worldSize: 3, numFeatures: {c}, ...options }}).join();
  const rankA = async (rank, mode) => {{
    const bn = await join('{group_a}', rank, {{ mode }});
    for (const step of data.a) {{
      const {{ x, dy, shape }} = step[rank];
      const y = await bn.forward(f32(x), shape);
      const g = await bn.backward(f32(dy));
      out.a[rank].push([arr(y), arr(g.gradInput)]);
      for (let ch = 0; ch < {c}; ++ch) {{
        bn.weight[ch] -= {lr} * g.gradWeight[ch];
        bn.bias[ch] -= {lr} * g.gradBias[ch];
      }}
    }}
  }};
  await Promise.all([rankA(0, 'tensor'), rankA(2, 'stats')]);

  const sgd = {{ lr: {lr}, momentum: {momentum} }};
  const rankB = async (rank, mode) => {{
    const bn = await join('{group_b}', rank, {{ mode, sgd }});
    for (const step of data.b.slice(0, 2)) {{
      const {{ x, dy, shape }} = step[rank];
      const y = await bn.forward(f32(x), shape);
      const weight = arr(bn.weight);
      const g = await bn.backward(f32(dy));
      out.b[rank].push([arr(y), arr(g.gradInput), weight]);
    }}
  }};
  await Promise.all([rankB(0, 'tensor'), rankB(1, 'stats')]);
  const stream = c.train();
  const onStream = async () => {{
    const {{ x, dy, shape }} = data.b[2][0];
    const f = await stream.syncForward('{group_b}', 2, 0,
                                       {{ input: tensor(shape, f32(x)) }});
    const g = await stream.syncBackward('{group_b}', 2, 0, {{
      handle: f.handle, gradOutput: tensor(shape, f32(dy)), sgd }});
    out.b[0].push([arr(f.output.data), arr(g.gradInput.data),
                   arr(f.weight), f.output.shape, f.output.layout]);
  }};
  const empty = async () => {{
    const shape = [0, {c}, 2, 3];
    const f = await c.syncForward('{group_b}', 2, 1,
                                  {{ input: tensor(shape, f32([])) }});
    const g = await c.syncBackward('{group_b}', 2, 1, {{
      handle: f.handle, gradOutput: tensor(shape, f32([])),
      skipGradInput: true, sgd }});
    out.b[1].push([arr(f.output.data), g.gradInput, arr(f.weight),
                   f.output.shape, f.count]);
  }};
  await Promise.all([onStream(), empty()]);
  await stream.end();

  const {{ x, dy, shape }} = data.eval;
  const e = await c.syncForward('{group_b}', 0, 0, {{
    input: tensor(shape, f32(x)), training: false }});
  const eg = await c.syncBackward('{group_b}', 0, 0, {{
    handle: e.handle, gradOutput: tensor(shape, f32(dy)) }});
  out.eval = [arr(e.output.data), arr(eg.gradInput.data)];
  try {{
    await c.syncForward('{group_b}', 3, 0, {{
      input: tensor(shape, f32(x)), count: 12, mean: [0, 0, 0],
      m2: [1, 1, 1], timeoutMs: 5000 }});
  }} catch (err) {{ out.both = [err.codeName, err.details]; }}
  console.log(JSON.stringify(out));
  c.close();
}})().catch((e) => {{ console.error(e); process.exit(1); }});
""")
    proc = subprocess.Popen([node_binary, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # Group A, rank 1: stats mode, local parameters and optimizer.
        bn = nst.SyncBatchNorm(c, client=client, group=group_a, rank=1,
                               world_size=3, barrier_timeout=30)
        opt = torch.optim.SGD(bn.parameters(), lr=lr)
        ours_a = []
        for step in data_a:
            x = torch.from_numpy(step[1][0]).requires_grad_(True)
            y = bn(x)
            y.backward(torch.from_numpy(step[1][1]))
            ours_a.append([y.detach().numpy().ravel(), x.grad.numpy().ravel()])
            opt.step()
            opt.zero_grad()
        # Group B, rank 2: raw tensor-mode calls with the same sgd.
        ours_b, state_b0 = [], None
        for i, step in enumerate(data_b):
            f = client.sync_forward(group_b, i, 2, input=step[2][0])
            b = client.sync_backward(group_b, i, 2, handle=f.handle,
                                     grad_output=step[2][1],
                                     sgd=dict(lr=lr, momentum=momentum))
            ours_b.append([np.asarray(f.output).ravel(),
                           np.asarray(b.grad_input).ravel()])
            if i == 0:  # One step: weight = 1 - lr * the union's sum.
                state_b0 = client.get_state(group_b)
                np.testing.assert_allclose(state_b0["weight"],
                                           1 - lr * b.sum_dy_xhat, atol=1e-6)
                np.testing.assert_allclose(state_b0["bias"], -lr * b.sum_dy,
                                           atol=1e-6)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        out = json.loads(stdout)

        def check(data, got, ref, opt, name):
            for i, step in enumerate(data):
                x = torch.cat([torch.from_numpy(s[0]).double()
                               for s in step]).requires_grad_(True)
                y = ref(x)
                y.backward(torch.cat([torch.from_numpy(s[1]).double()
                                      for s in step]))
                start = 0
                for rank, (sx, _) in enumerate(step):
                    n = len(sx)
                    if got[rank][i] is not None:
                        got_y, got_dx = got[rank][i][:2]
                        np.testing.assert_allclose(
                            got_y, y[start:start + n].detach().reshape(-1),
                            atol=1e-5, err_msg=f"{name} y {i} rank {rank}")
                        np.testing.assert_allclose(
                            got_dx, x.grad[start:start + n].reshape(-1),
                            atol=1e-5, err_msg=f"{name} dx {i} rank {rank}")
                    start += n
                opt.step()
                opt.zero_grad()
                if i == 1 and name == "a":
                    # The tensor rank pushed these before step 2.
                    np.testing.assert_allclose(
                        client.get_state(group_a)["weight"],
                        ref.weight.detach(), atol=1e-6)

        ref_a = torch.nn.BatchNorm1d(c).double()
        check(data_a, [out["a"][0], ours_a, out["a"][2]], ref_a,
              torch.optim.SGD(ref_a.parameters(), lr=lr), "a")
        empty = out["b"][1].pop()
        assert empty[:2] == [[], None] and empty[3:] == [[0, c, 2, 3], 4 * 6]
        ref_b = torch.nn.BatchNorm2d(c).double()
        check(data_b, [out["b"][0], out["b"][1] + [None], ours_b], ref_b,
              torch.optim.SGD(ref_b.parameters(), lr=lr, momentum=momentum),
              "b")
        # The forward refreshed the local weight from the stepped one.
        for rank in (0, 1):
            np.testing.assert_allclose(out["b"][rank][1][2],
                                       state_b0["weight"], atol=1e-7)
        # Step 2 (stream and empty rank): one weight, both ranks.
        assert out["b"][0][2][3:] == [[2, c, 2, 3], "NCHW"]
        np.testing.assert_array_equal(out["b"][0][2][2], empty[2])
        state = client.get_state(group_b)
        for key in ("weight", "bias", "running_mean", "running_var"):
            np.testing.assert_allclose(state[key],
                                       ref_b.state_dict()[key].numpy(),
                                       atol=1e-5, err_msg=key)
        # Eval: the running statistics and the stepped parameters.
        ref_b.eval()
        x = torch.from_numpy(eval_x).double().requires_grad_(True)
        y = ref_b(x)
        y.backward(torch.from_numpy(eval_dy).double())
        np.testing.assert_allclose(out["eval"][0], y.detach().reshape(-1),
                                   atol=1e-5)
        np.testing.assert_allclose(out["eval"][1], x.grad.reshape(-1),
                                   atol=1e-5)
        assert out["both"][0] == "INVALID_ARGUMENT"
        assert "exclusive" in out["both"][1]
    finally:
        if proc.poll() is None:
            proc.kill()
        for name in (group_a, group_b):
            try:
                client.delete_layer(name)
            except Exception:
                pass
