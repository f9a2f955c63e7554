"""The identity purifier (no defense), registered as "none"."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.purifiers.base import Purified, Purifier, PurifierSettings
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise


@dataclass(frozen=True)
class IdentitySettings(PurifierSettings):
    """No settings."""


class IdentityPurifier(Purifier):
    """No purification: the undefended classifier, as a baseline row in every report.

    Paper: none (no defense).
    Deterministic and differentiable, no test-time optimisation: the honest attack is the
    classifier's own gradient. No network evaluations (nfe 0), no stats.
    Shapes: x [N, C, H, W] → x unchanged.

    Arguments:
        settings (IdentitySettings): none. (Default: IdentitySettings())
    """

    def __init__(self, settings: IdentitySettings = IdentitySettings()):
        super().__init__(settings)

    def purify(self, x: torch.Tensor, noise: Noise | None = None) -> Purified:
        return Purified(x, 0)


@PURIFIERS.register("none", settings=IdentitySettings, checkpoint=None)
def build(checkpoint: None, settings: IdentitySettings) -> IdentityPurifier:
    """No purification (undefended baseline)."""
    return IdentityPurifier(settings)
