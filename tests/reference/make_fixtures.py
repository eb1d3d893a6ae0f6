#!/usr/bin/python3
"""Writes the UNet and classifier fixtures tests/test-unet.c checks against.

Each tests/reference/<name>.safetensors holds every weight of a small model
(diffusers' names; the old attention names for the configs that ask for
them) and:
  fixture.x       [N,Cin,H,W]  input
  fixture.t       [N]          timesteps (float)
  fixture.labels  [N]          class labels as floats (when the model uses
                               them: class-conditional UNet or classifier)
  fixture.out     forward result: eps [N,Cout,H,W] or logits [N,K]
and, for the configs with grads=True:
  UNet:        fixture.target [N,Cout,H,W], fixture.loss [1] (MSE, mean over
               all elements), fixture.grad.<param name> for every parameter
  classifier:  fixture.loss [1] = sum over N of log_softmax(logits)[label],
               fixture.grad.x [N,Cin,H,W] its gradient with respect to x
__metadata__: "config" (diffusers' config JSON; + "classifier_classes" for
the classifier), "kind" ("unet" | "classifier"), "flops" (multiply-adds x 2
of one image's forward pass, convolutions, linears and attention products),
"fixture": "1".

The weights are seeded float32 values; the forward and backward run in
float64 on those exact values (the time embedding included), so the stored
results are the exact function of the stored weights rounded to float32, and
a float32 engine is judged by its own rounding only.  The files are written
deterministically: running the script again reproduces them bit for bit.

Usage: /usr/bin/python3 tests/reference/make_fixtures.py [outdir]
"""

import json
import os
import struct
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import unet_ref  # noqa: E402

DOWN, ADOWN = "DownBlock2D", "AttnDownBlock2D"
UP, AUP = "UpBlock2D", "AttnUpBlock2D"

FIXTURES = [
    # Attention in the lower block (2 heads), new names, flip_sin_to_cos,
    # shift 0, padding 1, 2 groups: the gradient check of the whole model.
    dict(name="unet-attn-grad", seed=1, batch=2, t=[37.0, 815.0],
         grads=True,
         config=dict(sample_size=8, in_channels=2, out_channels=2,
                     block_out_channels=[4, 8],
                     down_block_types=[DOWN, ADOWN],
                     up_block_types=[AUP, UP],
                     layers_per_block=1, norm_num_groups=2,
                     attention_head_dim=4, flip_sin_to_cos=True,
                     freq_shift=0, downsample_padding=1)),
    # Class-conditional, old attention names, no flip, shift 1, padding 0
    # (the asymmetric pad), one head, mid_block_scale_factor 2: gradients too.
    dict(name="unet-class-old-grad", seed=2, batch=2, t=[3.0, 999.0],
         grads=True, old_names=True,
         config=dict(sample_size=8, in_channels=1, out_channels=1,
                     block_out_channels=[8, 8],
                     down_block_types=[ADOWN, DOWN],
                     up_block_types=[UP, AUP],
                     layers_per_block=1, norm_num_groups=4,
                     attention_head_dim=None, flip_sin_to_cos=False,
                     freq_shift=1, downsample_padding=0,
                     num_class_embeds=3, mid_block_scale_factor=2)),
    # Two layers per block, 16x16, out_channels != in_channels, no mid
    # attention, a fractional timestep, class embedding.
    dict(name="unet-lpb2", seed=3, batch=2, t=[0.0, 421.5],
         config=dict(sample_size=16, in_channels=3, out_channels=2,
                     block_out_channels=[8, 8],
                     down_block_types=[DOWN, ADOWN],
                     up_block_types=[AUP, UP],
                     layers_per_block=2, norm_num_groups=4,
                     attention_head_dim=4, flip_sin_to_cos=True,
                     freq_shift=1, downsample_padding=0,
                     num_class_embeds=4, add_attention=False)),
    # Three levels, attention everywhere, batch 3, eps 1e-6.
    dict(name="unet-3level", seed=4, batch=3, t=[1.0, 250.0, 640.0],
         config=dict(sample_size=8, in_channels=1, out_channels=1,
                     block_out_channels=[8, 8, 12],
                     down_block_types=[ADOWN, DOWN, ADOWN],
                     up_block_types=[AUP, UP, AUP],
                     layers_per_block=1, norm_num_groups=4, norm_eps=1e-6,
                     attention_head_dim=4, flip_sin_to_cos=False,
                     freq_shift=0, downsample_padding=1)),
    # Channels in 16s on 14x14 and 7x7: the F(4x4, 3x3) Winograd
    # convolutions (forward, dx and dW), gradients too.
    dict(name="unet-f4-grad", seed=6, batch=2, t=[5.0, 512.0],
         grads=True,
         config=dict(sample_size=14, in_channels=1, out_channels=1,
                     block_out_channels=[16, 16],
                     down_block_types=[DOWN, ADOWN],
                     up_block_types=[AUP, UP],
                     layers_per_block=1, norm_num_groups=4,
                     attention_head_dim=8, flip_sin_to_cos=True,
                     freq_shift=0, downsample_padding=1)),
    # The noisy classifier: down path + mid block + head.
    dict(name="classifier", seed=5, batch=2, t=[12.0, 700.0],
         grads=True, classifier=True,
         config=dict(sample_size=8, in_channels=3, out_channels=3,
                     block_out_channels=[8, 16, 16],
                     down_block_types=[DOWN, ADOWN, ADOWN],
                     up_block_types=[AUP, AUP, UP],
                     layers_per_block=1, norm_num_groups=4,
                     attention_head_dim=4, flip_sin_to_cos=True,
                     freq_shift=0, downsample_padding=1,
                     classifier_classes=5)),
]


def full_config(cfg):
    """The diffusers config as a UNet2DModel's config.json would hold it."""
    out = dict(unet_ref.DEFAULT_CONFIG)
    out.update(cfg)
    out["_diffusers_version"] = "0.25.0"
    return out


def randomise(model, gen):
    """PyTorch's default init (already applied) made less trivial: norms get
    weights around 1 and non-zero biases, so a swapped gamma/beta shows."""
    for mod in model.modules():
        if isinstance(mod, nn.GroupNorm):
            with torch.no_grad():
                mod.weight.copy_(1.0 + 0.25 * torch.randn(
                    mod.weight.shape, generator=gen))
                mod.bias.copy_(0.25 * torch.randn(mod.bias.shape,
                                                  generator=gen))


def count_flops(model, args, batch):
    """Multiply-adds x 2 of the convolutions, linears and attention products
    of one forward pass, per image: what df_unet_flops counts."""
    total = [0]

    def conv_hook(mod, inp, out):
        total[0] += 2 * mod.in_channels // mod.groups * \
            mod.kernel_size[0] * mod.kernel_size[1] * out.numel()

    def linear_hook(mod, inp, out):
        total[0] += 2 * mod.in_features * out.numel()

    def attn_hook(mod, inp, out):
        n, c, h, w = inp[0].shape
        total[0] += 2 * 2 * n * (h * w) ** 2 * c      # q k^T and p v

    hooks = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(linear_hook))
        elif isinstance(mod, unet_ref.Attention):
            hooks.append(mod.register_forward_hook(attn_hook))
    with torch.no_grad():
        model(*args)
    for h in hooks:
        h.remove()
    return total[0] // batch


def write_safetensors(path, tensors, metadata):
    """tensors: list of (name, float32 tensor); header padded to 8 bytes."""
    header = {"__metadata__": metadata}
    blobs = []
    offset = 0
    for name, t in tensors:
        data = t.detach().to(torch.float32).contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def make(fx, outdir):
    torch.manual_seed(fx["seed"])
    gen = torch.Generator().manual_seed(1000 + fx["seed"])
    classifier = fx.get("classifier", False)
    cfg = full_config(fx["config"])
    model = unet_ref.UNet2DModel(cfg, classifier=classifier)
    randomise(model, gen)
    weights = [(k, v.clone()) for k, v in model.state_dict().items()]
    model = model.double()

    # Inputs.
    n = fx["batch"]
    size = cfg["sample_size"]
    x = torch.randn((n, cfg["in_channels"], size, size), generator=gen)
    t = torch.tensor(fx["t"], dtype=torch.float32)
    labels = None
    if classifier:
        labels = torch.randint(0, cfg["classifier_classes"], (n,),
                               generator=gen)
    elif cfg["num_class_embeds"] is not None:
        labels = torch.randint(0, cfg["num_class_embeds"], (n,),
                               generator=gen)

    # The time embedding in float64 too: the engine computes it in double.
    model.time_proj.forward = lambda ts: unet_ref.get_timestep_embedding(
        ts.double(), model.time_proj.num_channels,
        model.time_proj.flip_sin_to_cos, model.time_proj.downscale_freq_shift,
        dtype=torch.float64)

    flops = count_flops(model, (x.double(), t.double(), labels), n)
    xd = x.double().requires_grad_(classifier)
    out = model(xd, t.double(), labels)
    extra = [("fixture.x", x), ("fixture.t", t)]
    if labels is not None:
        extra.append(("fixture.labels", labels.to(torch.float32)))
    extra.append(("fixture.out", out))

    if fx.get("grads"):
        if classifier:
            logp = torch.log_softmax(out, dim=-1)
            loss = logp[torch.arange(n), labels].sum()
            loss.backward()
            extra.append(("fixture.loss", loss.reshape(1)))
            extra.append(("fixture.grad.x", xd.grad))
        else:
            target = torch.randn(out.shape, generator=gen)
            loss = ((out - target.double()) ** 2).mean()
            loss.backward()
            extra.append(("fixture.target", target))
            extra.append(("fixture.loss", loss.reshape(1)))
            for name, p in model.named_parameters():
                extra.append(("fixture.grad." + name, p.grad))

    rename = unet_ref.old_attention_name if fx.get("old_names") else None
    if rename:
        weights = [(rename(k), v) for k, v in weights]
        extra = [(("fixture.grad." + rename(k[len("fixture.grad."):]))
                  if k.startswith("fixture.grad.") else k, v)
                 for k, v in extra]

    meta = {"config": json.dumps(cfg, sort_keys=True),
            "kind": "classifier" if classifier else "unet",
            "flops": str(flops),
            "fixture": "1"}
    path = os.path.join(outdir, fx["name"] + ".safetensors")
    write_safetensors(path, weights + extra, meta)
    nparams = sum(v.numel() for _, v in weights)
    print("%-22s %6d params %7d bytes" % (fx["name"], nparams,
                                           os.path.getsize(path)))


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else \
        os.path.dirname(os.path.abspath(__file__))
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for fx in FIXTURES:
        make(fx, outdir)


if __name__ == "__main__":
    main()
