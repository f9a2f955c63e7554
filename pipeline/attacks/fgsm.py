"""FGSM — Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015."""
from __future__ import annotations

import torch

from pipeline.attacks.base import Attack, AttackResult, AttackTarget, BreakTracker, Recheck, normalized_step, project
from pipeline.registry import ATTACKS
from pipeline.seeding import Noise


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """Fast gradient (sign) method: one step of size ε along the (EOT) loss gradient.

    Paper: Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples",
    ICLR 2015, https://arxiv.org/abs/1412.6572.
    Threat model: ℓ∞ (sign step, the paper's) or ℓ2 (normalised gradient step, ours), radius
    eps in [0, 1] image units, intersected with [0, 1].
    Shapes: x [B, C, H, W] in [0, 1], y [B] (labels, or targets when target_mode is "given")
    → x_adv [B, C, H, W]; the target's logits are [B, R, K]. nfe 1 per sample (one forward and
    backward at x). `broken_step` is 0 where the clean input already met the goal.

    Arguments:
        eps (float): radius in [0, 1] image units, ℓ∞ ≤ 1 (e.g. 0.3 MNIST, 8/255 CIFAR-10). Paper. (Default: required)
        norm (str): "linf" (Paper) or "l2" (Ours). (Default: "linf")
        targeted (bool): minimise the loss towards a target class instead of maximising it. Ours. (Default: False)
        target_mode (str): targeted only: "given" (y is the target), "top", "least_likely" or
            "random" (y is the true label; see Attack). Ours. (Default: "given")
        eot_reduction (str): how R draws make one gradient, "mean_loss", "mean_logits" or
            "sign_sum" (pipeline.attacks.eot). Ours. (Default: "mean_loss")
        loss (str): "ce" or "dlr" (DLR: Croce & Hein 2020). Paper: CE. (Default: "ce")
        recheck_draws (int): H ≥ 0 draws of the real defense that confirm each candidate break
            (Hill et al. 2021); 0: the attack's own forward decides. Hill et al.'s. (Default: 0)
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
