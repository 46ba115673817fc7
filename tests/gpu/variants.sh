#!/usr/bin/env bash
# Versions of the CUDA kernels side by side on one GPU, in one call: each
# version's benchmark and kernel tests, built here from its own source tree,
# run there after the check bundle's own build (the baseline) and timed by
# normserve_cuda_bench in the same call, so that their ratios compare like
# with like. bench/cuda/NOTES.md records what was compared this way.
#
#   tests/gpu/variants.sh build NAME SRC_DIR [NAME SRC_DIR ...]
#       here: builds SRC_DIR (a copy of this repository with the change, e.g.
#       `git worktree add /tmp/v1 HEAD` then edit) in build-variants/NAME
#       (sm_90 only; VARIANT_CUDA_FLAGS adds nvcc flags) and packs its two
#       binaries into build-variants/carry/NAME.tar.xz
#   tests/gpu/variants.sh run [BUNDLE]
#       on the GPU machine: the baseline (the check's bundle, default
#       build-cuda/gpu-carry/gpu-bundle.tar.xz, which also brings the shared
#       libraries; tests/gpu/check.sh bundle), then each variant in
#       build-variants/carry: the kernel tests (without the > 2^31-element
#       case) and the benchmark (BENCH_ARGS passed on), then the baseline's
#       benchmark again (the spread between its two runs is the noise).
#       Results in $OUT: variants.log, bench-NAME.json, and the table of
#       ratios (variants.txt), printed last. The device tool returns at most
#       8 files: up to 4 variants per call come back whole.
#
# From the session's device tool:
#   run(command="tests/gpu/variants.sh run",
#       carry=["build-cuda/gpu-carry", "build-variants/carry"], timeout_s=...)
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VARIANTS_DIR=$ROOT/build-variants

do_build() {
  [[ $# -gt 0 && $(($# % 2)) -eq 0 ]] || { echo "give NAME SRC_DIR pairs" >&2; return 2; }
  mkdir -p "$VARIANTS_DIR/carry"
  while [[ $# -gt 0 ]]; do
    local name=$1 src
    src=$(cd "$2" && pwd) || return 2
    shift 2
    local dir=$VARIANTS_DIR/$name
    cmake -S "$src" -B "$dir" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CUDA_ARCHITECTURES=90 "-DCMAKE_CUDA_FLAGS=${VARIANT_CUDA_FLAGS:-}" \
      >"$dir.configure.log" 2>&1 ||
      { tail -n 20 "$dir.configure.log" >&2; return 1; }
    cmake --build "$dir" -j2 --target normserve_cuda_bench gpu_kernels_test \
      >"$dir.build.log" 2>&1 || { tail -n 30 "$dir.build.log" >&2; return 1; }
    local stage
    stage=$(mktemp -d)
    mkdir -p "$stage/$name"
    cp "$dir/bin/normserve_cuda_bench" "$dir/bin/gpu_kernels_test" "$stage/$name/"
    strip --strip-unneeded "$stage/$name"/* 2>/dev/null || true
    echo "$src $(git -C "$src" rev-parse --short HEAD 2>/dev/null)${VARIANT_CUDA_FLAGS:+ $VARIANT_CUDA_FLAGS}" >"$stage/$name/VARIANT"
    tar -C "$stage" -cf - "$name" | xz -9 -T1 >"$VARIANTS_DIR/carry/$name.tar.xz"
    rm -rf "$stage"
    echo "variant $name: $VARIANTS_DIR/carry/$name.tar.xz ($(du -h "$VARIANTS_DIR/carry/$name.tar.xz" | cut -f1))"
  done
}

do_run() {
  local out=${OUT:-$VARIANTS_DIR/out}
  mkdir -p "$out"
  local bundle_src=${1:-$ROOT/build-cuda/gpu-carry/gpu-bundle.tar.xz}
  local work
  work=$(mktemp -d /tmp/normserve-variants.XXXXXX)
  tar -C "$work" -xJf "$bundle_src" || return 2
  export LD_LIBRARY_PATH="$work/gpu-bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if ldd "$work/gpu-bundle/bin/gpu_kernels_test" 2>&1 | grep -q "version .* not found"; then
    export LD_LIBRARY_PATH="$work/gpu-bundle/lib-cxx:$LD_LIBRARY_PATH"
  fi
  local cudnn
  cudnn=$(python3 -c 'import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib"))' 2>/dev/null)
  [[ -n $cudnn ]] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$cudnn"
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
    # The check's own build first: the baseline of this call.
    local names=(base) dirs=("$work/gpu-bundle/bin") archive name
    for archive in "$VARIANTS_DIR"/carry/*.tar.xz; do
      [[ -f $archive ]] || continue
      tar -C "$work" -xJf "$archive"
      name=$(basename "$archive" .tar.xz)
      names+=("$name")
      dirs+=("$work/$name")
    done
    local i rc
    for i in "${!names[@]}"; do
      echo "=== ${names[$i]} $(cat "${dirs[$i]}/VARIANT" 2>/dev/null)"
      rc=0
      timeout 120 "${dirs[$i]}/gpu_kernels_test" --gtest_brief=1 --gtest_color=no \
        --gtest_filter='-*Huge*' || rc=$?
      echo "tests ${names[$i]}: exit $rc"
      timeout 120 "${dirs[$i]}/normserve_cuda_bench" --json "$out/bench-${names[$i]}.json" ${BENCH_ARGS:-}
      echo "bench ${names[$i]}: exit $?"
    done
    # A second baseline pass: the spread between the two is the noise.
    timeout 120 "${dirs[0]}/normserve_cuda_bench" --json "$out/bench-base2.json" ${BENCH_ARGS:-}
  } 2>&1 | tee "$out/variants.log" | grep -E "^(===|tests|bench|\[  FAILED|NVIDIA)"
  python3 - "$out" <<'PY' | tee "$out/variants.txt"
import glob, json, os, sys
out = sys.argv[1]
runs = {}
for f in sorted(glob.glob(os.path.join(out, "bench-*.json"))):
    try:
        runs[os.path.basename(f)[6:-5]] = json.load(open(f))
    except Exception as e:
        print("unreadable", f, e)
if "base" not in runs:
    sys.exit("no baseline")
names = ["base", "base2"] + sorted(n for n in runs if n not in ("base", "base2"))
names = [n for n in names if n in runs]
print("ms (median); ratio = base ms / variant ms (> 1: faster)")
print("%-30s %-15s" % ("case", "op") + "".join("%14s" % n for n in names))
base = runs["base"]
for i, c in enumerate(base["cases"]):
    label = "%s %s %s" % ("x".join(map(str, c["shape"])), c["layout"], c["dtype"])
    for op in ("forward_train", "backward_train", "forward_eval"):
        b = c[op]["ours"]["median_ms"]
        row = "%-30s %-15s" % (label, op)
        for n in names:
            cs = runs[n]["cases"]
            if i >= len(cs):
                row += "%14s" % "-"
                continue
            v = cs[i][op]["ours"]["median_ms"]
            row += "%8.4f %5.2f" % (v, b / v)
        row += "  cudnn %.4f" % c[op]["cudnn"]["median_ms"]
        print(row)
PY
  rm -rf "$work"
}

case "${1:-}" in
  build) shift; do_build "$@" ;;
  run) shift; do_run "$@" ;;
  *) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
