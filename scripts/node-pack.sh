#!/usr/bin/env bash
# Packs the Node client (client/node) as an npm tarball in BUILD_DIR/dist
# and prints its path. The tarball carries what package.json's `files`
# lists: index.js, index.d.ts, example.js, README.md and the API's proto,
# copied from proto/ (its one source of truth) into a staging copy of the
# package, so the checkout is never touched and runs may overlap. (`npm pack`
# in client/node itself does the same through the prepack and postpack
# scripts.) Idempotent: the tarball is replaced. Quiet on success but for
# the path.
#
# usage: scripts/node-pack.sh BUILD_DIR
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 BUILD_DIR" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
NODE_DIR="$ROOT/client/node"
PROTO="normserve/v1/normserve.proto"
mkdir -p "$1/dist"
DIST="$(cd "$1/dist" && pwd)"

for tool in node npm tar; do
  command -v "$tool" >/dev/null || { echo "node-pack: $tool not found" >&2
                                     exit 1; }
done

# One version for the project: the package's must be VERSION's.
VERSION="$(tr -d '[:space:]' < "$ROOT/VERSION")"
PACKAGE_VERSION="$(node -p "require(process.argv[1]).version" \
                     "$NODE_DIR/package.json")"
if [[ "$PACKAGE_VERSION" != "$VERSION" ]]; then
  echo "node-pack: client/node/package.json has version $PACKAGE_VERSION," \
       "VERSION says $VERSION" >&2
  exit 1
fi

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
tar -C "$NODE_DIR" --exclude=./node_modules --exclude=./proto -cf - . |
  tar -C "$STAGE" -xf -
mkdir -p "$STAGE/proto/$(dirname "$PROTO")"
cp "$ROOT/proto/$PROTO" "$STAGE/proto/$PROTO"

TARBALL="$DIST/normserve-client-$VERSION.tgz"
rm -f "$TARBALL"
if ! NAME="$(cd "$STAGE" && npm pack --silent --ignore-scripts \
                --pack-destination "$DIST" 2>"$STAGE/npm.log")"; then
  cat "$STAGE/npm.log" >&2
  echo "node-pack: npm pack failed" >&2
  exit 1
fi
if [[ "$(printf '%s\n' "$NAME" | tail -n 1)" != "$(basename "$TARBALL")" ||
      ! -f "$TARBALL" ]]; then
  cat "$STAGE/npm.log" >&2
  echo "node-pack: npm pack made ${NAME:-nothing}, not $TARBALL" >&2
  exit 1
fi
CONTENTS="$(tar -tzf "$TARBALL")"
if ! grep -qx "package/proto/$PROTO" <<<"$CONTENTS"; then
  echo "node-pack: $TARBALL lacks the proto" >&2
  exit 1
fi
echo "$TARBALL"
