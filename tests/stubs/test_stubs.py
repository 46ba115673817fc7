"""Go and Java stubs from Debian's gRPC packages (scripts/stubs.sh).

Builds the stubs and both smoke programs (client/go/smoke,
client/java/Smoke.java) into a clean directory, twice (the second run must
be as quiet as the first), then runs each smoke program against a real
server: the checksum of its training Forward's output must equal
normserve-cli's for the same input on a fresh layer of the same config, and
its Backward's grad_input checksum the Python client's doing the same
forward and backward. Bad calls must exit 1 naming the gRPC status code.

Needs: NORMSERVE_CLI (normserve-cli), NORMSERVE_BUILD_DIR (where the stubs
are built, under stubs-test/), and the packages of scripts/install-deps.sh.
"""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from normserve_pytest import REPO

SHAPE = (3, 4, 5, 6)
LANGUAGES = ["go", "java"]


def fnv1a64(data):
    hash_ = 0xcbf29ce484222325
    for byte in bytes(data):
        hash_ = ((hash_ ^ byte) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"{hash_:016x}"


def run(args, timeout=120, check=True):
    result = subprocess.run(args, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, (
            f"{' '.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result


@pytest.fixture(scope="module")
def cli():
    path = os.environ.get("NORMSERVE_CLI") or os.path.join(
        REPO, "build", "bin", "normserve-cli")
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} not found (set NORMSERVE_CLI)")
    return path


@pytest.fixture(scope="module")
def build():
    """Runs scripts/stubs.sh into a fresh dir; returns (dir, [results])."""
    root = os.environ.get("NORMSERVE_BUILD_DIR") or os.path.join(REPO,
                                                                 "build")
    out = os.path.join(root, "stubs-test")
    shutil.rmtree(out, ignore_errors=True)
    script = os.path.join(REPO, "scripts", "stubs.sh")
    runs = [run([script, out], timeout=300, check=False) for _ in range(2)]
    return os.path.join(out, "stubs"), runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An input with per-channel offsets and a grad_output, as raw files."""
    rng = np.random.default_rng(17)
    per = np.arange(SHAPE[1], dtype=np.float32).reshape(1, -1, 1, 1)
    x = (per - 1 + (1 + per) * rng.standard_normal(SHAPE)).astype(np.float32)
    g = rng.standard_normal(SHAPE).astype(np.float32)
    directory = tmp_path_factory.mktemp("stubs-data")
    x_path, g_path = str(directory / "x.f32"), str(directory / "g.f32")
    x.astype("<f4").tofile(x_path)
    g.astype("<f4").tofile(g_path)
    return x, g, x_path, g_path


def smoke_command(build, language):
    stubs, _ = build
    return [os.path.join(stubs, language, "smoke")]


def run_smoke(build, language, server, layer, data, *extra):
    _, _, x_path, g_path = data
    return run(smoke_command(build, language) + [
        f"--address={server.address}", f"--layer={layer}",
        "--shape=" + ",".join(map(str, SHAPE)), f"--input={x_path}",
        f"--grad_output={g_path}", *extra], check=False)


def test_stubs_script_is_quiet_and_idempotent(build):
    stubs, runs = build
    for i, result in enumerate(runs):
        assert result.returncode == 0, (
            f"run {i + 1}: stubs.sh exited {result.returncode}\n"
            f"{result.stdout}{result.stderr}")
        assert result.stdout == "" and result.stderr == "", (
            f"run {i + 1} was not quiet:\n{result.stdout}{result.stderr}")
    for path in ("go/src/normserve/v1/normserve.pb.go",
                 "go/src/normserve/v1/normserve_grpc.pb.go",
                 "java/src/normserve/v1/Normserve.java",
                 "java/src/normserve/v1/NormalizationGrpc.java",
                 "java/classes/Smoke.class"):
        assert os.path.isfile(os.path.join(stubs, path)), path
    for language in LANGUAGES:
        assert os.access(os.path.join(stubs, language, "smoke"), os.X_OK)


def test_stubs_script_names_missing_package(tmp_path):
    # A PATH with the basics but no Go toolchain.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "mkdir", "protoc", "protoc-gen-go",
                 "protoc-gen-go-grpc"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    result = subprocess.run(
        [str(bin_dir / "bash"), os.path.join(REPO, "scripts", "stubs.sh"),
         str(tmp_path / "out")], capture_output=True, text=True,
        env={"PATH": str(bin_dir)}, timeout=60)
    assert result.returncode != 0
    assert "go not found; install Debian package golang-go" in result.stderr


@pytest.mark.parametrize("language", LANGUAGES)
def test_smoke_matches_cli_and_python(build, language, server, client, cli,
                                      data):
    x, g, x_path, _ = data
    layer = f"{language}-smoke"
    result = run_smoke(build, language, server, layer, data)
    assert result.returncode == 0, (
        f"{language} smoke exited {result.returncode}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}")
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    forward = re.fullmatch(r"forward: fnv1a64=([0-9a-f]{16})", lines[0])
    backward = re.fullmatch(r"backward: fnv1a64=([0-9a-f]{16})", lines[1])
    assert forward and backward, result.stdout

    # The smoke program's layer: C channels, one training batch folded in.
    info = client.get_layer(layer)
    assert info.kind == "batch_norm"
    assert info.num_features == SHAPE[1]
    assert info.num_batches_tracked == 1

    # normserve-cli on a fresh layer of the same config, same input.
    cli_layer = f"{language}-cli"
    run([cli, f"--address={server.address}", "create",
         f"--num_features={SHAPE[1]}", f"--id={cli_layer}"])
    out = run([cli, f"--address={server.address}", "forward", cli_layer,
               "--shape=" + ",".join(map(str, SHAPE)), f"--input={x_path}",
               "--training"]).stdout
    cli_sum = re.search(r"^checksum: fnv1a64=([0-9a-f]{16})$", out, re.M)
    assert cli_sum, out
    assert forward.group(1) == cli_sum.group(1)

    # The Python client: forward and backward on another fresh layer.
    py_layer = client.create_layer(SHAPE[1], layer_id=f"{language}-py").name
    fwd = client.forward(py_layer, x, training=True, raw=True)
    bwd = client.backward(py_layer, fwd.handle, g, raw=True)
    assert forward.group(1) == fnv1a64(fwd.output.data)
    assert backward.group(1) == fnv1a64(bwd.grad_input.data)
    # Both checksums cover real, distinct tensors.
    assert backward.group(1) != forward.group(1)
    assert backward.group(1) != fnv1a64(bytes(x.size * 4))


@pytest.mark.parametrize("language", LANGUAGES)
def test_smoke_channel_mismatch_is_invalid_argument(build, language, server,
                                                    data):
    result = run_smoke(build, language, server, f"{language}-mismatch", data,
                       f"--num_features={SHAPE[1] + 1}")
    assert result.returncode == 1, result
    assert "forward:" not in result.stdout
    assert re.search(r"^error: INVALID_ARGUMENT: \S", result.stderr,
                     re.M), result.stderr


@pytest.mark.parametrize("language", LANGUAGES)
def test_smoke_existing_layer_is_already_exists(build, language, server,
                                                client, data):
    layer = f"{language}-taken"
    client.create_layer(SHAPE[1], layer_id=layer)
    result = run_smoke(build, language, server, layer, data)
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert re.search(r"^error: ALREADY_EXISTS: \S", result.stderr,
                     re.M), result.stderr
