"""guided-diffusion's ε-prediction U-Net (Dhariwal & Nichol, "Diffusion Models Beat GANs on Image
Synthesis", NeurIPS 2021) as DiffPure uses it for ImageNet: `256x256_diffusion_uncond.pt`.

Published configuration (guided-diffusion README flags for the 256×256 unconditional model;
DiffPure configs/imagenet.yml): image_size 256, model_channels 256, channel_mult (1, 1, 2, 2, 4, 4),
2 residual blocks per resolution, attention at 32, 16 and 8 pixels with 64-channel heads (the
legacy head layout: per head q, k, v contiguous), learned σ (6 output channels: ε, then the
variance interpolation v), scale-shift norm (FiLM from the time embedding after the second
GroupNorm), residual blocks that resample (nearest up / 2×2 mean down, no conv), dropout 0,
unconditional. GroupNorm has 32 groups and eps 1e-5; the time embedding is [cos, sin] of
t·10000^(−i/half) through Linear–SiLU–Linear to 4·model_channels.

Key layout: the original's (time_embed.{0,2}, input_blocks.i.j, middle_block.{0,1,2},
output_blocks.i.j, out.{0,2}; in a residual block in_layers.{0,2}, emb_layers.1, out_layers.{0,3},
skip_connection; in attention norm, qkv, proj_out as 1-D convs), so the published plain state dict
loads strict. tests/fixtures/guided_unet_256_uncond_keys.json (dumped from the official code)
pins every key and shape.

DiffPure ran this model with use_fp16 (convolutions of the torso in float16). Here the whole
network runs in the dtype of its parameters (float32, or bfloat16 after .to() / dtype="bfloat16"),
GroupNorm in float32 and the time embedding computed in float32; inputs and outputs keep the
caller's dtype. Attention is torch's scaled_dot_product_attention (the same softmax(qkᵀ/√d)v as
the original's einsums, with memory-efficient kernels on a GPU).

`resize_bilinear` is the 224 → 256 → 224 resize of DiffPure's ImageNet evaluation.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.io import checkpoints
from pipeline.purifiers.base import PublishedWeights
from pipeline.purifiers.nets.ncsnpp import (
    Float32GroupNorm,
    first_shape_mismatch,
    is_state_dict,
    load_frozen_safely,
    on_meta,
    parse_dtype,
)

ARCH = "guided_unet"

PUBLISHED_256_UNCOND: dict[str, Any] = {
    "image_size": 256, "in_channels": 3, "model_channels": 256, "channel_mult": (1, 1, 2, 2, 4, 4),
    "num_res_blocks": 2, "attention_resolutions": (32, 16, 8), "num_head_channels": 64, "num_heads": 4,
    "learn_sigma": True, "dropout": 0.0,
}


def resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """x [N, C, H, W] → [N, C, size, size], bilinear, align_corners=False, no antialiasing: DiffPure's
    ImageNet evaluation (eval_sde_adv.py) resizes 224 → 256 before the diffusion model and the
    purified 256 → 224 after it exactly so. Differentiable."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """guided-diffusion's embedding: [cos(t·f_i), sin(t·f_i)], f_i = max_period^(−i/half), in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _norm(ch: int) -> Float32GroupNorm:
    return Float32GroupNorm(32, ch)


class ResBlock(nn.Module):
    """Residual block with scale-shift conditioning, optionally resampling (resblock_updown):
    h = conv(resample(SiLU(GN(x)))); h = conv(drop(SiLU(GN(h)·(1 + scale) + shift))) with
    (scale, shift) = Linear(SiLU(emb)); out = skip(resample(x)) + h, skip a 1×1 conv when the
    channels change, else identity."""

    def __init__(self, cin: int, emb_ch: int, cout: int, *, dropout: float = 0.0, up: bool = False,
                 down: bool = False):
        super().__init__()
        self.up, self.down = up, down
        self.in_layers = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * cout))
        self.out_layers = nn.Sequential(_norm(cout), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cout == cin else nn.Conv2d(cin, cout, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm, act, conv = self.in_layers
        h = conv(self._resample(act(norm(x))))
        scale, shift = self.emb_layers(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        norm, act, drop, conv = self.out_layers
        h = conv(drop(act(norm(h) * (1 + scale) + shift)))
        return self.skip_connection(self._resample(x)) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels with a residual connection (no rescale); qkv
    channels laid out per head as (q, k, v), guided-diffusion's legacy order."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        if ch % heads:
            raise ValueError(f"{ch} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = _norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *spatial = x.shape
        t = x.reshape(n, c, -1)                                      # [N, C, T]
        qkv = self.qkv(self.norm(t)).reshape(n, self.heads, 3 * c // self.heads, -1)
        q, k, v = qkv.transpose(-1, -2).chunk(3, dim=-1)            # each [N, heads, T, d]
        a = F.scaled_dot_product_attention(q, k, v)                 # softmax(q kᵀ / √d) v
        h = self.proj_out(a.transpose(-1, -2).reshape(n, c, -1))
        return (t + h).reshape(n, c, *spatial)


class EmbSequential(nn.Sequential):
    """Layers applied in turn; residual blocks also get the time embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class GuidedUNet(nn.Module):
    """ε-prediction U-Net: x [N, C, H, W] on [−1, 1] and integer (or real) steps t [N] in [0, 1000)
    → [N, 2C, H, W] with learn_sigma (ε, then the variance channels), else [N, C, H, W].

    Defaults are the published `256x256_diffusion_uncond.pt` configuration. attention_resolutions
    are in pixels (as guided-diffusion's flags); num_head_channels > 0 fixes the head width
    (heads = channels / num_head_channels), −1 uses num_heads heads.
    """

    def __init__(self, image_size: int = 256, in_channels: int = 3, model_channels: int = 256,
                 channel_mult: Sequence[float] = (1, 1, 2, 2, 4, 4), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (32, 16, 8), num_head_channels: int = 64,
                 num_heads: int = 4, learn_sigma: bool = True, dropout: float = 0.0):
        super().__init__()
        if image_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(channel_mult) - 1}")
        self.image_size, self.in_channels, self.model_channels = image_size, in_channels, model_channels
        attn_ds = {image_size // r for r in attention_resolutions}
        heads = lambda ch: ch // num_head_channels if num_head_channels > 0 else num_heads  # noqa: E731
        emb = 4 * model_channels
        block = lambda cin, cout, **kw: ResBlock(cin, emb, cout, dropout=dropout, **kw)  # noqa: E731
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        ch = first = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([EmbSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attn_ds:
                    layers.append(AttentionBlock(ch, heads(ch)))
                self.input_blocks.append(EmbSequential(*layers))
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.input_blocks.append(EmbSequential(block(ch, ch, down=True)))
                skips.append(ch)
                ds *= 2
        self.middle_block = EmbSequential(block(ch, ch), AttentionBlock(ch, heads(ch)), block(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [block(ch + skips.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attn_ds:
                    layers.append(AttentionBlock(ch, heads(ch)))
                if level and i == num_res_blocks:
                    layers.append(block(ch, ch, up=True))
                    ds //= 2
                self.output_blocks.append(EmbSequential(*layers))
        out_channels = 2 * in_channels if learn_sigma else in_channels
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(first, out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"GuidedUNet expects [N, {self.in_channels}, {self.image_size}, {self.image_size}] "
                             f"inputs, got {tuple(x.shape)}")
        timesteps = torch.as_tensor(timesteps, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.dtype))
        h, hs = x.to(self.dtype), []
        for blk in self.input_blocks:
            h = blk(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for blk in self.output_blocks:
            h = blk(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)


# ---------------------------------------------------------------------------------------
# The guided-diffusion checkpoint (a plain state dict)
# ---------------------------------------------------------------------------------------


def read_guided_state_dict(raw: Any, *, arch_params: dict | None = None,
                           source: str = "checkpoint") -> PublishedWeights:
    """Recognise a guided-diffusion checkpoint (a plain state dict; a `module.` prefix is removed)
    and check every shape against the network (published 256×256 unconditional configuration,
    overridden by arch_params), naming the first mismatch; missing/extra keys are refused by the
    strict load that follows."""
    params = {**PUBLISHED_256_UNCOND, **(arch_params or {})}
    if not is_state_dict(raw):
        got = sorted(map(str, raw))[:8] if isinstance(raw, dict) else type(raw).__name__
        raise checkpoints.CheckpointError(
            f"{source}: not a guided-diffusion checkpoint (a plain state dict of tensors); got {got}")
    state = checkpoints.strip_prefix(dict(raw), "module.")
    config = "GuidedUNet(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"
    expected = {k: v.shape for k, v in on_meta(GuidedUNet, **params).state_dict().items()}
    mismatch = first_shape_mismatch(expected, state, config)
    if mismatch:
        raise checkpoints.CheckpointError(f"{source}: {mismatch}")
    return PublishedWeights("guided_diffusion", ARCH, params, state, {})


def load_guided_diffusion(checkpoint: str, *, arch_params: dict | None = None,
                          dtype: str | torch.dtype = "float32") -> tuple[GuidedUNet, dict]:
    """Load the guided-diffusion U-Net, frozen and in eval mode (`pipeline.purifiers.base.load_frozen`,
    torch.load with weights_only=True), from the published state dict (256x256_diffusion_uncond.pt
    by default) or our own checkpoint (arch "guided_unet"); cast to dtype ("float32" or "bfloat16").
    Returns (net, info)."""
    torch_dtype = parse_dtype(dtype)

    def published(raw: Any) -> PublishedWeights:
        return read_guided_state_dict(raw, arch_params=arch_params, source=checkpoint)

    net, info = load_frozen_safely(checkpoint, GuidedUNet, ARCH, published, "guided-diffusion network")
    info["dtype"] = str(torch_dtype).removeprefix("torch.")
    return net.to(torch_dtype), info
