"""Helpers for the persistence tests: start/kill the real server, raw stubs."""
import os
import re
import signal
import socket
import subprocess
import threading
import time

import grpc
import numpy as np

from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc

SERVER = os.environ.get("NORMSERVE_SERVER", "build/bin/normserve")


def free_port(outside_ephemeral=False):
    """A free port; outside_ephemeral keeps it out of the range outgoing
    connections draw from, so a client retrying against a dead server can
    never take it (a self-connect) before the server restarts."""
    import random
    while True:
        with socket.socket() as s:
            port = random.randint(20000, 32000) if outside_ephemeral else 0
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]


class Server:
    """build/bin/normserve on 127.0.0.1:port; output kept in self.lines."""

    def __init__(self, port, state_dir=None, extra=()):
        args = [SERVER, "--address", f"127.0.0.1:{port}", "--device", "cpu",
                "--cpu_threads", "1", "--workers", "2"]
        if state_dir:
            args += ["--state_dir", state_dir]
        args += list(extra)
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines = []
        # A server that hangs at start is killed, so readline returns.
        watchdog = threading.Timer(60, self.proc.kill)
        watchdog.start()
        try:
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError("server exited or hung at start: " +
                                       "".join(self.lines))
                self.lines.append(line)
                # The last start-up line: the state report or "in memory".
                if "state_dir" in line or "in memory only" in line:
                    return
        finally:
            watchdog.cancel()

    def output(self):
        return "".join(self.lines)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = self.proc.communicate(timeout=30)
            self.lines.append(rest or "")
        except subprocess.TimeoutExpired:
            self.kill()


def stub(port):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.NormalizationStub(channel)


def tensor(array):
    return pb.Tensor(shape=list(array.shape), dtype=pb.DTYPE_FLOAT32,
                     data=np.ascontiguousarray(array, np.float32).tobytes())


def state_arrays(response):
    out = {}
    for key, t in response.state.tensors.items():
        if t.dtype == pb.DTYPE_INT64:
            out[key] = np.frombuffer(t.data, np.int64).copy()
        else:
            out[key] = np.frombuffer(t.data, np.float32).copy()
    return out


def find(pattern, text):
    return re.search(pattern, text) is not None
