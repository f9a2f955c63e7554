"""Plain denoising-autoencoder purification: x̂ = clip(D(x), 0, 1).

The simplest reconstruction defense (MagNet-style reformer; Meng, Chen, "MagNet: a
Two-Pronged Defense against Adversarial Examples", CCS 2017, arXiv:1705.09064): one pass
through a denoiser trained on Gaussian-noised clean images. Deterministic and
differentiable, so the honest attack is a full-gradient one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.purifiers.base import Purified, Purifier, PurifierSettings, load_frozen
from pipeline.purifiers.nets import rednet, small_dae
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise

DENOISER_ARCHS = (small_dae.ARCH, rednet.ARCH)


@dataclass(frozen=True)
class DAESettings(PurifierSettings):
    """No settings: the denoiser is the whole method."""


class DAEPurifier(Purifier):
    """One pass through a denoiser, clipped to [0, 1] (MagNet's reformer, arXiv:1705.09064).

    Deterministic, differentiable, no test-time optimisation: the honest attack is the full
    gradient. nfe 1 per row (one network evaluation), no stats.
    Shapes: x [N, C, H, W] in [0, 1] → x̂ [N, C, H, W] in [0, 1].

    Arguments:
        denoiser (nn.Module): D, [N, C, H, W] → [N, C, H, W], frozen by the caller.
        settings (DAESettings): none. (Default: DAESettings())
        info (Mapping | None): facts about the denoiser for the record. (Default: None)
    """

    def __init__(self, denoiser: nn.Module, settings: DAESettings = DAESettings(), info: dict | None = None):
        super().__init__(settings, info)
        self.denoiser = denoiser

    def purify(self, x: torch.Tensor, noise: Noise | None = None) -> Purified:
        return Purified(self.denoiser(x).clamp(0.0, 1.0), 1)


def _make_denoiser(arch: str, params: dict) -> nn.Module:
    return small_dae.SmallDAE(**params) if arch == small_dae.ARCH else rednet.make(**params)


def load_denoiser_record(checkpoint: str) -> tuple[nn.Module, dict]:
    """A frozen denoiser (small_dae or rednet30 checkpoint, from jobs/train_dae.py or the
    demo) and its checkpoint record {"format", "arch", "arch_params", "meta"}."""
    return load_frozen(checkpoint, _make_denoiser, archs=DENOISER_ARCHS, kind="denoiser")


def load_denoiser(checkpoint: str) -> nn.Module:
    return load_denoiser_record(checkpoint)[0]


@PURIFIERS.register("dae", settings=DAESettings)
def build(checkpoint: str, settings: DAESettings) -> DAEPurifier:
    """One-pass denoising autoencoder (MagNet-style reformer); checkpoint from jobs/train_dae.py.

    Arguments:
        checkpoint (str): our small_dae / rednet30 checkpoint (local path or URL).
        settings (DAESettings): none.
    """
    return DAEPurifier(load_denoiser(checkpoint), settings)
