"""pytest plugin shared by the Python suites (load with -p normserve_pytest).

- ``server``: a real normserve process on 127.0.0.1:0 (session scope),
  stopped with SIGTERM at the end; it must exit 0. The binary is
  $NORMSERVE_SERVER, else build/bin/normserve of this tree.
- ``client``: a normserve.Client connected to it.
- ``tool(env, default)``: the executable $ENV names (else `default` on
  PATH); fails the test, naming the variable, when there is none.
- A skipped test is a failure here (no check may pass by not running), and
  ``--min-tests=N`` fails the run when fewer than N tests were collected.
"""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


class ServerProcess:
    """The normserve binary running on a free port."""

    def __init__(self, binary=None, args=()):
        self.binary = binary or os.environ.get("NORMSERVE_SERVER") or (
            os.path.join(REPO, "build", "bin", "normserve"))
        self.args = list(args)
        self.process = None
        self.address = None
        self._dir = tempfile.TemporaryDirectory(prefix="normserve-test-")
        self.stdout_path = os.path.join(self._dir.name, "server.out")
        self.stderr_path = os.path.join(self._dir.name, "server.err")

    def start(self, timeout=30):
        if not os.access(self.binary, os.X_OK):
            raise RuntimeError(f"normserve server binary {self.binary} not "
                               "found (run `make`, or set NORMSERVE_SERVER)")
        with open(self.stdout_path, "wb") as out, \
                open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [self.binary, "--address=127.0.0.1:0"] + self.args,
                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.stdout_path, encoding="utf-8",
                      errors="replace") as out:
                first = out.readline()
            match = re.match(r"normserve listening on (\S+) ", first)
            if match:
                self.address = match.group(1)
                if not re.search(r":[1-9][0-9]*$", self.address):
                    raise RuntimeError(f"no real port in {first!r}")
                return self
            if self.process.poll() is not None:
                raise RuntimeError("normserve exited with "
                                   f"{self.process.returncode} before "
                                   f"listening:\n{self.logs()}")
            time.sleep(0.05)
        self.process.kill()
        raise RuntimeError(f"normserve did not listen within {timeout} s:\n"
                           + self.logs())

    def logs(self):
        text = []
        for path in (self.stdout_path, self.stderr_path):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text.append(f.read()[-4000:])
            except OSError:
                pass
        return "\n".join(text)

    def stop(self, timeout=20):
        """Sends SIGTERM and returns the exit code (kills after timeout)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"normserve still running {timeout} s after "
                               "SIGTERM")

    def __del__(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()


def tool(env, default):
    """The executable $`env` names, else `default` (found on PATH)."""
    path = os.environ.get(env) or default
    found = shutil.which(path) or (path if os.access(path, os.X_OK) else None)
    if not found:
        pytest.fail(f"{path} not found (set {env})")
    return found


@pytest.fixture(scope="session")
def server():
    process = ServerProcess().start()
    yield process
    code = process.stop()
    assert code == 0, (f"normserve exited with {code} after SIGTERM:\n"
                       + process.logs())


@pytest.fixture(scope="session")
def client(server):
    import normserve
    with normserve.Client(server.address, timeout=30) as c:
        yield c


def pytest_addoption(parser):
    parser.addoption("--min-tests", type=int, default=1,
                     help="fail when fewer tests are collected")


def pytest_collection_finish(session):
    minimum = session.config.getoption("--min-tests")
    if len(session.items) < minimum and not session.config.option.collectonly:
        raise pytest.UsageError(f"collected {len(session.items)} tests; "
                                f"expected at least {minimum}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr,
                                                  tuple) else report.longrepr
        report.longrepr = f"skipped, which counts as a failure: {reason}"
