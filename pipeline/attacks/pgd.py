"""PGD — Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.

With random_start=False this is BIM (Kurakin et al. 2017).
"""
from __future__ import annotations

import torch

from pipeline.attacks.base import (Attack, AttackResult, AttackTarget, normalized_step, project,
                                   random_start, track_broken)
from pipeline.registry import ATTACKS
from pipeline.seeding import Noise


@ATTACKS.register("pgd")
class PGD(Attack):
    """Projected gradient descent on the (EOT) cross-entropy.

    Threat model: ℓ∞ or ℓ2 ball of radius eps (image units in [0, 1]) intersected with [0, 1].
    Arguments: eps, steps (≥1, default 40), step_size (default 2.5·eps/steps),
    norm ("linf" | "l2"), random_start (True), targeted (False),
    eot_reduction ("mean_loss" | "mean_logits").
    Returns the final iterate; `broken_step` records the first iterate that fooled the model
    (the worst case over steps used by Hill et al. 2021).
    """

    name = "pgd"

    def __init__(self, eps: float, steps: int = 40, step_size: float | None = None,
                 norm: str = "linf", random_start: bool = True, targeted: bool = False,
                 eot_reduction: str = "mean_loss"):
        super().__init__(eps, norm, targeted, eot_reduction)
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        self.steps = int(steps)
        self.step_size = float(step_size) if step_size is not None else 2.5 * self.eps / self.steps
        self.random_start = random_start

    def params(self):
        return {**super().params(), "steps": self.steps, "step_size": self.step_size,
                "random_start": self.random_start}

    def perturb(self, target: AttackTarget, x: torch.Tensor, y: torch.Tensor,
                noise: Noise) -> AttackResult:
        x = x.detach()
        x_adv = random_start(x, self.eps, self.norm, noise) if self.random_start else x.clone()
        broken = torch.full((x.shape[0],), -1, dtype=torch.int64)
        for t in range(self.steps):
            _, grad, logits = self.loss_and_grad(target, x_adv, y, step=t)
            broken = track_broken(broken, logits, y, t, self.targeted)
            x_adv = project(x_adv + self.step_size * normalized_step(grad, self.norm), x, self.eps, self.norm)
        return AttackResult(x_adv.detach(), broken, nfe=self.steps)
