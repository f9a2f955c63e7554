"""R+FGSM — Tramèr et al., "Ensemble Adversarial Training: Attacks and Defenses", ICLR 2018."""
from __future__ import annotations

import torch

from pipeline.attacks.base import Attack, AttackResult, AttackTarget, BreakTracker, Recheck, normalized_step, project
from pipeline.registry import ATTACKS
from pipeline.seeding import Noise


@ATTACKS.register("rfgsm")
class RFGSM(Attack):
    """FGSM from a random point: x' = x + α·sign(N(0, I)), then x' + (ε − α)·sign(∇ loss(x')).

    Paper: Tramèr, Kurakin, Papernot, Goodfellow, Boneh, McDaniel, "Ensemble Adversarial
    Training: Attacks and Defenses", ICLR 2018, https://arxiv.org/abs/1705.07204.
    The random step escapes the sharp curvature next to data points that makes single-step
    attacks weak against (single-step) adversarially trained models.
    Threat model: ℓ∞ (paper). ℓ2 (ours): x' = x + α·n/‖n‖₂, then an ℓ2 gradient step of ε − α;
    radius eps in [0, 1] image units, intersected with [0, 1].
    Shapes: x [B, C, H, W] in [0, 1], y [B] → x_adv [B, C, H, W]; the target's logits are
    [B, R, K]. nfe 1 per sample. The noise is keyed per sample (purpose "rfgsm");
    `broken_step` 0 means the random point x' already met the goal.

    Arguments:
        eps (float): radius in [0, 1] image units, ℓ∞ ≤ 1. Paper. (Default: required)
        alpha (float | None): size of the random step, 0 ≤ alpha < eps; None = eps/2. Paper. (Default: None)
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

    name = "rfgsm"

    def __init__(self, eps: float, alpha: float | None = None, norm: str = "linf", targeted: bool = False,
                 eot_reduction: str = "mean_loss", loss: str = "ce", target_mode: str = "given",
                 recheck_draws: int = 0):
        super().__init__(eps, norm, targeted, eot_reduction, loss, target_mode, recheck_draws)
        self.alpha = self.eps / 2 if alpha is None else float(alpha)
        if not (0 <= self.alpha < self.eps or self.eps == self.alpha == 0):
            raise ValueError(f"alpha must be in [0, eps) = [0, {self.eps}), got {alpha}")

    def params(self):
        return {**super().params(), "alpha": self.alpha}

    def perturb(self, target: AttackTarget, x: torch.Tensor, y: torch.Tensor,
                noise: Noise, recheck: Recheck | None = None) -> AttackResult:
        (goal,) = self.goals(target, x, y, noise)
        n = noise.normal(tuple(x.shape[1:]), "rfgsm").to(x)
        x_rand = project(x + self.alpha * normalized_step(n, self.norm), x, self.eps, self.norm)
        _, direction, logits = self.loss_and_direction(target, x_rand, goal, step=0)
        tracker = BreakTracker(x, recheck)
        tracker.update(x_rand, logits, goal, 0)
        x_adv = project(x_rand + (self.eps - self.alpha) * normalized_step(direction, self.norm),
                        x, self.eps, self.norm)
        return tracker.result(x_adv, 1, goal.y_target)
