#!/usr/bin/env bash
# Engine vs PyTorch 1.13 on the same weights and thread count, in one run:
# UNet forward at batch 1 and 16 (and the share of it its GEMMs take),
# training steps, and both against the machine's sgemm peak.  Engine and
# PyTorch take turns for ROUNDS rounds (default 3), each timing the best of
# its repeats, and the ratios are given per round and as their median: on a
# shared machine one process's timings can swing by a fifth from the next
# one's.  Not part of CI.
#   [ROUNDS=N] scripts/bench.sh [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
rounds=${ROUNDS:-3}

bash scripts/setup.sh
build=${BUILD_DIR:-build}
[ -f "$build/build.ninja" ] || meson setup "$build" >/dev/null
ninja -C "$build" bench/bench-engine >/dev/null

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for r in $(seq "$rounds"); do
  "$build/bench/bench-engine" --threads "$threads" \
    --weights-out "$tmp/w.safetensors" > "$tmp/engine-$r.json"
  /usr/bin/python3 scripts/bench_torch.py --weights "$tmp/w.safetensors" \
    --threads "$threads" > "$tmp/torch-$r.json"
done

/usr/bin/python3 - "$tmp" "$rounds" <<'PY'
import json, statistics, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
E = [json.load(open(f"{tmp}/engine-{r}.json")) for r in range(1, rounds + 1)]
T = [json.load(open(f"{tmp}/torch-{r}.json")) for r in range(1, rounds + 1)]
e0, t0 = E[0], T[0]
print(f"kernel: {e0['corename']} ({e0['choice']}); threads {e0['threads']}; "
      f"torch {t0['torch']} on {t0['threads']} threads; {rounds} rounds")
print(f"model: {e0['params']} parameters, "
      f"{e0['flops_per_image'] / 1e6:.0f} MFLOP per image")
# GFLOP/s is nominal (direct convolution's count); "GEMMs alone" replays
# the pass's own GEMM calls (fewer FLOPs where it uses Winograd) without the
# rest of the pass: the share of its time the GEMMs take, and their rate.
print(f"{'round':>5} {'batch':>5} {'engine ms':>10} {'torch ms':>10} "
      f"{'speed-up':>9} {'GFLOP/s':>8} {'GEMMs alone':>12} {'GEMM GFLOP/s':>13}")
fwd = {}
for i, (e, t) in enumerate(zip(E, T), 1):
    for b, r in e["forward"].items():
        tt = t["forward_s"][b]
        fwd.setdefault(b, []).append(tt / r["seconds"])
        print(f"{i:>5} {b:>5} {r['seconds'] * 1e3:10.2f} {tt * 1e3:10.2f} "
              f"{tt / r['seconds']:8.2f}x {r['gflops']:8.1f} "
              f"{r['gemm_seconds'] / r['seconds']:12.0%} "
              f"{r['gemm_gflops']:13.1f}")
train = []
for i, (e, t) in enumerate(zip(E, T), 1):
    eb, tb = e["train_batch"], t["train_batch"]
    ei, ti = eb / e["train_step_s"], tb / t["train_step_s"]
    train.append(ei / ti)
    # A step's nominal arithmetic, 3 forward passes' worth (forward, input
    # and weight gradients) of direct convolution, against this machine's
    # FP32 ceiling: a rate above it needs fewer multiplies (the engine's
    # Winograd convolutions) or lower precision.
    fl, peak = 3 * e["flops_per_image"] * eb, e["sgemm_peak_gflops"]
    er, tr = fl / e["train_step_s"] / 1e9, fl / t["train_step_s"] / 1e9
    print(f"round {i}: train batch {eb}: engine {ei:.1f} img/s, torch "
          f"{ti:.1f} img/s, speed-up {ei / ti:.2f}x; {fl / 1e9:.1f} GFLOP "
          f"nominal (the engine's GEMMs {e['train_step_gemm_flops'] / 1e9:.1f})"
          f", sgemm peak {peak:.0f} GFLOP/s (1024-cube on each of "
          f"{e['threads']} threads): engine {er:.0f} GFLOP/s nominal "
          f"({er / peak:.0%}), torch {tr:.0f} ({tr / peak:.0%})")
for b, r in fwd.items():
    print(f"forward batch {b}: median speed-up {statistics.median(r):.2f}x "
          f"({min(r):.2f}-{max(r):.2f}x over {rounds} rounds)")
print(f"train: median speed-up {statistics.median(train):.2f}x "
      f"({min(train):.2f}-{max(train):.2f}x over {rounds} rounds)")
PY
