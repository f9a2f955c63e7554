"""Score networks s_θ(x) ≈ ∇_x log p(x) for ADP.

- `SmallScoreNet`: a small noise-unconditional U-Net for digit-sized images (8×8, 28×28;
  any H, W divisible by 4) that trains on a CPU in minutes.
- `NCSNv2`: the RefineNet of Song & Ermon, "Improved Techniques for Training Score-Based
  Generative Models" (NeurIPS 2020), CIFAR-10 variant (InstanceNorm++, ELU, ngf 128),
  written so that its state-dict keys are those of the NCSNv2 code (models/ncsnv2.py,
  models/layers.py, models/normalization.py): begin_conv, res1–res4.*.{normalize1,conv1,
  normalize2,conv2,shortcut}, refine1–4.{adapt_convs,msf,crp,output_convs}, normalizer,
  end_conv and the `sigmas` buffer. ADP uses it noise-unconditionally: the output is not
  divided by σ (the ADP fork sets used_sigmas to 1), which is `forward(x)` here;
  `forward(x, labels)` divides by sigmas[labels] as the original NCSNv2 does.

Both take inputs on the [0, 1] score grid and map them to [−1, 1] inside (h = 2x − 1,
NCSNv2 with logit_transform = rescaled = False).

Checkpoints: `load_ncsnv2_state` reads the layout the NCSNv2 runner saves,
[model_state, optimizer_state, epoch, step, ema_state] with DataParallel `module.` keys,
or a plain state dict (with or without the prefix).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.io import checkpoints
from pipeline.purifiers.base import PublishedWeights, load_frozen
from pipeline.purifiers.nets import SIDE_MULTIPLE, check_multiple

SMALL_ARCH = "small_score"
NCSNV2_ARCH = "ncsnv2"


# ---------------------------------------------------------------------------------------
# Small noise-unconditional score net for digits
# ---------------------------------------------------------------------------------------


def _gn(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)  # per-sample statistics: a row never sees its batch


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _gn(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _gn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.elu(self.norm1(x)))
        h = self.conv2(F.elu(self.norm2(h)))
        return self.skip(x) + h


class SmallScoreNet(nn.Module):
    """Two-level U-Net (H → H/2 → H/4 and back, with skips), GroupNorm + ELU.

    Noise-unconditional like ADP's network: trained by denoising score matching over a
    range of σ, it returns one score field for whatever noise the input carries.
    """

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()
        w = width
        self.inp = nn.Conv2d(in_channels, w, 3, padding=1)
        self.enc1 = _Res(w, w)
        self.down1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.enc2 = _Res(2 * w, 2 * w)
        self.down2 = nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1)
        self.mid = _Res(2 * w, 2 * w)
        self.up2 = nn.ConvTranspose2d(2 * w, 2 * w, 4, stride=2, padding=1)
        self.dec2 = _Res(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1)
        self.dec1 = _Res(2 * w, w)
        self.out_norm = _gn(w)
        self.out = nn.Conv2d(w, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_multiple(x, SIDE_MULTIPLE[SMALL_ARCH], SMALL_ARCH)
        h = self.inp(2.0 * x - 1.0)
        e1 = self.enc1(h)
        e2 = self.enc2(self.down1(e1))
        m = self.mid(self.down2(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.out(F.elu(self.out_norm(d1)))


# ---------------------------------------------------------------------------------------
# NCSNv2 RefineNet (key-compatible with the NCSNv2 code)
# ---------------------------------------------------------------------------------------


def _conv3x3(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=1, padding=1, bias=bias)


def _dilated3x3(cin: int, cout: int, dilation: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=bias)


class InstanceNorm2dPlus(nn.Module):
    """InstanceNorm++ (NCSN, Song & Ermon 2019): instance norm that re-injects the
    normalised per-channel means, so colour shifts survive normalisation."""

    def __init__(self, num_features: int, bias: bool = True):
        super().__init__()
        self.num_features = num_features
        self.bias = bool(bias)
        self.instance_norm = nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
        self.alpha = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.gamma = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        if self.bias:
            self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=(2, 3))                                     # [N, C]
        m = means.mean(dim=-1, keepdim=True)
        v = means.var(dim=-1, keepdim=True)
        means = (means - m) / torch.sqrt(v + 1e-5)
        h = self.instance_norm(x) + means[..., None, None] * self.alpha[..., None, None]
        out = self.gamma.view(-1, self.num_features, 1, 1) * h
        if self.bias:
            out = out + self.beta.view(-1, self.num_features, 1, 1)
        return out


class ConvMeanPool(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size: int = 3, adjust_padding: bool = False):
        super().__init__()
        conv = nn.Conv2d(cin, cout, kernel_size, stride=1, padding=kernel_size // 2, bias=True)
        self.conv = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), conv) if adjust_padding else conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return (h[:, :, ::2, ::2] + h[:, :, 1::2, ::2] + h[:, :, ::2, 1::2] + h[:, :, 1::2, 1::2]) / 4.0


class ResidualBlock(nn.Module):
    """Pre-activation residual block; resample='down' halves H, W unless dilated (NCSNv2
    keeps 16×16 from res2 on and widens the receptive field with dilation instead)."""

    def __init__(self, cin: int, cout: int, resample: str | None = None, act: nn.Module | None = None,
                 normalization=InstanceNorm2dPlus, adjust_padding: bool = False, dilation: int = 1):
        super().__init__()
        self.non_linearity = act if act is not None else nn.ELU()
        self.input_dim, self.output_dim, self.resample = cin, cout, resample
        if resample == "down":
            if dilation > 1:
                self.conv1 = _dilated3x3(cin, cin, dilation)
                self.normalize2 = normalization(cin)
                self.conv2 = _dilated3x3(cin, cout, dilation)
                shortcut = lambda: _dilated3x3(cin, cout, dilation)  # noqa: E731
            else:
                self.conv1 = _conv3x3(cin, cin)
                self.normalize2 = normalization(cin)
                self.conv2 = ConvMeanPool(cin, cout, 3, adjust_padding=adjust_padding)
                shortcut = lambda: ConvMeanPool(cin, cout, 1, adjust_padding=adjust_padding)  # noqa: E731
        elif resample is None:
            if dilation > 1:
                self.conv1 = _dilated3x3(cin, cout, dilation)
                self.normalize2 = normalization(cout)
                self.conv2 = _dilated3x3(cout, cout, dilation)
                shortcut = lambda: _dilated3x3(cin, cout, dilation)  # noqa: E731
            else:
                self.conv1 = _conv3x3(cin, cout)
                self.normalize2 = normalization(cout)
                self.conv2 = _conv3x3(cout, cout)
                shortcut = lambda: nn.Conv2d(cin, cout, 1, bias=True)  # noqa: E731
        else:
            raise ValueError(f"invalid resample {resample!r}")
        if cout != cin or resample is not None:
            self.shortcut = shortcut()
        self.normalize1 = normalization(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.non_linearity(self.normalize1(x)))
        h = self.conv2(self.non_linearity(self.normalize2(h)))
        skip = x if (self.output_dim == self.input_dim and self.resample is None) else self.shortcut(x)
        return skip + h


class RCUBlock(nn.Module):
    """Residual conv unit: n_blocks × (n_stages × (act, conv3x3 without bias)) + skip."""

    def __init__(self, features: int, n_blocks: int, n_stages: int, act: nn.Module):
        super().__init__()
        for i in range(n_blocks):
            for j in range(n_stages):
                setattr(self, f"{i + 1}_{j + 1}_conv", _conv3x3(features, features, bias=False))
        self.n_blocks, self.n_stages, self.act = n_blocks, n_stages, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_blocks):
            residual = x
            for j in range(self.n_stages):
                x = getattr(self, f"{i + 1}_{j + 1}_conv")(self.act(x))
            x = x + residual
        return x


class CRPBlock(nn.Module):
    """Chained residual pooling (max-pool 5×5, conv) with a running sum."""

    def __init__(self, features: int, n_stages: int, act: nn.Module, maxpool: bool = True):
        super().__init__()
        self.convs = nn.ModuleList([_conv3x3(features, features, bias=False) for _ in range(n_stages)])
        self.n_stages = n_stages
        self.maxpool = (nn.MaxPool2d(5, stride=1, padding=2) if maxpool
                        else nn.AvgPool2d(5, stride=1, padding=2))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        path = x
        for conv in self.convs:
            path = conv(self.maxpool(path))
            x = path + x
        return x


class MSFBlock(nn.Module):
    """Multi-resolution fusion: conv each input, resize bilinearly, sum."""

    def __init__(self, in_planes: list[int], features: int):
        super().__init__()
        self.convs = nn.ModuleList([_conv3x3(c, features, bias=True) for c in in_planes])
        self.features = features

    def forward(self, xs: list[torch.Tensor], shape) -> torch.Tensor:
        out = None
        for conv, x in zip(self.convs, xs):
            h = F.interpolate(conv(x), size=shape, mode="bilinear", align_corners=True)
            out = h if out is None else out + h
        return out


class RefineBlock(nn.Module):
    def __init__(self, in_planes: list[int], features: int, act: nn.Module, start: bool = False,
                 end: bool = False, maxpool: bool = True):
        super().__init__()
        self.n_blocks = len(in_planes)
        self.adapt_convs = nn.ModuleList([RCUBlock(c, 2, 2, act) for c in in_planes])
        self.output_convs = RCUBlock(features, 3 if end else 1, 2, act)
        if not start:
            self.msf = MSFBlock(in_planes, features)
        self.crp = CRPBlock(features, 2, act, maxpool=maxpool)

    def forward(self, xs: list[torch.Tensor], shape) -> torch.Tensor:
        hs = [conv(x) for conv, x in zip(self.adapt_convs, xs)]
        h = self.msf(hs, shape) if self.n_blocks > 1 else hs[0]
        return self.output_convs(self.crp(h))


def geometric_sigmas(sigma_begin: float, sigma_end: float, num_classes: int) -> torch.Tensor:
    """NCSNv2 noise levels: geometric from sigma_begin down to sigma_end."""
    return torch.tensor(np.exp(np.linspace(np.log(sigma_begin), np.log(sigma_end), num_classes))).float()


class NCSNv2(nn.Module):
    """NCSNv2 RefineNet (CIFAR-10 / 32×32 variant; 28×28 supported as in the original).

    Defaults are the published CIFAR-10 config: channels 3, ngf 128, 232 geometric
    σ from 50 to 0.01, InstanceNorm++, ELU.
    """

    def __init__(self, channels: int = 3, ngf: int = 128, num_classes: int = 232,
                 sigma_begin: float = 50.0, sigma_end: float = 0.01, image_size: int = 32,
                 sigma_dist: str = "geometric"):
        super().__init__()
        if sigma_dist == "geometric":
            sigmas = geometric_sigmas(sigma_begin, sigma_end, num_classes)
        elif sigma_dist == "uniform":
            sigmas = torch.tensor(np.linspace(sigma_begin, sigma_end, num_classes)).float()
        else:
            raise ValueError(f"unknown sigma_dist {sigma_dist!r}")
        self.register_buffer("sigmas", sigmas)
        self.ngf, self.num_classes = ngf, num_classes
        act = self.act = nn.ELU()
        norm = InstanceNorm2dPlus
        self.begin_conv = nn.Conv2d(channels, ngf, 3, stride=1, padding=1)
        self.normalizer = norm(ngf, num_classes)  # the original passes num_classes as `bias` (truthy)
        self.end_conv = nn.Conv2d(ngf, channels, 3, stride=1, padding=1)
        rb = lambda cin, cout, **kw: ResidualBlock(cin, cout, act=act, normalization=norm, **kw)  # noqa: E731
        self.res1 = nn.ModuleList([rb(ngf, ngf), rb(ngf, ngf)])
        self.res2 = nn.ModuleList([rb(ngf, 2 * ngf, resample="down"), rb(2 * ngf, 2 * ngf)])
        self.res3 = nn.ModuleList([rb(2 * ngf, 2 * ngf, resample="down", dilation=2),
                                   rb(2 * ngf, 2 * ngf, dilation=2)])
        self.res4 = nn.ModuleList([rb(2 * ngf, 2 * ngf, resample="down", dilation=4,
                                      adjust_padding=(image_size == 28)),
                                   rb(2 * ngf, 2 * ngf, dilation=4)])
        self.refine1 = RefineBlock([2 * ngf], 2 * ngf, act=act, start=True)
        self.refine2 = RefineBlock([2 * ngf, 2 * ngf], 2 * ngf, act=act)
        self.refine3 = RefineBlock([2 * ngf, 2 * ngf], ngf, act=act)
        self.refine4 = RefineBlock([ngf, ngf], ngf, act=act, end=True)

    @staticmethod
    def _run(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for b in blocks:
            x = b(x)
        return x

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.begin_conv(2.0 * x - 1.0)
        l1 = self._run(self.res1, h)
        l2 = self._run(self.res2, l1)
        l3 = self._run(self.res3, l2)
        l4 = self._run(self.res4, l3)
        r1 = self.refine1([l4], l4.shape[2:])
        r2 = self.refine2([l3, r1], l3.shape[2:])
        r3 = self.refine3([l2, r2], l2.shape[2:])
        out = self.refine4([l1, r3], l1.shape[2:])
        out = self.end_conv(self.act(self.normalizer(out)))
        if labels is not None:  # original noise-conditional use: s(x, σ_i) = f(x) / σ_i
            out = out / self.sigmas[labels].view(-1, *([1] * (x.dim() - 1)))
        return out


# ---------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------

ARCHS: dict[str, type[nn.Module]] = {SMALL_ARCH: SmallScoreNet, NCSNV2_ARCH: NCSNv2}


def make_score_net(arch: str, **params: Any) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"unknown score network {arch!r}; known: {sorted(ARCHS)}")
    return ARCHS[arch](**params)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) \
        and all(isinstance(v, torch.Tensor) for v in obj.values())


def ncsnv2_state_from_raw(raw: Any, ema: bool = False, source: str = "checkpoint") -> dict:
    """A plain state dict (no `module.` prefix) from what the NCSNv2 runner saves.

    raw is either [model_state, optimizer_state, epoch, step(, ema_state)] or a plain
    state dict. With ema=True the EMA shadow (parameters only, saved unprefixed by
    EMAHelper) replaces the parameters of model_state, as NCSNv2 sampling does; ADP's
    purification code loads model_state (states[0]) as is, hence the default.
    """
    if isinstance(raw, (list, tuple)):
        if not raw or not _is_state_dict(raw[0]):
            raise checkpoints.CheckpointError(
                f"{source}: not an NCSNv2 checkpoint list (first item is not a state dict)")
        state = checkpoints.strip_prefix(dict(raw[0]), "module.")
        if ema:
            if len(raw) < 5 or not _is_state_dict(raw[4]):
                raise checkpoints.CheckpointError(f"{source}: ema=True but the checkpoint holds no EMA state (item 4)")
            shadow = checkpoints.strip_prefix(dict(raw[4]), "module.")
            unknown = sorted(set(shadow) - set(state))
            if unknown:
                raise checkpoints.CheckpointError(f"{source}: EMA keys not in the model: {unknown[:5]}")
            state.update(shadow)
        return state
    if _is_state_dict(raw):
        if ema:
            raise checkpoints.CheckpointError(
                f"{source}: ema=True needs the NCSNv2 list layout, got a plain state dict")
        return checkpoints.strip_prefix(dict(raw), "module.")
    raise checkpoints.CheckpointError(f"{source}: neither an NCSNv2 checkpoint list nor a state dict")


def load_score_net(checkpoint: str, arch: str | None = None, arch_params: dict | None = None,
                   ema: bool = False) -> tuple[nn.Module, dict]:
    """Load a score network, frozen and in eval mode (`pipeline.purifiers.base.load_frozen`), from
    - our checkpoint (pipeline.io.checkpoints.save, written by jobs/train_score.py): the
      arch and its params come from the file;
    - a published NCSNv2 checkpoint (list layout or plain state dict): arch defaults to
      "ncsnv2" and arch_params to the CIFAR-10 config.
    Returns (net, info) where info records the format for the purifier's params().
    """
    def published(raw: Any) -> PublishedWeights:
        state = ncsnv2_state_from_raw(raw, ema=ema, source=checkpoint)
        return PublishedWeights("ncsnv2", arch or NCSNV2_ARCH, dict(arch_params or {}), state, {"ema": bool(ema)})

    return load_frozen(checkpoint, lambda a, params: make_score_net(a, **params),
                       archs=None if arch is None else [arch], published=published, kind="score network")
