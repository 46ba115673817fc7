#!/usr/bin/env bash
# Stages what the runtime image holds: the normserve binaries and the shared
# libraries they load that the runtime base image does not provide.
#
# usage: stage-runtime.sh BUILD_DIR STAGE_DIR
#
#   BUILD_DIR  a configured and built CMake tree (binaries in BUILD_DIR/bin)
#   STAGE_DIR  created; afterwards holds usr/local/bin/* and usr/local/lib/*.so*
#              and is copied over the runtime image's root (then `ldconfig`).
#
# Runs in the builder stage of deploy/docker/Dockerfile. Libraries are found
# with ldd, so the list follows the build (gRPC, protobuf, abseil, their
# dependencies). Left out: glibc, libstdc++ and libgcc_s (in every Debian and
# Ubuntu base image), the NVIDIA driver (libcuda, libnvidia-*: the container
# toolkit mounts the host's at run time; a copy baked in would break it) and
# the CUDA toolkit's libraries (the nvidia/cuda runtime image has them).
set -euo pipefail

BUILD_DIR=${1:?usage: stage-runtime.sh BUILD_DIR STAGE_DIR}
STAGE_DIR=${2:?usage: stage-runtime.sh BUILD_DIR STAGE_DIR}

REQUIRED=(normserve normserve-cli)
OPTIONAL=(normserve-load)  # The load generator, when this tree builds it.

mkdir -p "$STAGE_DIR/usr/local/bin" "$STAGE_DIR/usr/local/lib"
bins=()
for name in "${REQUIRED[@]}" "${OPTIONAL[@]}"; do
  src=$BUILD_DIR/bin/$name
  if [[ ! -x $src ]]; then
    for required in "${REQUIRED[@]}"; do
      if [[ $name == "$required" ]]; then
        echo "stage-runtime: $src missing" >&2
        exit 1
      fi
    done
    continue
  fi
  install -m 0755 "$src" "$STAGE_DIR/usr/local/bin/$name"
  strip --strip-unneeded "$STAGE_DIR/usr/local/bin/$name"
  bins+=("$STAGE_DIR/usr/local/bin/$name")
done

skip_lib() {
  case $(basename "$1") in
    ld-linux*.so* | libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | \
      librt.so.* | libresolv.so.* | libutil.so.* | libstdc++.so.* | \
      libgcc_s.so.*) return 0 ;;
    libcuda.so* | libnvidia-*) return 0 ;;
  esac
  case $1 in
    /usr/local/cuda* | /usr/lib/wsl/*) return 0 ;;
  esac
  return 1
}

declare -A staged=()
for bin in "${bins[@]}"; do
  # ldd lines: "libfoo.so.1 => /path/libfoo.so.1 (0x...)".
  while read -r soname arrow path _; do
    [[ $arrow == "=>" ]] || continue
    # The driver is absent from a builder without a GPU ("not found").
    skip_lib "$soname" && continue
    if [[ $path == "not" ]]; then
      echo "stage-runtime: $bin needs $soname, which is not found" >&2
      exit 1
    fi
    skip_lib "$path" && continue
    [[ -n ${staged[$soname]:-} ]] && continue
    cp -L "$path" "$STAGE_DIR/usr/local/lib/$soname"
    strip --strip-unneeded "$STAGE_DIR/usr/local/lib/$soname"
    staged[$soname]=1
  done < <(ldd "$bin")
done

echo "stage-runtime: $(ls "$STAGE_DIR/usr/local/bin" | tr '\n' ' ')+" \
  "${#staged[@]} shared libraries," \
  "$(du -sh "$STAGE_DIR" | cut -f1) in all"
