"""FGSM — Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015."""
from __future__ import annotations

import torch

from pipeline.attacks.base import Attack, AttackResult, AttackTarget, BreakTracker, Recheck, normalized_step, project
from pipeline.registry import ATTACKS
from pipeline.seeding import Noise


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """Fast gradient (sign) method: one step of size ε.

    Threat model: ℓ∞ (sign step) or ℓ2 (normalised gradient step), radius eps in [0, 1] units.
    Arguments: eps (ℓ∞: 0–1, e.g. 0.3 MNIST, 8/255 CIFAR), norm ("linf" | "l2"),
    targeted (False), eot_reduction ("mean_loss" | "mean_logits" | "sign_sum"), loss ("ce" | "dlr"),
    target_mode ("given"), recheck_draws (0). `broken_step` is 0 where the clean input already
    met the goal (the only forward pass FGSM makes).
    """

    name = "fgsm"

    def perturb(self, target: AttackTarget, x: torch.Tensor, y: torch.Tensor,
                noise: Noise, recheck: Recheck | None = None) -> AttackResult:
        (goal,) = self.goals(target, x, y, noise)
        _, direction, logits = self.loss_and_direction(target, x, goal, step=0)
        tracker = BreakTracker(x, recheck)
        tracker.update(x, logits, goal, 0)
        x_adv = project(x + self.eps * normalized_step(direction, self.norm), x, self.eps, self.norm)
        return tracker.result(x_adv, 1, goal.y_target)
