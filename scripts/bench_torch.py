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

    # Training step: forward, MSE on eps, backward, AdamW.
    model.train()
    n = args.train_batch
    x, t, y = batch(n)
    target = torch.randn(x.shape, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x, t, y), target)
        loss.backward()
        opt.step()

    out["train_step_s"] = best_time(step, args.repeats)
    out["train_batch"] = n
    print(json.dumps(out))


if __name__ == "__main__":
    main()
