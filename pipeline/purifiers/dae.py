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
from pipeline.purifiers.nets import small_dae
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise


class DAEPurifier(Purifier):
    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, noise: Noise | None = None) -> torch.Tensor:
        self.nfe += 1
        return self.denoiser(x).clamp(0.0, 1.0)


def load_denoiser(checkpoint: str) -> nn.Module:
    ckpt = checkpoints.load_ours(checkpoint, expect_arch=small_dae.ARCH)
    net = small_dae.SmallDAE(**ckpt["arch_params"])
    checkpoints.load_state_strict(net, ckpt["state_dict"], checkpoint)
    return net.eval()


@PURIFIERS.register("dae")
def build(checkpoint: str) -> DAEPurifier:
    """One-pass denoising autoencoder (MagNet-style reformer); checkpoint from jobs/train_dae.py."""
    return DAEPurifier(load_denoiser(checkpoint))
