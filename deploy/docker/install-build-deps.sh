#!/usr/bin/env bash
# Installs what the image's builder stages need to build normserve's server,
# CLI and load generator (tests off): the C++ part of scripts/install-deps.sh,
# nothing for the Python or Node clients. libgoogle-perftools-dev: the server
# links tcmalloc when it finds it (server/CMakeLists.txt), and the image's
# server should be the one that was measured. libcivetweb-dev: the metrics
# endpoint (--metrics_address). Debian 12 and Ubuntu 24.04 (the
# nvidia/cuda images) name these packages alike.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  build-essential cmake pkg-config \
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
  libabsl-dev grpc-proto libbenchmark-dev libcivetweb-dev \
  libgoogle-perftools-dev >/dev/null
rm -rf /var/lib/apt/lists/*
