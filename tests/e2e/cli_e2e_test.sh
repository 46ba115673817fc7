#!/usr/bin/env bash
# End-to-end test of the C++ client: starts the real normserve server on a
# free port and drives it with normserve-cli and normserve-demo.
#
# usage: cli_e2e_test.sh BIN_DIR
#   BIN_DIR holds normserve-cli and normserve-demo (and normserve, unless
#   NORMSERVE_SERVER names the server binary). NORMSERVE_E2E_DEVICE sets the
#   server's --device (default: the server's own default).
# Needs python3 with numpy for the numeric checks (skipped without numpy).
set -euo pipefail

BIN_DIR=${1:?usage: cli_e2e_test.sh BIN_DIR}
SERVER=${NORMSERVE_SERVER:-$BIN_DIR/normserve}
CLI=$BIN_DIR/normserve-cli
DEMO=$BIN_DIR/normserve-demo
PYTHON=/usr/bin/python3
[[ -x $PYTHON ]] || PYTHON=python3
for bin in "$SERVER" "$CLI" "$DEMO"; do
  [[ -x $bin ]] || { echo "FAIL: $bin not found or not executable" >&2; exit 1; }
done

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
  for f in out err; do
    echo "--- last output ($f)" >&2
    tail -n 20 "$WORK/last.$f" 2>/dev/null >&2 || true
  done
  echo "--- server stdout/stderr" >&2
  tail -n 30 "$WORK/server.out" "$WORK/server.err" 2>/dev/null >&2 || true
  exit 1
}
pass() { echo "ok: $*"; }

# run EXPECTED_RC CMD... : runs CMD with a time limit, keeps its output in
# $WORK/last.{out,err}, and fails unless it exits with EXPECTED_RC. CMD "cli"
# stands for normserve-cli pointed at the server.
run() {
  local expected=$1 rc=0
  shift
  if [[ $1 == cli ]]; then
    shift
    set -- "$CLI" --address="$ADDRESS" --timeout_ms=20000 "$@"
  fi
  timeout 60 "$@" >"$WORK/last.out" 2>"$WORK/last.err" || rc=$?
  [[ $rc -eq $expected ]] || fail "'$*' exited $rc, expected $expected"
}
expect_out() { grep -qF -- "$1" "$WORK/last.out" || fail "stdout lacks '$1'"; }
expect_err() { grep -qF -- "$1" "$WORK/last.err" || fail "stderr lacks '$1'"; }

# --- start the server on a free port -------------------------------------
server_args=(--address=127.0.0.1:0)
[[ -n ${NORMSERVE_E2E_DEVICE:-} ]] && server_args+=(--device="$NORMSERVE_E2E_DEVICE")
"$SERVER" "${server_args[@]}" >"$WORK/server.out" 2>"$WORK/server.err" &
SERVER_PID=$!
ADDRESS=""
for _ in $(seq 1 300); do  # Up to 30 s.
  ADDRESS=$(sed -n 's/^normserve listening on \([^ ]*\) .*/\1/p' \
    "$WORK/server.out" | head -n 1)
  [[ -n $ADDRESS ]] && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "server exited before listening"
  sleep 0.1
done
[[ -n $ADDRESS ]] || fail "no 'normserve listening on' line within 30 s"
[[ $ADDRESS =~ :[1-9][0-9]*$ ]] || fail "address '$ADDRESS' has no real port"
pass "server listening on $ADDRESS ($(head -n 1 "$WORK/server.out"))"

# --- CLI ------------------------------------------------------------------
run 0 cli health
expect_out SERVING
pass "health"

run 2 cli create --num_features=abc
expect_err "error: INVALID_ARGUMENT"
run 2 cli frobnicate
pass "usage errors exit 2"

run 0 cli create --id=e2e-bn --num_features=8 --momentum=0.1 --eps=1e-5
expect_out 'name: "layers/e2e-bn"'
expect_out 'num_features: 8'
run 1 cli create --id=e2e-bn --num_features=8
expect_err "error: ALREADY_EXISTS"
run 1 cli create --num_features=0
expect_err "error: INVALID_ARGUMENT"
run 0 cli create --id=e2e-bn2 --num_features=3 --momentum=none \
  --affine=false --layout=nhwc --dtype=float16
expect_out 'name: "layers/e2e-bn2"'
expect_out 'cumulative_average'
pass "create, duplicate, invalid config"

run 0 cli list
expect_out "layers/e2e-bn  num_features=8"
expect_out "layers/e2e-bn2  num_features=3"
expect_out "2 layer(s)"
run 0 cli get e2e-bn
expect_out 'name: "layers/e2e-bn"'
run 0 cli get layers/e2e-bn2
expect_out 'affine: false'
pass "list, get"

# Training forward on a known input, then eval on the same input; compare
# both outputs and the exported state with a numpy reference.
SHAPE=16,8,12,12
HAVE_NUMPY=0
if "$PYTHON" -c 'import numpy' 2>/dev/null; then HAVE_NUMPY=1; fi
if [[ $HAVE_NUMPY -eq 1 ]]; then
  "$PYTHON" - "$WORK/x.bin" <<'PY'
import sys, numpy as np
rng = np.random.default_rng(7)
c = np.arange(8, dtype=np.float32).reshape(1, 8, 1, 1)
x = (1.0 + 0.5 * c + (1.0 + 0.2 * c) * rng.standard_normal((16, 8, 12, 12))).astype(np.float32)
x.tofile(sys.argv[1])
PY
  INPUT=(--input="$WORK/x.bin")
else
  echo "note: numpy missing, numeric checks skipped"
  INPUT=(--seed=7)
fi
run 0 cli forward e2e-bn --shape=$SHAPE "${INPUT[@]}" --training \
  --output="$WORK/y_train.bin"
expect_out "mode: training"
expect_out "shape=[16, 8, 12, 12] dtype=float32"
expect_out "checksum: fnv1a64="
awk '/^mean=/ { split($1, m, "="); split($2, s, "=");
  if (m[2] < -1e-3 || m[2] > 1e-3 || s[2] < 0.999 || s[2] > 1.001) exit 1 }' \
  "$WORK/last.out" || fail "training output is not normalized: $(grep ^mean= "$WORK/last.out")"
[[ $(stat -c %s "$WORK/y_train.bin") -eq $((16 * 8 * 12 * 12 * 4)) ]] ||
  fail "output file has the wrong size"
run 0 cli forward e2e-bn --shape=$SHAPE "${INPUT[@]}" --output="$WORK/y_eval.bin"
expect_out "mode: eval"
pass "forward training and eval"

run 0 cli state e2e-bn --output="$WORK/state.json"
expect_out "wrote 5 tensors"
run 1 cli state e2e-bn --output="$WORK/no/such/dir/state.json"
"$PYTHON" - "$WORK" "$HAVE_NUMPY" <<'PY' || fail "state or output values are wrong"
import json, sys
work, have_numpy = sys.argv[1], sys.argv[2] == "1"
state = json.load(open(f"{work}/state.json"))
assert state["format"] == "normserve.state.v1", state["format"]
t = state["tensors"]
assert sorted(t) == ["bias", "num_batches_tracked", "running_mean",
                     "running_var", "weight"], sorted(t)
assert t["num_batches_tracked"] == {"dtype": "int64", "shape": [],
                                    "values": [1]}, t["num_batches_tracked"]
for name in ("weight", "bias", "running_mean", "running_var"):
    assert t[name]["dtype"] == "float32" and t[name]["shape"] == [8], t[name]
assert t["weight"]["values"] == [1] * 8 and t["bias"]["values"] == [0] * 8
if have_numpy:
    import numpy as np
    x = np.fromfile(f"{work}/x.bin", dtype=np.float32).reshape(16, 8, 12, 12)
    xd = x.astype(np.float64)
    mean = xd.mean(axis=(0, 2, 3))
    var = xd.var(axis=(0, 2, 3))
    n = xd.size / 8
    rm = 0.1 * mean
    rv = 0.9 + 0.1 * var * n / (n - 1)
    np.testing.assert_allclose(t["running_mean"]["values"], rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t["running_var"]["values"], rv, rtol=1e-5, atol=1e-6)
    c = (1, 8, 1, 1)
    y_train = (xd - mean.reshape(c)) / np.sqrt(var.reshape(c) + 1e-5)
    y_eval = (xd - rm.reshape(c)) / np.sqrt(rv.reshape(c) + 1e-5)
    for name, want in (("y_train", y_train), ("y_eval", y_eval)):
        got = np.fromfile(f"{work}/{name}.bin", dtype=np.float32).reshape(x.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
print("state and outputs match the reference")
PY
pass "state export (JSON) and numerics"

# float16 on the wire, NHWC layer, momentum none.
run 0 cli forward e2e-bn2 --shape=4,3,5,5 --seed=3 --training --dtype=float16
expect_out "dtype=float16"
run 1 cli forward e2e-bn2 --shape=4,5,5,5 --seed=3 --training
expect_err "error: INVALID_ARGUMENT"
run 1 cli forward e2e-bn2 --shape=1,3 --seed=3 --training
expect_err "error: INVALID_ARGUMENT"
pass "float16 forward, shape errors"

run 0 cli delete e2e-bn
expect_out "deleted e2e-bn"
run 1 cli get e2e-bn
expect_err "error: NOT_FOUND"
run 1 cli delete e2e-bn
expect_err "error: NOT_FOUND"
run 1 cli forward e2e-bn --shape=2,8 --seed=1
expect_err "error: NOT_FOUND"
run 0 cli delete layers/e2e-bn2
run 0 cli list
expect_out "0 layer(s)"
pass "delete, NOT_FOUND after delete"

# Request ids: a repeated create returns the layer, a repeated training
# forward is applied once, a stale --expected_version fails, a repeated
# delete is OK.
run 0 cli create --id=e2e-rid --num_features=2 --request_id=cli-create-1
expect_out 'name: "layers/e2e-rid"'
run 0 cli create --id=e2e-rid --num_features=2 --request_id=cli-create-1
expect_out 'name: "layers/e2e-rid"'
run 0 cli forward e2e-rid --shape=4,2 --seed=1 --training \
  --request_id=cli-fwd-1 --expected_version=1
expect_out "version: 2"
run 1 cli forward e2e-rid --shape=4,2 --seed=1 --training --request_id=cli-fwd-1
expect_err "error: ALREADY_EXISTS"
expect_err "was already applied"
run 1 cli forward e2e-rid --shape=4,2 --seed=2 --training --expected_version=1
expect_err "error: FAILED_PRECONDITION"
expect_err "is at version 2; the request expected version 1"
run 0 cli get e2e-rid
expect_out "version: 2"
run 0 cli delete e2e-rid --request_id=cli-delete-1 --retries=2
run 0 cli delete e2e-rid --request_id=cli-delete-1
run 1 cli delete e2e-rid
expect_err "error: NOT_FOUND"
pass "request ids and expected versions"

# --- demo -----------------------------------------------------------------
run 0 "$DEMO" --address="$ADDRESS"
for line in "server $ADDRESS: SERVING" "created layers/demo-" "step 1/5" \
  "step 5/5" "|grad_weight|=" "eval forward (running statistics): output mean=" \
  "num_batches_tracked" "int64 [] = 5" "deleted layers/demo-" \
  "(layer_norm over the last dim, 12)" "std=1.0000 mean square=1.0000" \
  "(rms_norm over the last dim, 12)" "mean square=1.0000" \
  "(group_norm, 2 groups of 4 channels)" "first group of the output: mean=" \
  "(instance_norm)" "first instance of the output: mean="; do
  expect_out "$line"
done
run 0 cli list
expect_out "0 layer(s)"
pass "demo"

# --- clean shutdown on SIGTERM --------------------------------------------
kill -TERM "$SERVER_PID"
for _ in $(seq 1 150); do  # Up to 15 s.
  kill -0 "$SERVER_PID" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$SERVER_PID" 2>/dev/null; then
  fail "server still running 15 s after SIGTERM"
fi
rc=0
wait "$SERVER_PID" || rc=$?
SERVER_PID=""
[[ $rc -eq 0 ]] || fail "server exited with $rc after SIGTERM"
pass "server stopped on SIGTERM with exit 0"
echo "PASS"
