#!/usr/bin/env bash
# Remakes the README's pictures from the shipped weights with the CLI:
#   weights/samples-grid.png           10 x 10, one row per class
#   weights/samples-interpolation.png  8 DDIM frames between two seeds
# (assembled with /usr/bin/python3's PIL; the demo makes the same in GIMP).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}
steps=${STEPS:-50}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for k in 0 1 2 3 4 5 6 7 8 9; do
  "$build/cli/diffuse" generate --class "$k" --count 10 --steps "$steps" \
    --guidance-scale 3 --seed 1 --quiet --out "$tmp/class$k"
done
"$build/cli/diffuse" interpolate --seeds 3,11 --frames 8 --class 7 \
  --steps "$steps" --quiet --out "$tmp/interp"

/usr/bin/python3 - "$tmp" <<'PY'
import sys
from PIL import Image
tmp = sys.argv[1]
def sheet(paths, cols, scale=2, gap=2):
    ims = [Image.open(p).convert("L") for p in paths]
    w, h = ims[0].size
    rows = (len(ims) + cols - 1) // cols
    out = Image.new("L", (cols * (w + gap) - gap, rows * (h + gap) - gap), 255)
    for i, im in enumerate(ims):
        out.paste(im, ((i % cols) * (w + gap), (i // cols) * (h + gap)))
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST)
sheet([f"{tmp}/class{k}/{i:04d}.png" for k in range(10) for i in range(10)],
      10).save("weights/samples-grid.png")
sheet([f"{tmp}/interp/{i:04d}.png" for i in range(8)], 8, scale=3).save(
    "weights/samples-interpolation.png")
PY
echo "samples: weights/samples-grid.png, weights/samples-interpolation.png"
