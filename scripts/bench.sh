#!/usr/bin/env bash
# Engine vs PyTorch 1.13 on the same weights and thread count, in one run:
# UNet forward at batch 1 and 16 (and the share of it its GEMMs take),
# training steps, and both against the machine's sgemm peak.  Not part of
# CI.
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
# GFLOP/s is nominal (direct convolution's count); "GEMMs alone" replays
# the pass's own GEMM calls (fewer FLOPs where it uses Winograd) without the
# rest of the pass: the share of its time the GEMMs take, and their rate.
print(f"{'batch':>5} {'engine ms':>10} {'torch ms':>10} {'speed-up':>9} "
      f"{'GFLOP/s':>8} {'GEMMs alone':>12} {'GEMM GFLOP/s':>13}")
for b, r in e["forward"].items():
    tt = t["forward_s"][b]
    print(f"{b:>5} {r['seconds'] * 1e3:10.2f} {tt * 1e3:10.2f} "
          f"{tt / r['seconds']:8.2f}x {r['gflops']:8.1f} "
          f"{r['gemm_seconds'] / r['seconds']:12.0%} {r['gemm_gflops']:13.1f}")
eb, tb = e["train_batch"], t["train_batch"]
ei, ti = eb / e["train_step_s"], tb / t["train_step_s"]
print(f"train batch {eb}: engine {ei:.1f} img/s, torch {ti:.1f} img/s, "
      f"speed-up {ei / ti:.2f}x")
# A step's nominal arithmetic, 3 forward passes' worth (forward, input
# and weight gradients) of direct convolution, against this machine's FP32
# ceiling: a rate above it needs fewer multiplies (the engine's Winograd
# convolutions) or lower precision.
fl, peak = 3 * e["flops_per_image"] * eb, e["sgemm_peak_gflops"]
er, tr = fl / e["train_step_s"] / 1e9, fl / t["train_step_s"] / 1e9
print(f"train step: {fl / 1e9:.1f} GFLOP nominal (the engine's GEMMs "
      f"{e['train_step_gemm_flops'] / 1e9:.1f}); sgemm peak {peak:.0f} GFLOP/s "
      f"(1024-cube on each of {e['threads']} threads); engine {er:.0f} "
      f"GFLOP/s nominal ({er / peak:.0%} of peak), torch {tr:.0f} "
      f"({tr / peak:.0%}); 1.5x torch is {1.5 * tr:.0f} ({1.5 * tr / peak:.0%})")
PY
