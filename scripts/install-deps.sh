#!/usr/bin/env bash
# Installs the Debian 12 packages normserve needs to build and test, and the
# Node client's npm packages (client/node, from its package-lock.json).
# Idempotent and quiet when everything is already there.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev grpc-proto
  libgtest-dev libgmock-dev libbenchmark-dev
  # Python client (stubs from protobuf-compiler-grpc's grpc_python_plugin)
  # and its tests, for Debian's /usr/bin/python3.
  python3-grpcio python3-protobuf python3-numpy python3-pytest python3-torch
  python3-sklearn
  # tests/deploy: reads the rendered Kubernetes manifests.
  python3-yaml
  # bench/ and tests/load: the load report's plot, and the allocators the
  # service benchmark compares (tcmalloc is linked into the server when
  # found, see server/CMakeLists.txt).
  python3-matplotlib libgoogle-perftools-dev libjemalloc2
  # tests/server/security_test makes its certificates; scripts/fuzz.sh
  # builds the libFuzzer target with clang 14.
  openssl clang-14 libclang-rt-14-dev
  # Metrics (--metrics_address; tests/metrics): civetweb serves /metrics;
  # the tests parse it with prometheus-client and scrape it with Prometheus.
  libcivetweb-dev prometheus python3-prometheus-client
  # Packages (make python-wheel, tests/packaging): the wheel is built and
  # installed into a venv offline, with Debian's build tools.
  python3-venv python3-build python3-wheel python3-setuptools
  # Node package (tests/node_package): tsc checks index.d.ts.
  node-typescript
  # Stubs for more languages (make stubs, tests/stubs): Go and Java from
  # Debian's gRPC packages. Go: github.com/golang/protobuf 1.5 (over APIv2;
  # grpc-go's codec crashes on protoc-gen-go's messages with 1.3, which
  # golang-google-grpc-dev pulls in otherwise). Java: what libgrpc-java's
  # jars need but its package does not pull in (netty transport, protobuf,
  # perfmark, gson, javax.annotation.Generated for the generated stubs).
  golang-go golang-google-grpc-dev golang-google-protobuf-dev
  golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc
  default-jdk-headless libgrpc-java protobuf-compiler-grpc-java-plugin
  libnetty-java libprotobuf-java libguava-java libperfmark-java
  libgoogle-gson-java libgeronimo-annotation-1.3-spec-java
)
# Node client: Debian's node and npm unless both are already on PATH (e.g.
# from NodeSource, whose nodejs package conflicts with Debian's npm).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  PACKAGES+=(nodejs npm)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# npm ci when node_modules is missing or older than the lock file (npm ci
# writes node_modules/.package-lock.json last).
NODE_DIR="$(cd "$(dirname "$0")/../client/node" && pwd)"
if [ ! -f "$NODE_DIR/node_modules/.package-lock.json" ] ||
   [ "$NODE_DIR/package-lock.json" -nt "$NODE_DIR/node_modules/.package-lock.json" ]; then
  echo "install-deps: npm ci in client/node"
  (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
