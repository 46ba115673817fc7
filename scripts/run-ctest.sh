#!/usr/bin/env bash
# Runs ctest in BUILD_DIR and ends with one plain line,
#   ctest: P passed, F failed, S skipped
# since ctest prints its list of skipped tests (the GPU tests without a GPU)
# after its own summary. Exits with ctest's status.
#
#   scripts/run-ctest.sh BUILD_DIR [ctest args...]
set -uo pipefail
build_dir=$1
shift
log="$build_dir/ctest.log"
(cd "$build_dir" && ctest "$@") 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
total=$(sed -n 's/.*tests failed out of \([0-9]*\).*/\1/p' "$log" | tail -n 1)
failed=$(sed -n 's/.*, \([0-9]*\) tests failed out of.*/\1/p' "$log" | tail -n 1)
skipped=$(sed -n '/The following tests did not run:/,$p' "$log" |
  grep -c '(Skipped)' || true)
if [[ -n $total && -n $failed ]]; then
  echo "ctest: $((total - failed - skipped)) passed, $failed failed, $skipped skipped"
fi
exit "$status"
