"""Deep Image Prior networks, one independent network per batch row, evaluated together.

The architecture is the "skip" encoder–decoder of Ulyanov, Vedaldi, Lempitsky, "Deep Image
Prior" (CVPR 2018), written anew for stacked parameters: every parameter tensor has a leading
row dimension N, and each convolution runs as one grouped convolution with N groups, so N
networks train in one pass with no Python loop over images.

Per level i (top to bottom), with d = down[i], s = skip[i], u = up[i]:
- down: conv k×k stride 2 (→ d) · norm · LeakyReLU · conv k×k (d → d) · norm · LeakyReLU;
- skip: conv 1×1 (→ s) · norm · LeakyReLU (absent when s = 0);
- up:   [skip ‖ upsample(deeper)] · norm · conv k×k (→ u) · norm · LeakyReLU ·
        conv 1×1 (u → u) · norm · LeakyReLU;
and a final conv 1×1 (up[0] → image channels) · sigmoid. "deeper" is the next level's up
output, or this level's down output at the bottom; upsampling (nearest or bilinear) goes to
the exact size of the level above, so any H, W works (28×28 → 14 → 7 → 4 → ...).

"norm" is BatchNorm as DIP uses it, with a batch of one image in training mode: statistics
per (row, channel) over the spatial positions, with a per-row affine. Rows never mix, so a
row's output depends only on its own parameters and input.

Initialisation matches PyTorch's default for Conv2d (weights and biases uniform in
±1/√fan_in) and BatchNorm (scale 1, shift 0), drawn from keyed noise (purpose
"dip/init/<name>"), so a row's network depends only on its key.

Numerics: on CPU the grouped convolution gives a row bitwise the same result for any number
of groups ≥ 2; a batch of one row is run as two copies so that it matches too. The output
sigmoid is computed as 1/(1 + exp(−h)) because torch.sigmoid is not position-invariant on
CPU (see batch_free_sigmoid). Checked on CPU with one thread; other back ends (cuDNN) may
choose algorithms by batch size, so there the guarantee is float-rounding closeness.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from pipeline.purifiers.steps import batch_free_sigmoid
from pipeline.seeding import Noise

ARCH = "dip_skip"


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    kind: str          # "weight" | "bias" | "scale" | "shift"
    fan_in: int = 1


def group_conv(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int = 1,
               pad_mode: str = "reflect") -> torch.Tensor:
    """Row-wise convolution: h [N, C, H, W], w [N, O, C, k, k], b [N, O] → [N, O, H', W']."""
    n = h.shape[0]
    if n == 1:  # a single group would take another kernel; two copies keep numerics batch-free
        out = group_conv(torch.cat([h, h]), torch.cat([w, w]), torch.cat([b, b]), stride, pad_mode)
        return out[:1]
    _, o, c, k, _ = w.shape
    p = k // 2
    if p:
        mode = "constant" if pad_mode == "zeros" else pad_mode
        h = F.pad(h, (p, p, p, p), mode=mode)
    hh, ww = h.shape[-2:]
    out = F.conv2d(h.reshape(1, n * c, hh, ww), w.reshape(n * o, c, k, k), b.reshape(n * o),
                   stride=stride, groups=n)
    return out.view(n, o, *out.shape[-2:])


def row_norm(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm of a one-image batch (training mode): per (row, channel) over H, W."""
    mean = h.mean(dim=(2, 3), keepdim=True)
    var = (h - mean).pow(2).mean(dim=(2, 3), keepdim=True)
    return (h - mean) / torch.sqrt(var + eps) * scale[:, :, None, None] + shift[:, :, None, None]


class StackedSkipNet:
    """The DIP skip network for N rows at once; parameters live outside (a dict of [N, ...])."""

    def __init__(self, in_channels: int, out_channels: int, down: Sequence[int] = (32, 32, 32),
                 up: Sequence[int] | None = None, skip: Sequence[int] | int = 4, kernel: int = 3,
                 upsample: str = "bilinear", pad_mode: str = "reflect", slope: float = 0.2):
        down = [int(c) for c in down]
        up = [int(c) for c in (up if up is not None else down)]
        skip = [int(skip)] * len(down) if isinstance(skip, int) else [int(c) for c in skip]
        if not down or len(up) != len(down) or len(skip) != len(down):
            raise ValueError("down, up and skip need one entry per level")
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {upsample!r}")
        if pad_mode not in ("reflect", "replicate", "zeros"):
            raise ValueError(f"pad_mode must be reflect, replicate or zeros, got {pad_mode!r}")
        if kernel % 2 != 1:
            raise ValueError(f"kernel must be odd, got {kernel}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.down, self.up, self.skip = down, up, skip
        self.kernel, self.upsample, self.pad_mode, self.slope = int(kernel), upsample, pad_mode, float(slope)
        self.specs = self._specs()

    def arch_params(self) -> dict:
        return {"arch": ARCH, "down": self.down, "up": self.up, "skip": self.skip,
                "kernel": self.kernel, "upsample": self.upsample, "pad_mode": self.pad_mode,
                "slope": self.slope}

    # ------------------------------------------------------------------ parameters
    def _specs(self) -> list[ParamSpec]:
        specs: list[ParamSpec] = []

        def conv(name: str, cin: int, cout: int, k: int) -> None:
            specs.append(ParamSpec(f"{name}.w", (cout, cin, k, k), "weight", cin * k * k))
            specs.append(ParamSpec(f"{name}.b", (cout,), "bias", cin * k * k))

        def norm(name: str, c: int) -> None:
            specs.append(ParamSpec(f"{name}.scale", (c,), "scale"))
            specs.append(ParamSpec(f"{name}.shift", (c,), "shift"))

        k, levels = self.kernel, len(self.down)
        cin = self.in_channels
        for i in range(levels):
            d, s = self.down[i], self.skip[i]
            if s:
                conv(f"l{i}.skip", cin, s, 1)
                norm(f"l{i}.skip_n", s)
            conv(f"l{i}.down1", cin, d, k)
            norm(f"l{i}.down1_n", d)
            conv(f"l{i}.down2", d, d, k)
            norm(f"l{i}.down2_n", d)
            deeper = self.up[i + 1] if i + 1 < levels else d
            norm(f"l{i}.merge_n", s + deeper)
            conv(f"l{i}.up1", s + deeper, self.up[i], k)
            norm(f"l{i}.up1_n", self.up[i])
            conv(f"l{i}.up2", self.up[i], self.up[i], 1)
            norm(f"l{i}.up2_n", self.up[i])
            cin = d
        conv("out", self.up[0], self.out_channels, 1)
        return specs

    def init_params(self, noise: Noise, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Per-row parameters [N, *shape] drawn from keyed noise (PyTorch's default init)."""
        params = {}
        n, device = noise.rows, noise.device
        for spec in self.specs:
            if spec.kind in ("weight", "bias"):
                bound = 1.0 / math.sqrt(spec.fan_in)
                p = noise.uniform(spec.shape, f"dip/init/{spec.name}", low=-bound, high=bound, dtype=dtype)
            elif spec.kind == "scale":
                p = torch.ones((n, *spec.shape), dtype=dtype, device=device)
            else:
                p = torch.zeros((n, *spec.shape), dtype=dtype, device=device)
            params[spec.name] = p
        return params

    # ------------------------------------------------------------------ forward
    def _act(self, h: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(h, self.slope)

    def _conv(self, p: dict, name: str, h: torch.Tensor, stride: int = 1) -> torch.Tensor:
        return group_conv(h, p[f"{name}.w"], p[f"{name}.b"], stride, self.pad_mode)

    def _norm(self, p: dict, name: str, h: torch.Tensor) -> torch.Tensor:
        return row_norm(h, p[f"{name}.scale"], p[f"{name}.shift"])

    def _level(self, p: dict, i: int, h: torch.Tensor) -> torch.Tensor:
        s = self.skip[i]
        d = self._act(self._norm(p, f"l{i}.down1_n", self._conv(p, f"l{i}.down1", h, stride=2)))
        d = self._act(self._norm(p, f"l{i}.down2_n", self._conv(p, f"l{i}.down2", d)))
        if i + 1 < len(self.down):
            d = self._level(p, i + 1, d)
        mode = {"mode": "nearest"} if self.upsample == "nearest" else {"mode": "bilinear", "align_corners": False}
        d = F.interpolate(d, size=tuple(h.shape[-2:]), **mode)
        if s:
            sk = self._act(self._norm(p, f"l{i}.skip_n", self._conv(p, f"l{i}.skip", h)))
            d = torch.cat([sk, d], 1)
        u = self._norm(p, f"l{i}.merge_n", d)
        u = self._act(self._norm(p, f"l{i}.up1_n", self._conv(p, f"l{i}.up1", u)))
        return self._act(self._norm(p, f"l{i}.up2_n", self._conv(p, f"l{i}.up2", u)))

    def __call__(self, params: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """z [N, in_channels, H, W] → images [N, out_channels, H, W] in (0, 1)."""
        h, w = z.shape[-2:]
        bottom = min(h, w)
        for _ in self.down:
            bottom = (bottom + 1) // 2
        if self.pad_mode == "reflect" and bottom < 2:
            raise ValueError(f"a {h}×{w} image is too small for {len(self.down)} DIP levels with "
                             "reflection padding; use fewer levels or pad_mode='zeros'")
        out = self._level(params, 0, z)
        return batch_free_sigmoid(self._conv(params, "out", out))
