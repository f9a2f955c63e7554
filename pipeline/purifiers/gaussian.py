"""Gaussian noise injection: x̂ = clip(x + σ·z, 0, 1), z ~ N(0, I) keyed per row.

The input noise of randomized smoothing (Cohen, Rosenfeld, Kolter, "Certified Adversarial
Robustness via Randomized Smoothing", ICML 2019, arXiv:1902.02918), without its
certification: the simplest *stochastic* pre-processing defense. No network, so it costs
nothing and is the cheapest way to exercise everything an evaluation of a randomized
defense needs — R runs, EOT, confirmed breaks. Differentiable: the honest attack is full
gradient with EOT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.purifiers.base import Purified, Purifier, PurifierSettings
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise


@dataclass(frozen=True)
class GaussianSettings(PurifierSettings):
    """Settings of Gaussian noise injection (Cohen et al. 2019).

    Arguments:
        sigma (float): noise standard deviation in [0, 1] image units, > 0; the paper's
            CIFAR-10 values are 0.12, 0.25, 0.5, 1.0. Paper. (Default: 0.25)
    """

    sigma: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("sigma", self.sigma > 0, "> 0")


class GaussianPurifier(Purifier):
    """Adds keyed Gaussian noise and clips to [0, 1] (Cohen et al. 2019, arXiv:1902.02918).

    Stochastic, differentiable, no test-time optimisation: the honest attack is the full
    gradient with EOT. No network: nfe 0, no stats.
    Shapes: x [N, C, H, W] in [0, 1] → x̂ [N, C, H, W] in [0, 1].

    Arguments:
        settings (GaussianSettings): see GaussianSettings. (Default: GaussianSettings())
    """

    stochastic = True
    settings: GaussianSettings

    def __init__(self, settings: GaussianSettings = GaussianSettings()):
        super().__init__(settings)

    def purify(self, x: torch.Tensor, noise: Noise | None = None) -> Purified:
        z = self._noise(noise, x).normal(tuple(x.shape[1:]), "gaussian").to(x)
        return Purified((x + self.settings.sigma * z).clamp(0.0, 1.0), 0)


@PURIFIERS.register("gaussian", settings=GaussianSettings, checkpoint=None)
def build(checkpoint: None, settings: GaussianSettings) -> GaussianPurifier:
    """Gaussian noise injection (randomized-smoothing input noise), a stochastic baseline.

    Arguments:
        checkpoint (None): no network.
        settings (GaussianSettings): see GaussianSettings.
    """
    return GaussianPurifier(settings)
