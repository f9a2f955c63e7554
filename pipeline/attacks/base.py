"""The attack interface, threat-model projection, attack goals and break tracking.

An attack never sees the defense's internals. It gets an `AttackTarget`: a callable
`target(x, step) -> logits [B, R, K]` that is differentiable in x. R is the number of
EOT draws (1 for a deterministic model); the target decides how gradients pass the
purifier (full gradient or BPDA) and keys fresh randomness to every step. Attacks number
their target calls: step t ≥ 0 for iterate t (restarts continue the count), −1 for the
clean forward that picks target classes. Randomness of the attack itself (random start,
random targets) comes only from its `noise` argument, keyed per sample, never from torch's
global generator — so a sample's adversarial example does not depend on its batch.

Call: `attack(target, x, y, noise, recheck=None) -> AttackResult`.

`recheck` (optional, see `Recheck`) is how an evaluation loop confirms a break with a
larger draw count (Hill et al. 2021: "EOT defense" with H = 150 draws). An attack whose
`recheck_draws` > 0 must be given one; `pipeline.attacks.recheck.make_defense_recheck`
builds it from a Defense.

Template for an attack's docstring (after torchattacks):
    Paper. Threat model. Arguments with defaults and ranges.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pipeline.attacks.eot import EOT_REDUCTIONS, LOSSES, eot_gradient
from pipeline.seeding import Noise

NORMS = ("linf", "l2")
TARGET_MODES = ("given", "top", "least_likely", "random")
SELECT_STEP = -1  # the target call that picks target classes from the clean input
SAMPLE_CHUNKS = True  # EOT gradients per chunk of samples (`eot_step`); False: one call (benchmarks)


class AttackTarget(Protocol):
    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """logits [B, R, K] for inputs x [B, C, H, W]; `step` keys the draws.

        A target may also offer `select_rows(rows) -> AttackTarget`: the same view for rows
        `rows` [n] of the batch only, each keeping its own keyed draws (see `restrict`), and
        with it `sample_chunk() -> int`: how many samples one gradient call should take
        (read at call time; see `eot_step`)."""


class Recheck(Protocol):
    def __call__(self, x_sub: torch.Tensor, idx: torch.Tensor, step: int) -> torch.Tensor:
        """Logits [n, H, K] of the real defense (H draws, no gradient needed) for rows
        x_sub [n, C, H, W] of the batch; idx [n] int64 are their positions in the batch (to
        pick the samples' keys); `step` is the attack step, so every check gets fresh draws."""


@dataclass
class AttackResult:
    x_adv: torch.Tensor          # [B, C, H, W], within the ε-ball and [0, 1]
    broken_step: torch.Tensor    # [B] int64: first step whose forward pass met the goal, -1 never
    nfe: int                     # target evaluations (forward + backward) per sample
    target_class: torch.Tensor | None = None  # [B] int64 for targeted attacks, else None
    candidate_step: torch.Tensor | None = None  # [B] first step the attack's own forward met the
                                                # goal (None: same as broken_step)
    sample_nfe: torch.Tensor | None = None      # [B] int64 target evaluations of each sample, where
                                                # attacks skip broken ones (None: `nfe` for all)
    nonfinite: torch.Tensor | None = None       # [B] bool: a forward or re-check of the sample gave
                                                # NaN / inf logits (None: not tracked)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project x_adv onto {‖x_adv − x‖ ≤ ε} ∩ [0, 1]^d.

    ℓ∞: exact (box ∩ box). ℓ2: radial projection onto the ball, then clipping to [0, 1];
    clipping only moves coordinates towards x (x ∈ [0, 1]), so the result stays in the ball.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (eps / n).clamp(max=1.0).view(-1, *[1] * (x.dim() - 1))
    else:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    return (x + delta).clamp(0.0, 1.0)


def normalized_step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign(g) for ℓ∞, g/‖g‖₂ for ℓ2."""
    if norm == "linf":
        return grad.sign()
    n = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad / n.view(-1, *[1] * (grad.dim() - 1))


def random_start(x: torch.Tensor, eps: float, norm: str, noise: Noise, index: int = 0) -> torch.Tensor:
    """A uniform point of the ε-ball (ℓ∞) or a point on a uniformly random direction at a
    uniform radius (ℓ2). `index` selects independent starts (restarts)."""
    shape = tuple(x.shape[1:])
    if norm == "linf":
        delta = noise.uniform(shape, "random_start", step=index, low=-eps, high=eps).to(x)
    else:
        d = noise.normal(shape, "random_start", step=index).to(x)
        d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * len(shape))
        r = noise.uniform((1,), "random_start_radius", step=index).to(x).view(-1, *[1] * len(shape))
        delta = d * r * eps
    return project(x + delta, x, eps, norm)


def restrict(target: AttackTarget, rows: torch.Tensor, x: torch.Tensor) -> AttackTarget:
    """The target for rows `rows` [n] (int64, increasing) of the batch x only, so that an
    attack evaluates just the samples it still works on (AutoAttack attacks only the unbroken
    ones). A target with `select_rows` (the Defense's views) builds it, keeping each sample's
    keyed draws; any other target is called on the whole batch — x with these rows replaced —
    and its answer for these rows returned: the same logits, no work saved."""
    if rows.numel() == x.shape[0]:
        return target
    select_rows = getattr(target, "select_rows", None)
    if callable(select_rows):
        return select_rows(rows)
    base = x.detach()

    def sub(x_sub: torch.Tensor, step: int) -> torch.Tensor:
        full = base.index_copy(0, rows.to(base.device), x_sub)   # differentiable in x_sub
        out = target(full, step)
        return out[rows.to(out.device)]

    return sub


@dataclass
class Goal:
    """What an attack run is after: y_true (untargeted, or targeted with known labels) and
    y_target (targeted). Success is judged on the mean logits over the draws."""

    y_true: torch.Tensor | None
    y_target: torch.Tensor | None
    targeted: bool

    def select(self, rows: torch.Tensor) -> Goal:
        """The goal of rows `rows` of the batch."""
        pick = (lambda t: None if t is None else t[rows.to(t.device)])
        return Goal(pick(self.y_true), pick(self.y_target), self.targeted)

    def success(self, logits: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """[n] bool for logits [n, R, K] of rows idx (all rows if None)."""
        pick = (lambda t: t if idx is None else t[idx])
        pred = logits.mean(1).argmax(1)
        if self.targeted:
            return pred == pick(self.y_target).to(pred.device)
        return pred != pick(self.y_true).to(pred.device)


class BreakTracker:
    """Per sample: the first step whose attack-time forward met the goal (a *candidate*),
    and the first step a break was *confirmed* — by `recheck` (fresh draws of the real
    defense) if given, else by that forward itself — with the iterate of that step. Once
    confirmed, a sample stays broken (Hill et al. 2021); an unconfirmed candidate is not a
    break: the attack keeps pushing it, and it is re-checked whenever it meets the goal again."""

    def __init__(self, x: torch.Tensor, recheck: Recheck | None = None):
        B = x.shape[0]
        self.candidate_step = torch.full((B,), -1, dtype=torch.int64, device=x.device)
        self.broken_step = torch.full((B,), -1, dtype=torch.int64, device=x.device)
        self.x_broken = x.detach().clone()
        self.target_class = torch.full((B,), -1, dtype=torch.int64, device=x.device)
        self.nonfinite = torch.zeros(B, dtype=torch.bool, device=x.device)
        self.recheck = recheck

    @property
    def broken(self) -> torch.Tensor:
        return self.broken_step >= 0

    def update(self, x_adv: torch.Tensor, logits: torch.Tensor, goal: Goal, step: int,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """Mark samples newly broken at this step; returns the mask of new breaks. x_adv,
        logits and goal are of the batch, or (with `rows` [n], int64) of those rows of it."""
        rows = torch.arange(self.broken_step.shape[0], device=self.broken_step.device) if rows is None \
            else rows.to(self.broken_step.device)
        # NaN / inf logits (a diverged purifier) break nothing: argmax of garbage is no break, and
        # the row's final evaluation then reports it as non-finite
        finite = torch.isfinite(logits).flatten(1).all(1).to(rows.device)
        self.nonfinite[rows[~finite]] = True
        new = goal.success(logits).to(rows.device) & finite & ~self.broken[rows]
        first = new & (self.candidate_step[rows] < 0)
        self.candidate_step[rows[first]] = step
        if self.recheck is not None and bool(new.any()):
            idx = new.nonzero().squeeze(1)
            confirm_logits = self.recheck(x_adv[idx].detach(), rows[idx], step)  # positions in the batch
            checked = torch.isfinite(confirm_logits).flatten(1).all(1)
            confirmed = goal.success(confirm_logits, idx) & checked
            self.nonfinite[rows[idx[~checked.to(idx.device)]]] = True
            ok = confirmed.to(new.device)
            new = torch.zeros_like(new)
            new[idx[ok]] = True
        if bool(new.any()):
            at = rows[new]
            self.broken_step[at] = step
            self.x_broken[at] = x_adv.detach()[new.to(x_adv.device)].to(self.x_broken.device)
            if goal.targeted:
                self.target_class[at] = goal.y_target.to(new.device)[new]
        return new

    def result(self, x_adv: torch.Tensor, nfe: int, target_class: torch.Tensor | None = None,
               sample_nfe: torch.Tensor | None = None) -> AttackResult:
        """The attack's result with this tracker's candidate and confirmed steps."""
        return AttackResult(x_adv.detach(), self.broken_step, nfe, target_class, self.candidate_step, sample_nfe,
                            self.nonfinite)

    def merge(self, x_other: torch.Tensor) -> torch.Tensor:
        """The breaking iterate where broken, x_other elsewhere."""
        mask = self.broken.view(-1, *[1] * (x_other.dim() - 1))
        return torch.where(mask, self.x_broken, x_other.detach())


class Attack:
    """Base class. Subclasses implement `perturb`; constructor arguments are the whole config.

    Common arguments:
      eps: radius in [0, 1] image units (ℓ∞ ≤ 1); norm: "linf" | "l2";
      targeted: False; target_mode (targeted only): "given" — y passed in *is* the target
        class (the caller chooses); "top" — the most likely wrong class of the clean input;
        "least_likely"; "random" — keyed uniform over the other classes. With every mode but
        "given", y is the true label.
      eot_reduction: "mean_loss" | "mean_logits" | "sign_sum" (see pipeline.attacks.eot);
      loss: "ce" | "dlr" (targeted DLR needs the true label: target_mode ≠ "given");
      recheck_draws: H > 0 asks the evaluation loop for a `recheck` of every candidate break
        with H draws of the real defense (Hill et al. 2021); 0 = the attack's own forward decides.
    """

    name: str = "attack"
    # False for an attack that only queries the defense's outputs (listed, torch-free, in
    # vocabulary.GRADIENT_FREE_ATTACKS so that the report knows without importing attacks)
    uses_gradient: bool = True
    # True for an attack whose forward has evaluated (and, with a recheck, judged) the image it
    # returns, so its confirmed breaks alone can decide a verdict (evaluation.verdict: recheck)
    checks_returned_image: bool = False

    def __init__(self, eps: float, norm: str = "linf", targeted: bool = False,
                 eot_reduction: str = "mean_loss", loss: str = "ce", target_mode: str = "given",
                 recheck_draws: int = 0):
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
        if not eps >= 0:
            raise ValueError(f"eps must be ≥ 0 (images are in [0, 1]), got {eps}")
        if norm == "linf" and eps > 1:
            raise ValueError(f"ℓ∞ eps is in [0, 1] image units; got {eps} (did you mean {eps}/255?)")
        if eot_reduction not in EOT_REDUCTIONS:
            raise ValueError(f"unknown eot_reduction {eot_reduction!r}; expected one of {EOT_REDUCTIONS}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
        if target_mode not in TARGET_MODES:
            raise ValueError(f"unknown target_mode {target_mode!r}; expected one of {TARGET_MODES}")
        if targeted and loss == "dlr" and target_mode == "given":
            raise ValueError("targeted DLR needs the true label: use target_mode 'top', "
                             "'least_likely' or 'random' (y is then the true label)")
        if int(recheck_draws) < 0:
            raise ValueError(f"recheck_draws must be ≥ 0, got {recheck_draws}")
        self.eps = float(eps)
        self.norm = norm
        self.targeted = bool(targeted)
        self.eot_reduction = eot_reduction
        self.loss = loss
        self.target_mode = target_mode
        self.recheck_draws = int(recheck_draws)

    def judges_returned_image(self) -> bool:
        """Whether a sample without a confirmed break is one whose returned image no check
        found misclassified: the image was evaluated and a break means any wrong class."""
        return self.checks_returned_image and not self.targeted

    def params(self) -> dict[str, Any]:
        p = {"eps": self.eps, "norm": self.norm, "targeted": self.targeted,
             "eot_reduction": self.eot_reduction, "loss": self.loss}
        if self.targeted:
            p["target_mode"] = self.target_mode
        if self.recheck_draws:
            p["recheck_draws"] = self.recheck_draws
        return p

    def __call__(self, target: AttackTarget, x: torch.Tensor, y: torch.Tensor,
                 noise: Noise, recheck: Recheck | None = None) -> AttackResult:
        if self.recheck_draws and recheck is None:
            raise ValueError(
                f"attack {self.name!r} has recheck_draws={self.recheck_draws}: pass recheck= "
                "(build it with pipeline.attacks.recheck.make_defense_recheck)")
        if self.eps == 0:
            never = torch.full((x.shape[0],), -1, dtype=torch.int64)
            return AttackResult(x.detach().clone(), never, 0, candidate_step=never)
        return self.perturb(target, x.detach(), y, noise, recheck)

    def perturb(self, target: AttackTarget, x: torch.Tensor, y: torch.Tensor,
                noise: Noise, recheck: Recheck | None = None) -> AttackResult:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses

    def goals(self, target: AttackTarget, x: torch.Tensor, y: torch.Tensor, noise: Noise,
              count: int = 1) -> list[Goal]:
        """The goal(s) of this call: one untargeted goal, or `count` target classes
        (rank 1..count of the target mode: APGD-T runs one per rank)."""
        if not self.targeted:
            return [Goal(y, None, False)]
        if self.target_mode == "given":
            if count != 1:
                raise ValueError("target_mode 'given' supplies exactly one target class")
            return [Goal(None, y, True)]
        with torch.no_grad():  # picking classes needs no gradient
            z = target(x, SELECT_STEP).mean(1)
        K = z.shape[1]
        if count > K - 1:
            raise ValueError(f"{count} target classes asked for, only {K - 1} wrong classes")
        y_dev = y.to(z.device)
        goals = []
        for rank in range(1, count + 1):
            if self.target_mode in ("top", "least_likely"):
                ranked = z.scatter(1, y_dev.view(-1, 1), float("-inf") if self.target_mode == "top" else float("inf"))
                order = ranked.argsort(1, descending=self.target_mode == "top")
                t = order[:, rank - 1]
            else:  # random, keyed per sample
                r = noise.randint((1,), "target_class", high=K - 1, step=rank - 1).view(-1).to(z.device)
                t = (y_dev + 1 + r) % K
            goals.append(Goal(y, t.to(y.device), True))
        return goals

    def loss_and_direction(self, target: AttackTarget, x_adv: torch.Tensor, goal: Goal,
                 step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(objective [B], ascent direction, logits [B, R, K]) at x_adv."""
        return eot_step(target, x_adv, goal, step, self.loss, self.eot_reduction)


def sample_chunk(target: AttackTarget, batch: int) -> int:
    """Samples per forward-and-backward call: the target's `sample_chunk()` where it offers
    one (with `select_rows`, and SAMPLE_CHUNKS on), else the whole batch."""
    chunk = getattr(target, "sample_chunk", None)
    if not SAMPLE_CHUNKS or not callable(chunk) or not callable(getattr(target, "select_rows", None)):
        return batch
    return max(1, int(chunk()))


def eot_step(target: AttackTarget, x: torch.Tensor, goal: Goal, step: int, loss: str = "ce",
             reduction: str = "mean_loss") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(objective [B], ascent direction, logits [B, R, K]) at x: one EOT gradient step.

    Forward and backward run per chunk of samples (`sample_chunk`), each sample's R draws
    together, as AutoAttack runs forward and backward per draw: only one chunk's graph is held
    at a time, not the whole batch × EOT (half the peak memory, a few per cent less CPU:
    BENCHMARKS.md "Forward and backward per chunk of samples"). Every EOT reduction is per
    sample and the views keep each sample's keyed draws, so the result is the whole batch's up
    to float rounding."""
    B = x.shape[0]
    chunk = sample_chunk(target, B)
    if chunk >= B:
        return _eot_step(target, x, goal, step, loss, reduction)
    parts = []
    for i in range(0, B, chunk):
        rows = torch.arange(i, min(B, i + chunk), device=x.device)
        parts.append(_eot_step(target.select_rows(rows), x[i:i + chunk], goal.select(rows), step, loss, reduction))
    obj, direction, logits = zip(*parts)
    return torch.cat(obj), torch.cat(direction), torch.cat(logits)


def _eot_step(target: AttackTarget, x: torch.Tensor, goal: Goal, step: int, loss: str,
              reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = target(x, step)
        obj, direction = eot_gradient(logits, x, goal.y_true, goal.y_target, loss, reduction, goal.targeted)
    return obj.detach(), direction.detach(), logits.detach()
