#!/usr/bin/env bash
# `make soak`: scripts/soak.py against BIN_DIR's server for SECONDS.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN_DIR=${1:-build/bin}
SECONDS_TO_RUN=${2:-600}
BUILD_DIR=$(dirname "$BIN_DIR")
PYTHONPATH="$BUILD_DIR/python:client/python${PYTHONPATH:+:$PYTHONPATH}" \
  exec /usr/bin/python3 scripts/soak.py "$BIN_DIR" "$SECONDS_TO_RUN"
