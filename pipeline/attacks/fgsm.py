"""FGSM — Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015."""
from __future__ import annotations

import torch

from pipeline.attacks.base import Attack, AttackResult, AttackTarget, normalized_step, project, track_broken
from pipeline.registry import ATTACKS
from pipeline.seeding import Noise


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """Fast gradient (sign) method: one step of size ε.

    Threat model: ℓ∞ (sign step) or ℓ2 (normalised gradient step), radius eps in [0, 1] units.
    Arguments: eps (ℓ∞: 0–1, e.g. 0.3 MNIST, 8/255 CIFAR), norm ("linf" | "l2"),
    targeted (False), eot_reduction ("mean_loss" | "mean_logits").
    """

    name = "fgsm"

    def perturb(self, target: AttackTarget, x: torch.Tensor, y: torch.Tensor,
                noise: Noise) -> AttackResult:
        _, grad, logits = self.loss_and_grad(target, x, y, step=0)
        broken = track_broken(torch.full((x.shape[0],), -1, dtype=torch.int64), logits, y, 0, self.targeted)
        x_adv = project(x + self.eps * normalized_step(grad, self.norm), x, self.eps, self.norm)
        return AttackResult(x_adv.detach(), broken, nfe=1)
