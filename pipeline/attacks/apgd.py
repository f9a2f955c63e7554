"""APGD — Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020 (Algorithm 1).

Step-size-free PGD: the step η starts at 2ε and is halved per sample at checkpoints when
  (1) the loss grew in too few of the steps since the last checkpoint (oscillation), or
  (2) η was not halved at the last checkpoint and the best loss has not improved since;
after a halving the iterate restarts from the best point found. Updates use momentum α:
  z = P(x_k + η·s(∇f(x_k))),  x_{k+1} = P(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1})),
with s = sign (ℓ∞) or g/‖g‖₂ (ℓ2), α = 1 on the first step and 0.75 after.

Two checkpoint schedules (`schedule`):
  "autoattack" (default) — the schedule of AutoAttack's code (fra31/auto-attack,
    autoattack/autopgd_base.py), which produced the published AutoAttack numbers: a counter
    of steps since the last check; the check runs when it reaches k, k₁ = max(⌊0.22N⌋, 1),
    then k ← max(k − max(⌊0.03N⌋, 1), max(⌊0.06N⌋, 1)). Test (1) is "increases ≤ ρ·k" over
    exactly the last k steps; test (2) cannot fire at the first check.
  "paper" — w_j = ⌈p_j·N⌉, p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06),
    test (1) "increases < ρ·(w_j − w_{j−1})"; our implementation before issue 9, kept to
    reproduce older records.
They agree for N = 100 and 200 and differ for small N (N = 10: 2, 3, …, 10 vs 3, 5, 6, 7, 8, 9).
"""
from __future__ import annotations

import logging
import math

import torch

from pipeline.attacks.base import (
    Attack,
    AttackResult,
    AttackTarget,
    BreakTracker,
    Goal,
    Recheck,
    normalized_step,
    project,
    random_start,
    restrict,
)
from pipeline.registry import ATTACKS
from pipeline.seeding import Noise

log = logging.getLogger(__name__)

SCHEDULES = ("autoattack", "paper")
# no further steps on a sample whose break is confirmed (switched off only to test that verdicts agree)
SKIP_BROKEN = True
TARGETED_SUCCESS = ("target", "misclassified")


def autoattack_periods(steps: int) -> tuple[int, int, int]:
    """(first period, minimum period, decrement) of AutoAttack's checkpoint counter.

    Written as AutoAttack writes them, int() of a float product, so that any rounding
    quirk of the float products is reproduced too (none occurs for N < 400).
    """
    return max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)


def step_size_checkpoints(steps: int, schedule: str = "autoattack") -> list[int]:
    """Iteration counts (1 … N) after which the step size is reconsidered.

    "autoattack" lists every check AutoAttack runs, including one after the last step when the
    counter lands on N (it cannot change the result). "paper" lists w_j < N (paper, §3.2).
    """
    if schedule == "autoattack":
        k, k_min, decr = autoattack_periods(steps)
        out, w = [], k
        while w <= steps:
            out.append(w)
            k = max(k - decr, k_min)
            w += k
        return out
    if schedule != "paper":
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    p_prev, p = 0.0, 0.22
    out = []
    while p < 1.0:
        w = math.ceil(p * steps - 1e-9)  # p_j carries float error (0.41 + 0.16 = 0.5700…01)
        if 0 < w < steps and (not out or w > out[-1]):
            out.append(w)
        p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
    return out


class StepSizeControl:
    """APGD's per-sample halving test, fed the loss of every evaluated iterate in order.

    `observe(f_new, f_max)` returns None between checkpoints and, at a checkpoint, the [B]
    mask of samples whose step size halves. Kept apart from the update loop so the test can
    be checked against a plain re-statement of AutoAttack's bookkeeping.
    """

    def __init__(self, f0: torch.Tensor, steps: int, rho: float, schedule: str = "autoattack"):
        self.autoattack = schedule == "autoattack"
        self.checks = set(step_size_checkpoints(steps, schedule))
        self.rho = float(rho)
        # AutoAttack compares the first iterate's loss with a zero-initialised slot of its loss
        # history (loss_steps[-1]), not with the start point's loss; reproduced on purpose.
        self.f_last = torch.zeros_like(f0) if self.autoattack else f0.clone()
        self.increases = torch.zeros_like(f0)
        self.f_max_at_check = f0.clone()
        # AutoAttack starts with "reduced at the last check" set: test (2) waits a check.
        self.halved_at_check = torch.full_like(f0, self.autoattack, dtype=torch.bool)
        self.count = 0
        self.last_check = 0

    def observe(self, f_new: torch.Tensor, f_max: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """f_new, f_max of rows `rows` (int64) of the batch, all if None; the returned mask is
        of those rows. A sample left out of a step keeps its counters (APGD stops stepping a
        sample once broken), so every other sample's decisions are those of the whole batch."""
        at = slice(None) if rows is None else rows
        self.increases[at] += (f_new > self.f_last[at]).float()
        self.f_last[at] = f_new
        self.count += 1
        if self.count not in self.checks:
            return None
        limit = self.rho * (self.count - self.last_check)
        increases = self.increases[at]
        oscillating = increases <= limit if self.autoattack else increases < limit
        stalled = ~self.halved_at_check[at] & (f_max <= self.f_max_at_check[at])
        halve = oscillating | stalled
        if not self.autoattack:  # the old rule compared the next loss with the restart point's
            self.f_last[at] = torch.where(halve, f_max, self.f_last[at])
        self.halved_at_check[at], self.f_max_at_check[at] = halve, f_max
        self.increases[at] = 0
        self.last_check = self.count
        return halve


def _bcast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *[1] * (like.dim() - 1))


@ATTACKS.register("apgd")
class APGD(Attack):
    """Auto-PGD with the CE or DLR loss; APGD-T with targeted=True (DLR-targeted by default).

    Paper: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690; the
    checkpoint schedule of AutoAttack's code (fra31/auto-attack) by default.
    Threat model: ℓ∞ or ℓ2 ball of radius eps (image units) ∩ [0, 1].
    Shapes: x [B, C, H, W] in [0, 1], y [B] → x_adv [B, C, H, W]; the target's logits are
    [B, R, K]. nfe per sample and run: steps + 1 (the start point and every iterate are
    evaluated); runs = restarts × n_target_classes.
    Each run attacks only the samples no earlier run broke (AutoAttack), and within a run each
    step only those not yet broken (a broken sample returns its breaking iterate whatever
    follows); none is left once every sample has met the goal; `sample_nfe` counts each
    sample's own evaluations. Every run
    starts from its own keyed random point, as AutoAttack draws a fresh start per run.
    Returns, per sample, the first iterate that met the goal (confirmed by `recheck` if given),
    else the highest-loss point over all runs; `broken_step` counts target steps over runs,
    run j owning steps j·(N+1) … j·(N+1)+N.

    Arguments:
        eps (float): radius in [0, 1] image units, ℓ∞ ≤ 1. Paper. (Default: required)
        steps (int): iterations N per run, ≥ 1. Paper. (Default: 100)
        norm (str): "linf" or "l2". Paper. (Default: "linf")
        loss (str): "ce" or "dlr". Paper. (Default: "ce")
        targeted (bool): APGD-T: minimise the loss towards a target class. Paper. (Default: False)
        target_mode (str): targeted only: "top" (the n-th most likely wrong class of the clean
            input, as APGD-T), "least_likely", "random" or "given". Paper. (Default: "top")
        n_target_classes (int): target classes, one run each, ≥ 1 (1 untargeted; 9 in
            AutoAttack's APGD-T). AutoAttack's. (Default: 1)
        restarts (int): runs per target class, ≥ 1. Paper. (Default: 1)
        random_start (bool): start each run at a keyed random point; False starts at x. Paper. (Default: True)
        rho (float): oscillation threshold of the step-size test (1), in (0, 1]. Paper. (Default: 0.75)
        momentum (float): α of the update after the first step, in (0, 1]. Paper. (Default: 0.75)
        initial_step (float): the first step η in units of eps, > 0. Paper. (Default: 2.0)
        eot_reduction (str): how R draws make one gradient, "mean_loss", "mean_logits" or
            "sign_sum" (pipeline.attacks.eot). Ours. (Default: "mean_loss")
        recheck_draws (int): H ≥ 0 draws of the real defense that confirm each candidate break
            (Hill et al. 2021); 0: the attack's own forward decides. Hill et al.'s. (Default: 0)
        schedule (str): the step-size checkpoints, "autoattack" (AutoAttack's code) or "paper"
            (module docstring). AutoAttack's. (Default: "autoattack")
        targeted_success (str): "target" (a targeted run breaks a sample when it hits the
            target; Paper) or "misclassified" (when it is misclassified at all, as AutoAttack's
            APGD-T counts). (Default: "target")
    """

    name = "apgd"
    checks_returned_image = True   # x_best is an evaluated iterate

    def __init__(self, eps: float, steps: int = 100, norm: str = "linf", loss: str = "ce",
                 targeted: bool = False, target_mode: str = "top", n_target_classes: int = 1,
                 restarts: int = 1, random_start: bool = True, rho: float = 0.75, momentum: float = 0.75,
                 initial_step: float = 2.0, eot_reduction: str = "mean_loss", recheck_draws: int = 0,
                 schedule: str = "autoattack", targeted_success: str = "target"):
        super().__init__(eps, norm, targeted, eot_reduction, loss, target_mode, recheck_draws)
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        if restarts < 1:
            raise ValueError(f"restarts must be ≥ 1, got {restarts}")
        if n_target_classes < 1 or (not targeted and n_target_classes != 1):
            raise ValueError("n_target_classes must be ≥ 1, and 1 for untargeted attacks")
        if not 0 < rho <= 1 or not 0 < momentum <= 1 or not initial_step > 0:
            raise ValueError("need 0 < rho ≤ 1, 0 < momentum ≤ 1, initial_step > 0")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
        if targeted_success not in TARGETED_SUCCESS:
            raise ValueError(f"unknown targeted_success {targeted_success!r}; expected one of {TARGETED_SUCCESS}")
        if targeted and targeted_success == "misclassified" and target_mode == "given":
            raise ValueError("targeted_success 'misclassified' needs the true label: target_mode ≠ 'given'")
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.n_target_classes = int(n_target_classes)
        self.random_start = bool(random_start)
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.initial_step = float(initial_step)
        self.schedule = schedule
        self.targeted_success = targeted_success
        self.checkpoints = step_size_checkpoints(self.steps, schedule)

    def params(self):
        p = {**super().params(), "steps": self.steps, "restarts": self.restarts,
             "random_start": self.random_start, "rho": self.rho, "momentum": self.momentum,
             "initial_step": self.initial_step, "schedule": self.schedule}
        if self.targeted:
            p["n_target_classes"] = self.n_target_classes
            p["targeted_success"] = self.targeted_success
        return p

    def perturb(self, target: AttackTarget, x: torch.Tensor, y: torch.Tensor,
                noise: Noise, recheck: Recheck | None = None) -> AttackResult:
        goals = self.goals(target, x, y, noise, self.n_target_classes)
        tracker = BreakTracker(x, recheck)
        B = x.shape[0]
        x_best = x.clone()
        f_best = torch.full((B,), -math.inf, device=x.device)
        best_target = torch.full((B,), -1, dtype=torch.int64, device=x.device)
        broke_on = best_target.clone()  # target of the run that broke the sample (misclassified mode)
        sample_nfe = torch.zeros(B, dtype=torch.int64, device=x.device)
        nfe = 0
        for g, goal in enumerate(goals):
            # the loss follows `goal`; with "misclassified" any wrong class counts as a break
            judge = Goal(goal.y_true, None, False) if self._any_wrong_class(goal) else goal
            for r in range(self.restarts):
                # as AutoAttack: each run attacks only the samples no earlier run broke
                rows = (~tracker.broken).nonzero().squeeze(1)
                if rows.numel() == 0:
                    break
                run = g * self.restarts + r
                was_broken = tracker.broken.clone()
                xs = x[rows]
                # a fresh start per run: per restart and per target class (AutoAttack's apgd-t)
                x0 = random_start(xs, self.eps, self.norm, noise.select(rows), index=run) if self.random_start \
                    else xs.clone()
                x_max, f_max, evals = self._run(restrict(target, rows, x), xs, x0, goal.select(rows),
                                                judge.select(rows), tracker, rows, run * (self.steps + 1))
                better = f_max > f_best[rows]
                x_best[rows] = torch.where(_bcast(better, xs), x_max, x_best[rows])
                f_best[rows] = torch.where(better, f_max, f_best[rows])
                if goal.targeted:
                    t = goal.y_target.to(x.device)
                    best_target[rows] = torch.where(better, t[rows], best_target[rows])
                    broke_on = torch.where(tracker.broken & ~was_broken, t, broke_on)
                sample_nfe[rows] += evals
                nfe = (run + 1) * (self.steps + 1)
                log.debug("apgd run %d (restart %d) on %d samples: %d/%d samples met the goal", run, r,
                          rows.numel(), int(tracker.broken.sum()), B)
        target_class = None
        if self.targeted:
            hit = broke_on if self.targeted_success == "misclassified" else tracker.target_class
            target_class = torch.where(tracker.broken, hit, best_target)
        return tracker.result(tracker.merge(x_best), nfe, target_class, sample_nfe)

    def judges_returned_image(self) -> bool:
        return not self.targeted or self.targeted_success == "misclassified"

    def _any_wrong_class(self, goal: Goal) -> bool:
        return goal.targeted and self.targeted_success == "misclassified"

    def _step(self, x: torch.Tensor, x_k: torch.Tensor, x_prev: torch.Tensor, direction: torch.Tensor,
              eta: torch.Tensor, alpha: float) -> torch.Tensor:
        z = project(x_k + _bcast(eta, x) * normalized_step(direction, self.norm), x, self.eps, self.norm)
        return project(x_k + alpha * (z - x_k) + (1 - alpha) * (x_k - x_prev), x, self.eps, self.norm)

    def _run(self, target: AttackTarget, x: torch.Tensor, x0: torch.Tensor, goal: Goal, judge: Goal,
             tracker: BreakTracker, rows: torch.Tensor, step0: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One APGD run from x0 on `goal`'s loss, breaks judged by `judge`, over rows `rows` of
        the tracker's batch (x, x0, target and goals are of those rows); returns (x_max, f_max,
        evaluations [n] of each row).

        A broken sample returns its breaking iterate (`tracker.merge`) whatever follows, so each
        step evaluates only the samples of the run not yet broken (SKIP_BROKEN), as PGD does;
        a broken sample's state freezes and every other's is the whole run's (its draws are
        keyed per sample and step, not by batch position)."""
        f_k, g_k, logits = self.loss_and_direction(target, x0, goal, step0)
        tracker.update(x0, logits, judge, step0, rows)
        evals = torch.ones(x.shape[0], dtype=torch.int64, device=x.device)
        x_k, x_prev = x0.clone(), x0.clone()
        x_max, f_max, g_max = x0.clone(), f_k.clone(), g_k.clone()
        eta = torch.full((x.shape[0],), self.initial_step * self.eps, device=x.device)
        control = StepSizeControl(f_k, self.steps, self.rho, self.schedule)
        everyone = torch.arange(x.shape[0], device=x.device)
        for k in range(self.steps):
            on = (~tracker.broken[rows]).nonzero().squeeze(1) if SKIP_BROKEN else everyone
            if on.numel() == 0:
                break
            xs, step = x[on], step0 + k + 1
            x_new = self._step(xs, x_k[on], x_prev[on], g_k[on], eta[on], 1.0 if k == 0 else self.momentum)
            f_new, g_new, logits = self.loss_and_direction(restrict(target, on, x), x_new, goal.select(on), step)
            tracker.update(x_new, logits, judge.select(on), step, rows[on])
            evals[on] += 1
            better = f_new > f_max[on]
            x_max[on] = torch.where(_bcast(better, xs), x_new, x_max[on])
            g_max[on] = torch.where(_bcast(better, xs), g_new, g_max[on])
            f_max[on] = torch.where(better, f_new, f_max[on])
            x_prev[on], x_k[on], g_k[on] = x_k[on], x_new, g_new
            halve = control.observe(f_new, f_max[on], on)
            if halve is not None:
                eta[on] = torch.where(halve, eta[on] / 2, eta[on])
                hb = _bcast(halve, xs)
                x_k[on] = torch.where(hb, x_max[on], x_k[on])
                g_k[on] = torch.where(hb, g_max[on], g_k[on])
                x_prev[on] = torch.where(hb, x_k[on], x_prev[on])  # restart: no momentum carried over (ours)
        return x_max, f_max, evals
