"""The purifier interface and its capability flags.

A purifier maps a batch x [N, C, H, W] in [0, 1] to x̂ of the same shape and range. Its
flags say what it is, and so which attack is honest against it:
- stochastic: x̂ depends on random draws (evaluate over R runs, attack with EOT);
- differentiable: autograd through forward() gives the true gradient (full-gradient attack);
- test_time_optimization: forward() runs an inner optimisation (BPDA+EOT, and a check flag).

Rules every purifier keeps:
- randomness only from the `noise` argument (rows keyed by sample and replica), never from
  torch's global generator, so a row's output does not depend on its batch;
- no torch.no_grad()/inference_mode() inside: the caller decides whether gradients flow;
- `self.nfe` counts network evaluations per row, so records can report the cost.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.seeding import Noise


class Purifier(nn.Module):
    stochastic: ClassVar[bool] = False
    differentiable: ClassVar[bool] = True
    test_time_optimization: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.nfe = 0

    def forward(self, x: torch.Tensor, noise: Noise | None = None) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The settings that define this purification, recorded with every result."""
        return {}

    def flags(self) -> dict[str, bool]:
        return {"stochastic": self.stochastic, "differentiable": self.differentiable,
                "test_time_optimization": self.test_time_optimization}

    def _noise(self, noise: Noise | None, x: torch.Tensor) -> Noise:
        if noise is None:
            return Noise.unkeyed(x.shape[0], x.device)
        if noise.rows != x.shape[0]:
            raise ValueError(f"noise has {noise.rows} rows for a batch of {x.shape[0]}")
        return noise.to(x.device)


class Identity(Purifier):
    """No purification: the undefended classifier, as a baseline row in every report."""

    def forward(self, x: torch.Tensor, noise: Noise | None = None) -> torch.Tensor:
        return x
