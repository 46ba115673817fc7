#!/usr/bin/env bash
# Starts the normserve server, runs normserve-demo and `normserve-cli list`
# against it, stops the server with SIGTERM and exits with the demo's status.
#
# usage: scripts/demo.sh [BIN_DIR]     (default: build/bin)
#   NORMSERVE_ADDRESS  where to listen (default 127.0.0.1:50051); when that
#                      port is taken, a free port on the same host is used.
#   NORMSERVE_DEVICE   the server's --device (default auto)
set -uo pipefail

BIN_DIR=${1:-build/bin}
ADDRESS=${NORMSERVE_ADDRESS:-127.0.0.1:50051}
DEVICE=${NORMSERVE_DEVICE:-auto}
SERVER=$BIN_DIR/normserve
CLI=$BIN_DIR/normserve-cli
DEMO=$BIN_DIR/normserve-demo
for bin in "$SERVER" "$CLI" "$DEMO"; do
  if [[ ! -x $bin ]]; then
    echo "demo: $bin not found; build first (make build)" >&2
    exit 1
  fi
done

LOG_DIR=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -KILL "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
  fi
  rm -rf "$LOG_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server ADDRESS: starts the server and waits (up to 30 s) for its
# start-up line; sets SERVER_PID and LISTEN_ADDRESS. Fails if it exits first.
start_server() {
  "$SERVER" --address="$1" --device="$DEVICE" \
    >"$LOG_DIR/server.out" 2>"$LOG_DIR/server.err" &
  SERVER_PID=$!
  LISTEN_ADDRESS=""
  for _ in $(seq 1 300); do
    LISTEN_ADDRESS=$(sed -n 's/^normserve listening on \([^ ]*\) .*/\1/p' \
      "$LOG_DIR/server.out" | head -n 1)
    if [[ -n $LISTEN_ADDRESS ]]; then
      return 0
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      wait "$SERVER_PID" 2>/dev/null
      SERVER_PID=""
      return 1
    fi
    sleep 0.1
  done
  echo "demo: server printed no start-up line within 30 s" >&2
  kill -KILL "$SERVER_PID" 2>/dev/null
  return 1
}

# Returns success when something accepts TCP connections at HOST:PORT.
port_in_use() {
  local host=${1%:*} port=${1##*:}
  host=${host#[}
  host=${host%]}
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

HOST=${ADDRESS%:*}
if port_in_use "$ADDRESS"; then
  echo "demo: $ADDRESS is already in use (another server running?);" \
    "using a free port on $HOST instead"
  start_server "$HOST:0" || {
    echo "demo: the server failed to start:" >&2
    cat "$LOG_DIR/server.err" >&2
    exit 1
  }
elif ! start_server "$ADDRESS"; then
  echo "demo: the server could not listen on $ADDRESS:" >&2
  sed 's/^/  /' "$LOG_DIR/server.err" >&2
  echo "demo: trying a free port on $HOST instead" >&2
  start_server "$HOST:0" || {
    echo "demo: the server failed to start:" >&2
    cat "$LOG_DIR/server.err" >&2
    exit 1
  }
fi
echo "demo: $(head -n 1 "$LOG_DIR/server.out")"

ready=0
for _ in $(seq 1 20); do
  if timeout 10 "$CLI" --address="$LISTEN_ADDRESS" --timeout_ms=2000 health \
    >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.25
done
if [[ $ready -ne 1 ]]; then
  echo "demo: server at $LISTEN_ADDRESS does not report SERVING" >&2
  exit 1
fi

echo "demo: running normserve-demo --address=$LISTEN_ADDRESS"
echo
timeout 300 "$DEMO" --address="$LISTEN_ADDRESS"
demo_status=$?
echo
echo "demo: normserve-cli list"
timeout 30 "$CLI" --address="$LISTEN_ADDRESS" list

echo "demo: stopping the server (SIGTERM)"
kill -TERM "$SERVER_PID"
for _ in $(seq 1 150); do
  kill -0 "$SERVER_PID" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$SERVER_PID" 2>/dev/null; then
  echo "demo: server did not stop within 15 s; killing it" >&2
  kill -KILL "$SERVER_PID"
fi
wait "$SERVER_PID"
server_status=$?
SERVER_PID=""
tail -n +2 "$LOG_DIR/server.out" | sed 's/^/demo: /'
echo "demo: server exited with status $server_status;" \
  "normserve-demo exited with status $demo_status"
exit "$demo_status"
