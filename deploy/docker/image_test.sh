#!/usr/bin/env bash
# Builds the `cpu` target of deploy/docker/Dockerfile without a Docker engine
# or a registry, then runs the image's own server and CLI and checks their
# answers. `make image-test` runs it; as root on Debian 12 (debootstrap,
# chroot, mount namespaces).
#
#   1. installs podman and debootstrap (install-image-test-deps.sh);
#   2. makes a minimal Debian 12 root filesystem with debootstrap from the
#      mirror apt already uses, cached as build/image-test/debian-12-base.tar;
#   3. imports it under the exact base image names the Dockerfile's ARGs
#      name (and their docker.io/library/ forms);
#   4. `podman build --isolation chroot --target cpu` of the unmodified
#      Dockerfile (podman's layer cache makes reruns fast);
#   5. checks the image config (non-root user, port, HEALTHCHECK) and its
#      filesystem (binaries, no toolchain), exports it, and runs its server as
#      PID 1 of a new PID namespace, as uid 10001, on a read-only root with
#      tmpfs /tmp and a writable /var/lib/normserve, on 127.0.0.1:<free port>;
#   6. drives it with the image's CLI (and the host's build/bin/normserve-cli
#      if there is one): health, the HEALTHCHECK command, create, training
#      and eval forward checked against a double-precision reference, state
#      export checked the same way, list, delete;
#   7. stops it with SIGTERM and expects a drain and exit 0.
#
# Environment: IMAGE_TEST_CACHE (default build/image-test), IMAGE_TEST_TAG
# (default localhost/normserve:cpu-image-test), BUILD_DIR (host build tree,
# default build), DEBIAN_MIRROR (default: the first Debian mirror in apt's
# sources), IMAGE_TEST_REFRESH_BASE=1 to debootstrap again, IMAGE_TEST_PRUNE=0
# to keep dangling podman images older than a day.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DOCKERFILE=$ROOT/deploy/docker/Dockerfile
CACHE=${IMAGE_TEST_CACHE:-$ROOT/build/image-test}
TAG=${IMAGE_TEST_TAG:-localhost/normserve:cpu-image-test}
BUILD_DIR=${BUILD_DIR:-build}
[[ $BUILD_DIR == /* ]] || BUILD_DIR=$ROOT/$BUILD_DIR
PYTHON=/usr/bin/python3
[[ -x $PYTHON ]] || PYTHON=python3
SUITE=bookworm
UID_GID=10001:10001

START=$SECONDS
PHASE_START=$SECONDS
phase() {
  echo "image-test: [$((SECONDS - START))s] $*"
  PHASE_START=$SECONDS
}
took() { echo "image-test:   done in $((SECONDS - PHASE_START))s"; }

WORK=""
SERVER_PID=""  # The unshare process; its child is the server.
CONTAINER=""
cleanup() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -KILL "$SERVER_PID" 2>/dev/null || true  # --kill-child takes the server.
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  [[ -n $CONTAINER ]] && podman rm -f "$CONTAINER" >/dev/null 2>&1 || true
  if [[ -n $WORK ]]; then
    rm -rf --one-file-system "$WORK"
  fi
}
trap cleanup EXIT

fail() {
  echo "image-test: FAIL: $*" >&2
  if [[ -n $WORK ]]; then
    for f in last.out last.err server.out server.err; do
      [[ -s $WORK/$f ]] || continue
      echo "--- $f" >&2
      tail -n 20 "$WORK/$f" >&2
    done
  fi
  exit 1
}
ok() { echo "image-test:   ok: $*"; }

[[ $(id -u) -eq 0 ]] || fail "needs root (debootstrap, chroot, mount namespaces)"

# --- 1. tools ---------------------------------------------------------------
phase "installing podman and debootstrap if missing"
"$ROOT/deploy/docker/install-image-test-deps.sh"
took

# --- 2. Debian 12 base, cached ---------------------------------------------
# The first Debian (not security) mirror in apt's sources, deb822 or one-line.
find_mirror() {
  local f url
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    url=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' "$f" |
      grep -E '/debian/?$' | head -n 1 || true)
    [[ -n $url ]] && { echo "${url%/}"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    url=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; break } }' "$f" |
      grep -E '/debian/?$' | head -n 1 || true)
    [[ -n $url ]] && { echo "${url%/}"; return; }
  done
  echo http://deb.debian.org/debian
}
MIRROR=${DEBIAN_MIRROR:-$(find_mirror)}
SECURITY_MIRROR=${MIRROR%/debian}/debian-security

mkdir -p "$CACHE"
rm -rf --one-file-system "$CACHE"/run.*  # Left by an interrupted run.
BASE_TAR=$CACHE/debian-12-base.tar
if [[ ! -s $BASE_TAR || ${IMAGE_TEST_REFRESH_BASE:-0} == 1 ]]; then
  phase "debootstrap --variant=minbase $SUITE from $MIRROR"
  rootfs=$CACHE/debootstrap.tmp
  # An interrupted debootstrap can leave /proc and /sys mounted in there.
  findmnt -rno TARGET | grep "^$rootfs/" | sort -r | xargs -r umount -l
  rm -rf --one-file-system "$rootfs"
  debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" \
    >"$CACHE/debootstrap.log" 2>&1 ||
    fail "debootstrap failed; see $CACHE/debootstrap.log"
  # Like the official debian:12-slim: deb822 sources with updates and
  # security, no package lists, no docs, man pages or locales.
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
EOF
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/log/* "$rootfs"/tmp/*
  tar --numeric-owner -C "$rootfs" -cf "$BASE_TAR.tmp" .
  mv "$BASE_TAR.tmp" "$BASE_TAR"
  rm -rf --one-file-system "$rootfs"
  took
else
  phase "Debian 12 base cached: $BASE_TAR (IMAGE_TEST_REFRESH_BASE=1 redoes it)"
fi

# --- 3. import under the names the Dockerfile uses -------------------------
dockerfile_arg() {
  sed -n "s/^ARG $1=\(.*\)$/\1/p" "$DOCKERFILE" | head -n 1
}
# Every name a FROM may resolve to: podman resolves a short name to
# localhost/NAME, Docker to docker.io/library/NAME.
local_names() {
  local name=$1 first=${1%%/*}
  if [[ $name == */* && ($first == *.* || $first == *:* || $first == localhost) ]]; then
    echo "$name"
  elif [[ $name == */* ]]; then
    echo "localhost/$name docker.io/$name"
  else
    echo "localhost/$name docker.io/library/$name"
  fi
}
BASES=()
for arg in DEBIAN_BUILD_IMAGE DEBIAN_RUNTIME_IMAGE; do
  name=$(dockerfile_arg "$arg")
  [[ -n $name ]] || fail "no 'ARG $arg=' in $DOCKERFILE"
  for n in $(local_names "$name"); do
    [[ " ${BASES[*]} " == *" $n "* ]] || BASES+=("$n")
  done
done
BASE_SHA=$(sha256sum "$BASE_TAR" | cut -c1-16)
phase "tagging the base as ${BASES[*]}"
base_id=""
for name in "${BASES[@]}"; do
  label=$(podman image inspect --format \
    '{{index .Labels "org.normserve.image-test.base"}}' "$name" 2>/dev/null || true)
  [[ $label == "$BASE_SHA" ]] && continue
  if [[ -z $base_id ]]; then
    # Reused while the tarball is unchanged, so podman's layer cache holds.
    base_id=$(podman images -q --filter "label=org.normserve.image-test.base=$BASE_SHA" | head -n 1)
    if [[ -z $base_id ]]; then
      base_id=$(podman import -q \
        --change "LABEL org.normserve.image-test.base=$BASE_SHA" \
        --change 'CMD ["bash"]' "$BASE_TAR")
    fi
  fi
  podman tag "$base_id" "$name"
done
took

# --- 4. build ---------------------------------------------------------------
# Each source change leaves the previous build's stage images behind
# (dangling, ~1 GB): drop those older than a day, keep today's as the cache.
if [[ ${IMAGE_TEST_PRUNE:-1} == 1 ]]; then
  podman image prune -f --filter until=24h >/dev/null
fi
phase "podman build --isolation chroot --target cpu (log: $CACHE/build.log)"
# --format docker keeps HEALTHCHECK (OCI image configs have no such field);
# --pull=never: every base must be the local one.
if ! podman build --isolation chroot --format docker --pull=never \
  --target cpu -f "$DOCKERFILE" -t "$TAG" "$ROOT" >"$CACHE/build.log" 2>&1; then
  tail -n 40 "$CACHE/build.log" >&2
  fail "podman build failed; see $CACHE/build.log"
fi
grep -h '^stage-runtime:' "$CACHE/build.log" | tail -n 1 || true
took

# --- 5. image config and filesystem ----------------------------------------
phase "checking the image"
# Under the cache, not /tmp: the image's root filesystem goes here.
WORK=$(mktemp -d "$CACHE/run.XXXXXX")
podman image inspect "$TAG" >"$WORK/inspect.json"
# Prints the config as shell assignments (JSON arrays as one argument each).
"$PYTHON" - "$WORK/inspect.json" >"$WORK/config.sh" <<'PY' || fail "image config is not what the Dockerfile says"
import json, shlex, sys
image = json.load(open(sys.argv[1]))[0]
config = image["Config"]
health = (image.get("Healthcheck") or image.get("HealthCheck")
          or config.get("Healthcheck") or {})
test = health.get("Test") or []
errors = []
if config.get("User") != "10001:10001":
    errors.append(f"User is {config.get('User')!r}, want '10001:10001'")
if "50051/tcp" not in (config.get("ExposedPorts") or {}):
    errors.append(f"ExposedPorts {config.get('ExposedPorts')} lacks 50051/tcp")
if not test or test[0] != "CMD" or not test[1].endswith("/normserve-cli") or "health" not in test:
    errors.append(f"HEALTHCHECK is {test!r}, want the CLI's health command")
if config.get("Entrypoint") != ["/usr/local/bin/normserve"]:
    errors.append(f"Entrypoint is {config.get('Entrypoint')!r}")
for e in errors:
    print("image-test: " + e, file=sys.stderr)
if errors:
    sys.exit(1)
print("ENTRYPOINT=(" + " ".join(map(shlex.quote, config["Entrypoint"])) + ")")
print("CMD=(" + " ".join(map(shlex.quote, config.get("Cmd") or [])) + ")")
print("HEALTHCHECK=(" + " ".join(map(shlex.quote, test[1:])) + ")")
print("SIZE=%d" % image.get("Size", 0))
PY
source "$WORK/config.sh"
ok "user 10001:10001, EXPOSE 50051, HEALTHCHECK ${HEALTHCHECK[*]}"
ok "ENTRYPOINT ${ENTRYPOINT[*]}, CMD ${CMD[*]}, $((SIZE / 1000000)) MB"

CONTAINER=$(podman create --no-healthcheck "$TAG")
IMAGE_ROOT=$WORK/rootfs
mkdir "$IMAGE_ROOT"
podman export "$CONTAINER" | tar --numeric-owner -C "$IMAGE_ROOT" -xf -
podman rm "$CONTAINER" >/dev/null
CONTAINER=""
for f in usr/local/bin/normserve usr/local/bin/normserve-cli bin/sleep; do
  [[ -x $IMAGE_ROOT/$f ]] || fail "/$f missing from the image"
done
for f in usr/bin/gcc usr/bin/g++ usr/bin/cc usr/bin/cmake usr/bin/protoc \
  usr/include/grpcpp src build; do
  [[ ! -e $IMAGE_ROOT/$f ]] || fail "/$f is in the runtime image"
done
[[ $(stat -c %u:%g:%a "$IMAGE_ROOT/var/lib/normserve") == 10001:10001:750 ]] ||
  fail "/var/lib/normserve is $(stat -c %u:%g:%a "$IMAGE_ROOT/var/lib/normserve"), want 10001:10001:750"
ok "binaries, /bin/sleep (preStop), /var/lib/normserve 10001:10001 0750, no toolchain," \
  "$(ls "$IMAGE_ROOT/usr/local/lib" | grep -c '\.so') staged libraries"

# "${IN_IMAGE[@]}" CMD... runs CMD inside the image as uid 10001, as PID 1
# of new PID and mount namespaces: read-only root, /proc, a minimal /dev,
# read-only /sys, /tmp from $WORK/tmp and /var/lib/normserve from
# $WORK/state (the volumes the Kubernetes manifests mount). Host network:
# the server listens on 127.0.0.1 only.
mkdir -m 1777 "$WORK/tmp"
mkdir "$WORK/state"
chown "$UID_GID" "$WORK/state"
IN_IMAGE_SH='
    set -e
    r=$1 w=$2 user=$3
    shift 3
    mount --make-rprivate /
    mount --bind "$r" "$r"
    mount -t proc proc "$r/proc"
    mount -t tmpfs -o mode=755,size=1m dev "$r/dev"
    for n in null zero random urandom; do
      touch "$r/dev/$n"
      mount --bind "/dev/$n" "$r/dev/$n"
    done
    mount --bind /sys "$r/sys"
    mount -o remount,bind,ro "$r/sys"
    mount --bind "$w/tmp" "$r/tmp"
    mount --bind "$w/state" "$r/var/lib/normserve"
    mount -o remount,bind,ro "$r"
    exec chroot --userspec="$user" "$r" "$@"
  '
IN_IMAGE=(unshare --mount --pid --fork --kill-child -- /bin/sh -c "$IN_IMAGE_SH"
  sh "$IMAGE_ROOT" "$WORK" "$UID_GID")

"${IN_IMAGE[@]}" /usr/bin/touch /var/lib/normserve/.write-test ||
  fail "uid 10001 cannot write the state dir"
if "${IN_IMAGE[@]}" /usr/bin/touch /write-test 2>/dev/null; then
  fail "the root filesystem is writable in the test's sandbox"
fi
ok "as uid 10001: state dir writable, root filesystem read-only"

# --- 6. the image's server and CLI -----------------------------------------
phase "running the image's server"
# The image's own ENTRYPOINT and CMD, with --address moved to loopback.
server_cmd=("${ENTRYPOINT[@]}")
for a in "${CMD[@]}"; do
  [[ $a == --address=* ]] || server_cmd+=("$a")
done
server_cmd+=(--address=127.0.0.1:0)
"${IN_IMAGE[@]}" "${server_cmd[@]}" >"$WORK/server.out" 2>"$WORK/server.err" &
SERVER_PID=$!
ADDRESS=""
for _ in $(seq 1 300); do  # Up to 30 s.
  ADDRESS=$(sed -n 's/^normserve listening on \([^ ]*\) .*/\1/p' "$WORK/server.out" |
    head -n 1 || true)
  [[ -n $ADDRESS ]] && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "server exited before listening"
  sleep 0.1
done
[[ $ADDRESS =~ ^127\.0\.0\.1:[1-9][0-9]*$ ]] || fail "no 'normserve listening on 127.0.0.1:PORT' line"
NORMSERVE_PID=$(cat "/proc/$SERVER_PID/task/$SERVER_PID/children" | awk '{ print $1 }')
[[ -n $NORMSERVE_PID ]] || fail "server process not found"
ok "$(head -n 1 "$WORK/server.out") (host pid $NORMSERVE_PID, PID 1 inside)"
[[ $(awk '/^Uid:/ { print $2 }' "/proc/$NORMSERVE_PID/status") == 10001 ]] ||
  fail "server does not run as uid 10001"
took

phase "driving it with the image's CLI"
# run EXPECTED_RC CMD...: runs CMD, keeps its output in $WORK/last.{out,err}.
# "cli" stands for the image's CLI pointed at the server, "host-cli" for
# the host build's.
run() {
  local expected=$1 rc=0
  shift
  case $1 in
    cli) shift; set -- "${IN_IMAGE[@]}" /usr/local/bin/normserve-cli --address="$ADDRESS" "$@" ;;
    host-cli) shift; set -- "$BUILD_DIR/bin/normserve-cli" --address="$ADDRESS" "$@" ;;
  esac
  timeout 60 "$@" >"$WORK/last.out" 2>"$WORK/last.err" || rc=$?
  [[ $rc -eq $expected ]] || fail "'$*' exited $rc, expected $expected"
}
expect_out() { grep -qF -- "$1" "$WORK/last.out" || fail "stdout lacks '$1'"; }

run 0 cli health
expect_out SERVING
healthcheck=()
for a in "${HEALTHCHECK[@]}"; do healthcheck+=("${a/127.0.0.1:50051/$ADDRESS}"); done
run 0 "${IN_IMAGE[@]}" "${healthcheck[@]}"
expect_out SERVING
ok "health SERVING; the HEALTHCHECK command (port moved to ${ADDRESS##*:}) exits 0"

run 0 cli create --id=image-bn --num_features=8 --momentum=0.1 --eps=1e-5
expect_out 'name: "layers/image-bn"'
run 1 cli create --id=image-bn --num_features=8
grep -qF "ALREADY_EXISTS" "$WORK/last.err" || fail "duplicate create is not ALREADY_EXISTS"
ok "create, duplicate create ALREADY_EXISTS"

# A known input: per channel c, mean 1 + c/2 and std 1 + c/5.
"$PYTHON" - "$WORK/tmp/x.bin" <<'PY'
import array, random, sys
rng = random.Random(7)
x = array.array("f", (1.0 + 0.5 * c + (1.0 + 0.2 * c) * rng.gauss(0.0, 1.0)
                      for n in range(16) for c in range(8) for _ in range(144)))
assert x.itemsize == 4 and sys.byteorder == "little"
x.tofile(open(sys.argv[1], "wb"))
PY
chmod 644 "$WORK/tmp/x.bin"
run 0 cli forward image-bn --shape=16,8,12,12 --input=/tmp/x.bin --training --output=/tmp/y_train.bin
expect_out "mode: training"
expect_out "shape=[16, 8, 12, 12] dtype=float32"
run 0 cli forward image-bn --shape=16,8,12,12 --input=/tmp/x.bin --output=/tmp/y_eval.bin
expect_out "mode: eval"
checksum=$(grep -o 'fnv1a64=[0-9a-fx]*' "$WORK/last.out" || true)
[[ -n $checksum ]] || fail "forward printed no checksum"
run 0 cli state image-bn --output=/tmp/state.json
expect_out "wrote 5 tensors"
"$PYTHON" - "$WORK/tmp" <<'PY' || fail "outputs or state differ from the reference"
import array, json, math, sys
work = sys.argv[1]
N, C, HW = 16, 8, 144
def load(name):
    a = array.array("f")
    with open(f"{work}/{name}", "rb") as f:
        a.frombytes(f.read())
    assert len(a) == N * C * HW, (name, len(a))
    return a
x = load("x.bin")
idx = lambda n, c, i: (n * C + c) * HW + i
mean, var = [], []
for c in range(C):
    v = [float(x[idx(n, c, i)]) for n in range(N) for i in range(HW)]
    m = math.fsum(v) / len(v)
    mean.append(m)
    var.append(math.fsum((t - m) ** 2 for t in v) / len(v))
count = N * HW
rm = [0.1 * m for m in mean]
rv = [0.9 + 0.1 * v * count / (count - 1) for v in var]
state = json.load(open(f"{work}/state.json"))
t = state["tensors"]
assert t["num_batches_tracked"]["values"] == [1], t["num_batches_tracked"]
def close(got, want, tol, what):
    for k, (g, w) in enumerate(zip(got, want)):
        if abs(g - w) > tol * (1 + abs(w)):
            raise SystemExit(f"{what}[{k}] = {g}, reference {w}")
close(t["running_mean"]["values"], rm, 1e-5, "running_mean")
close(t["running_var"]["values"], rv, 1e-5, "running_var")
for name, mu, var_ in (("y_train.bin", mean, var), ("y_eval.bin", rm, rv)):
    y = load(name)
    worst = 0.0
    for n in range(N):
        for c in range(C):
            s = 1.0 / math.sqrt(var_[c] + 1e-5)
            for i in range(HW):
                k = idx(n, c, i)
                worst = max(worst, abs(y[k] - (x[k] - mu[c]) * s))
    if worst > 1e-4:
        raise SystemExit(f"{name}: max error {worst} against the reference")
print("outputs and state match the double-precision reference")
PY
ok "training and eval forward and state match a double-precision reference ($checksum)"

if [[ -x $BUILD_DIR/bin/normserve-cli ]]; then
  run 0 host-cli health
  expect_out SERVING
  run 0 host-cli forward image-bn --shape=16,8,12,12 --input="$WORK/tmp/x.bin"
  expect_out "$checksum"
  ok "host CLI ($BUILD_DIR/bin): health SERVING, same eval output ($checksum)"
else
  echo "image-test:   note: no host CLI in $BUILD_DIR/bin, cross-check skipped"
fi

run 0 cli list
expect_out "layers/image-bn"
expect_out "1 layer(s)"
run 0 cli delete image-bn
run 1 cli get image-bn
grep -qF "NOT_FOUND" "$WORK/last.err" || fail "get after delete is not NOT_FOUND"
ok "list, delete, NOT_FOUND after delete"
took

# --- 7. SIGTERM -------------------------------------------------------------
phase "SIGTERM to the server (PID 1 in its namespace)"
kill -TERM "$NORMSERVE_PID"
for _ in $(seq 1 200); do  # Up to 20 s.
  kill -0 "$SERVER_PID" 2>/dev/null || break
  sleep 0.1
done
kill -0 "$SERVER_PID" 2>/dev/null && fail "server still running 20 s after SIGTERM"
rc=0
wait "$SERVER_PID" || rc=$?
SERVER_PID=""
[[ $rc -eq 0 ]] || fail "server exited with $rc after SIGTERM"
grep -q "SIGTERM received, draining" "$WORK/server.out" || fail "no drain message"
grep -q "normserve: stopped" "$WORK/server.out" || fail "no 'stopped' message"
ok "drained and exited 0"
took

echo "image-test: PASS in $((SECONDS - START))s (image $TAG)"
