"""Plain denoising-autoencoder purification: x̂ = clip(D(x), 0, 1).

The simplest reconstruction defense (MagNet-style reformer, Meng & Chen 2017): one pass
through a denoiser trained on Gaussian-noised clean images. Deterministic and
differentiable, so the honest attack is a full-gradient one.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline import checkpoints
from pipeline.purifiers.base import Purifier
from pipeline.purifiers.nets import rednet, small_dae
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise


class DAEPurifier(Purifier):
    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, noise: Noise | None = None) -> torch.Tensor:
        self.nfe += 1
        return self.denoiser(x).clamp(0.0, 1.0)


def load_denoiser_record(checkpoint: str) -> tuple[nn.Module, dict]:
    """A frozen denoiser (small_dae or rednet30 checkpoint, from jobs/train_dae.py or the
    demo) and its checkpoint record without the state dict."""
    ckpt = checkpoints.load_ours(checkpoint)
    arch, params = ckpt["arch"], ckpt.get("arch_params", {})
    if arch == small_dae.ARCH:
        net: nn.Module = small_dae.SmallDAE(**params)
    elif arch == rednet.ARCH:
        net = rednet.make(**params)
    else:
        raise checkpoints.CheckpointError(
            f"{checkpoint}: holds a {arch!r} network; a denoiser is {small_dae.ARCH!r} or {rednet.ARCH!r}")
    checkpoints.load_state_strict(net, ckpt["state_dict"], checkpoint)
    net.eval().requires_grad_(False)
    return net, {k: v for k, v in ckpt.items() if k != "state_dict"}


def load_denoiser(checkpoint: str) -> nn.Module:
    return load_denoiser_record(checkpoint)[0]


@PURIFIERS.register("dae")
def build(checkpoint: str) -> DAEPurifier:
    """One-pass denoising autoencoder (MagNet-style reformer); checkpoint from jobs/train_dae.py."""
    return DAEPurifier(load_denoiser(checkpoint))
