"""A compact U-Net for small images, conditioned on c_noise(σ) (the raw network F of lcsc_ray/precond.py).

Layout follows the DDPM/ADM family (Ho et al. 2020; Dhariwal & Nichol 2021) cut down to what 8x8..32x32
images need: a 3x3 input conv, `len(channel_mult)` resolution levels of `num_blocks` residual blocks each
(average-pool down, nearest up, skip connections concatenated), an optional self-attention block at the
lowest resolution, GroupNorm + SiLU, and a zero-initialised output conv (so f(x, σ) = c_skip·x at step 0).

Noise conditioning: `emb_mode="add"` adds a projection of the noise embedding to the activations (DDPM);
`"scale_shift"` modulates the normalised activations instead, h ← norm(h)·(1 + s) + b (ADM's
"use_scale_shift_norm"), which lets one network change its contrast and brightness per noise level and
trained the digits demo to a much lower Fréchet distance in the same steps (docs/TRAINING.md). "add" is
the default so runs saved before the option existed rebuild unchanged.

Sizes: the CPU digits demo is `channels=16, channel_mult=(1, 2, 2), num_blocks=1, emb_mode="scale_shift"`
(about 0.4M parameters);
a CIFAR-10-scale setting is `channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2, attention=True,
dropout=0.1` (tens of millions of parameters, GPU only). Other architectures plug in through
lcsc_ray/models/registry.py: anything callable as `net(x_in [N,C,H,W], c_noise [N]) -> [N,C,H,W]`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(c_noise: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of 1000·c_noise (the OpenAI CM convention feeds 1000·¼·ln σ; Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
    args = (1000.0 * c_noise.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4) or 1, channels)


EMB_MODES = ("add", "scale_shift")


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, conditioned on the noise embedding in between (ADM's residual block):
    added to the activations, or as a scale and shift of the second normalisation (`emb_mode`)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, emb_mode: str = "add"):
        super().__init__()
        self.scale_shift = emb_mode == "scale_shift"
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch)) if self.scale_shift else nn.Linear(emb_dim, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        if self.scale_shift:  # ADM: each block starts as its skip path
            nn.init.zeros_(self.conv2.weight)
            nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        cond = self.emb(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = cond.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + cond)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the H·W positions, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(n, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    """F(x_in, c_noise): a compact U-Net (see module docstring); output has the input's shape."""

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_blocks: int = 1,
        attention: bool = False,
        dropout: float = 0.0,
        emb_mode: str = "add",
    ):
        super().__init__()
        if emb_mode not in EMB_MODES:
            raise ValueError(f"emb_mode {emb_mode!r}: choose one of {', '.join(EMB_MODES)}")
        emb_dim = 4 * channels
        self.channels = channels
        self.emb = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        widths = [channels * m for m in channel_mult]
        self.down = nn.ModuleList()
        skip_widths, width = [channels], channels
        for level, out_w in enumerate(widths):
            for _ in range(num_blocks):
                self.down.append(ResBlock(width, out_w, emb_dim, dropout, emb_mode))
                width = out_w
                skip_widths.append(width)
            if level < len(widths) - 1:
                self.down.append(nn.AvgPool2d(2))
                skip_widths.append(width)
        self.mid1 = ResBlock(width, width, emb_dim, dropout, emb_mode)
        self.mid_attn = SelfAttention(width) if attention else nn.Identity()
        self.mid2 = ResBlock(width, width, emb_dim, dropout, emb_mode)
        self.up = nn.ModuleList()
        for level, out_w in reversed(list(enumerate(widths))):
            for _ in range(num_blocks + 1):
                self.up.append(ResBlock(width + skip_widths.pop(), out_w, emb_dim, dropout, emb_mode))
                width = out_w
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.emb(timestep_embedding(c_noise, self.channels).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
