"""The C++ client installed with `cmake --install` (make install), used by a
program outside the tree: through find_package(normserve CONFIG) and
through pkg-config."""

import math
import os
import subprocess

import pytest

from packaging_util import BUILD, REPO, VERSION, run

CONSUMER = os.path.join(REPO, "tests", "packaging", "consumer")


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    run(["cmake", "--install", BUILD, "--prefix", str(root)])
    return root


def libdir(prefix):
    (found,) = [d for d in ("lib", "lib64", "lib/x86_64-linux-gnu")
                if (prefix / d / "libnormserve_client.a").exists()]
    return prefix / found


def check_output(text):
    lines = dict(line.split(" ", 1) for line in text.strip().splitlines())
    assert lines["client"] == VERSION
    assert [float(v) for v in lines["mean"].split()] == [3.5, 7.0]
    assert math.isclose(float(lines["y0"]), -3.5 / math.sqrt(5.25 + 1e-5),
                        abs_tol=1e-5)
    assert [float(v) for v in lines["grad_bias"].split()] == [1.0, 0.0]


def test_install_layout(prefix):
    lib = libdir(prefix)
    for path in ("include/normserve/client/cpp/client.h",
                 "include/normserve/client/cpp/remote_batch_norm.h",
                 "include/normserve/common/version.h",
                 "include/normserve/normserve/v1/normserve.pb.h",
                 "include/normserve/normserve/v1/normserve.proto",
                 "bin/normserve", "bin/normserve-cli"):
        assert (prefix / path).exists(), path
    assert (lib / "cmake" / "normserve" / "normserveConfig.cmake").exists()
    assert (lib / "cmake" / "normserve" /
            "normserveConfigVersion.cmake").exists()
    assert (lib / "pkgconfig" / "normserve.pc").exists()
    assert run([str(prefix / "bin" / "normserve-cli"), "--version"]) == (
        f"normserve-cli {VERSION}\n")


def test_find_package_consumer(prefix, server, tmp_path):
    build = tmp_path / "build"
    run(["cmake", "-S", CONSUMER, "-B", str(build),
         f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release"])
    run(["cmake", "--build", str(build), "-j2"], timeout=600)
    check_output(run([str(build / "consumer"), server.address,
                      "cmake-consumer"]))


def test_find_package_refuses_another_minor_version(prefix, tmp_path):
    project = tmp_path / "src"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.22)\nproject(p LANGUAGES CXX)\n"
        "find_package(normserve 99.0 CONFIG REQUIRED)\n")
    done = subprocess.run(["cmake", "-S", str(project), "-B",
                           str(tmp_path / "b"),
                           f"-DCMAKE_PREFIX_PATH={prefix}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "normserveConfigVersion.cmake" in done.stderr or (
        VERSION in done.stderr)


def test_pkg_config_consumer(prefix, server, tmp_path):
    env = dict(os.environ, PKG_CONFIG_PATH=str(libdir(prefix) / "pkgconfig"))
    assert run(["pkg-config", "--modversion", "normserve"],
               env=env).strip() == VERSION
    flags = run(["pkg-config", "--cflags", "--libs", "normserve"],
                env=env).split()
    binary = tmp_path / "consumer"
    run(["g++", "-std=c++17", "-O1", os.path.join(CONSUMER, "main.cc"),
         "-o", str(binary)] + flags, timeout=600)
    check_output(run([str(binary), server.address, "pkg-config-consumer"]))
