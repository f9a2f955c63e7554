"""Gaussian noise injection: x̂ = clip(x + σ·z, 0, 1), z ~ N(0, I) keyed per row.

The simplest *stochastic* pre-processing defense (the input noise of randomized smoothing,
Cohen, Rosenfeld, Kolter, ICML 2019, without its certification): no network, so it costs
nothing and is the cheapest way to exercise everything an evaluation of a randomized
defense needs — R runs, EOT, confirmed breaks. Differentiable: the honest attack is full
gradient with EOT.
"""
from __future__ import annotations

import torch

from pipeline.purifiers.base import Purified, Purifier
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise


class GaussianPurifier(Purifier):
    """Adds keyed Gaussian noise and clips to [0, 1] (no network evaluations, nfe 0).

    Arguments:
        sigma (float): noise standard deviation in [0, 1] image units (default 0.25).
    """

    stochastic = True

    def __init__(self, *, sigma: float = 0.25):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def purify(self, x: torch.Tensor, noise: Noise | None = None) -> Purified:
        z = self._noise(noise, x).normal(tuple(x.shape[1:]), "gaussian").to(x)
        return Purified((x + self.sigma * z).clamp(0.0, 1.0), 0)

    def params(self) -> dict[str, float]:
        return {"sigma": self.sigma}


@PURIFIERS.register("gaussian")
def build(sigma: float = 0.25) -> GaussianPurifier:
    """Gaussian noise injection (randomized-smoothing input noise), a stochastic baseline.

    Arguments:
        sigma (float): noise standard deviation in [0, 1] image units (default 0.25).
    """
    return GaussianPurifier(sigma=sigma)
