#!/usr/bin/env bash
# Installs the Debian 12 packages diffuse needs to build, test and run.
# Idempotent: installs only what is missing.  apt-get as root, sudo otherwise.
set -euo pipefail

packages=(
  build-essential meson ninja-build pkg-config
  libglib2.0-dev libjson-glib-dev libopenblas-dev zlib1g-dev
  libgdk-pixbuf-2.0-dev libcairo2-dev
  libgimp2.0-dev libgtk-3-dev gimp
  xvfb xauth
  dataset-fashion-mnist
  python3-torch python3-numpy python3-pil
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
    || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then sudo=; else sudo=sudo; fi
echo "setup: installing ${missing[*]}" >&2
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
