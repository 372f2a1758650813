"""The U-Net ε-predictor: ResNet blocks with adaptive group normalisation, self-attention at the low
resolutions, a sinusoidal time embedding through an MLP.

The conditioning vector (class and/or text embedding, already projected to ``emb_dim``) is added to
the time embedding; every ResNet block turns that sum into a per-channel scale and shift applied
after its second GroupNorm (AdaGN, Dhariwal & Nichol 2021): h = GN(h)·(1 + scale) + shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = (1, 2)  # indices into channel_mults that get self-attention
    num_heads: int = 4
    dropout: float = 0.1
    groups: int = 8
    emb_mult: int = 4  # time-embedding width = emb_mult * base_channels

    @property
    def emb_dim(self) -> int:
        return self.emb_mult * self.base_channels


def _levels_for(size: int) -> int:
    """How many resolution levels fit: 28 -> 3 (28, 14, 7), 32 -> 3, 64 -> 4, 128 -> 5."""
    return {28: 3, 32: 3, 64: 4, 128: 5}.get(size, max(1, min(5, int(math.log2(size)) - 2)))


MODEL_SIZES = ("tiny", "compact", "small", "large")


def unet_preset(name: str, image_shape: tuple[int, int, int]) -> UNetConfig:
    """Named sizes: ``tiny`` (fast CPU tests), ``compact`` (~0.73M, trainable on a CPU), ``small`` (~1.8M parameters on 1×28×28, the study's
    small model) and ``large`` (~50M: 49M on 1×28×28, 44M at 64×64, 47M at 128×128)."""
    c, h, w = image_shape
    levels = _levels_for(min(h, w))
    low = tuple(range(max(1, levels - 2), levels))  # attention on the two lowest resolutions
    if name == "tiny":
        mults = (1, 2, 2, 2, 2)[:levels]
        return UNetConfig(c, 16, mults, 1, (levels - 1,), 2, 0.0, 8, 2)
    if name == "compact":  # ~0.73M on 1×28×28: the CPU-trainable default model
        mults = (1, 2, 4, 4, 4)[:levels]
        return UNetConfig(c, 16, mults, 1, low, 4, 0.0, 8, 4)
    if name == "small":
        mults = (1, 2, 2, 2, 2)[:levels]
        return UNetConfig(c, 32, mults, 2, low, 4, 0.1, 8, 4)
    if name == "large":  # ~50M parameters whatever the resolution
        base, groups = {3: (168, 24), 4: (96, 32)}.get(levels, (80, 16))
        mults = (1, 2, 2, 4, 4)[:levels] if levels > 3 else (1, 2, 2)[:levels]
        return UNetConfig(c, base, mults, 2, low, 4, 0.1, groups, 4)
    raise ValueError(f"unknown model size {name!r}; expected one of {', '.join(MODEL_SIZES)}")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim] (Vaswani et al.)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().reshape(-1, 1) * freqs.reshape(1, -1)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift  # adaptive group normalisation
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNet(nn.Module):
    """ε_θ(x, t, c): x [B, C, H, W], t [B] (integer or float timesteps), cond_emb [B, emb_dim] or None."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, emb_dim, g = cfg.base_channels, cfg.emb_dim, cfg.groups
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, cur = [ch], ch
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                stage = nn.ModuleList([ResBlock(cur, ch * mult, emb_dim, cfg.dropout, g)])
                cur = ch * mult
                if level in cfg.attn_levels:
                    stage.append(SelfAttention(cur, cfg.num_heads, g))
                self.down.append(stage)
                skips.append(cur)
            if level < len(cfg.channel_mults) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skips.append(cur)

        self.mid = nn.ModuleList([
            ResBlock(cur, cur, emb_dim, cfg.dropout, g),
            SelfAttention(cur, cfg.num_heads, g),
            ResBlock(cur, cur, emb_dim, cfg.dropout, g),
        ])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                stage = nn.ModuleList([ResBlock(cur + skips.pop(), ch * mult, emb_dim, cfg.dropout, g)])
                cur = ch * mult
                if level in cfg.attn_levels:
                    stage.append(SelfAttention(cur, cfg.num_heads, g))
                self.up.append(stage)
            if level > 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))

        self.out_norm = nn.GroupNorm(g, cur)
        self.out_conv = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    @staticmethod
    def _run(stage: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in stage:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond_emb: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))
        if cond_emb is not None:
            emb = emb + cond_emb.to(emb.dtype)
        h = self.stem(x)
        hs = [h]
        for stage in self.down:
            h = self._run(stage, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for stage in self.up:
            if isinstance(stage[0], Upsample):
                h = stage[0](h, hs[-1].shape[-2:])
            else:
                h = self._run(stage, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))
