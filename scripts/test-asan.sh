#!/usr/bin/env bash
# Builds the in-process server tests (and the journal and engine unit
# tests) with ASan + UBSan (GCC, CPU only, in
# build-asan/ or $ASAN_BUILD_DIR) and runs them once. Only the test targets
# are built, at -O1, to keep this to a few minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${ASAN_BUILD_DIR:-build-asan}
jobs=${JOBS:-$(nproc)}
tests=(integration_test security_test lifecycle_test wire_test idempotency_test
       journal_test engine_test
       request_fuzzer_replay)

if [[ ! -f $dir/CMakeCache.txt ]]; then
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Debug \
    -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" -DNORMSERVE_CUDA=OFF \
    -DNORMSERVE_MALLOC=system \
    -DNORMSERVE_SANITIZE=address,undefined >/dev/null
fi
start=$(date +%s)
cmake --build "$dir" -j"$jobs" --target "${tests[@]}" >/dev/null
echo "test-asan: built in $(( $(date +%s) - start ))s"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
failed=0
for t in "${tests[@]}"; do
  args=()
  [[ $t == request_fuzzer_replay ]] && args=(tests/fuzz/corpus/*)
  if "$dir/bin/$t" "${args[@]}" >"$dir/$t.log" 2>&1; then
    echo "test-asan: $t passed"
  else
    echo "test-asan: $t FAILED ($dir/$t.log):" >&2
    tail -60 "$dir/$t.log" >&2
    failed=1
  fi
done
echo "test-asan: done in $(( $(date +%s) - start ))s"
exit $failed
