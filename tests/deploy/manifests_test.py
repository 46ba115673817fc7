#!/usr/bin/python3
"""Renders deploy/k8s with `kubectl kustomize` and checks what issue 7 promises.

usage: manifests_test.py --server PATH/normserve [--cli PATH/normserve-cli]
                         [--load PATH/normserve-load] [--kubectl PATH]

For each overlay (cpu, gpu), on the rendered YAML:
  - a StatefulSet, a headless and a ClusterIP Service, a ConfigMap of flags,
    a PodDisruptionBudget, all selecting the same pods;
  - native gRPC startup, readiness and liveness probes on the container's
    gRPC port, which is also the port of --address and of both Services;
    a startup budget with room for CUDA initialisation in the gpu overlay;
  - every arg is a flag `normserve --help` lists, every $(VAR) comes from the
    ConfigMap, and the server starts with those args and stops on SIGTERM;
  - preStop plus --shutdown_grace_s fit in terminationGracePeriodSeconds;
  - non-root, read-only root filesystem, no privilege escalation, all
    capabilities dropped, seccomp RuntimeDefault;
  - the volumeClaimTemplate is mounted at the state dir the image prepares
    and the state-dir component passes;
  - CPU and memory requests and limits; threads fit the CPU limit; the memory
    limit fits the saved-input and message limits;
  - nvidia.com/gpu: 1 in the gpu overlay's limits, nowhere in the cpu one;
  - metrics: a container port `metrics` (in no Service) that --metrics_address
    listens on, the pod's prometheus.io/scrape, port and path annotations
    agreeing with it, no PodMonitor (its CRD may be absent); the server
    started with the rendered args serves GET /metrics there (Prometheus
    text format, normserve_build_info{version} 1, only the metric names
    and types of METRICS).
Also: each overlay with the state-dir and tls components renders with flags
the server has, and the server starts with them (TLS with certificates made
here); in that variant the probes target the plaintext health listener
(--health_address, a container port of its own, in no Service), where
`normserve-cli health` gets SERVING while the TLS port refuses plaintext and
the health port serves nothing else. The metrics component on each overlay
(alone, and with the other two) adds a PodMonitor and nothing else; it
selects the StatefulSet's pods and not the load Job's, and scrapes a
container port by name, the one --metrics_address listens on, in plain HTTP
at /metrics every 15 s. The Grafana dashboard (deploy/grafana) parses, uses
only the ${datasource} variable as its data source, and its PromQL names only
the metrics of METRICS (every one of them somewhere), histograms through
_bucket/_sum/_count, counters under rate(); with promtool installed every
expression parses. The load Job
targets a replica through the headless Service with flags normserve-load
lists; the Dockerfile agrees with the manifests (user, port, state dir,
HEALTHCHECK, targets).

Exits 77 (skipped) when kubectl is missing.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import socket
import time
import urllib.error
import urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
K8S = os.path.join(REPO, "deploy", "k8s")
DOCKERFILE = os.path.join(REPO, "deploy", "docker", "Dockerfile")
DASHBOARD = os.path.join(REPO, "deploy", "grafana", "normserve-dashboard.json")
OVERLAYS = ("cpu", "gpu")
# Opt-in components, rendered on top of each overlay.
COMPONENTS = ("state-dir", "tls")
# Needs the Prometheus Operator's CRD: rendered apart (check_metrics_component).
METRICS_COMPONENT = "metrics"
# What --metrics_address serves (issue 14): family name -> type. The
# dashboard may name only these.
METRICS = {
    "normserve_requests_total": "counter",
    "normserve_request_duration_seconds": "histogram",
    "normserve_received_bytes_total": "counter",
    "normserve_sent_bytes_total": "counter",
    "normserve_queue_wait_seconds": "histogram",
    "normserve_compute_seconds": "histogram",
    "normserve_layers": "gauge",
    "normserve_saved_contexts": "gauge",
    "normserve_saved_context_bytes": "gauge",
    "normserve_open_streams": "gauge",
    "normserve_state_bytes": "gauge",
    "normserve_build_info": "gauge",
}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
STATE_DIR = "/var/lib/normserve"
RUN_AS = 10001
# Startup budget (s): the gpu overlay leaves room for CUDA initialisation.
MIN_STARTUP_S = {"cpu": 30, "gpu": 240}
# Final flush after the drain, once the server has a state dir.
FLUSH_MARGIN_S = 10

failures = []


def check(ok, what):
    """Records WHAT as a failure unless OK; returns OK."""
    if not ok:
        failures.append(what)
    return ok


def kustomize(kubectl, path):
    """The objects `kubectl kustomize PATH` renders; its warnings fail."""
    proc = subprocess.run([kubectl, "kustomize", path], capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        for f in failures:  # Found before; the exit below ends the run.
            print("FAIL: " + f)
        raise SystemExit(f"FAIL: kubectl kustomize {path}:\n{proc.stderr}")
    check(not proc.stderr.strip(),
          f"kubectl kustomize {path} warned:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def server_flags(server):
    """Flag names that `SERVER --help` lists, and the help text."""
    out = subprocess.run([server, "--help"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return set(re.findall(r"^\s+--([a-z0-9_]+)", out, re.M)), out


def server_version(server):
    """The version `SERVER --version` prints ("normserve 0.2.0" -> "0.2.0")."""
    out = subprocess.run([server, "--version"], capture_output=True, text=True,
                         timeout=30, check=True).stdout.split()
    return out[-1] if out else ""


def metric_family(series):
    """The METRICS family a series name belongs to (a histogram's through its
    _bucket, _sum and _count series), or None."""
    if series in METRICS:
        return series
    for suffix in HISTOGRAM_SERIES:
        base = series[:-len(suffix)]
        if series.endswith(suffix) and METRICS.get(base) == "histogram":
            return base
    return None


def free_port():
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(address, version, name):
    """GET http://ADDRESS/metrics (retrying while the listener comes up) and
    checks the Prometheus text it returns against METRICS."""
    url = f"http://{address}/metrics"
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                status, ctype = resp.status, resp.headers.get("Content-Type", "")
                body = resp.read().decode()
            break
        except (urllib.error.URLError, ConnectionError) as err:
            if time.monotonic() > deadline:
                check(False, f"{name}: GET {url} (--metrics_address): {err}")
                return
            time.sleep(0.2)
    check(status == 200 and ctype.startswith("text/plain"),
          f"{name}: GET {url}: {status} {ctype!r}, want 200 text/plain")
    for fam, kind in re.findall(r"^# TYPE (normserve_\w+) (\w+)$", body, re.M):
        want = METRICS.get(fam) or METRICS.get(fam + "_total")
        check(want == kind, f"{name}: /metrics has {fam} as {kind}; METRICS says {want}")
    series = re.findall(r"^(normserve_\w+)(\{[^}]*\})?\s+(\S+)", body, re.M)
    for s, _, _ in series:
        check(metric_family(s), f"{name}: /metrics serves {s}, not in METRICS "
              "(the dashboard and docs/deploy.md list them)")
    info = [(labels, value) for s, labels, value in series if s == "normserve_build_info"]
    check(len(info) == 1 and f'version="{version}"' in info[0][0]
          and float(info[0][1]) == 1,
          f"{name}: /metrics normserve_build_info is {info}, want {{version=\"{version}\"}} 1")


def parse_quantity(q):
    """CPU in cores or memory in bytes, from a Kubernetes quantity."""
    q = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix in sorted(units, key=len, reverse=True):
        if q.endswith(suffix):
            return float(q[:-len(suffix)]) * units[suffix]
    return float(q)


def one(docs, kind, pred=lambda d: True, what=None):
    """The one object of KIND matching PRED ({} and a failure otherwise)."""
    found = [d for d in docs if d.get("kind") == kind and pred(d)]
    check(len(found) == 1, f"{what or kind}: want exactly one, found {len(found)}")
    return found[0] if found else {}


def selects(selector, labels):
    """Whether a matchLabels SELECTOR picks pods with LABELS."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def expand_args(container, configmap, name):
    """The container's args with $(VAR) expanded from its ConfigMap envFrom."""
    env = {}
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef", {}).get("name")
        check(ref == configmap["metadata"]["name"],
              f"{name}: envFrom names ConfigMap {ref}, rendered "
              f"{configmap['metadata']['name']}")
        env.update(configmap.get("data", {}))
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
    expanded = []
    for arg in container.get("args", []):
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
            # Kubernetes leaves an undefined $(VAR) as it is: a silent bug.
            check(var in env, f"{name}: arg {arg} uses $({var}), not in the ConfigMap")
        expanded.append(re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                               lambda m: env.get(m.group(1), m.group(0)), arg))
    return expanded


def flags_of(args, name):
    """{flag: value} from --flag=value args."""
    flags = {}
    for arg in args:
        m = re.fullmatch(r"--([a-z0-9_]+)=(.*)", arg)
        if check(m, f"{name}: arg {arg!r} is not --flag=value"):
            check(m.group(1) not in flags, f"{name}: --{m.group(1)} given twice")
            flags[m.group(1)] = m.group(2)
    return flags


def int_flag(flags, flag, default, name):
    """--FLAG's value as an integer (DEFAULT when absent or not a number)."""
    value = flags.get(flag, str(default))
    if check(re.fullmatch(r"[0-9]+", value), f"{name}: --{flag}={value} is not a number"):
        return int(value)
    return default


def start_server(server, flags, name, version):
    """Starts the server with FLAGS on loopback, scrapes its metrics, then
    stops it with SIGTERM."""
    flags = dict(flags)
    flags["address"] = "127.0.0.1:0"
    if "metrics_address" in flags:
        flags["metrics_address"] = f"127.0.0.1:{free_port()}"
    if flags.get("device", "").startswith("cuda"):
        flags["device"] = "cpu"  # No GPU here; the value itself is checked.
    args = [server] + [f"--{k}={v}" for k, v in flags.items()]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("normserve listening on 127.0.0.1:"):
            if not line:  # The server exited; its reason is on stderr.
                proc.wait(timeout=30)
                line = proc.stderr.read().strip()
            check(False, f"{name}: the server rejects the rendered args: {line}")
            return
        if "metrics_address" in flags:
            scrape(flags["metrics_address"], version, name)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        check(rc == 0, f"{name}: server exited {rc} after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check_overlay(overlay, docs, server, known_flags, version, image_facts):
    name = f"overlay {overlay}"
    before = len(failures)
    sts = one(docs, "StatefulSet", what=f"{name}: StatefulSet")
    headless = one(docs, "Service", lambda d: d["spec"].get("clusterIP") == "None",
                   f"{name}: headless Service")
    cluster = one(docs, "Service",
                  lambda d: d["spec"].get("clusterIP") != "None"
                  and d["spec"].get("type", "ClusterIP") == "ClusterIP",
                  f"{name}: ClusterIP Service")
    configmap = one(docs, "ConfigMap", what=f"{name}: ConfigMap")
    pdb = one(docs, "PodDisruptionBudget", what=f"{name}: PodDisruptionBudget")
    if len(failures) > before:  # This overlay's objects are missing.
        return

    spec = sts["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    check(selects(spec["selector"]["matchLabels"], labels),
          f"{name}: StatefulSet selector does not match its pods")
    check(spec.get("serviceName") == headless["metadata"]["name"],
          f"{name}: serviceName {spec.get('serviceName')} is not the headless Service")
    for svc in (headless, cluster):
        check(selects(svc["spec"].get("selector", {}), labels),
              f"{name}: Service {svc['metadata']['name']} does not select the pods")
    check(selects(pdb["spec"]["selector"]["matchLabels"], labels),
          f"{name}: PodDisruptionBudget does not select the pods")
    check("maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"],
          f"{name}: PodDisruptionBudget sets no budget")

    containers = pod["containers"]
    check(len(containers) == 1, f"{name}: want one container")
    c = containers[0]
    cname = f"{name}: container {c['name']}"
    check(":" in c["image"].rsplit("/", 1)[-1] and "/" in c["image"],
          f"{cname}: image {c['image']} is the base's placeholder")

    # Port: container, --address, probes, Services.
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    port = ports.get("grpc")
    check(port is not None, f"{cname}: no port named grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe)
        if not check(p, f"{cname}: no {probe}"):
            continue
        check("grpc" in p and not {"httpGet", "tcpSocket", "exec"} & set(p),
              f"{cname}: {probe} is not a native gRPC probe")
        check(p.get("grpc", {}).get("port") == port,
              f"{cname}: {probe} port {p.get('grpc', {}).get('port')} is not "
              f"the gRPC port {port}")
        check(p.get("grpc", {}).get("service", "") == "",
              f"{cname}: {probe} checks a named service; the server reports ''")
    startup = c.get("startupProbe", {})
    budget = (startup.get("initialDelaySeconds", 0)
              + startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3))
    check(budget >= MIN_STARTUP_S[overlay],
          f"{cname}: startup probe allows {budget}s, want >= {MIN_STARTUP_S[overlay]}s")
    for svc in (headless, cluster):
        sp = svc["spec"]["ports"]
        check(len(sp) == 1 and sp[0].get("targetPort") in ("grpc", port)
              and sp[0]["port"] == port,
              f"{name}: Service {svc['metadata']['name']} ports {sp} do not "
              f"lead to the gRPC port {port}")

    # Args: known flags, values from the ConfigMap, the server accepts them.
    args = expand_args(c, configmap, cname)
    check(not c.get("command"), f"{cname}: command overrides the image's ENTRYPOINT")
    flags = flags_of(args, cname)
    unknown = set(flags) - known_flags
    check(not unknown, f"{cname}: flags {sorted(unknown)} are not in `normserve --help`")
    address = flags.get("address", "")
    check(address in (f"0.0.0.0:{port}", f"[::]:{port}"),
          f"{cname}: --address={address}, want 0.0.0.0:{port}")
    device = flags.get("device", "")
    check(re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", device),
          f"{cname}: --device={device} is not auto|cpu|cuda[:N]")
    if not unknown:
        start_server(server, flags, cname, version)

    # Metrics: every pod serves GET /metrics (plain HTTP) on the port
    # `metrics`; annotated for a plain Prometheus; a PodMonitor only with
    # components/metrics, since its CRD may be absent.
    mport = ports.get("metrics")
    check(mport is not None and mport != port,
          f"{cname}: no container port `metrics` apart from grpc ({ports})")
    maddress = flags.get("metrics_address", "")
    check(maddress in (f"0.0.0.0:{mport}", f"[::]:{mport}"),
          f"{cname}: --metrics_address={maddress}, want 0.0.0.0:{mport} (the port `metrics`)")
    annotations = spec["template"]["metadata"].get("annotations", {})
    want = {"prometheus.io/scrape": "true", "prometheus.io/port": str(mport),
            "prometheus.io/path": "/metrics"}
    got = {k: annotations.get(k) for k in want}
    check(got == want, f"{name}: pod template annotations {got}, want {want}")
    monitors = [d["kind"] for d in docs
                if d.get("apiVersion", "").startswith("monitoring.coreos.com/")]
    check(not monitors, f"{name}: {monitors} without components/{METRICS_COMPONENT}; "
          "the Prometheus Operator's CRD may be absent")

    # Shutdown: preStop, then SIGTERM and the drain, within the grace period.
    pre_stop = c.get("lifecycle", {}).get("preStop", {})
    sleep_s = 0
    if "exec" in pre_stop:
        cmd = pre_stop["exec"]["command"]
        check(cmd[0].startswith("/") and cmd[0].endswith("/sleep"),
              f"{cname}: preStop {cmd} is not an absolute sleep")
        sleep_s = int(cmd[-1]) if str(cmd[-1]).isdigit() else 0
    elif "sleep" in pre_stop:
        sleep_s = int(pre_stop["sleep"].get("seconds", 0))
    check(sleep_s > 0, f"{cname}: no preStop delay before SIGTERM")
    grace = int_flag(flags, "shutdown_grace_s", 10, cname)
    period = pod.get("terminationGracePeriodSeconds", 30)
    check(period >= sleep_s + grace + FLUSH_MARGIN_S,
          f"{name}: terminationGracePeriodSeconds {period} < preStop {sleep_s}s + "
          f"--shutdown_grace_s {grace}s + {FLUSH_MARGIN_S}s flush")

    # Security context.
    psc = pod.get("securityContext", {})
    csc = c.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True,
          f"{name}: runAsNonRoot is not set")
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    check(uid == image_facts["uid"],
          f"{name}: runAsUser {uid} is not the image's user {image_facts['uid']}")
    check(psc.get("fsGroup") == image_facts["gid"],
          f"{name}: fsGroup {psc.get('fsGroup')} cannot write the image's state dir")
    check(csc.get("allowPrivilegeEscalation") is False,
          f"{cname}: allowPrivilegeEscalation is not false")
    check(csc.get("readOnlyRootFilesystem") is True,
          f"{cname}: readOnlyRootFilesystem is not true")
    check(csc.get("privileged") is not True, f"{cname}: privileged")
    check("ALL" in csc.get("capabilities", {}).get("drop", []),
          f"{cname}: capabilities are not all dropped")
    check(csc.get("capabilities", {}).get("add") in (None, []),
          f"{cname}: adds capabilities")
    seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {}))
    check(seccomp.get("type") == "RuntimeDefault", f"{name}: seccomp is not RuntimeDefault")
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        check(not pod.get(host), f"{name}: {host}")
    check(pod.get("automountServiceAccountToken") is False,
          f"{name}: the service account token is mounted")

    # State volume, at the directory the image prepares.
    claims = {t["metadata"]["name"]: t for t in spec.get("volumeClaimTemplates", [])}
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    state = [n for n, m in mounts.items() if m["mountPath"] == STATE_DIR]
    check(state and state[0] in claims,
          f"{cname}: no volumeClaimTemplate mounted at {STATE_DIR}")
    if state and state[0] in claims:
        check(not mounts[state[0]].get("readOnly"), f"{cname}: state volume is read-only")
        check(claims[state[0]]["spec"].get("resources", {}).get("requests", {}).get("storage"),
              f"{name}: the state claim requests no storage")
    check(image_facts["state_dir"] == STATE_DIR,
          f"Dockerfile prepares {image_facts['state_dir']}, manifests mount {STATE_DIR}")
    tmp = mounts.get("tmp", {})
    check(tmp.get("mountPath") == "/tmp", f"{cname}: no writable /tmp on the read-only root")

    # Resources.
    res = c.get("resources", {})
    req, lim = res.get("requests", {}), res.get("limits", {})
    for r in ("cpu", "memory"):
        if check(r in req and r in lim, f"{cname}: {r} request and limit not both set"):
            check(parse_quantity(req[r]) <= parse_quantity(lim[r]),
                  f"{cname}: {r} request above its limit")
    if "cpu" in lim:
        cpus = parse_quantity(lim["cpu"])
        for f in ("cpu_threads", "workers"):
            n = int_flag(flags, f, 0, cname)
            check(1 <= n <= max(1, cpus),
                  f"{cname}: --{f}={n}; want 1..{cpus:g} (0 means every core of the node)")
    if "memory" in lim:
        need = (int_flag(flags, "max_saved_mb", 2048, cname)
                + 2 * int_flag(flags, "max_message_mb", 512, cname) + 512) * 2**20
        check(parse_quantity(lim["memory"]) >= need,
              f"{cname}: memory limit {lim['memory']} < saved + 2 x message + 512 MiB "
              f"({need >> 20} MiB)")
    gpus = lim.get("nvidia.com/gpu")
    rendered = yaml.safe_dump_all(docs)
    if overlay == "gpu":
        check(str(gpus) == "1", f"{cname}: limits nvidia.com/gpu is {gpus}, want 1")
        check(device.startswith("cuda"), f"{cname}: --device={device}, want cuda")
        check(pod.get("nodeSelector") or pod.get("tolerations") or pod.get("affinity", {}).get("nodeAffinity"),
              f"{name}: no node selector, affinity or tolerations for GPU nodes")
    else:
        check("nvidia.com/gpu" not in rendered.replace("nvidia.com/gpu.present", ""),
              f"{name}: mentions nvidia.com/gpu")
        check(device in ("cpu", "auto"), f"{cname}: --device={device}")
    return flags


def make_certificates(tmp):
    """A CA and a server certificate for 127.0.0.1 under TMP (openssl);
    returns (ca, cert, key) paths, or None when openssl fails."""
    d = os.path.join(tmp, "certs")
    os.makedirs(d)
    ext = os.path.join(d, "san.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    p = lambda name: os.path.join(d, name)
    steps = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=test-ca", "-keyout", p("ca.key"), "-out", p("ca.pem")],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-keyout", p("tls.key"), "-out", p("tls.csr")],
        ["openssl", "x509", "-req", "-days", "2", "-in", p("tls.csr"), "-CA", p("ca.pem"),
         "-CAkey", p("ca.key"), "-CAcreateserial", "-extfile", ext, "-out", p("tls.crt")],
    ]
    for step in steps:
        try:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=60)
        except OSError as err:
            check(False, f"cannot run openssl for the TLS variant: {err}")
            return None
        if not check(proc.returncode == 0, f"openssl failed: {proc.stderr[-500:]}"):
            return None
    return p("ca.pem"), p("tls.crt"), p("tls.key")


def cli_run(cli, *args):
    """(exit code, stdout + stderr) of normserve-cli ARGS."""
    proc = subprocess.run([cli, "--timeout_ms=5000"] + list(args), capture_output=True,
                          text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def check_tls_server(server, cli, flags, certs, name, version):
    """Starts the server with the TLS variant's FLAGS on loopback (its
    certificate from CERTS) and checks what the probes rely on: a plaintext
    health check on --health_address answers SERVING, the main port refuses
    plaintext and serves TLS, the health port serves nothing else, metrics
    stay plain HTTP, SIGTERM exits 0."""
    ca, cert, key = certs
    flags = dict(flags, address="127.0.0.1:0", health_address="127.0.0.1:0",
                 tls_cert=cert, tls_key=key)
    flags.pop("tls_client_ca", None)
    if "metrics_address" in flags:
        flags["metrics_address"] = f"127.0.0.1:{free_port()}"
    if flags.get("device", "").startswith("cuda"):
        flags["device"] = "cpu"
    proc = subprocess.Popen([server] + [f"--{k}={v}" for k, v in flags.items()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        main = health = None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and health is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.match(r"normserve listening on (\S+) ", line)
            main = m.group(1) if m else main
            m = re.match(r"normserve: health checks .* on (\S+)$", line.strip())
            health = m.group(1) if m else health
        if not check(main and health, f"{name}: the server did not report both "
                     f"listeners: {''.join(lines)}{proc.stderr.read() if proc.poll() is not None else ''}"):
            return
        rc, out = cli_run(cli, f"--address={health}", "health")
        check(rc == 0 and "SERVING" in out,
              f"{name}: plaintext health check on --health_address failed ({rc}): {out}")
        rc, out = cli_run(cli, f"--address={main}", "health")
        check(rc != 0, f"{name}: the TLS port answered a plaintext health check: {out}")
        rc, out = cli_run(cli, f"--address={main}", f"--tls_ca={ca}", "health")
        check(rc == 0 and "SERVING" in out,
              f"{name}: health check over TLS on the main port failed ({rc}): {out}")
        rc, out = cli_run(cli, f"--address={health}", "list")
        check(rc != 0 and "UNIMPLEMENTED" in out,
              f"{name}: the health port answered ListLayers ({rc}): {out}")
        if "metrics_address" in flags:
            scrape(flags["metrics_address"], version, name)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        check(rc == 0, f"{name}: server exited {rc} after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def render_variant(kubectl, k8s, overlay, components, name):
    """Renders `overlay` plus `components` from k8s (a copy of deploy/k8s:
    kustomize takes only relative paths) as variants/NAME."""
    variant = os.path.join(k8s, "variants", name)
    os.makedirs(variant)
    with open(os.path.join(variant, "kustomization.yaml"), "w") as f:
        yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [f"../../overlays/{overlay}"],
            "components": [f"../../components/{c}" for c in components],
        }, f)
    return kustomize(kubectl, variant)


def check_components(kubectl, server, known_flags, cli, version):
    """Each overlay plus the opt-in components renders, with flags the server
    has; its probes reach the health listener, and the server starts with
    those flags (check_tls_server)."""
    with tempfile.TemporaryDirectory() as tmp:
        certs = make_certificates(tmp)
        # kustomize takes only relative paths, inside a copy of the tree.
        k8s = os.path.join(tmp, "k8s")
        shutil.copytree(K8S, k8s)
        for overlay in OVERLAYS:
            docs = render_variant(kubectl, k8s, overlay, COMPONENTS,
                                  overlay)
            sts = one(docs, "StatefulSet")
            configmap = one(docs, "ConfigMap")
            c = sts["spec"]["template"]["spec"]["containers"][0]
            name = f"overlay {overlay} + components {', '.join(COMPONENTS)}"
            flags = flags_of(expand_args(c, configmap, name), name)
            unknown = set(flags) - known_flags
            check(not unknown, f"{name}: flags {sorted(unknown)} are unknown to the server")
            check(flags.get("state_dir") == STATE_DIR,
                  f"{name}: --state_dir={flags.get('state_dir')}, the volume is at {STATE_DIR}")
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            for f in ("tls_cert", "tls_key"):
                check(os.path.dirname(flags.get(f, "")) in mounts,
                      f"{name}: --{f} is not on a mounted volume")

            # Probes: plaintext gRPC on the health listener, not the TLS port.
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            health = ports.get("health")
            check(len(set(ports.values())) == len(ports),
                  f"{name}: container ports {ports} share a number")
            check(health is not None and health != ports.get("grpc"),
                  f"{name}: no container port `health` apart from grpc ({ports})")
            check(flags.get("health_address") in (f"0.0.0.0:{health}", f"[::]:{health}"),
                  f"{name}: --health_address={flags.get('health_address')}, want "
                  f"0.0.0.0:{health} (the probes' port)")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                grpc_probe = c.get(probe, {}).get("grpc", {})
                check(grpc_probe and grpc_probe.get("port") == health
                      and grpc_probe.get("service", "") == "",
                      f"{name}: {probe} {c.get(probe)} does not target the plaintext "
                      f"health port {health}")
            for svc in (d for d in docs if d.get("kind") == "Service"):
                for sp in svc["spec"]["ports"]:
                    check(sp.get("targetPort") not in ("health", health)
                          and sp["port"] != health,
                          f"{name}: Service {svc['metadata']['name']} exposes the health port")
                    check(sp.get("appProtocol") != "kubernetes.io/h2c",
                          f"{name}: Service {svc['metadata']['name']} says h2c (cleartext) "
                          "for the TLS port")

            if not unknown and certs:
                state = dict(flags)
                state["state_dir"] = os.path.join(tmp, f"state-{overlay}")
                os.makedirs(state["state_dir"])
                check_tls_server(server, cli, state, certs, name, version)
        print(f"ok: components {', '.join(COMPONENTS)} render on every overlay; "
              "their probes reach the plaintext health listener")


def check_metrics_component(kubectl, rendered):
    """components/metrics on each overlay, alone and with the other
    components: a PodMonitor for the server pods' port `metrics`, and alone
    nothing else (RENDERED: {overlay: its objects})."""
    load = one(kustomize(kubectl, os.path.join(K8S, "load")), "Job", what="load: Job")
    load_labels = load.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
    with tempfile.TemporaryDirectory() as tmp:
        k8s = os.path.join(tmp, "k8s")
        shutil.copytree(K8S, k8s)
        for overlay in OVERLAYS:
            for components in ((METRICS_COMPONENT,), COMPONENTS + (METRICS_COMPONENT,)):
                name = f"overlay {overlay} + components {', '.join(components)}"
                docs = render_variant(kubectl, k8s, overlay, components,
                                      "-".join((overlay,) + components))
                monitor = one(docs, "PodMonitor", what=f"{name}: PodMonitor")
                if components == (METRICS_COMPONENT,):
                    check([d for d in docs if d.get("kind") != "PodMonitor"] == rendered[overlay],
                          f"{name}: changes the overlay's objects; it should only add a PodMonitor")
                sts = one(docs, "StatefulSet", what=f"{name}: StatefulSet")
                configmap = one(docs, "ConfigMap", what=f"{name}: ConfigMap")
                if not monitor or not sts:
                    continue
                check(monitor.get("apiVersion") == "monitoring.coreos.com/v1",
                      f"{name}: PodMonitor apiVersion {monitor.get('apiVersion')}")
                mspec = monitor.get("spec", {})
                # Applied with -n like the rest, it watches its own namespace.
                check("namespace" not in monitor["metadata"] and not mspec.get("namespaceSelector"),
                      f"{name}: the PodMonitor must live in, and watch, the pods' namespace")
                labels = sts["spec"]["template"]["metadata"]["labels"]
                selector = mspec.get("selector", {})
                check(set(selector) == {"matchLabels"} and selects(selector["matchLabels"], labels),
                      f"{name}: PodMonitor selector {selector} does not select the "
                      f"StatefulSet's pods {labels}")
                check(not selects(selector.get("matchLabels", {}), load_labels),
                      f"{name}: PodMonitor selects the load Job's pods, which serve no metrics")
                c = sts["spec"]["template"]["spec"]["containers"][0]
                ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
                flags = flags_of(expand_args(c, configmap, name), name)
                mport = flags.get("metrics_address", "").rsplit(":", 1)[-1]
                endpoints = mspec.get("podMetricsEndpoints", [])
                check(len(endpoints) == 1, f"{name}: PodMonitor endpoints {endpoints}, want one")
                for ep in endpoints:
                    check("targetPort" not in ep and ep.get("port") in ports,
                          f"{name}: PodMonitor port {ep.get('port')!r} is not the name of a "
                          f"container port ({sorted(ports)})")
                    check(str(ports.get(ep.get("port"))) == mport,
                          f"{name}: PodMonitor port {ep.get('port')} "
                          f"({ports.get(ep.get('port'))}) is not --metrics_address's {mport}")
                    check(ep.get("path") == "/metrics" and ep.get("scheme", "http") == "http",
                          f"{name}: PodMonitor scrapes {ep.get('scheme', 'http')}://...{ep.get('path')}, "
                          "want plain http at /metrics")
                    check(ep.get("interval") == "15s", f"{name}: interval {ep.get('interval')}, want 15s")
    print(f"ok: component {METRICS_COMPONENT} adds a PodMonitor on every overlay, "
          "for the server pods' port `metrics`")


def dashboard_panels(panels):
    """PANELS and the panels of their rows, flattened."""
    for p in panels:
        yield p
        yield from dashboard_panels(p.get("panels", []))


def datasource_refs(node):
    """Every "datasource" value anywhere in NODE."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "datasource":
                yield v
            yield from datasource_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from datasource_refs(v)


def is_datasource_variable(ref):
    """Whether REF names the dashboard's ${datasource} variable (a Prometheus one)."""
    variable = ("${datasource}", "$datasource")
    return ref in variable or (isinstance(ref, dict) and ref.get("uid") in variable
                               and ref.get("type", "prometheus") == "prometheus")


def check_promql(exprs, promtool):
    """Each of EXPRS (Grafana's variables replaced) parses, by `promtool check
    rules` on recording rules made of them."""
    def concrete(expr):
        expr = re.sub(r"\$__rate_interval\b|\$\{__rate_interval\}", "1m", expr)
        expr = re.sub(r"\$__interval\b|\$__range\b", "1m", expr)
        return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)
    with tempfile.TemporaryDirectory() as tmp:
        rules = os.path.join(tmp, "dashboard-rules.yaml")
        with open(rules, "w") as f:
            yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
                {"record": f"dashboard:expr_{i}", "expr": concrete(e)}
                for i, e in enumerate(exprs)]}]}, f)
        proc = subprocess.run([promtool, "check", "rules", rules], capture_output=True,
                              text=True, timeout=60)
        check(proc.returncode == 0,
              f"dashboard: promtool rejects its PromQL:\n{proc.stdout}{proc.stderr}")


def check_dashboard(promtool):
    """deploy/grafana's dashboard: Grafana JSON on the ${datasource} variable,
    PromQL over METRICS only."""
    name = f"dashboard {os.path.relpath(DASHBOARD, REPO)}"
    try:
        with open(DASHBOARD) as f:
            text = f.read()
        dash = json.loads(text)
    except (OSError, ValueError) as err:
        check(False, f"{name}: {err}")
        return
    check(isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 36,
          f"{name}: schemaVersion {dash.get('schemaVersion')}, want >= 36")
    check(dash.get("title") and dash.get("uid"), f"{name}: no title or uid")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    check(ds.get("type") == "datasource" and ds.get("query") == "prometheus",
          f"{name}: no datasource variable `datasource` of Prometheus data sources")
    # No data source of one Grafana (a uid) nor an export's ${DS_...} input.
    bad = [r for r in datasource_refs(dash) if not is_datasource_variable(r)]
    check(not bad, f"{name}: data sources {bad} are not the ${{datasource}} variable")
    check("__inputs" not in dash and "${DS_" not in text,
          f"{name}: import placeholders (__inputs, ${{DS_...}}) instead of the variable")

    panels = list(dashboard_panels(dash.get("panels", [])))
    ids = [p.get("id") for p in panels]
    check(len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids),
          f"{name}: panel ids {ids} are not unique integers")
    exprs, used = [], set()
    for v in variables.values():
        if v.get("type") == "query":
            check(is_datasource_variable(v.get("datasource")),
                  f"{name}: variable {v.get('name')} queries {v.get('datasource')}")
            query = v.get("query", {})
            query = query.get("query", "") if isinstance(query, dict) else query
            for series in re.findall(r"normserve_[a-z_]+", query):
                check(metric_family(series), f"{name}: variable {v.get('name')} names {series}, "
                      "not a metric of METRICS")
    for p in panels:
        if p.get("type") == "row":
            continue
        title = f"{name}: panel {p.get('title')!r}"
        check(p.get("gridPos"), f"{title}: no gridPos")
        check(is_datasource_variable(p.get("datasource")),
              f"{title}: datasource {p.get('datasource')} is not ${{datasource}}")
        targets = p.get("targets", [])
        check(targets, f"{title}: no targets")
        for t in targets:
            expr = t.get("expr", "")
            if not check(expr, f"{title}: target {t.get('refId')} has no expr"):
                continue
            exprs.append(expr)
            check(is_datasource_variable(t.get("datasource", p.get("datasource"))),
                  f"{title}: target {t.get('refId')} datasource {t.get('datasource')}")
            names = re.findall(r"normserve_[a-z_]+", expr)
            check(names, f"{title}: {expr!r} names no normserve metric")
            for series in names:
                family = metric_family(series)
                if not check(family, f"{title}: {series} is not a metric of METRICS"):
                    continue
                used.add(family)
                check(METRICS[family] != "histogram" or series != family,
                      f"{title}: {series} is a histogram: use its _bucket, _sum or _count")
                if METRICS[family] == "counter" or series != family:
                    check(re.search(r"\b(rate|irate|increase)\s*\(", expr),
                          f"{title}: counter {series} outside rate() or increase()")
            if "_bucket" in expr or "histogram_quantile" in expr:
                by = re.findall(r"\bby\s*\(([^)]*)\)", expr)
                check("histogram_quantile(" in expr and "_bucket" in expr
                      and any("le" in [g.strip() for g in b.split(",")] for b in by),
                      f"{title}: {expr!r}: want histogram_quantile over _bucket, by (le, ...)")
    missing = sorted(set(METRICS) - used)
    check(not missing, f"{name}: no panel shows {missing}")
    if promtool:
        check_promql(exprs, promtool)
    print(f"ok: {name}: {len(panels)} panels, {len(exprs)} expressions over "
          f"{len(used)} metrics" + ("" if promtool else " (no promtool: PromQL not parsed)"))


def check_load_job(kubectl, sts, port, load_binary):
    docs = kustomize(kubectl, os.path.join(K8S, "load"))
    job = one(docs, "Job", what="load: Job")
    if not job:
        return
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    check(c.get("command", [""])[0] == "/usr/local/bin/normserve-load",
          f"load: command {c.get('command')} is not the image's normserve-load")
    addresses = [a.split("=", 1)[1] for a in c.get("args", []) if a.startswith("--address=")]
    want = f"{sts['metadata']['name']}-0.{sts['spec']['serviceName']}:{port}"
    check(addresses == [want], f"load: --address {addresses}, want {want}")
    check(pod.get("restartPolicy") == "Never", "load: restartPolicy is not Never")
    check(pod.get("securityContext", {}).get("runAsNonRoot") is True, "load: runAsNonRoot")
    csc = c.get("securityContext", {})
    check(csc.get("allowPrivilegeEscalation") is False and csc.get("readOnlyRootFilesystem") is True
          and "ALL" in csc.get("capabilities", {}).get("drop", []),
          "load: container security context")
    check(c.get("resources", {}).get("limits"), "load: no limits")
    if load_binary:  # Its flags may change: the Job must keep up.
        known, _ = server_flags(load_binary)
        unknown = set(flags_of(c.get("args", []), "load")) - known
        check(not unknown, f"load: flags {sorted(unknown)} are not in `normserve-load --help`")
    with open(os.path.join(REPO, "deploy", "docker", "stage-runtime.sh")) as f:
        check("normserve-load" in f.read(), "load: the image does not stage normserve-load")


def image_facts():
    """What the Dockerfile's cpu and gpu runtime stages promise."""
    with open(DOCKERFILE) as f:
        text = f.read()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I)
    check(stages[:2] == ["cpu-build", "cpu"] and {"gpu-build", "gpu"} <= set(stages),
          f"Dockerfile stages {stages}: want cpu-build, cpu first, then gpu-build, gpu")
    users = set(re.findall(r"^USER\s+(\d+):(\d+)\s*$", text, re.M))
    check(len(users) == 1, f"Dockerfile USER lines {users}: want one numeric uid:gid")
    uid, gid = map(int, next(iter(users))) if users else (None, None)
    check(uid == RUN_AS, f"Dockerfile USER {uid}, want {RUN_AS}")
    exposed = set(re.findall(r"^EXPOSE\s+(\d+)", text, re.M))
    check(exposed == {"50051"}, f"Dockerfile EXPOSE {exposed}, want 50051")
    health = re.findall(r'HEALTHCHECK[^\n]*\\\n\s*CMD \[([^\]]*)\]', text)
    check(len(health) == 2 and all('normserve-cli' in h and '"health"' in h
                                   and "127.0.0.1:50051" in h for h in health),
          f"Dockerfile HEALTHCHECKs {health}: want normserve-cli health on :50051")
    dirs = re.findall(r"install -d -o (\d+) -g (\d+) -m 0750 (\S+)", text)
    check(len(set(dirs)) == 1, f"Dockerfile state dirs {dirs}: want one")
    state_dir = dirs[0][2] if dirs else None
    with open(os.path.join(REPO, ".dockerignore")) as f:
        ignore = f.read().split()
    for script in re.findall(r"^COPY (deploy/docker/\S+)", text, re.M) + [
            "deploy/docker/stage-runtime.sh"]:
        check("!" + script in ignore,
              f".dockerignore leaves {script} out of the build context")
        check(os.access(os.path.join(REPO, script), os.X_OK), f"{script} is not executable")
    return {"uid": uid, "gid": gid, "state_dir": state_dir}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True, help="the normserve binary")
    parser.add_argument("--cli", help="the normserve-cli binary (default: beside --server)")
    parser.add_argument("--load", help="the normserve-load binary, if built")
    parser.add_argument("--kubectl", default=shutil.which("kubectl") or "/usr/bin/kubectl")
    parser.add_argument("--promtool", default=shutil.which("promtool"),
                        help="parses the dashboard's PromQL (default: from PATH, if any)")
    opts = parser.parse_args()
    if not os.access(opts.kubectl, os.X_OK):
        print(f"SKIP: no kubectl ({opts.kubectl}); `kubectl kustomize` renders the overlays")
        return 77

    known_flags, _ = server_flags(opts.server)
    version = server_version(opts.server)
    facts = image_facts()
    cpu_sts = None
    rendered = {}
    for overlay in OVERLAYS:
        before = len(failures)
        docs = kustomize(opts.kubectl, os.path.join(K8S, "overlays", overlay))
        rendered[overlay] = docs
        flags = check_overlay(overlay, docs, opts.server, known_flags, version, facts)
        if overlay == "cpu":
            cpu_sts = one(docs, "StatefulSet")
        if len(failures) == before:
            print(f"ok: overlay {overlay}: {len(docs)} objects; flags "
                  + " ".join(f"--{k}={v}" for k, v in (flags or {}).items()))
    cli = opts.cli or os.path.join(os.path.dirname(opts.server), "normserve-cli")
    if not os.access(cli, os.X_OK):
        raise SystemExit(f"FAIL: no normserve-cli at {cli} (--cli)")
    check_components(opts.kubectl, opts.server, known_flags, cli, version)
    check_metrics_component(opts.kubectl, rendered)
    check_dashboard(opts.promtool)
    if cpu_sts:
        port = cpu_sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
        check_load_job(opts.kubectl, cpu_sts, port, opts.load)

    for f in failures:
        print("FAIL: " + f)
    checks = "overlays, components, metrics component, dashboard, load Job, Dockerfile"
    if failures:
        print(f"{len(failures)} problem(s) in deploy/")
        return 1
    print(f"PASS: {checks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
