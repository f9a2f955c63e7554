"""PGD — Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.

With random_start=False this is BIM (Kurakin et al. 2017). With recheck_draws > 0 it is the
BPDA+EOT protocol of Hill et al. 2021 ("Stochastic Security", ICLR 2021): every candidate
break (the attack's own R-draw forward is fooled) is confirmed with H draws of the real
defense, and a confirmed break stays broken (its iterate is the one returned).
"""
from __future__ import annotations

import torch

from pipeline.attacks.base import (
    Attack,
    AttackResult,
    AttackTarget,
    BreakTracker,
    Recheck,
    normalized_step,
    project,
    random_start,
    restrict,
)
from pipeline.registry import ATTACKS
from pipeline.seeding import Noise

# no further steps on a sample whose break is confirmed (switched off only to test that verdicts agree)
SKIP_BROKEN = True


@ATTACKS.register("pgd")
class PGD(Attack):
    """Projected gradient descent on the (EOT) loss; BIM with random_start=False.

    Paper: Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018, https://arxiv.org/abs/1706.06083.
    Threat model: ℓ∞ or ℓ2 ball of radius eps (image units in [0, 1]) intersected with [0, 1].
    Shapes: x [B, C, H, W] in [0, 1], y [B] → x_adv [B, C, H, W]; the target's logits are
    [B, R, K]. nfe per sample: steps + 1 with keep_broken, else steps.
    Iterate t (t = 0 … steps−1) is evaluated with target step t and then updated.
    With keep_broken (the default; implied whenever breaks are re-checked) the final iterate
    is evaluated too (step `steps`, nfe = steps + 1) and samples with a confirmed break return
    their breaking iterate, the others the final iterate; keep_broken False returns the final
    iterate always (nfe = steps), the textbook PGD. With keep_broken each step attacks only the
    samples without a confirmed break (`sample_nfe` counts each sample's own evaluations).

    Arguments:
        eps (float): radius in [0, 1] image units, ℓ∞ ≤ 1. Paper. (Default: required)
        steps (int): iterations, ≥ 1. Paper: 40 on MNIST. (Default: 40)
        step_size (float | None): step in image units, > 0; None = 2.5·eps/steps (Madry et
            al.'s rule of thumb). Paper. (Default: None)
        norm (str): "linf" or "l2". Paper. (Default: "linf")
        random_start (bool): start at a keyed uniform point of the ball. Paper. (Default: True)
        keep_broken (bool): return a confirmed break's breaking iterate (evaluating the final
            iterate too). Ours. (Default: True)
        targeted (bool): minimise the loss towards a target class instead of maximising it. Ours. (Default: False)
        target_mode (str): targeted only: "given" (y is the target), "top", "least_likely" or
            "random" (y is the true label; see Attack). Ours. (Default: "given")
        eot_reduction (str): how R draws make one gradient, "mean_loss", "mean_logits" or
            "sign_sum" (pipeline.attacks.eot). Ours. (Default: "mean_loss")
        loss (str): "ce" or "dlr" (DLR: Croce & Hein 2020). Paper: CE. (Default: "ce")
        recheck_draws (int): H ≥ 0 draws of the real defense that confirm each candidate break
            (Hill et al. 2021); 0: the attack's own forward decides. Hill et al.'s. (Default: 0)
    """

    name = "pgd"

    def __init__(self, eps: float, steps: int = 40, step_size: float | None = None,
                 norm: str = "linf", random_start: bool = True, targeted: bool = False,
                 eot_reduction: str = "mean_loss", loss: str = "ce", target_mode: str = "given",
                 keep_broken: bool = True, recheck_draws: int = 0):
        super().__init__(eps, norm, targeted, eot_reduction, loss, target_mode, recheck_draws)
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        self.steps = int(steps)
        self.step_size = float(step_size) if step_size is not None else 2.5 * self.eps / self.steps
        if not (self.step_size > 0 or self.step_size == self.eps == 0):
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.random_start = bool(random_start)
        self.keep_broken = bool(keep_broken) or self.recheck_draws > 0
        self.checks_returned_image = self.keep_broken   # the final iterate's forward runs with keep_broken

    def params(self):
        p = {**super().params(), "steps": self.steps, "step_size": self.step_size,
             "random_start": self.random_start}
        if not self.keep_broken:
            p["keep_broken"] = False
        return p

    def perturb(self, target: AttackTarget, x: torch.Tensor, y: torch.Tensor,
                noise: Noise, recheck: Recheck | None = None) -> AttackResult:
        (goal,) = self.goals(target, x, y, noise)
        x_adv = random_start(x, self.eps, self.norm, noise) if self.random_start else x.clone()
        tracker = BreakTracker(x, recheck)
        sample_nfe = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        keep = self.keep_broken or recheck is not None
        for t in range(self.steps + (1 if keep else 0)):
            # with keep_broken a confirmed break returns its breaking iterate whatever comes
            # after, so (as AutoAttack) each step attacks the samples not yet broken only
            rows = ((~tracker.broken).nonzero().squeeze(1) if keep and SKIP_BROKEN
                    else torch.arange(x.shape[0], device=x.device))
            if rows.numel() == 0:
                break
            sub, sub_goal, xs = restrict(target, rows, x), goal.select(rows), x_adv[rows]
            if t == self.steps:   # the last iterate's forward: no gradient needed
                with torch.no_grad():
                    logits = sub(xs, t)
            else:
                _, direction, logits = self.loss_and_direction(sub, xs, sub_goal, t)
            tracker.update(xs, logits, sub_goal, t, rows=rows)
            if t < self.steps:
                x_adv[rows] = project(xs + self.step_size * normalized_step(direction, self.norm), x[rows],
                                      self.eps, self.norm)
            sample_nfe[rows] += 1
        nfe = self.steps + (1 if keep else 0)
        if keep:
            x_adv = tracker.merge(x_adv)
        return tracker.result(x_adv, nfe, goal.y_target, sample_nfe)
