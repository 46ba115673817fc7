"""GET /metrics of a real server (--metrics_address): what known traffic
leaves in it, read with Debian's prometheus-client parser, and Debian's
Prometheus scraping it."""

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import normserve
from normserve.v1 import normserve_pb2 as pb
from normserve_pytest import ServerProcess

METRICS_LINE = re.compile(r"^normserve: metrics \(Prometheus, plain HTTP\) "
                          r"on http://(\S+)/metrics$", re.M)


class MetricsServer(ServerProcess):
    def __init__(self, args=()):
        super().__init__(args=["--metrics_address=127.0.0.1:0", *args])

    @property
    def metrics_address(self):
        with open(self.stdout_path, encoding="utf-8") as out:
            match = METRICS_LINE.search(out.read())
        assert match, self.logs()
        return match.group(1)

    def scrape(self):
        with urllib.request.urlopen(
                f"http://{self.metrics_address}/metrics", timeout=10) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith(
                "text/plain; version=0.0.4")
            return r.read().decode()


@pytest.fixture
def metrics_server():
    server = MetricsServer().start()
    yield server
    assert server.stop() == 0, server.logs()


def samples(text):
    """{(name, frozenset(labels)): value} of every sample."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed, name, **labels):
    return parsed.get((name, frozenset(labels.items())), 0.0)


def test_known_traffic_is_counted(metrics_server):
    x = np.random.default_rng(1).standard_normal((4, 3, 2, 2)).astype(
        np.float32)
    with normserve.Client(metrics_server.address, timeout=30) as client:
        client.create_layer(3, layer_id="m-bn")
        client.create_layer(kind="layer_norm", layer_id="m-ln",
                            normalized_shape=[8])
        for _ in range(5):
            fwd = client.forward("m-bn", x, training=True)
        client.backward("m-bn", fwd.handle, np.ones_like(x))
        for _ in range(3):
            with pytest.raises(normserve.NotFoundError):
                client.get_layer("missing")
        with pytest.raises(normserve.InvalidArgumentError):
            client.forward("m-bn", np.ones((4, 5, 2, 2), np.float32))
        parsed = samples(metrics_server.scrape())
        client.delete_layer("m-ln")
        after = samples(metrics_server.scrape())

    requests = "normserve_requests_total"
    assert value(parsed, requests, method="Forward", code="OK") == 5
    assert value(parsed, requests, method="Forward",
                 code="INVALID_ARGUMENT") == 1
    assert value(parsed, requests, method="GetLayer", code="NOT_FOUND") == 3
    assert value(parsed, requests, method="Backward", code="OK") == 1
    assert value(parsed, requests, method="CreateLayer", code="OK") == 2
    duration = "normserve_request_duration_seconds"
    assert value(parsed, duration + "_count", method="Forward") == 6
    assert value(parsed, duration + "_sum", method="Forward") > 0
    assert value(parsed, duration + "_bucket", method="Forward",
                 le="+Inf") == 6
    # Request bytes are the serialized messages: five equal training
    # forwards and the refused one.
    one = pb.ForwardRequest(name="m-bn", input=pb.Tensor(
        shape=x.shape, dtype=pb.DTYPE_FLOAT32, layout=pb.LAYOUT_NCHW,
        data=x.tobytes()), training=True).ByteSize()
    received = value(parsed, "normserve_received_bytes_total",
                     method="Forward")
    assert 5 * one <= received < 5 * one + 2 * one
    assert value(parsed, "normserve_sent_bytes_total",
                 method="Forward") >= 5 * x.nbytes
    assert value(parsed, "normserve_layers", kind="batch_norm") == 1
    assert value(parsed, "normserve_layers", kind="layer_norm") == 1
    assert value(after, "normserve_layers", kind="layer_norm") == 0
    assert value(after, requests, method="DeleteLayer", code="OK") == 1
    # The last forward's context waits for a Backward that never comes.
    assert value(parsed, "normserve_saved_contexts") >= 1
    assert value(parsed, "normserve_saved_context_bytes") > 0
    assert value(parsed, "normserve_state_bytes") > 0
    assert value(parsed, "normserve_queue_wait_seconds_count") >= 6
    assert value(parsed, "normserve_compute_seconds_count") >= 6
    assert value(parsed, "normserve_build_info", version=normserve.__version__,
                 device=next(dict(k)["device"] for (n, k) in parsed
                             if n == "normserve_build_info")) == 1


def test_other_services_are_counted_by_their_path(metrics_server):
    # grpc.health.v1 speaks raw byte buffers, not our messages: counted,
    # without byte counts, and the server keeps serving.
    import grpc
    with grpc.insecure_channel(metrics_server.address) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        for _ in range(2):
            assert check(b"", timeout=10) == b"\x08\x01"  # SERVING
    with normserve.Client(metrics_server.address, timeout=30) as client:
        client.create_layer(2, layer_id="after-health")
    parsed = samples(metrics_server.scrape())
    assert value(parsed, "normserve_requests_total",
                 method="grpc.health.v1.Health/Check", code="OK") == 2
    assert ("normserve_received_bytes_total",
            frozenset({("method", "grpc.health.v1.Health/Check")})) not in (
                parsed)


def test_histogram_buckets_are_cumulative(metrics_server):
    with normserve.Client(metrics_server.address, timeout=30) as client:
        for i in range(4):
            client.create_layer(2, layer_id=f"h{i}")
    for family in text_string_to_metric_families(metrics_server.scrape()):
        if family.type != "histogram":
            continue
        series = {}
        for s in family.samples:
            if s.name.endswith("_bucket"):
                key = frozenset((k, v) for k, v in s.labels.items()
                                if k != "le")
                series.setdefault(key, []).append(
                    (float(s.labels["le"]), s.value))
        for points in series.values():
            counts = [c for _, c in sorted(points)]
            assert counts == sorted(counts), (family.name, points)
            assert sorted(points)[-1][0] == float("inf")


def test_train_stream_is_counted_when_it_ends(metrics_server):
    x = np.ones((2, 2, 2, 2), np.float32)
    with normserve.Client(metrics_server.address, timeout=30) as client:
        client.create_layer(2, layer_id="s-bn")
        with client.train() as stream:
            stream.forward("s-bn", x, training=False)
            opened = samples(metrics_server.scrape())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            closed = samples(metrics_server.scrape())
            if value(closed, "normserve_open_streams") == 0:
                break
            time.sleep(0.05)
    assert value(opened, "normserve_open_streams") == 1
    assert value(opened, "normserve_requests_total", method="Train",
                 code="OK") == 0
    assert value(closed, "normserve_open_streams") == 0
    assert sum(v for (n, labels), v in closed.items()
               if n == "normserve_requests_total"
               and dict(labels)["method"] == "Train") == 1
    assert value(closed, "normserve_received_bytes_total",
                 method="Train") >= x.nbytes


def test_other_paths_and_methods(metrics_server):
    base = f"http://{metrics_server.metrics_address}"
    for path in ("/", "/other", "/metrics/x"):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(base + path, timeout=10)
        assert error.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(urllib.request.Request(
            base + "/metrics", data=b"x", method="POST"), timeout=10)
    assert error.value.code == 405


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address,message", [
    ("nonsense", "expected HOST:PORT"),
    ("127.0.0.1:70000", "expected HOST:PORT"),
    ("taken", "cannot serve metrics there"),
])
def test_bad_metrics_address_fails_start(address, message):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if address == "taken":
            address = "127.0.0.1:%d" % taken.getsockname()[1]
        server = ServerProcess(args=[f"--metrics_address={address}"])
        with pytest.raises(RuntimeError) as error:
            server.start()
    assert message in str(error.value)


def test_prometheus_scrapes_it(metrics_server, tmp_path):
    binary = os.environ.get("NORMSERVE_PROMETHEUS") or shutil.which(
        "prometheus") or "prometheus"
    assert shutil.which(binary), f"{binary} not found (Debian: prometheus)"
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: normserve\n"
        f"    static_configs:\n      - targets: ['{metrics_server.metrics_address}']\n")
    with normserve.Client(metrics_server.address, timeout=30) as client:
        client.create_layer(2, layer_id="p-bn")
        for _ in range(7):
            client.forward("p-bn", np.ones((2, 2, 3, 3), np.float32),
                           training=True, save_for_backward=False)
    log = open(tmp_path / "prometheus.log", "wb")
    process = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    query = urllib.parse.quote(
        'sum(normserve_requests_total{job="normserve",method="Forward",'
        'code="OK"})')
    try:
        got, deadline = None, time.monotonic() + 90
        while time.monotonic() < deadline and got != 7:
            assert process.poll() is None, (tmp_path / "prometheus.log"
                                            ).read_text()[-3000:]
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/api/v1/query?query={query}",
                        timeout=5) as r:
                    answer = json.load(r)
                result = answer["data"]["result"]
                got = int(float(result[0]["value"][1])) if result else None
            except (urllib.error.URLError, ConnectionError):
                pass
            if got != 7:
                time.sleep(0.5)
        assert got == 7, (tmp_path / "prometheus.log").read_text()[-3000:]
        with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/api/v1/targets", timeout=5) as r:
            (target,) = json.load(r)["data"]["activeTargets"]
        assert target["health"] == "up", target
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
