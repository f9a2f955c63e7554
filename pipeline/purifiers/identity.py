"""The identity purifier (no defense), registered as "none"."""
from __future__ import annotations

import torch

from pipeline.purifiers.base import Purified, Purifier
from pipeline.registry import PURIFIERS
from pipeline.seeding import Noise


class IdentityPurifier(Purifier):
    """No purification: the undefended classifier, as a baseline row in every report.

    Deterministic and differentiable; no network evaluations (nfe 0). No arguments.
    """

    def purify(self, x: torch.Tensor, noise: Noise | None = None) -> Purified:
        return Purified(x, 0)


@PURIFIERS.register("none")
def build() -> IdentityPurifier:
    """No purification (undefended baseline)."""
    return IdentityPurifier()
