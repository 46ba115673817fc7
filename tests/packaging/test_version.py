"""One version, written in VERSION, everywhere it is shown."""

import re
import subprocess

import normserve
from packaging_util import CLI, VERSION, run


def test_version_file_is_semver():
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", VERSION), VERSION


def test_server_and_cli_print_it(server):
    assert run([server.binary, "--version"]) == f"normserve {VERSION}\n"
    assert run([CLI, "--version"]) == f"normserve-cli {VERSION}\n"
    assert "--version" in run([server.binary, "--help"])
    assert "--version" in run([CLI, "--help"])


def test_server_logs_it_at_start(server):
    with open(server.stdout_path, encoding="utf-8") as out:
        text = out.read()
    assert f"normserve: version {VERSION} (API normserve.v1)\n" in text


def test_python_package_has_it():
    assert normserve.__version__ == VERSION


def test_cli_version_needs_no_server():
    # Nothing listens on port 9: --version answers before any call.
    done = subprocess.run([CLI, "--address=127.0.0.1:9", "--version"],
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, f"normserve-cli {VERSION}\n")
