"""The Node client as an npm package (ctest node_package).

scripts/node-pack.sh packs client/node into a tarball; the tarball is
installed with npm into an empty project in a temporary directory, far from
this repository, and used from there against a real server: the packaged
example, a script that require()s 'normserve-client', and usage.ts (next to
this file), a TypeScript program compiled with `tsc --strict` against the
package's index.d.ts and run. usage.ts's `@ts-expect-error` lines are
mistakes the declarations must catch: with the directives removed, tsc must
fail on exactly those lines. A generated TypeScript file checks that the
declarations and the module's exports and methods name the same things.

Needs: npm and node (NORMSERVE_NPM, NORMSERVE_NODE), tsc (NORMSERVE_TSC;
Debian's node-typescript), the npm registry or a warm ~/.npm cache for the
client's two dependencies (`npm ci` in client/node, done by
scripts/install-deps.sh, fills it).
"""

import json
import os
import re
import subprocess
import tarfile

import pytest

from normserve_pytest import REPO, tool

NODE_DIR = os.path.join(REPO, "client", "node")
PROTO = os.path.join(REPO, "proto", "normserve", "v1", "normserve.proto")
HERE = os.path.dirname(os.path.abspath(__file__))
EXPECTED_FILES = {
    "package/package.json", "package/index.js", "package/index.d.ts",
    "package/example.js", "package/README.md",
    "package/proto/normserve/v1/normserve.proto",
}
# Compiled with no Node types at all: the declarations stand alone.
TSCONFIG = {
    "compilerOptions": {
        "strict": True, "target": "es2020", "module": "commonjs",
        "lib": ["es2020"], "types": [], "noUnusedLocals": True,
        "outDir": "out",
    },
}


def child_env():
    """The environment of every child: nothing that points into the repo."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NORMSERVE_PROTO_DIR", "NODE_PATH")}
    env["npm_config_update_notifier"] = "false"
    return env


def run(args, cwd, timeout=180, check=True):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env=child_env())
    if check:
        assert result.returncode == 0, (
            f"{' '.join(args)} (in {cwd}) exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def version():
    with open(os.path.join(REPO, "VERSION"), encoding="utf-8") as f:
        return f.read().strip()


@pytest.fixture(scope="session")
def node():
    return tool("NORMSERVE_NODE", "node")


@pytest.fixture(scope="session")
def tsc():
    return tool("NORMSERVE_TSC", "tsc")


@pytest.fixture(scope="session")
def tarball(tmp_path_factory):
    """The tarball that scripts/node-pack.sh made, packed twice over."""
    build = tmp_path_factory.mktemp("node-pack-build")
    script = os.path.join(REPO, "scripts", "node-pack.sh")
    paths = []
    for _ in range(2):  # Idempotent: the same path, replaced.
        result = run([script, str(build)], cwd=REPO)
        assert result.stderr == "", result.stderr
        paths.append(result.stdout.strip())
    assert paths[0] == paths[1], paths
    path = paths[0]
    assert path == os.path.join(str(build), "dist",
                                f"normserve-client-{version()}.tgz")
    assert os.listdir(os.path.join(str(build), "dist")) == [
        os.path.basename(path)]
    return path


@pytest.fixture(scope="session")
def project(tarball, tmp_path_factory):
    """An empty npm project with the tarball installed."""
    npm = tool("NORMSERVE_NPM", "npm")
    directory = tmp_path_factory.mktemp("node-project")
    with open(directory / "package.json", "w", encoding="utf-8") as f:
        json.dump({"name": "normserve-package-test", "version": "1.0.0",
                   "private": True}, f)
    run([npm, "install", "--prefer-offline", "--no-audit", "--no-fund",
         tarball], cwd=str(directory), timeout=300)
    installed = directory / "node_modules" / "normserve-client"
    assert (installed / "package.json").is_file()
    return directory


def test_version_is_the_projects():
    with open(os.path.join(NODE_DIR, "package.json"), encoding="utf-8") as f:
        package = json.load(f)
    with open(os.path.join(NODE_DIR, "package-lock.json"),
              encoding="utf-8") as f:
        lock = json.load(f)
    assert package["version"] == version()
    assert lock["version"] == version()
    assert lock["packages"][""]["version"] == version()
    assert "private" not in package
    assert package["types"] == "index.d.ts"
    assert package["main"] == "index.js"


def test_tarball_contents(tarball):
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
        packaged = tar.extractfile(
            "package/proto/normserve/v1/normserve.proto").read()
        package = json.load(tar.extractfile("package/package.json"))
    # Exactly what ships: no node_modules, tests, lock file or stray files.
    assert names == EXPECTED_FILES, sorted(names ^ EXPECTED_FILES)
    assert package["version"] == version()
    # The proto is the repository's, byte for byte (its only source)...
    with open(PROTO, "rb") as f:
        assert packaged == f.read()
    # ...and no copy of it is left in the checkout.
    assert not os.path.exists(os.path.join(NODE_DIR, "proto"))


def test_example_runs_from_installed_package(server, client, node, project):
    result = run([node, os.path.join("node_modules", "normserve-client",
                                     "example.js"),
                  f"--address={server.address}", "--steps=3"],
                 cwd=str(project))
    text = result.stdout
    for line in ("created layers/node-example-", "step 1/3: output mean",
                 "step 3/3", "grad_weight=", "eval forward",
                 "num_batches_tracked = 3", "running_var = [",
                 "deleted layers/node-example-"):
        assert line in text, text
    # Training output is normalized in the first step.
    first = text.split("step 1/3: output mean ")[1].split("\n")[0]
    means = [float(v) for v in first.split("]")[0].strip("[").split(",")]
    stds = [float(v) for v in first.split(" std ")[1].strip("[]").split(",")]
    assert max(abs(m) for m in means) < 1e-3, first
    assert all(abs(s - 1) < 1e-2 for s in stds), first
    assert not [l for l in client.all_layers()
                if l.name.startswith("layers/node-example-")]


def test_require_from_empty_project(server, client, node, project):
    script = project / "use.js"
    script.write_text("""
const path = require('path');
const { Client, tensor, loadApi, status } = require('normserve-client');
(async () => {
  const c = new Client(process.argv[2], { timeoutMs: 20000 });
  const layer = await c.createLayer(2, { layerId: 'pkg-require' });
  const x = Float32Array.from([1, 2, 3, 4, 5, 6, 7, 9]);
  const fwd = await c.forward(layer.name, tensor([4, 2], x), { training: true });
  const state = await c.getState(layer.name);
  let missing = null;
  try { await c.getLayer('layers/pkg-missing'); } catch (err) {
    missing = err.code === status.NOT_FOUND && err.codeName;
  }
  console.log(JSON.stringify({
    resolved: require.resolve('normserve-client'),
    api: typeof loadApi().Normalization,
    output: Array.from(fwd.output.data),
    numBatchesTracked: state.tensors.num_batches_tracked,
    missing,
  }));
  c.close();
})().catch((err) => { console.error(err.message); process.exit(1); });
""")
    out = json.loads(run([node, str(script), server.address],
                         cwd=str(project)).stdout)
    resolved = os.path.realpath(out["resolved"])
    assert resolved == os.path.realpath(
        project / "node_modules" / "normserve-client" / "index.js")
    assert not resolved.startswith(os.path.realpath(REPO) + os.sep)
    assert out["api"] == "function"
    assert out["numBatchesTracked"] == 1
    assert out["missing"] == "NOT_FOUND"
    # Channel 0 of [[1, 2], [3, 4], [5, 6], [7, 9]] normalized: mean 4,
    # biased variance 5.
    expected = [(v - 4) / (5 + 1e-5) ** 0.5 for v in (1, 3, 5, 7)]
    assert out["output"][0::2] == pytest.approx(expected, abs=1e-5)
    info = client.get_layer("pkg-require")
    assert info.num_batches_tracked == 1
    client.delete_layer("pkg-require")


def compile_ts(tsc, project, source, name, emit=True):
    (project / name).write_text(source)
    config = dict(TSCONFIG, files=[name])
    if not emit:
        config = dict(config, compilerOptions=dict(
            TSCONFIG["compilerOptions"], noEmit=True))
    (project / "tsconfig.json").write_text(json.dumps(config))
    return run([tsc, "-p", "."], cwd=str(project), check=False)


def test_typescript_usage_compiles_and_runs(server, client, node, tsc,
                                            project):
    with open(os.path.join(HERE, "usage.ts"), encoding="utf-8") as f:
        source = f.read()
    result = compile_ts(tsc, project, source, "usage.ts")
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(run([node, os.path.join("out", "usage.js"),
                          server.address], cwd=str(project)).stdout)
    assert out["bnMomentum"] is None
    assert out["forwardMean"] is True
    assert out["statsLength"] == 3
    assert out["gradBias"] == [8, 8, 8]  # 16 elements per channel, dy 0.5.
    assert out["numBatchesTracked"] == 1
    assert out["afterRunning"] == 2
    assert "running_var" in out["stateKeys"]
    assert out["streamGradInput"] == "float32"
    assert out["kinds"] == ["batch_norm:3", "layer_norm:2x2", "rms_norm:4",
                            "group_norm:1/3", "instance_norm:3"]
    assert out["rmsEps"] is None
    assert out["halfOutput"] == "float16"
    assert out["syncOutput"] is True
    assert out["worldSizeVersion"] is True
    assert out["error"] == "NOT_FOUND"
    assert out["listed"] >= 6
    assert not [l for l in client.all_layers()
                if re.match(r"layers/ts-", l.name)]


def test_typescript_mistakes_fail(tsc, project):
    with open(os.path.join(HERE, "usage.ts"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    expected = [i + 2 for i, line in enumerate(lines)
                if line.strip().startswith("// @ts-expect-error")]
    assert len(expected) >= 15, expected
    wrong = [re.sub(r"// @ts-expect-error.*", "// (a mistake)", line)
             for line in lines]
    result = compile_ts(tsc, project, "\n".join(wrong), "wrong.ts",
                        emit=False)
    assert result.returncode != 0, "tsc accepted the mistakes"
    text = result.stdout + result.stderr
    failed = sorted({int(m.group(1)) for m in
                     re.finditer(r"^wrong\.ts\((\d+),\d+\): error TS\d+",
                                 text, re.M)})
    assert failed == expected, text


def test_declarations_name_every_export(node, tsc, project):
    # What the module really has: its exports, a Client's and a Train
    # stream's public methods and properties, a SyncBatchNorm's.
    probe = project / "probe.js"
    probe.write_text("""
const m = require('normserve-client');
const pub = (o) => {
  const names = new Set(Object.keys(o));
  for (let p = Object.getPrototypeOf(o); p && p !== Object.prototype;
       p = Object.getPrototypeOf(p)) {
    for (const n of Object.getOwnPropertyNames(p)) names.add(n);
  }
  return [...names].filter((n) => !n.startsWith('_') && n !== 'constructor')
    .sort();
};
const client = new m.Client('127.0.0.1:1');
const stream = Object.create(m.TrainStream.prototype);
for (const n of pub(client)) {
  if (typeof client[n] === 'function' && !(n in m.Client.prototype)) {
    stream[n] = client[n];  // The operations both have (OPS).
  }
}
const sync = new m.SyncBatchNorm(client, { group: 'g', rank: 0,
                                           worldSize: 1, numFeatures: 1 });
console.log(JSON.stringify({ exports: Object.keys(m).sort(),
  client: pub(client), stream: pub(stream), sync: pub(sync) }));
client.close();
""")
    names = json.loads(run([node, str(probe)], cwd=str(project)).stdout)
    assert "setWorldSize" in names["client"] and "forward" in names["stream"]
    # SyncBatchNorm's fields set by join().
    sync_later = ["bias", "layer", "weight"]

    def union(values):
        return "(" + (" | ".join(json.dumps(v) for v in values) or "never") + ")"

    # Each check fails naming what only one side has ("Type '"ok"' is not
    # assignable to type '"bogus"'").
    checks = []
    for what, declared, runtime in (
            ("exports", "keyof typeof m", names["exports"]),
            ("client", "keyof m.Client", names["client"]),
            ("stream", "keyof m.TrainStream", names["stream"]),
            ("sync", "keyof m.SyncBatchNorm", names["sync"] + sync_later)):
        js = union(runtime)
        for side, a, b in (("OnlyInDts", declared, js),
                           ("OnlyInJs", js, declared)):
            checks.append(f"const {what}{side}: OnlyIn<{a}, {b}> = 'ok';")
            checks.append(f"void {what}{side};")
    source = ("import * as m from 'normserve-client';\n"
              "type OnlyIn<A, B> = [Exclude<A, B>] extends [never] ? 'ok'\n"
              "                                                : Exclude<A, B>;\n"
              + "\n".join(checks) + "\n")
    result = compile_ts(tsc, project, source, "names.ts", emit=False)
    assert result.returncode == 0, (
        "index.d.ts and index.js name different things:\n" + result.stdout
        + result.stderr + "\nruntime: " + json.dumps(names))
