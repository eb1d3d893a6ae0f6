"""PyTorch side of scripts/bench.sh: the same weights, threads and batches.

Loads an engine .safetensors file (config in __metadata__), builds the
independent PyTorch UNet2DModel of tests/reference/unet_ref.py, and times
forward passes and training steps.  Prints one JSON object.
"""

import argparse
import json
import os
import struct
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests",
                                "reference"))
import unet_ref  # noqa: E402


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, e in header.items():
        assert e["dtype"] == "F32", name
        b, end = e["data_offsets"]
        arr = np.frombuffer(data[b:end], dtype="<f4").reshape(e["shape"])
        tensors[name] = torch.from_numpy(arr.copy())
    return tensors, meta


def best_time(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tensors, meta = read_safetensors(args.weights)
    cfg = json.loads(meta["config"])
    classifier = meta.get("kind") == "classifier"
    model = unet_ref.UNet2DModel(cfg, classifier=classifier)
    state = {k: v for k, v in tensors.items() if k in model.state_dict()}
    model.load_state_dict(state, strict=True)
    model.eval()

    size, cin = cfg["sample_size"], cfg["in_channels"]
    classes = cfg.get("num_class_embeds")
    gen = torch.Generator().manual_seed(0)
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__,
           "forward_s": {}}

    def batch(n):
        x = torch.randn(n, cin, size, size, generator=gen)
        t = torch.randint(0, 1000, (n,), generator=gen).float()
        y = (torch.randint(0, classes, (n,), generator=gen)
             if classes else None)
        return x, t, y

    with torch.no_grad():
        for n in [int(b) for b in args.batches.split(",")]:
            x, t, y = batch(n)
            out["forward_s"][str(n)] = best_time(lambda: model(x, t, y),
                                                 args.repeats)

    # Training step, the work of the engine's (diffuse train's defaults):
    # a batch noised at uniform t with labels dropped to the unconditional
    # class with probability 0.1, forward, MSE on eps, backward, gradient
    # clipping at norm 1, AdamW, and the EMA of the weights.
    model.train()
    n = args.train_batch
    x0, _, y0 = batch(n)
    betas = torch.linspace(1e-4, 0.02, 1000)
    alpha_bar = torch.cumprod(1 - betas, 0)
    params = [p for p in model.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)

    def step():
        t = torch.randint(0, 1000, (n,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        ab = alpha_bar[t].view(n, 1, 1, 1)
        x = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        y = y0
        if y0 is not None:
            drop = torch.rand(n, generator=gen) < 0.1
            y = torch.where(drop, torch.full_like(y0, classes - 1), y0)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x, t.float(), y), eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(ema, 0.9999)
            torch._foreach_add_(ema, [p.detach() for p in params],
                                alpha=1 - 0.9999)

    out["train_step_s"] = best_time(step, args.repeats)
    out["train_batch"] = n
    print(json.dumps(out))


if __name__ == "__main__":
    main()
