#!/usr/bin/env bash
# Builds tests/fuzz/request_fuzzer with clang 14 (libFuzzer, ASan, UBSan) in
# its own build directory and runs it for a bounded time over the seed
# corpus in tests/fuzz/corpus. New inputs it finds go to
# $FUZZ_BUILD_DIR/corpus, crashes to $FUZZ_BUILD_DIR/crash-*; the exit status
# is non-zero on any finding.
#
#   scripts/fuzz.sh [SECONDS]     default 600 (`make fuzz`)
#   FUZZ_RUNS=N scripts/fuzz.sh   exactly N inputs from seed 1 instead of a
#                                 time bound: the same inputs every run, so
#                                 `make test` cannot fail by luck
#   scripts/fuzz.sh --make-seeds  rewrites tests/fuzz/corpus from make_seeds.cc
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${FUZZ_BUILD_DIR:-build-fuzz}
jobs=${JOBS:-$(nproc)}

if [[ ! -f $dir/CMakeCache.txt ]]; then
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_COMPILER=clang++-14 -DNORMSERVE_CUDA=OFF \
    -DNORMSERVE_FUZZ=ON -DNORMSERVE_SANITIZE=address,undefined >/dev/null
fi

if [[ ${1:-} == --make-seeds ]]; then
  cmake --build "$dir" -j"$jobs" --target fuzz_make_seeds >/dev/null
  rm -f tests/fuzz/corpus/*
  mkdir -p tests/fuzz/corpus
  "$dir/bin/fuzz_make_seeds" tests/fuzz/corpus
  ls tests/fuzz/corpus
  exit 0
fi

seconds=${1:-600}
cmake --build "$dir" -j"$jobs" --target request_fuzzer >/dev/null
if [[ -n ${FUZZ_RUNS:-} ]]; then
  # A fresh corpus dir: inputs found by earlier runs would change the set.
  rm -rf "$dir/corpus"
  bound=(-runs="$FUZZ_RUNS" -seed=1)
  what="$FUZZ_RUNS inputs from seed 1"
else
  bound=(-max_total_time="$seconds")
  what="${seconds}s"
fi
mkdir -p "$dir/corpus"
echo "fuzz: request_fuzzer, $what (corpus $dir/corpus + tests/fuzz/corpus)"
# -detect_leaks=0: the long-lived engine's executor threads hold memory
# LeakSanitizer cannot always see as reachable when libFuzzer checks per
# input; leaks are covered by `make test-asan` at exit.
set +e
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  "$dir/bin/request_fuzzer" "${bound[@]}" -max_len=4096 \
    -timeout=20 -rss_limit_mb=3072 -print_final_stats=1 \
    -artifact_prefix="$dir/" "$dir/corpus" tests/fuzz/corpus 2>&1 |
  grep -vE '^#[0-9]+.*(NEW|REDUCE|pulse)|^\[libprotobuf'
status=${PIPESTATUS[0]}
set -e
if [[ $status -ne 0 ]]; then
  echo "fuzz: FAILED (exit $status); see $dir/crash-* and the report above" >&2
  exit 1
fi
echo "fuzz: no findings ($what)"
