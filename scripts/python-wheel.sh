#!/usr/bin/env bash
# Builds the Python client's wheel: stages client/python (pyproject.toml and
# normserve/) with what the CMake build generated beside it (the gRPC stubs
# in normserve/v1 and normserve/_version.py) and runs Debian's python3-build
# without isolation, so nothing comes from a package index.
#   scripts/python-wheel.sh BUILD_DIR [OUT_DIR]   (OUT_DIR: BUILD_DIR/dist)
# Prints the wheel's path.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 BUILD_DIR [OUT_DIR]" >&2
  exit 2
fi
REPO="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="$(cd "$1" && pwd)"
OUT="${2:-$BUILD/dist}"
PYTHON="${NORMSERVE_PYTHON:-/usr/bin/python3}"
GEN="$BUILD/python/normserve"

for f in v1/normserve_pb2.py v1/normserve_pb2_grpc.py _version.py; do
  if [ ! -f "$GEN/$f" ]; then
    echo "python-wheel: $GEN/$f is missing; build first (make build)" >&2
    exit 1
  fi
done
if ! "$PYTHON" -c 'import build, setuptools, wheel' 2>/dev/null; then
  echo "python-wheel: $PYTHON lacks build, setuptools or wheel (Debian:" \
       "python3-build python3-setuptools python3-wheel;" \
       "scripts/install-deps.sh installs them)" >&2
  exit 1
fi

STAGE="$BUILD/wheel-stage"
rm -rf "$STAGE"
mkdir -p "$STAGE/normserve/v1" "$OUT"
cp "$REPO/client/python/pyproject.toml" "$STAGE/"
cp "$REPO"/client/python/normserve/*.py "$STAGE/normserve/"
cp "$GEN/_version.py" "$STAGE/normserve/"
cp "$GEN"/v1/*.py "$STAGE/normserve/v1/"
: > "$STAGE/normserve/v1/__init__.py"

version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$GEN/_version.py")"
rm -f "$OUT"/normserve-"$version"-*.whl
if ! log="$(cd "$STAGE" && "$PYTHON" -m build --no-isolation --wheel \
              --outdir "$OUT" . 2>&1)"; then
  echo "$log" >&2
  echo "python-wheel: building the wheel failed" >&2
  exit 1
fi
rm -rf "$STAGE"
ls "$OUT"/normserve-"$version"-*.whl
