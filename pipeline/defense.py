"""classifier ∘ purifier: the R-run evaluation view and the attack views (full gradient, BPDA).

Replicas are batched: a batch [B, ...] becomes [B·R, ...] (sample-major) and is pushed
through purifier and classifier in chunks of at most `max_rows` rows.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeline.attacks.base import AttackTarget
from pipeline.purifiers.base import Purifier
from pipeline.seeding import Noise

GRADIENT_MODES = ("full", "bpda", "classifier")


def honest_gradient_mode(purifier: Purifier) -> str:
    """The attack the purifier's flags call for: full gradient where autograd is the true
    gradient, BPDA (with EOT if stochastic) where it is not or where the purifier optimises."""
    if purifier.differentiable and not purifier.test_time_optimization:
        return "full"
    return "bpda"


class Defense(nn.Module):
    def __init__(self, classifier: nn.Module, purifier: Purifier, max_rows: int = 4096):
        super().__init__()
        self.classifier = classifier
        self.purifier = purifier
        self.max_rows = max(1, int(max_rows))

    def purify(self, x: torch.Tensor, noise: Noise) -> torch.Tensor:
        """x [N, ...] with noise rows N → x̂ [N, ...], chunked."""
        if x.shape[0] <= self.max_rows:
            return self.purifier(x, noise)
        start, per_row, parts = self.purifier.nfe, 0, []
        for i in range(0, x.shape[0], self.max_rows):
            before = self.purifier.nfe
            parts.append(self.purifier(x[i:i + self.max_rows], noise.select(slice(i, i + self.max_rows))))
            per_row = max(per_row, self.purifier.nfe - before)
        self.purifier.nfe = start + per_row  # nfe counts evaluations per row, not per chunk
        return torch.cat(parts)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier(x[i:i + self.max_rows]) for i in range(0, x.shape[0], self.max_rows)])

    def logits(self, x: torch.Tensor, noise: Noise, mode: str = "full") -> torch.Tensor:
        """Logits [B, R, K] of the defended model over R = noise.rows // B purification runs.

        mode "full": autograd through the purifier; "bpda": identity backward through the
        purifier (straight-through); "classifier": no purifier at all.
        """
        B = x.shape[0]
        if mode == "classifier":
            return self.classify(x).unsqueeze(1)
        if noise.rows % B:
            raise ValueError(f"noise rows {noise.rows} not a multiple of batch {B}")
        R = noise.rows // B
        xr = x.repeat_interleave(R, 0)  # [B·R, C, H, W], sample-major
        if mode == "full":
            purified = self.purify(xr, noise)
        elif mode == "bpda":
            with torch.no_grad():
                p = self.purify(xr.detach(), noise)
            purified = xr + (p - xr).detach()  # forward: p; backward: identity (Athalye et al. 2018)
        else:
            raise ValueError(f"unknown gradient mode {mode!r}; expected one of {GRADIENT_MODES}")
        out = self.classify(purified)
        return out.view(B, R, -1)

    def attack_target(self, mode: str, seed: int, keys: Sequence[str], context: str,
                      eot: int = 1) -> AttackTarget:
        """The differentiable view an attack sees: every step gets fresh keyed draws."""
        if mode not in GRADIENT_MODES:
            raise ValueError(f"unknown gradient mode {mode!r}; expected one of {GRADIENT_MODES}")
        keys = list(keys)

        def target(x: torch.Tensor, step: int) -> torch.Tensor:
            if mode == "classifier":
                return self.logits(x, Noise.for_batch(seed, keys, context, 1, x.device), mode)
            noise = Noise.for_batch(seed, keys, f"{context}/step{step}", eot, x.device)
            return self.logits(x, noise, mode)

        return target
