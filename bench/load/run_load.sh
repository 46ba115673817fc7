#!/usr/bin/env bash
# `make load`: starts normserve on a free loopback port, runs a short
# normserve-load sweep against it, and leaves the report and plot in OUT_DIR
# (load.json, load.csv, load.png). Stops the server when done.
#
# usage: run_load.sh BIN_DIR OUT_DIR [normserve-load flags...]
#   Extra flags are appended to the defaults below, so they override them
#   (e.g. --ops train --batch_sizes 1:1024:x2).
set -euo pipefail

BIN_DIR=${1:?usage: run_load.sh BIN_DIR OUT_DIR [flags...]}
OUT_DIR=${2:?usage: run_load.sh BIN_DIR OUT_DIR [flags...]}
shift 2
mkdir -p "$OUT_DIR"

LOG=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$LOG"
}
trap cleanup EXIT

"$BIN_DIR/normserve" --address 127.0.0.1:0 >"$LOG/server.out" \
  2>"$LOG/server.err" &
SERVER_PID=$!
ADDRESS=""
for _ in $(seq 1 300); do
  ADDRESS=$(sed -n 's/^normserve listening on \([^ ]*\).*/\1/p' \
    "$LOG/server.out" | head -n 1)
  [[ -n $ADDRESS ]] && break
  kill -0 "$SERVER_PID" 2>/dev/null || break
  sleep 0.1
done
if [[ -z $ADDRESS ]]; then
  echo "run_load: the server did not start" >&2
  cat "$LOG/server.out" "$LOG/server.err" >&2
  exit 1
fi
echo "run_load: normserve at $ADDRESS"

"$BIN_DIR/normserve-load" --address "$ADDRESS" \
  --batch_sizes 1:256:x4 --concurrency 1,4 --ops train:1,forward:1,eval:1 \
  --duration_s 2 --warmup_s 0.5 \
  --json "$OUT_DIR/load.json" --csv "$OUT_DIR/load.csv" \
  --plot "$OUT_DIR/load.png" "$@"
echo "run_load: wrote $OUT_DIR/load.json, load.csv and load.png"
