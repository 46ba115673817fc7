#!/usr/bin/env bash
# End-to-end security and shutdown test: the real server with mutual TLS and
# bearer tokens (certificates made here with openssl), driven by
# normserve-cli and the Python client; then SIGTERM must exit 0, and no
# token may appear in the server's output.
#
# usage: secure_e2e_test.sh BIN_DIR   (NORMSERVE_SERVER: the server binary;
#   PYTHONPATH must reach the normserve package and its stubs for the Python
#   part, which is skipped when it cannot import)
set -euo pipefail

BIN_DIR=${1:?usage: secure_e2e_test.sh BIN_DIR}
SERVER=${NORMSERVE_SERVER:-$BIN_DIR/normserve}
CLI=$BIN_DIR/normserve-cli
PYTHON=/usr/bin/python3
[[ -x $PYTHON ]] || PYTHON=python3
WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  tail -n 20 "$WORK/last.out" "$WORK/last.err" "$WORK/server.out" \
    "$WORK/server.err" 2>/dev/null >&2 || true
  exit 1
}
pass() { echo "ok: $*"; }

# --- certificates and tokens ----------------------------------------------
cd "$WORK"
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >san.ext
for ca in ca other_ca; do
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=$ca" \
    -keyout $ca.key -out $ca.pem 2>/dev/null
done
leaf() {  # NAME CA
  openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout "$1.key" \
    -out "$1.csr" 2>/dev/null
  openssl x509 -req -days 2 -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" \
    -CAcreateserial -extfile san.ext -out "$1.pem" 2>/dev/null
}
leaf server ca
leaf client ca
TOKEN_A=tok-alpha-$(od -An -tx8 -N8 /dev/urandom | tr -d ' ')
TOKEN_B=tok-beta-$(od -An -tx8 -N8 /dev/urandom | tr -d ' ')
printf '# test tenants\n%s alpha\n%s beta\n' "$TOKEN_A" "$TOKEN_B" >tokens
printf '%s\n' "$TOKEN_A" >token_a
printf '%s\n' "$TOKEN_B" >token_b
cd - >/dev/null
pass "certificates and tokens made"

# --- server ------------------------------------------------------------------
"$SERVER" --address=127.0.0.1:0 --device=cpu --tls_cert="$WORK/server.pem" \
  --tls_key="$WORK/server.key" --tls_client_ca="$WORK/ca.pem" \
  --auth_tokens="$WORK/tokens" --shutdown_grace_s=5 \
  >"$WORK/server.out" 2>"$WORK/server.err" &
SERVER_PID=$!
ADDRESS=""
for _ in $(seq 1 300); do
  ADDRESS=$(sed -n 's/^normserve listening on \([^ ]*\) .*/\1/p' \
    "$WORK/server.out" | head -n 1)
  [[ -n $ADDRESS ]] && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "server exited before listening"
  sleep 0.1
done
[[ -n $ADDRESS ]] || fail "server did not start"
grep -q "mutual TLS, bearer tokens" "$WORK/server.out" ||
  fail "start-up line does not say mutual TLS and tokens"
pass "server with mutual TLS and tokens on $ADDRESS"

TLS=(--tls_ca="$WORK/ca.pem" --tls_cert="$WORK/client.pem"
     --tls_key="$WORK/client.key")
run() {  # EXPECTED_RC ARGS... (normserve-cli against the server)
  local expected=$1 rc=0
  shift
  timeout 60 "$CLI" --address="$ADDRESS" --timeout_ms=10000 "$@" \
    >"$WORK/last.out" 2>"$WORK/last.err" || rc=$?
  [[ $rc -eq $expected ]] || fail "cli $* exited $rc, expected $expected"
}

run 0 "${TLS[@]}" health
grep -q SERVING "$WORK/last.out" || fail "health: $(cat "$WORK/last.out")"
pass "health over mutual TLS needs no token"
run 1 list
pass "a plaintext client fails"
run 1 --tls_ca="$WORK/ca.pem" --token_file="$WORK/token_a" list
pass "a TLS client without a certificate fails"
run 1 "${TLS[@]}" list
grep -q UNAUTHENTICATED "$WORK/last.err" || fail "no UNAUTHENTICATED"
pass "a call without a token is UNAUTHENTICATED"
run 0 "${TLS[@]}" --token_file="$WORK/token_a" create --id=bn1 --num_features=4
run 0 "${TLS[@]}" --token_file="$WORK/token_a" forward bn1 --shape=2,4,3 \
  --training --seed=1
run 0 "${TLS[@]}" --token_file="$WORK/token_a" list
grep -q "layers/bn1" "$WORK/last.out" || fail "alpha does not list bn1"
run 0 "${TLS[@]}" --token_file="$WORK/token_b" list
grep -q "layers/bn1" "$WORK/last.out" && fail "beta lists alpha's bn1"
run 1 "${TLS[@]}" --token_file="$WORK/token_b" delete bn1
grep -q NOT_FOUND "$WORK/last.err" || fail "beta's delete is not NOT_FOUND"
pass "CLI: tenants isolated"

if "$PYTHON" -c 'import normserve' 2>/dev/null; then
  "$PYTHON" - "$ADDRESS" "$WORK" "$TOKEN_A" "$TOKEN_B" <<'PY' ||
import sys
import numpy as np
import normserve
address, work, token_a, token_b = sys.argv[1:5]
files = dict(tls_ca=f"{work}/ca.pem", tls_cert=f"{work}/client.pem",
             tls_key=f"{work}/client.key")
a = normserve.Client(address, timeout=10, token=token_a, **files)
b = normserve.Client(address, timeout=10, token=token_b, **files)
assert a.get_layer("bn1").name == "layers/bn1"
try:
    b.get_layer("bn1")
    raise SystemExit("beta read alpha's layer")
except normserve.NotFoundError:
    pass
b.create_layer(3, layer_id="bn1")
x = np.random.rand(2, 3, 4).astype(np.float32)
assert b.forward("bn1", x, training=True).output.shape == (2, 3, 4)
assert [l.name for l in b.all_layers()] == ["layers/bn1"]
assert repr(a).find(token_a) < 0
try:
    normserve.Client(address, timeout=5, tls_ca=f"{work}/ca.pem",
                     token=token_a).get_layer("bn1")
    raise SystemExit("mTLS let a client without a certificate in")
except normserve.NormserveError:
    pass
print("python ok")
PY
    fail "Python client over mutual TLS with tokens"
  pass "Python client: TLS files, tokens, tenants"
else
  echo "skip: Python client (normserve not importable)"
fi

# --- SIGTERM: drain, exit 0 ----------------------------------------------------
kill -TERM "$SERVER_PID"
rc=0
for _ in $(seq 1 150); do
  kill -0 "$SERVER_PID" 2>/dev/null || break
  sleep 0.1
done
kill -0 "$SERVER_PID" 2>/dev/null && fail "server still running 15 s after SIGTERM"
wait "$SERVER_PID" || rc=$?
SERVER_PID=""
[[ $rc -eq 0 ]] || fail "server exited $rc after SIGTERM"
grep -q "normserve: stopped" "$WORK/server.out" || fail "no 'stopped' line"
pass "SIGTERM: exit 0"

for t in "$TOKEN_A" "$TOKEN_B"; do
  if grep -qF "$t" "$WORK/server.out" "$WORK/server.err"; then
    fail "a token appears in the server's output"
  fi
done
pass "no token in the server's output"
