#!/usr/bin/env bash
# A short normserve-load sweep against the real server: every operation of
# the mix, two batch sizes, two concurrencies, open and closed loop, and
# the sync-group workload (not verified: EXPECT_VERIFIED=0). Checks
# that the JSON report has every field, that no request failed and that the
# sampled responses were checked against the reference and matched; and that
# the CSV and (with python3-matplotlib) the plot are written.
#
# usage: load_sweep_test.sh NORMSERVE NORMSERVE_LOAD
set -euo pipefail

SERVER=${1:?usage: load_sweep_test.sh NORMSERVE NORMSERVE_LOAD}
LOAD=${2:?usage: load_sweep_test.sh NORMSERVE NORMSERVE_LOAD}
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
  tail -n 20 "$WORK/load.out" "$WORK/load.err" "$WORK/server.err" \
    2>/dev/null >&2 || true
  exit 1
}

"$SERVER" --address 127.0.0.1:0 --device cpu >"$WORK/server.out" \
  2>"$WORK/server.err" &
SERVER_PID=$!
ADDRESS=""
for _ in $(seq 1 300); do
  ADDRESS=$(sed -n 's/^normserve listening on \([^ ]*\).*/\1/p' \
    "$WORK/server.out" | head -n 1)
  [[ -n $ADDRESS ]] && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited at start"
  sleep 0.1
done
[[ -n $ADDRESS ]] || fail "the server did not start"

PLOT=()
if "$PYTHON" -c "import matplotlib" 2>/dev/null; then
  PLOT=(--plot "$WORK/load.png")
else
  echo "note: python3-matplotlib missing, plot not checked"
fi

run() {  # run NAME FLAGS...: one sweep, its report in $WORK/NAME.json
  local name=$1 rc=0
  shift
  timeout 60 "$LOAD" --address "$ADDRESS" --json "$WORK/$name.json" \
    --csv "$WORK/$name.csv" --progress never "$@" \
    >"$WORK/load.out" 2>"$WORK/load.err" || rc=$?
  [[ $rc -eq 0 ]] || fail "normserve-load ($name) exited $rc"
  "$PYTHON" - "$WORK/$name.json" "$WORK/$name.csv" <<'PY' || fail "$name report"
import csv, json, os, sys
report = json.load(open(sys.argv[1]))
need_verified = os.environ.get("EXPECT_VERIFIED", "1") == "1"
for key in ("format", "tool", "started_at", "target", "machine", "config",
            "steps", "totals"):
    assert key in report, f"report lacks {key}"
step_keys = {"batch_size", "concurrency", "channels", "layers", "target_rate",
             "input_shape", "input_bytes", "window_s", "requests", "ok",
             "error_count", "errors", "unsent", "requests_per_s",
             "samples_per_s", "mb_per_s_sent", "mb_per_s_received",
             "latency_ms", "verification", "ops"}
latency_keys = {"count", "min", "mean", "p50", "p90", "p99", "p999", "max"}
expected_steps = (len(report["config"]["batch_sizes"]) *
                  len(report["config"]["concurrency"]))
assert len(report["steps"]) == expected_steps, "wrong number of steps"
for s in report["steps"]:
    where = f"step batch={s.get('batch_size')} conc={s.get('concurrency')}"
    missing = step_keys - s.keys()
    assert not missing, f"{where} lacks {sorted(missing)}"
    assert latency_keys <= s["latency_ms"].keys(), f"{where} latency fields"
    assert s["error_count"] == 0 and s["errors"] == {}, f"{where}: {s['errors']}"
    assert s["requests"] > 0 and s["ok"] == s["requests"], f"{where}: no requests"
    assert s["requests_per_s"] > 0 and s["mb_per_s_sent"] > 0, where
    assert abs(s["samples_per_s"] - s["requests_per_s"] * s["batch_size"]) \
        <= 1e-3 * s["samples_per_s"], f"{where}: samples/s"
    l = s["latency_ms"]
    assert 0 < l["min"] <= l["p50"] <= l["p90"] <= l["p99"] <= l["p999"] \
        <= l["max"], f"{where}: percentiles out of order {l}"
    v = s["verification"]
    assert v["failed"] == 0, f"{where}: checks failed: {v['messages']}"
    assert v["verified"] > 0 or not need_verified, f"{where}: nothing verified"
    for op in report["config"]["mix"].split(","):
        name = op.split(":")[0]
        assert name in s["ops"], f"{where}: no stats for {name}"
        assert s["ops"][name]["ok"] > 0, f"{where}: no {name} requests"
assert report["totals"]["errors"] == 0
rows = list(csv.DictReader(open(sys.argv[2])))
assert len(rows) == expected_steps, "CSV rows"
assert all(r["errors"] == "0" for r in rows), "CSV errors"
PY
}

run closed --batch_sizes 1,16 --concurrency 1,2 --ops train:1,forward:1,eval:1 \
  --duration_s 0.8 --warmup_s 0.2 --verify_every 8 "${PLOT[@]}"
if [[ ${#PLOT[@]} -gt 0 ]]; then
  [[ -s $WORK/load.png ]] || fail "no plot written"
fi
run open --batch_sizes 4 --concurrency 2 --ops forward,eval --layout nhwc \
  --dtype float16 --rate 200 --duration_s 0.8 --warmup_s 0.2 --verify_every 8
"$PYTHON" -c "
import json, sys
s = json.load(open('$WORK/open.json'))['steps'][0]
assert s['target_rate'] == 200, s['target_rate']
assert 100 <= s['requests_per_s'] <= 300, s['requests_per_s']
" || fail "open loop did not hold its rate"
# Sync groups of 2 ranks, a counted number of steps: every group stops at
# the same step, so no rank waits at a barrier (a wait would time out the
# 60 s run or show as ABORTED).
EXPECT_VERIFIED=0 run sync --batch_sizes 2,8 --concurrency 2,4 --ops sync \
  --sync_world_size 2 --requests 40 --warmup_s 0.1
"$PYTHON" -c "
import json
for s in json.load(open('$WORK/sync.json'))['steps']:
    assert s['requests'] == 40 and s['ok'] == 40, s
" || fail "the sync workload did not run its 40 steps per sweep step"
echo "ok: load sweep (closed and open loop, sync groups), reports complete, 0 errors"
