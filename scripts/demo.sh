#!/usr/bin/env bash
# Sets up, builds, and generates images with the shipped model into out/.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
build=${BUILD_DIR:-build}
[ -f "$build/build.ninja" ] || meson setup "$build" -Dplugin=auto >/dev/null
ninja -C "$build" >/dev/null

model=weights/fashion-mnist.safetensors
mkdir -p out
"$build/cli/diffuse" generate --model "$model" --count 16 --steps 50 --eta 0 \
  --seed 1 --out out/generate
echo "demo: images in $(pwd)/out/generate (grid.png shows them all)"
