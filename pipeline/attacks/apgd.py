"""APGD — Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020 (Algorithm 1).

Step-size-free PGD: the step η starts at 2ε and is halved per sample at checkpoints
w_j = ⌈p_j·N⌉, p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), when
  (1) the loss grew in fewer than ρ·(w_j − w_{j−1}) of the steps since the last checkpoint, or
  (2) η was not halved at the last checkpoint and the best loss has not improved since;
after a halving the iterate restarts from the best point found. Updates use momentum α:
  z = P(x_k + η·s(∇f(x_k))),  x_{k+1} = P(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1})),
with s = sign (ℓ∞) or g/‖g‖₂ (ℓ2), α = 1 on the first step and 0.75 after.
"""
from __future__ import annotations

import logging
import math

import torch

from pipeline.attacks.base import (Attack, AttackResult, AttackTarget, BreakTracker, Goal, Recheck,
                                   normalized_step, project, random_start)
from pipeline.registry import ATTACKS
from pipeline.seeding import Noise

log = logging.getLogger(__name__)


def checkpoints(steps: int) -> list[int]:
    """Iterations w_1 < w_2 < … < N at which the step size is reconsidered (paper, §3.2)."""
    p_prev, p = 0.0, 0.22
    out: list[int] = []
    while p < 1.0:
        w = math.ceil(p * steps - 1e-9)  # p_j carries float error (0.41 + 0.16 = 0.5700…01)
        if 0 < w < steps and (not out or w > out[-1]):
            out.append(w)
        p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
    return out


def _bcast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *[1] * (like.dim() - 1))


@ATTACKS.register("apgd")
class APGD(Attack):
    """Auto-PGD with the CE or DLR loss; APGD-T with targeted=True (DLR-targeted by default).

    Threat model: ℓ∞ or ℓ2 ball of radius eps (image units) ∩ [0, 1].
    Arguments: eps; steps N (default 100; nfe = N + 1 per run: the start point and every
    iterate are evaluated); norm ("linf" | "l2"); loss ("ce" | "dlr", default "ce");
    targeted (False) with target_mode ("top" default: the n-th most likely wrong class of the
    clean input, as APGD-T; "least_likely" | "random" | "given") and n_target_classes
    (default 1; 9 in AutoAttack's APGD-T), one run per target class; restarts (default 1)
    from independent keyed random starts; random_start (True; False starts at x);
    rho (0.75), momentum (0.75), initial_step (2.0, in units of eps);
    eot_reduction ("mean_loss" | "mean_logits" | "sign_sum"); recheck_draws (0).
    Runs stop early once every sample in the batch has met the goal.
    Returns, per sample, the first iterate that met the goal (confirmed by `recheck` if given),
    else the highest-loss point over all runs; `broken_step` counts target steps over runs,
    run j owning steps j·(N+1) … j·(N+1)+N.
    """

    name = "apgd"

    def __init__(self, eps: float, steps: int = 100, norm: str = "linf", loss: str = "ce",
                 targeted: bool = False, target_mode: str = "top", n_target_classes: int = 1,
                 restarts: int = 1, random_start: bool = True, rho: float = 0.75, momentum: float = 0.75,
                 initial_step: float = 2.0, eot_reduction: str = "mean_loss", recheck_draws: int = 0):
        super().__init__(eps, norm, targeted, eot_reduction, loss, target_mode, recheck_draws)
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        if restarts < 1:
            raise ValueError(f"restarts must be ≥ 1, got {restarts}")
        if n_target_classes < 1 or (not targeted and n_target_classes != 1):
            raise ValueError("n_target_classes must be ≥ 1, and 1 for untargeted attacks")
        if not 0 < rho <= 1 or not 0 < momentum <= 1 or not initial_step > 0:
            raise ValueError("need 0 < rho ≤ 1, 0 < momentum ≤ 1, initial_step > 0")
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.n_target_classes = int(n_target_classes)
        self.random_start = bool(random_start)
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.initial_step = float(initial_step)
        self.checkpoints = checkpoints(self.steps)

    def params(self):
        p = {**super().params(), "steps": self.steps, "restarts": self.restarts,
             "random_start": self.random_start, "rho": self.rho, "momentum": self.momentum,
             "initial_step": self.initial_step}
        if self.targeted:
            p["n_target_classes"] = self.n_target_classes
        return p

    def perturb(self, target: AttackTarget, x: torch.Tensor, y: torch.Tensor,
                noise: Noise, recheck: Recheck | None = None) -> AttackResult:
        goals = self.goals(target, x, y, noise, self.n_target_classes)
        tracker = BreakTracker(x, recheck)
        x_best = x.clone()
        f_best = torch.full((x.shape[0],), -math.inf, device=x.device)
        best_target = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
        nfe, run = 0, 0
        for goal in goals:
            for r in range(self.restarts):
                if bool(tracker.broken.all()):
                    break
                x0 = random_start(x, self.eps, self.norm, noise, index=r) if self.random_start else x.clone()
                x_max, f_max = self._run(target, x, x0, goal, tracker, run * (self.steps + 1))
                better = f_max > f_best
                x_best = torch.where(_bcast(better, x), x_max, x_best)
                f_best = torch.where(better, f_max, f_best)
                if goal.targeted:
                    best_target = torch.where(better, goal.y_target.to(x.device), best_target)
                nfe += self.steps + 1
                run += 1
                log.debug("apgd run %d (restart %d): %d/%d samples met the goal", run, r,
                          int(tracker.broken.sum()), x.shape[0])
        x_adv = tracker.merge(x_best)
        target_class = None
        if self.targeted:
            target_class = torch.where(tracker.broken, tracker.target_class, best_target)
        return AttackResult(x_adv.detach(), tracker.broken_step, nfe, target_class)

    def _step(self, x: torch.Tensor, x_k: torch.Tensor, x_prev: torch.Tensor, direction: torch.Tensor,
              eta: torch.Tensor, alpha: float) -> torch.Tensor:
        z = project(x_k + _bcast(eta, x) * normalized_step(direction, self.norm), x, self.eps, self.norm)
        return project(x_k + alpha * (z - x_k) + (1 - alpha) * (x_k - x_prev), x, self.eps, self.norm)

    def _run(self, target: AttackTarget, x: torch.Tensor, x0: torch.Tensor, goal: Goal,
             tracker: BreakTracker, step0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One APGD run from x0; returns (x_max, f_max)."""
        B = x.shape[0]
        f_k, g_k, logits = self.evaluate(target, x0, goal, step0)
        tracker.update(x0, logits, goal, step0)
        x_k, x_prev = x0, x0
        x_max, f_max, g_max = x0.clone(), f_k.clone(), g_k.clone()
        eta = torch.full((B,), self.initial_step * self.eps, device=x.device)
        increases = torch.zeros(B, device=x.device)
        f_max_at_check = f_max.clone()
        halved_at_check = torch.zeros(B, dtype=torch.bool, device=x.device)
        last_check = 0
        for k in range(self.steps):
            x_new = self._step(x, x_k, x_prev, g_k, eta, 1.0 if k == 0 else self.momentum)
            f_new, g_new, logits = self.evaluate(target, x_new, goal, step0 + k + 1)
            tracker.update(x_new, logits, goal, step0 + k + 1)
            increases += (f_new > f_k).float()
            better = f_new > f_max
            x_max = torch.where(_bcast(better, x), x_new, x_max)
            g_max = torch.where(_bcast(better, x), g_new, g_max)
            f_max = torch.where(better, f_new, f_max)
            x_prev, x_k, f_k, g_k = x_k, x_new, f_new, g_new
            if k + 1 in self.checkpoints:
                oscillating = increases < self.rho * (k + 1 - last_check)
                stalled = ~halved_at_check & (f_max <= f_max_at_check)
                halve = oscillating | stalled
                eta = torch.where(halve, eta / 2, eta)
                hb = _bcast(halve, x)
                x_k = torch.where(hb, x_max, x_k)
                g_k = torch.where(hb, g_max, g_k)
                f_k = torch.where(halve, f_max, f_k)
                x_prev = torch.where(hb, x_k, x_prev)  # restart: no momentum carried over
                halved_at_check, f_max_at_check = halve, f_max.clone()
                increases.zero_()
                last_check = k + 1
        return x_max, f_max
