#!/usr/bin/env bash
# The GPU check of the CUDA backend, in one call on a GPU machine.
#
#   tests/gpu/check.sh bundle  [BUILD_DIR]  here: gather what the GPU machine
#                                           needs into BUILD_DIR/gpu-carry/
#                                           gpu-bundle.tar.xz
#   tests/gpu/check.sh dry-run [BUILD_DIR]  here: bundle, unpack it, and run
#                                           every step as far as it goes
#                                           without a GPU (a typo costs no
#                                           GPU time)
#   tests/gpu/check.sh run     [BUNDLE]     on the GPU machine: the check
#
# BUILD_DIR defaults to build-cuda (a CUDA build that includes sm_90, e.g.
# `cmake -S . -B build-cuda && cmake --build build-cuda -j2`). BUNDLE is the
# archive or an unpacked bundle directory; default
# build-cuda/gpu-carry/gpu-bundle.tar.xz. The bundle holds the test,
# benchmark and server binaries (stripped) and every shared library they
# load that is not part of glibc or the NVIDIA driver (the GPU machine has no
# gRPC, protobuf or absl); libstdc++ and libgcc_s go to lib-cxx/, used only
# if the machine's own are too old. cuDNN (the benchmark's) is found on the
# GPU machine (PyTorch's). The binaries share their kernel images, so xz
# packs the bundle to a fraction of its size (the device tool carries at most
# 64 MiB with the working tree).
#
# `run` steps, in order, each with its own time limit inside a total budget
# (CHECK_BUDGET_S, default 480 s; a step that no longer fits is skipped and
# says so):
#   1. gpu tests: the GPU is visible, gpu_logic_test, gpu_kernels_test,
#      gpu_server_test
#   2. end to end: tests/e2e/cli_e2e_test.sh against `normserve --device cuda:0`
#   3. benchmark: normserve_cuda_bench (ours vs cuDNN vs copy bandwidth)
#   4. parity: parity_torch.py against torch.nn.BatchNorm on CUDA
#   5. compute-sanitizer memcheck over the kernel tests (small shapes)
#   6. compute-sanitizer racecheck over the reduction kernels
# CHECK_STEPS (comma-separated step names, default all) reruns a subset:
# gpu_visible, gpu_logic_test, gpu_kernels_test, gpu_server_test, e2e_cuda,
# bench, parity, memcheck, racecheck.
# Results go to $OUT (default build-cuda/gpu-check-out), at most 8 files:
# check.log (everything), summary.txt, gpu_kernels_test.xml,
# gpu_server_test.xml, bench.json, parity.json, memcheck.log, racecheck.log.
# The summary is printed last. Exit status: 0 when every step that ran
# passed (a sanitizer that runs out of time, or cannot run on the machine,
# is reported but does not fail the check).
#
# From the session's device tool:
#   run(command="tests/gpu/check.sh run", carry=["build-cuda/gpu-carry"],
#       timeout_s=570)
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
MODE=${1:-}
BUNDLE_BINS=(gpu_logic_test gpu_kernels_test gpu_server_test
  normserve_cuda_bench normserve_parity normserve normserve-cli
  normserve-demo)
# Glibc, the dynamic loader and the driver come from the machine.
SYSTEM_LIBS='^(linux-vdso|ld-linux|libc\.so|libm\.so|libpthread|libdl\.so|librt\.so|libresolv|libutil|libcuda\.so|libnvidia|libcudnn)'

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

log() { echo "[check $(date +%H:%M:%S)] $*"; }

# ---------------------------------------------------------------------------
# bundle

do_bundle() {
  local build=${1:-$ROOT/build-cuda}
  [[ -d $build/bin ]] || { echo "no $build/bin: build first" >&2; return 1; }
  local archs
  archs=$(sed -n 's/^CMAKE_CUDA_ARCHITECTURES:[A-Z]*=//p' "$build/CMakeCache.txt")
  if [[ -z $archs ]]; then
    echo "$build is not a CUDA build (no CMAKE_CUDA_ARCHITECTURES)" >&2
    return 1
  fi
  if [[ ! ";$archs;" =~ \;90(-real|-virtual|a)?\; ]]; then
    echo "warning: $build builds for '$archs', not 90: Hopper runs PTX only" >&2
  fi
  local bundle=$build/gpu-bundle
  rm -rf "$bundle"
  mkdir -p "$bundle/bin" "$bundle/lib" "$bundle/lib-cxx"
  local bin missing=0
  for bin in "${BUNDLE_BINS[@]}"; do
    if [[ ! -x $build/bin/$bin ]]; then
      echo "missing $build/bin/$bin" >&2
      missing=1
      continue
    fi
    cp "$build/bin/$bin" "$bundle/bin/"
    strip --strip-unneeded "$bundle/bin/$bin" 2>/dev/null || true
  done
  [[ $missing -eq 0 ]] || return 1
  local lib name
  while read -r lib; do
    name=$(basename "$lib")
    [[ $name =~ $SYSTEM_LIBS ]] && continue
    if [[ $name =~ ^(libstdc\+\+|libgcc_s) ]]; then
      cp -L "$lib" "$bundle/lib-cxx/$name"
    else
      cp -L "$lib" "$bundle/lib/$name"
    fi
  done < <(for bin in "${BUNDLE_BINS[@]}"; do ldd "$build/bin/$bin"; done |
    awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u)
  strip --strip-unneeded "$bundle"/lib/*.so* 2>/dev/null || true
  {
    echo "commit $(git -C "$ROOT" rev-parse HEAD 2>/dev/null) (plus working tree)"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n)"
    echo "cuda_architectures $archs"
    echo "nvcc $("$(sed -n 's/^CMAKE_CUDA_COMPILER:[A-Z]*=//p' "$build/CMakeCache.txt")" --version 2>/dev/null | tail -n 1)"
  } >"$bundle/MANIFEST"
  mkdir -p "$build/gpu-carry"
  rm -f "$build/gpu-carry/gpu-bundle.tar.xz"
  # One xz stream with a large window: the binaries' kernel images repeat.
  tar -C "$build" -cf - gpu-bundle | xz -9 -T1 >"$build/gpu-carry/gpu-bundle.tar.xz"
  log "bundle: $bundle ($(du -sh "$bundle" | cut -f1), $(ls "$bundle/lib" | wc -l) libraries) -> $build/gpu-carry/gpu-bundle.tar.xz ($(du -sh "$build/gpu-carry/gpu-bundle.tar.xz" | cut -f1))"
}

# Prints the bundle directory for $1 (a directory, or an archive unpacked
# into a temporary directory).
unpack_bundle() {
  local src=$1
  if [[ -d $src ]]; then
    (cd "$src" && pwd)
    return
  fi
  [[ -f $src ]] || { echo "no bundle at $src" >&2; return 1; }
  local dir
  dir=$(mktemp -d /tmp/normserve-gpu-bundle.XXXXXX)
  if ! tar -C "$dir" -xJf "$src" 2>/dev/null; then
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
      "$src" "$dir" || return 1
  fi
  echo "$dir/gpu-bundle"
}

# Sets LD_LIBRARY_PATH for the bundle in $1 (and cuDNN when found); adds
# lib-cxx when the machine's libstdc++ is older than the binaries need.
use_bundle() {
  local bundle=$1
  export LD_LIBRARY_PATH="$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if ldd "$bundle/bin/gpu_logic_test" 2>&1 | grep -q "version .* not found"; then
    export LD_LIBRARY_PATH="$bundle/lib-cxx:$LD_LIBRARY_PATH"
    log "using the bundled libstdc++ (the machine's is older)"
  fi
  if ! ldconfig -p 2>/dev/null | grep -q 'libcudnn.so.9 '; then
    local cudnn
    cudnn=$(python3 -c 'import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib"))' 2>/dev/null)
    if [[ -z $cudnn || ! -e $cudnn/libcudnn.so.9 ]]; then
      cudnn=$(find /usr /opt /lib -name 'libcudnn.so.9' -print -quit 2>/dev/null)
      cudnn=${cudnn:+$(dirname "$cudnn")}
    fi
    if [[ -n $cudnn ]]; then
      export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$cudnn"
      log "cuDNN from $cudnn"
    fi
  fi
}

# Fails when a bundled binary has an unresolved library.
check_libraries() {
  local bundle=$1 bin bad=0
  for bin in "$bundle"/bin/*; do
    if ldd "$bin" | grep -q "not found"; then
      echo "unresolved libraries of $(basename "$bin"):" >&2
      ldd "$bin" | grep "not found" >&2
      bad=1
    fi
  done
  return $bad
}

# ---------------------------------------------------------------------------
# Steps: each appends "NAME STATUS SECONDS NOTE" to the summary.

SUMMARY=()
FAILED=0
START_S=$SECONDS
BUDGET_S=${CHECK_BUDGET_S:-480}

# step NAME MAX_S CMD... : runs CMD with a limit of min(MAX_S, budget left),
# its output into check.log and on stdout.
step() {
  local name=$1 max=$2
  shift 2
  if [[ ${CHECK_STEPS:-all} != all && ",$CHECK_STEPS," != *",$name,"* ]]; then
    SUMMARY+=("$(printf '%-22s %-12s %5s  %s' "$name" SKIPPED - "not in CHECK_STEPS")")
    return 0
  fi
  local left=$((BUDGET_S - (SECONDS - START_S)))
  local limit=$((max < left ? max : left))
  if ((limit < 10)); then
    SUMMARY+=("$(printf '%-22s %-12s %5s  %s' "$name" SKIPPED - "time budget spent")")
    return 0
  fi
  log "step $name (limit ${limit}s): $*"
  local t0=$SECONDS rc=0
  export STEP_NOTE
  STEP_NOTE=$(mktemp /tmp/normserve-step.XXXXXX)
  # Through bash, so that CMD may be one of the functions below.
  timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" || rc=$?
  local dt=$((SECONDS - t0)) status=PASS note=""
  if ((rc == 124 || rc == 137)); then
    status=TIMEOUT
    note="stopped after ${limit}s"
    # A sanitizer that runs out of time found nothing wrong so far.
    [[ $name == memcheck || $name == racecheck ]] || FAILED=1
  elif ((rc == 77)); then
    status=UNAVAILABLE
    note="tool or device not usable here (see check.log)"
  elif ((rc != 0)); then
    status=FAIL
    note="exit $rc"
    FAILED=1
  fi
  if [[ -s $STEP_NOTE ]]; then note="$(cat "$STEP_NOTE")${note:+; $note}"; fi
  rm -f "$STEP_NOTE"
  SUMMARY+=("$(printf '%-22s %-12s %5s  %s' "$name" "$status" "$dt" "$note")")
  log "step $name: $status (${dt}s) $note"
  return 0
}

# gtest XML BIN ARGS...: a test binary with its XML report (XML may be ""),
# leaving "N tests, F failed, S skipped" for the summary.
gtest() {
  local xml=$1 bin=$2 rc=0 scratch=""
  shift 2
  if [[ -z $xml ]]; then
    scratch=$(mktemp /tmp/normserve-gtest.XXXXXX.xml)
    xml=$scratch
  fi
  "$bin" --gtest_color=no --gtest_output="xml:$xml" "$@" || rc=$?
  if [[ -f $xml ]]; then
    echo "$(grep -c '<testcase ' "$xml") tests, $(grep -c '<failure ' "$xml") failed, $(grep -c '<skipped ' "$xml") skipped" >"$STEP_NOTE"
  fi
  [[ -z $scratch ]] || rm -f "$scratch"
  return $rc
}

# sanitizer TOOL LOG BIN ARGS...: compute-sanitizer, or 77 when it cannot
# run here (missing, or the device not supported as on gVisor).
sanitizer() {
  local tool=$1 logf=$2
  shift 2
  if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer not found" | tee "$logf"
    return 77
  fi
  local rc=0
  compute-sanitizer --tool "$tool" --error-exitcode 97 --print-limit 50 \
    --log-file "$logf" "$@" >/dev/null || rc=$?
  tail -n 15 "$logf"
  if grep -q "Device not supported\|not supported on this device" "$logf"; then
    return 77
  fi
  return $rc
}

# The kernel tests' small shapes: every launch path, fast under the
# sanitizers.
MEMCHECK_FILTER='Matrix/CudaMatrixTest.*float32*:Matrix/CudaMatrixTest.Backward/*bfloat16*:CudaBackendTest.*-*2x4100x33x17*:*8x32x64x64*:*Huge*:*OutOfMemory*:*LargeOffsets*'
RACECHECK_FILTER='Matrix/CudaMatrixTest.ForwardTrain/*float32*:Matrix/CudaMatrixTest.Backward/*float32*:Matrix/CudaMatrixTest.ForwardTrain/*float16_4096x24*-*2x4100x33x17*:*8x32x64x64*:*1x2x150x151*:*16x40x24x24*:*2x5x3x4x6*'

export -f log gtest sanitizer check_libraries

print_summary() {
  local out=$1
  {
    echo "GPU check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - START_S)) s)"
    echo "device: ${DEVICE_LINE:-none}"
    printf '%-22s %-12s %5s  %s\n' step status secs note
    printf '%s\n' "${SUMMARY[@]}"
    if [[ -n ${EXTRA_SUMMARY:-} ]]; then echo; echo "$EXTRA_SUMMARY"; fi
  } >"$out/summary.txt"
  echo
  cat "$out/summary.txt"
}

do_run() {
  local bundle out=${OUT:-$ROOT/build-cuda/gpu-check-out}
  bundle=$(unpack_bundle "${1:-$ROOT/build-cuda/gpu-carry/gpu-bundle.tar.xz}") || return 2
  [[ -d $bundle/bin ]] || { echo "no bundle at $bundle" >&2; return 2; }
  mkdir -p "$out"
  run_steps "$bundle" "$out" 2>&1 | tee "$out/check.log"
  return "${PIPESTATUS[0]}"
}

run_steps() {
  local bundle=$1 out=$2
  log "bundle $bundle: $(tr '\n' ' ' <"$bundle/MANIFEST")"
  use_bundle "$bundle"
  check_libraries "$bundle" || log "some libraries are unresolved (above)"
  local bin=$bundle/bin
  DEVICE_LINE=$(nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader 2>/dev/null | head -n 1)
  log "device: ${DEVICE_LINE:-nvidia-smi failed}"
  nvidia-smi 2>&1 | head -n 15
  command -v compute-sanitizer && compute-sanitizer --version | tail -n 1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tail -n 1

  # The device tests skip without a GPU: make sure this one sees it.
  step gpu_visible 60 bash -c '"$1" --gtest_color=no \
    --gtest_filter=CudaBackendTest.Identity | tee /dev/stderr |
    grep -q "^\[       OK \] CudaBackendTest.Identity"' _ "$bin/gpu_kernels_test"
  step gpu_logic_test 60 gtest "" "$bin/gpu_logic_test" --gtest_brief=1
  step gpu_kernels_test 180 gtest "$out/gpu_kernels_test.xml" \
    "$bin/gpu_kernels_test" --gtest_brief=1
  step gpu_server_test 150 gtest "$out/gpu_server_test.xml" \
    "$bin/gpu_server_test" --gtest_brief=1
  step e2e_cuda 90 env NORMSERVE_E2E_DEVICE=cuda:0 \
    NORMSERVE_SERVER="$bin/normserve" bash "$ROOT/tests/e2e/cli_e2e_test.sh" "$bin"
  step bench 150 "$bin/normserve_cuda_bench" --json "$out/bench.json"
  step parity 150 python3 "$ROOT/tests/gpu/parity_torch.py" \
    --tool "$bin/normserve_parity" --device cuda:0 --json "$out/parity.json"
  step memcheck 150 sanitizer memcheck "$out/memcheck.log" \
    "$bin/gpu_kernels_test" --gtest_brief=1 --gtest_filter="$MEMCHECK_FILTER"
  step racecheck 120 sanitizer racecheck "$out/racecheck.log" \
    --racecheck-report hazard "$bin/gpu_kernels_test" --gtest_brief=1 \
    --gtest_filter="$RACECHECK_FILTER"
  if [[ -f $out/bench.json ]]; then
    EXTRA_SUMMARY=$(python3 - "$out/bench.json" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
print("bench: copy %.0f GB/s; ours GB/s (fraction of copy) / speedup vs cuDNN" % b["copy_gbps"])
for c in b["cases"]:
    parts = []
    for op in ("forward_train", "backward_train"):
        o = c[op]["ours"]
        parts.append("%s %s (%s) x%s" % (op.split("_")[0], o.get("gbps"), o.get("fraction_of_copy"), c[op]["speedup_vs_cudnn"]))
    print("  %-16s %-4s %-8s %s" % ("x".join(map(str, c["shape"])), c["layout"], c["dtype"], "  ".join(parts)))
PY
)
  fi
  print_summary "$out"
  return $FAILED
}

# ---------------------------------------------------------------------------
# dry-run: everything up to the GPU, here.

do_dry_run() {
  local build=${1:-$ROOT/build-cuda}
  local out=${OUT:-$build/gpu-check-dry-run}
  mkdir -p "$out"
  do_bundle "$build" || return 1
  # What the GPU machine will do: unpack the archive and run from there.
  local bundle bin
  bundle=$(unpack_bundle "$build/gpu-carry/gpu-bundle.tar.xz") || return 1
  bin=$bundle/bin
  log "unpacked to $bundle"
  use_bundle "$bundle"
  step libraries 30 check_libraries "$bundle"
  step gpu_logic_test 60 gtest "" "$bin/gpu_logic_test" --gtest_brief=1
  # Without a GPU the device tests skip; they must start and list, and the
  # device-independent cases must pass.
  step gpu_kernels_test 120 gtest "$out/gpu_kernels_test.xml" \
    "$bin/gpu_kernels_test" --gtest_brief=1
  step gpu_server_test 120 gtest "$out/gpu_server_test.xml" \
    "$bin/gpu_server_test" --gtest_brief=1
  step e2e_auto 90 env NORMSERVE_SERVER="$bin/normserve" \
    bash "$ROOT/tests/e2e/cli_e2e_test.sh" "$bin"
  step bench_list 30 "$bin/normserve_cuda_bench" --list
  # No GPU: the benchmark must say so and exit 3.
  step bench_no_gpu 30 bash -c '"$1" --reps 1; rc=$?; [[ $rc -eq 3 ]] || { echo "exit $rc, expected 3"; exit 1; }' _ "$bin/normserve_cuda_bench"
  step parity_selftest 60 python3 "$ROOT/tests/gpu/parity_torch.py" \
    --selftest --tool "$bin/normserve_parity" --device cpu \
    --json "$out/parity.json"
  step parity_script 30 python3 -m py_compile "$ROOT/tests/gpu/parity_torch.py"
  step filters 30 bash -c '
    for f in "$2" "$3"; do
      n=$("$1" --gtest_list_tests --gtest_filter="$f" | grep -c "^  ")
      echo "filter matches $n tests: $f"
      [[ $n -gt 0 ]] || exit 1
    done' _ "$bin/gpu_kernels_test" "$MEMCHECK_FILTER" "$RACECHECK_FILTER"
  if command -v compute-sanitizer >/dev/null; then
    SUMMARY+=("$(printf '%-22s %-12s %5s  %s' sanitizers READY - "$(command -v compute-sanitizer)")")
  else
    SUMMARY+=("$(printf '%-22s %-12s %5s  %s' sanitizers NOT-HERE - "compute-sanitizer runs on the GPU machine only")")
  fi
  EXTRA_SUMMARY="next, on the GPU machine: tests/gpu/check.sh run, carrying build-cuda/gpu-carry ($(du -sh "$build/gpu-carry" | cut -f1))"
  print_summary "$out"
  rm -rf "$(dirname "$bundle")"
  return $FAILED
}

case "$MODE" in
  bundle) shift; do_bundle "$@" ;;
  run) shift; do_run "$@" ;;
  dry-run) shift; do_dry_run "$@" ;;
  *) usage ;;
esac
