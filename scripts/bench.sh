#!/usr/bin/env bash
# Engine vs PyTorch 1.13 on the same weights and thread count, in one run:
# UNet forward at batch 1 and 16, the engine's GFLOP/s against cblas_sgemm
# on the same GEMM shapes, and training steps.  Not part of CI.
#   scripts/bench.sh [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}

bash scripts/setup.sh
build=${BUILD_DIR:-build}
[ -f "$build/build.ninja" ] || meson setup "$build" >/dev/null
ninja -C "$build" bench/bench-engine >/dev/null

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$build/bench/bench-engine" --threads "$threads" --weights-out "$tmp/w.safetensors" \
  > "$tmp/engine.json"
/usr/bin/python3 scripts/bench_torch.py --weights "$tmp/w.safetensors" \
  --threads "$threads" > "$tmp/torch.json"

/usr/bin/python3 - "$tmp/engine.json" "$tmp/torch.json" <<'PY'
import json, sys
e = json.load(open(sys.argv[1]))
t = json.load(open(sys.argv[2]))
print(f"kernel: {e['corename']} ({e['choice']}); threads {e['threads']}; "
      f"torch {t['torch']} on {t['threads']} threads")
print(f"model: {e['params']} parameters, "
      f"{e['flops_per_image'] / 1e6:.0f} MFLOP per image")
print(f"{'batch':>5} {'engine ms':>10} {'torch ms':>10} {'speed-up':>9} "
      f"{'GFLOP/s':>8} {'sgemm GFLOP/s':>14} {'of sgemm':>9}")
for b, r in e["forward"].items():
    tt = t["forward_s"][b]
    print(f"{b:>5} {r['seconds'] * 1e3:10.2f} {tt * 1e3:10.2f} "
          f"{tt / r['seconds']:8.2f}x {r['gflops']:8.1f} "
          f"{r['gemm_gflops']:14.1f} {r['gflops'] / r['gemm_gflops']:8.0%}")
eb, tb = e["train_batch"], t["train_batch"]
ei, ti = eb / e["train_step_s"], tb / t["train_step_s"]
print(f"train batch {eb}: engine {ei:.1f} img/s, torch {ti:.1f} img/s, "
      f"speed-up {ei / ti:.2f}x")
PY
