"""An independent PyTorch re-implementation of diffusers' UNet2DModel.

diffusers is not installed here, so this module rebuilds the parts of it the
engine implements, with diffusers' own module names (so state_dict() keys are
the tensor names of a diffusers checkpoint) and diffusers' semantics:

  conv_in -> time_proj (sinusoidal) -> time_embedding (linear_1, SiLU,
  linear_2) [+ class_embedding] -> down_blocks -> mid_block -> up_blocks
  (skip concatenation) -> conv_norm_out -> SiLU -> conv_out

The noisy classifier is conv_in + time embedding + down_blocks + mid_block
followed by a head: out.norm (GroupNorm), SiLU, mean over H and W, out.linear.

Legend: N batch, C channels, H, W image size, L tokens (H*W), E time
embedding width (4 x block_out_channels[0]).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# diffusers' UNet2DModel defaults (configuration_utils register_to_config).
DEFAULT_CONFIG = {
    "_class_name": "UNet2DModel",
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                         "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                       "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}


def get_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False,
                           downscale_freq_shift=1.0, scale=1.0,
                           max_period=10000, dtype=torch.float32):
    """diffusers.models.embeddings.get_timestep_embedding: t [N] -> [N, D].
    diffusers computes it in float32; dtype=torch.float64 gives the exact
    values the fixtures hold."""
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(
        0, half_dim, dtype=dtype, device=timesteps.device)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = torch.exp(exponent)
    emb = timesteps[:, None].to(dtype) * emb[None, :]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


class Timesteps(nn.Module):
    def __init__(self, num_channels, flip_sin_to_cos, downscale_freq_shift):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps):
        return get_timestep_embedding(timesteps, self.num_channels,
                                      self.flip_sin_to_cos,
                                      self.downscale_freq_shift)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels, time_embed_dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample):
        return self.linear_2(self.act(self.linear_1(sample)))


class ResnetBlock2D(nn.Module):
    """resnet_time_scale_shift "default", no up/down sampling inside."""

    def __init__(self, in_channels, out_channels, temb_channels, eps, groups,
                 output_scale_factor=1.0):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nonlinearity = nn.SiLU()
        self.use_in_shortcut = in_channels != out_channels
        self.conv_shortcut = None
        if self.use_in_shortcut:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, input_tensor, temb):
        h = self.nonlinearity(self.norm1(input_tensor))
        h = self.conv1(h)
        t = self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        h = h + t
        h = self.nonlinearity(self.norm2(h))
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + h) / self.output_scale_factor


class Attention(nn.Module):
    """diffusers' Attention as built for the deprecated attention block:
    group_norm, to_q/to_k/to_v/to_out.0, residual connection, division by
    rescale_output_factor.  [N,C,H,W] -> [N,C,H,W]."""

    def __init__(self, channels, heads, dim_head, eps, groups,
                 rescale_output_factor=1.0):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)
        inner = heads * dim_head
        self.to_q = nn.Linear(channels, inner, bias=True)
        self.to_k = nn.Linear(channels, inner, bias=True)
        self.to_v = nn.Linear(channels, inner, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels, bias=True),
                                     nn.Dropout(0.0)])

    def forward(self, hidden_states):
        residual = hidden_states
        n, c, h, w = hidden_states.shape
        x = self.group_norm(hidden_states).view(n, c, h * w).transpose(1, 2)
        q = self.to_q(x)                                  # [N,L,C]
        k = self.to_k(x)
        v = self.to_v(x)

        def split(a):                                     # [N,heads,L,Dh]
            return a.view(n, -1, self.heads, self.dim_head).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dim_head)
        # upcast_softmax: the softmax runs in float32 at least.
        probs = scores.softmax(dim=-1)
        a = torch.matmul(probs, v)                        # [N,heads,L,Dh]
        a = a.transpose(1, 2).reshape(n, h * w, self.heads * self.dim_head)
        a = self.to_out[1](self.to_out[0](a))
        a = a.transpose(-1, -2).reshape(n, c, h, w)
        a = a + residual
        return a / self.rescale_output_factor


class Downsample2D(nn.Module):
    def __init__(self, channels, padding):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


def _heads(channels, attention_head_dim):
    dim_head = attention_head_dim if attention_head_dim is not None \
        else channels
    return channels // dim_head, dim_head


class DownBlock(nn.Module):
    """DownBlock2D, or AttnDownBlock2D when attention is True."""

    def __init__(self, in_channels, out_channels, temb_channels, num_layers,
                 eps, groups, attention, attention_head_dim, add_downsample,
                 downsample_padding):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels,
                          out_channels, temb_channels, eps, groups)
            for i in range(num_layers)])
        self.attentions = None
        if attention:
            heads, dim_head = _heads(out_channels, attention_head_dim)
            self.attentions = nn.ModuleList([
                Attention(out_channels, heads, dim_head, eps, groups)
                for _ in range(num_layers)])
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList([
                Downsample2D(out_channels, downsample_padding)])

    def forward(self, hidden, temb):
        states = ()
        for i, resnet in enumerate(self.resnets):
            hidden = resnet(hidden, temb)
            if self.attentions is not None:
                hidden = self.attentions[i](hidden)
            states += (hidden,)
        if self.downsamplers is not None:
            for d in self.downsamplers:
                hidden = d(hidden)
            states += (hidden,)
        return hidden, states


class UpBlock(nn.Module):
    """UpBlock2D, or AttnUpBlock2D when attention is True."""

    def __init__(self, in_channels, prev_output_channel, out_channels,
                 temb_channels, num_layers, eps, groups, attention,
                 attention_head_dim, add_upsample):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            res_skip = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock2D(resnet_in + res_skip, out_channels,
                                         temb_channels, eps, groups))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = None
        if attention:
            heads, dim_head = _heads(out_channels, attention_head_dim)
            self.attentions = nn.ModuleList([
                Attention(out_channels, heads, dim_head, eps, groups)
                for _ in range(num_layers)])
        self.upsamplers = None
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])

    def forward(self, hidden, res_states, temb):
        for i, resnet in enumerate(self.resnets):
            res = res_states[-1]
            res_states = res_states[:-1]
            hidden = torch.cat([hidden, res], dim=1)
            hidden = resnet(hidden, temb)
            if self.attentions is not None:
                hidden = self.attentions[i](hidden)
        if self.upsamplers is not None:
            for u in self.upsamplers:
                hidden = u(hidden)
        return hidden


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels, temb_channels, eps, groups,
                 output_scale_factor, attention_head_dim, add_attention):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb_channels, eps, groups,
                          output_scale_factor),
            ResnetBlock2D(channels, channels, temb_channels, eps, groups,
                          output_scale_factor)])
        self.add_attention = add_attention
        if add_attention:
            heads, dim_head = _heads(channels, attention_head_dim)
            self.attentions = nn.ModuleList([
                Attention(channels, heads, dim_head, eps, groups,
                          rescale_output_factor=output_scale_factor)])

    def forward(self, hidden, temb):
        hidden = self.resnets[0](hidden, temb)
        if self.add_attention:
            hidden = self.attentions[0](hidden)
        return self.resnets[1](hidden, temb)


class ClassifierHead(nn.Module):
    def __init__(self, channels, classes, eps, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)
        self.linear = nn.Linear(channels, classes)

    def forward(self, x):
        return self.linear(F.silu(self.norm(x)).mean(dim=(2, 3)))


class UNet2DModel(nn.Module):
    """diffusers' UNet2DModel (positional time embedding, silu, default time
    scale shift, conv up/down samplers); classifier=True builds the noisy
    classifier (no up path: a head named out.*)."""

    def __init__(self, config, classifier=False):
        super().__init__()
        cfg = dict(DEFAULT_CONFIG)
        cfg.update(config)
        self.config = cfg
        self.classifier = classifier
        assert cfg["act_fn"] == "silu"
        assert cfg["time_embedding_type"] == "positional"
        assert cfg["resnet_time_scale_shift"] == "default"
        assert cfg["class_embed_type"] is None
        boc = list(cfg["block_out_channels"])
        eps = cfg["norm_eps"]
        groups = cfg["norm_num_groups"]
        head_dim = cfg["attention_head_dim"]
        temb = boc[0] * 4
        nb = len(boc)

        self.conv_in = nn.Conv2d(cfg["in_channels"], boc[0], 3, padding=1)
        self.time_proj = Timesteps(boc[0], cfg["flip_sin_to_cos"],
                                   cfg["freq_shift"])
        self.time_embedding = TimestepEmbedding(boc[0], temb)
        self.class_embedding = None
        if cfg["num_class_embeds"] is not None:
            self.class_embedding = nn.Embedding(cfg["num_class_embeds"], temb)

        self.down_blocks = nn.ModuleList()
        out_ch = boc[0]
        for i, kind in enumerate(cfg["down_block_types"]):
            assert kind in ("DownBlock2D", "AttnDownBlock2D")
            in_ch, out_ch = out_ch, boc[i]
            self.down_blocks.append(DownBlock(
                in_ch, out_ch, temb, cfg["layers_per_block"], eps, groups,
                kind == "AttnDownBlock2D",
                head_dim if head_dim is not None else out_ch,
                i != nb - 1, cfg["downsample_padding"]))

        self.mid_block = UNetMidBlock2D(
            boc[-1], temb, eps, groups, cfg["mid_block_scale_factor"],
            head_dim if head_dim is not None else boc[-1],
            cfg["add_attention"])

        if classifier:
            self.out = ClassifierHead(boc[-1], cfg["classifier_classes"], eps,
                                      groups)
            return

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(boc))
        out_ch = rev[0]
        for i, kind in enumerate(cfg["up_block_types"]):
            assert kind in ("UpBlock2D", "AttnUpBlock2D")
            prev, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, nb - 1)]
            self.up_blocks.append(UpBlock(
                in_ch, prev, out_ch, temb, cfg["layers_per_block"] + 1, eps,
                groups, kind == "AttnUpBlock2D",
                head_dim if head_dim is not None else out_ch, i != nb - 1))

        self.conv_norm_out = nn.GroupNorm(groups, boc[0], eps=eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(boc[0], cfg["out_channels"], 3, padding=1)

    def forward(self, sample, timesteps, class_labels=None):
        # x [N,Cin,H,W], timesteps [N] (float), class_labels [N] (long)
        t_emb = self.time_proj(timesteps).to(sample.dtype)       # [N,C0]
        emb = self.time_embedding(t_emb)                          # [N,E]
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)

        sample = self.conv_in(sample)
        res_states = (sample,)
        for block in self.down_blocks:
            sample, states = block(sample, emb)
            res_states += states

        sample = self.mid_block(sample, emb)
        if self.classifier:
            return self.out(sample)                               # [N,K]

        for block in self.up_blocks:
            n = len(block.resnets)
            states, res_states = res_states[-n:], res_states[:-n]
            sample = block(sample, states, emb)

        sample = self.conv_act(self.conv_norm_out(sample))
        return self.conv_out(sample)                              # [N,Cout,H,W]


# The names of the attention tensors before diffusers 0.14 (AttentionBlock).
OLD_ATTENTION_NAMES = {
    "to_q.": "query.",
    "to_k.": "key.",
    "to_v.": "value.",
    "to_out.0.": "proj_attn.",
}


def old_attention_name(name):
    """down_blocks.1.attentions.0.to_q.weight -> ...attentions.0.query.weight"""
    if ".attentions." not in name:
        return name
    head, _, tail = name.rpartition(".attentions.")
    index, _, leaf = tail.partition(".")
    for new, old in OLD_ATTENTION_NAMES.items():
        if leaf.startswith(new):
            leaf = old + leaf[len(new):]
    return head + ".attentions." + index + "." + leaf
