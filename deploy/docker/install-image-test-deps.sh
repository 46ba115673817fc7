#!/usr/bin/env bash
# Installs what `make image-test` needs on Debian 12 and nothing else: podman
# (builds the Dockerfile without a Docker engine) and debootstrap (makes the
# Debian 12 base image locally). Not part of scripts/install-deps.sh, so
# `make test` stays lean. Idempotent and quiet when everything is there.
set -euo pipefail

PACKAGES=(podman debootstrap)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-image-test-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
