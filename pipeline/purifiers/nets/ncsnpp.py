"""The score_sde DDPM++ "deep" continuous VP network (Song et al., "Score-Based Generative
Modeling through Stochastic Differential Equations", ICLR 2021) as DiffPure uses it for CIFAR-10.

Published configuration: score_sde_pytorch configs/vp/cifar10_ddpmpp_deep_continuous.py, which
DiffPure's configs/cifar10.yml repeats, checkpoint `vp/cifar10_ddpmpp_deep_continuous/
checkpoint_8.pth`. Architecture (NCSN++ code path, `model.name = 'ncsnpp'`): nf 128, channel
multipliers (1, 2, 2, 2), 8 residual blocks per resolution, self-attention at 16×16; BigGAN-style
residual blocks that also resample (fir False: nearest-neighbour up, 2×2 mean down, the skip
resampled the same way and projected by a 1×1 conv); every residual sum divided by √2
(skip_rescale); GroupNorm with min(C/4, 32) groups and eps 1e-6; SiLU; sinusoidal embedding of the
label, two dense layers to 4·nf; no progressive input/output paths; centered data (inputs on
[−1, 1]); scale_by_sigma False. Called as net(x, 999·t), the output is ε-like: DiffPure's score
is −output / σ(t) with σ(t)² = 1 − ᾱ(t) (that conversion is the purifier's job).

Key layout (decided so both halves of the checkpoint load): the layers live as the original
holds them, one flat ModuleList `all_modules` in construction order with the original sub-module
names (residual block: GroupNorm_0, Conv_0, Dense_0, GroupNorm_1, Conv_1, Conv_2; attention:
GroupNorm_0, NIN_0–NIN_3 with [in, out] matrices W and biases b), after a `sigmas` buffer. Hence
(1) parameters() has exactly the order and shapes in which the EMA stored its shadow_params and
(2) the checkpoint's `model` state dict, minus the DataParallel `module.` prefix, loads strict.
tests/fixtures/ncsnpp_cifar10_keys.json (dumped from the official code) pins both.

Inputs and outputs keep the caller's dtype; inside, the network runs in the dtype of its
parameters (cast it with .to(torch.bfloat16) or load with dtype="bfloat16"); GroupNorm statistics
are always taken in float32.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.io import checkpoints
from pipeline.purifiers.base import PublishedWeights, load_frozen

ARCH = "ncsnpp"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# vp/cifar10_ddpmpp_deep_continuous (the sigma_* and num_scales entries only size the `sigmas` buffer)
PUBLISHED_CIFAR10: dict[str, Any] = {
    "channels": 3, "image_size": 32, "nf": 128, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 8,
    "attn_resolutions": (16,), "dropout": 0.1, "sigma_min": 0.01, "sigma_max": 50.0, "num_scales": 1000,
}


# ---------------------------------------------------------------------------------------
# Pieces shared with guided_unet.py
# ---------------------------------------------------------------------------------------


class Float32GroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics and affine map are computed in float32, output in the input's
    dtype (guided-diffusion's GroupNorm32 does the same): bf16 means over 16k values lose digits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' / 'bfloat16' (or the torch dtype) → torch dtype; anything else is a user error."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def on_meta(make: Any, **params: Any) -> nn.Module:
    """The network with its parameter names and shapes but no storage (no memory, no init)."""
    with torch.device("meta"):
        return make(**params)


def empty_on_cpu(make: Any, **params: Any) -> nn.Module:
    """The network with uninitialised CPU storage: for a strict load, which overwrites every entry
    (load_state_strict refuses a missing key), so random init would be wasted time."""
    return on_meta(make, **params).to_empty(device="cpu")


def first_shape_mismatch(expected: dict[str, torch.Size], state: dict, config: str) -> str | None:
    """A message naming the first key (in the network's order) whose shape differs, else None."""
    for key, shape in expected.items():
        if key in state and tuple(state[key].shape) != tuple(shape):
            return (f"{key} has shape {tuple(state[key].shape)}, the network {config} expects {tuple(shape)}: "
                    f"the checkpoint is for another configuration (pass its arch_params)")
    return None


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) \
        and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_frozen_safely(checkpoint: str, make: Any, arch: str, published: Any, kind: str) -> tuple[nn.Module, dict]:
    """load_frozen (torch.load with weights_only=True) for a published network; a file that pickles
    Python objects besides tensors is refused with what to do instead of torch's advice to unpickle it."""
    try:
        return load_frozen(checkpoint, lambda a, p: empty_on_cpu(make, **p), archs=[arch],
                           published=published, kind=kind)
    except checkpoints.CheckpointError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if not found:
            raise
        raise checkpoints.CheckpointError(
            f"cannot load checkpoint {checkpoint}: it pickles {found.group(1)} besides tensors, and "
            "checkpoints are read with torch.load(weights_only=True), which never runs code from a file. "
            "The published files hold tensors only; re-save this one's tensors once, where you trust it "
            "(its state dict, or the score_sde dict of model/ema/step).") from None


# ---------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------


def _groups(ch: int) -> int:
    return min(ch // 4, 32)


def sinusoidal_embedding(labels: torch.Tensor, dim: int) -> torch.Tensor:
    """score_sde's embedding of a (real-valued) label: [sin(l·f_i), cos(l·f_i)] with
    f_i = 10000^(−i/(dim/2 − 1)), i < dim/2; computed in float32 (labels reach 999)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32, device=labels.device))
    args = labels.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class NIN(nn.Module):
    """Per-pixel linear map held as an [in, out] matrix W and bias b (the checkpoint's layout)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(cin, cout).uniform_(-cin ** -0.5, cin ** -0.5))
        self.b = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class ResBlock(nn.Module):
    """BigGAN-style residual block with time embedding (score_sde ResnetBlockBigGANpp, fir False).

    h = Conv_0(resample(SiLU(GN_0(x)))) + Dense_0(SiLU(temb)); h = Conv_1(drop(SiLU(GN_1(h))));
    out = (skip + h)/√2 with skip = Conv_2(resample(x)) (1×1) when channels change or it resamples.
    """

    def __init__(self, cin: int, cout: int, temb_dim: int, *, up: bool = False, down: bool = False,
                 dropout: float = 0.1):
        super().__init__()
        self.up, self.down = up, down
        self.GroupNorm_0 = Float32GroupNorm(_groups(cin), cin, eps=1e-6)
        self.Conv_0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.Dense_0 = nn.Linear(temb_dim, cout)
        self.GroupNorm_1 = Float32GroupNorm(_groups(cout), cout, eps=1e-6)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.Conv_2 = nn.Conv2d(cin, cout, 1) if (cin != cout or up or down) else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.Conv_0(self._resample(F.silu(self.GroupNorm_0(x))))
        h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
        skip = self._resample(x)
        if self.Conv_2 is not None:
            skip = self.Conv_2(skip)
        return (skip + h) * (0.5 ** 0.5)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (score_sde AttnBlockpp), (x + out)/√2."""

    def __init__(self, ch: int):
        super().__init__()
        self.GroupNorm_0 = Float32GroupNorm(_groups(ch), ch, eps=1e-6)
        self.NIN_0, self.NIN_1, self.NIN_2, self.NIN_3 = NIN(ch, ch), NIN(ch, ch), NIN(ch, ch), NIN(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = (nin(h).flatten(2).transpose(1, 2) for nin in (self.NIN_0, self.NIN_1, self.NIN_2))  # [N, HW, C]
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √C) v, one head
        h = self.NIN_3(a.transpose(1, 2).reshape(n, c, hh, ww))
        return (x + h) * (0.5 ** 0.5)


class NCSNpp(nn.Module):
    """DDPM++ (NCSN++ code path) noise-conditional network: x [N, C, H, W] on [−1, 1] and labels
    [N] (999·t for the continuous VP model) → output [N, C, H, W] (ε-like; score = −output/σ(t)).

    Defaults are the published CIFAR-10 `cifar10_ddpmpp_deep_continuous` configuration.
    """

    def __init__(self, channels: int = 3, image_size: int = 32, nf: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 8,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 sigma_min: float = 0.01, sigma_max: float = 50.0, num_scales: int = 1000):
        super().__init__()
        if nf % 2 or nf < 4:
            raise ValueError(f"nf must be even and ≥ 4, got {nf}")
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(ch_mult) - 1}")
        # unused by the VP model (scale_by_sigma False); kept so the `model` state dict loads strict
        self.register_buffer("sigmas", torch.exp(torch.linspace(
            math.log(sigma_max), math.log(sigma_min), num_scales, dtype=torch.float64)).float())
        self.channels, self.image_size, self.nf = channels, image_size, nf
        self.num_res_blocks = num_res_blocks
        levels = len(ch_mult)
        self.attn_at = [image_size // 2 ** i in set(attn_resolutions) for i in range(levels)]
        temb = 4 * nf
        block = lambda cin, cout, **kw: ResBlock(cin, cout, temb, dropout=dropout, **kw)  # noqa: E731
        mods: list[nn.Module] = [nn.Linear(nf, temb), nn.Linear(temb, temb), nn.Conv2d(channels, nf, 3, padding=1)]
        skips, ch = [nf], nf
        for level in range(levels):
            for _ in range(num_res_blocks):
                mods.append(block(ch, nf * ch_mult[level]))
                ch = nf * ch_mult[level]
                if self.attn_at[level]:
                    mods.append(AttnBlock(ch))
                skips.append(ch)
            if level < levels - 1:
                mods.append(block(ch, ch, down=True))
                skips.append(ch)
        mods += [block(ch, ch), AttnBlock(ch), block(ch, ch)]
        for level in reversed(range(levels)):
            for _ in range(num_res_blocks + 1):
                mods.append(block(ch + skips.pop(), nf * ch_mult[level]))
                ch = nf * ch_mult[level]
            if self.attn_at[level]:
                mods.append(AttnBlock(ch))
            if level > 0:
                mods.append(block(ch, ch, up=True))
        mods += [Float32GroupNorm(_groups(ch), ch, eps=1e-6), nn.Conv2d(ch, channels, 3, padding=1)]
        self.all_modules = nn.ModuleList(mods)

    @property
    def dtype(self) -> torch.dtype:
        return self.all_modules[0].weight.dtype

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"NCSNpp expects [N, {self.channels}, {self.image_size}, {self.image_size}] inputs, "
                             f"got {tuple(x.shape)}")
        labels = torch.as_tensor(labels, device=x.device).expand(x.shape[0])
        m = iter(self.all_modules)  # the modules in construction order, consumed as the data flows
        temb = sinusoidal_embedding(labels, self.nf).to(self.dtype)
        temb = next(m)(temb)
        temb = next(m)(F.silu(temb))
        hs = [next(m)(x.to(self.dtype))]
        for level, attn in enumerate(self.attn_at):
            for _ in range(self.num_res_blocks):
                h = next(m)(hs[-1], temb)
                hs.append(next(m)(h) if attn else h)
            if level < len(self.attn_at) - 1:
                hs.append(next(m)(hs[-1], temb))
        h = next(m)(hs[-1], temb)  # middle: block, attention, block
        h = next(m)(h)
        h = next(m)(h, temb)
        for level in reversed(range(len(self.attn_at))):
            for _ in range(self.num_res_blocks + 1):
                h = next(m)(torch.cat([h, hs.pop()], dim=1), temb)
            if self.attn_at[level]:
                h = next(m)(h)
            if level > 0:
                h = next(m)(h, temb)
        h = F.silu(next(m)(h))  # GroupNorm, then the output conv
        h = next(m)(h)
        return h.to(x.dtype)


# ---------------------------------------------------------------------------------------
# The score_sde checkpoint
# ---------------------------------------------------------------------------------------


def _config_text(params: dict) -> str:
    return "NCSNpp(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"


def _ema_state(raw: dict, template: nn.Module, config: str, source: str) -> dict:
    """{parameter name: shadow tensor}, pairing the EMA's shadow_params with parameters() in order."""
    ema = raw["ema"]
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in shadow):
        raise checkpoints.CheckpointError(f"{source}: ema.shadow_params is not a list of tensors")
    params = list(template.named_parameters())
    for i, ((name, p), s) in enumerate(zip(params, shadow)):
        if tuple(s.shape) != tuple(p.shape):
            raise checkpoints.CheckpointError(
                f"{source}: ema.shadow_params[{i}] has shape {tuple(s.shape)}, parameter {name} of {config} "
                f"expects {tuple(p.shape)}: the checkpoint is for another configuration (pass its arch_params)")
    if len(shadow) != len(params):
        raise checkpoints.CheckpointError(
            f"{source}: ema.shadow_params holds {len(shadow)} tensors, {config} has {len(params)} parameters")
    return {name: s for (name, _), s in zip(params, shadow)}


def read_score_sde_checkpoint(raw: Any, *, arch_params: dict | None = None, ema: bool = True,
                              source: str = "checkpoint") -> PublishedWeights:
    """Recognise and unpack a score_sde checkpoint (what its run_lib saves, checkpoint_8.pth).

    Layout: {"optimizer", "model", "ema", "step"}; `model` is the DataParallel state dict
    (`module.` prefixes), `ema` = {"decay", "num_updates", "shadow_params": [tensor, ...]} with one
    shadow per parameter in parameters() order. With ema=True (DiffPure's choice: it copies the
    EMA into the model) the shadows replace the model's parameters; buffers come from `model`.
    A plain state dict (e.g. exported EMA weights; with or without `module.`) is read as is.
    arch_params override the published CIFAR-10 configuration.
    """
    params = {**PUBLISHED_CIFAR10, **(arch_params or {})}
    config = _config_text(params)
    template = on_meta(NCSNpp, **params)
    if is_state_dict(raw):
        fmt, state, info = "state_dict", checkpoints.strip_prefix(dict(raw), "module."), {}
    elif isinstance(raw, dict) and "model" in raw and "ema" in raw:
        if not is_state_dict(raw["model"]):
            raise checkpoints.CheckpointError(f"{source}: `model` is not a state dict")
        state = checkpoints.strip_prefix(dict(raw["model"]), "module.")
        if ema:
            state.update(_ema_state(raw, template, config, source))
        step = raw.get("step")
        step = int(step) if isinstance(step, (int, torch.Tensor)) else None
        fmt, info = "score_sde", {"ema": bool(ema), "step": step}
    else:
        got = sorted(map(str, raw))[:8] if isinstance(raw, dict) else type(raw).__name__
        raise checkpoints.CheckpointError(
            f"{source}: not a score_sde checkpoint: expected top-level keys optimizer, model, ema, step; got {got}")
    mismatch = first_shape_mismatch({k: v.shape for k, v in template.state_dict().items()}, state, config)
    if mismatch:
        raise checkpoints.CheckpointError(f"{source}: {mismatch}")
    return PublishedWeights(fmt, ARCH, params, state, info)


def load_score_sde(checkpoint: str, *, arch_params: dict | None = None, ema: bool = True,
                   dtype: str | torch.dtype = "float32") -> tuple[NCSNpp, dict]:
    """Load the score_sde network, frozen and in eval mode (`pipeline.purifiers.base.load_frozen`,
    torch.load with weights_only=True), from a score_sde checkpoint (checkpoint_8.pth, EMA weights
    by default), a plain state dict of it, or our own checkpoint (arch "ncsnpp"); cast to dtype
    ("float32" or "bfloat16"). Returns (net, info); info records the format, config and EMA use.
    """
    torch_dtype = parse_dtype(dtype)

    def published(raw: Any) -> PublishedWeights:
        return read_score_sde_checkpoint(raw, arch_params=arch_params, ema=ema, source=checkpoint)

    net, info = load_frozen_safely(checkpoint, NCSNpp, ARCH, published, "score_sde network")
    info["dtype"] = str(torch_dtype).removeprefix("torch.")
    return net.to(torch_dtype), info
