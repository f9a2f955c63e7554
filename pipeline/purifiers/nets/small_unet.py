"""A small ε-prediction U-Net for 8×8 digits and 28×28 MNIST (ours, for CPU training).

The DDPM U-Net (Ho et al. 2020, Appendix B) cut down: sinusoidal step embedding → MLP,
residual blocks (GroupNorm, SiLU, 3×3 convolutions, the embedding added between them),
two resolutions (H and H/2, stride-2 convolution down, nearest ×2 + convolution up) with
skip connections, and no attention (at 8×8 and 14×14 it buys little for its cost).
forward(x [N, C, H, W] on [−1, 1], t [N] integer steps 0…N−1) → ε̂ [N, C, H, W].

Why not diffusers' UNet2DModel: it would make diffusers (and its hub/safetensors stack) a
dependency of the purifier for a network of ~100 lines, its configuration surface (block
types, attention heads, norm groups tied to widths) is far larger than the few choices an
8×8 net needs, and our checkpoints stay our one `load_frozen` layout. The schedule and samplers are ours
anyway (vpsde.py), as DiffPure's are its own.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ARCH = "small_unet"
ARCHS = (ARCH,)


def step_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (float) steps [N] → [N, dim] (Transformer / DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], 1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(e))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SmallUNet(nn.Module):
    """ε̂(x, t): widths (w, 2w) at (H, H/2), `blocks` residual blocks per level.

    Arguments:
        channels (int): image channels. (Default: 1)
        width (int): base width w. (Default: 32)
        blocks (int): residual blocks per level and direction (≥ 1). (Default: 1)
    """

    def __init__(self, channels: int = 1, width: int = 32, blocks: int = 1):
        super().__init__()
        w, emb = width, 4 * width
        self.width = w
        self.embed = nn.Sequential(nn.Linear(w, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(channels, w, 3, padding=1)
        self.down1 = nn.ModuleList([ResBlock(w, w, emb) for _ in range(blocks)])
        self.pool = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.down2 = nn.ModuleList([ResBlock(2 * w, 2 * w, emb) for _ in range(blocks)])
        self.mid = ResBlock(2 * w, 2 * w, emb)
        self.up2 = nn.ModuleList([ResBlock(4 * w if i == 0 else 2 * w, 2 * w, emb) for i in range(blocks)])
        self.unpool = nn.Conv2d(2 * w, w, 3, padding=1)
        self.up1 = nn.ModuleList([ResBlock(2 * w if i == 0 else w, w, emb) for i in range(blocks)])
        self.out_norm, self.out = _norm(w), nn.Conv2d(w, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # start at ε̂ = 0 (DDPM's zero-initialised last layer)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.embed(step_embedding(t, self.width))
        h1 = self.inp(x)
        for b in self.down1:
            h1 = b(h1, e)
        h2 = self.pool(h1)                                   # [N, 2w, ⌈H/2⌉, ⌈W/2⌉]
        for b in self.down2:
            h2 = b(h2, e)
        h = self.mid(h2, e)
        h = torch.cat([h, h2], 1)                            # [N, 4w, H/2, W/2]
        for b in self.up2:
            h = b(h, e)
        h = F.interpolate(h, size=h1.shape[-2:], mode="nearest")
        h = torch.cat([self.unpool(h), h1], 1)               # [N, 2w, H, W]
        for b in self.up1:
            h = b(h, e)
        return self.out(F.silu(self.out_norm(h)))


def make(arch: str, params: dict) -> nn.Module:
    """load_frozen's constructor: (arch, arch_params) → network."""
    if arch != ARCH:
        raise ValueError(f"unknown diffusion network arch {arch!r}; expected {ARCH!r}")
    return SmallUNet(**params)
