"""Square Attack — Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020.

Score-based random search: no gradients, only forward queries. From a first point on the
boundary of the ε-ball (ℓ∞: vertical stripes of ±ε, Alg. 1; ℓ2: a grid of the patch below,
§3.2), every query proposes a change inside a random square window and keeps it if the loss
went down (or the goal is met). The window covers a fraction p of the pixels, p halving by
a fixed table of iterations (the reference code's `p_selection`).

  ℓ∞ (Alg. 2): the window is set to x ± ε, one random sign per channel.
  ℓ2 (Alg. 3): the ℓ2 mass of the window and of a second random window is moved into the
  first as a signed "double ring" patch (+ on one half, − on the other, weights Σ 1/(r+1)²
  by ring r), plus the old content; the whole perturbation is then rescaled to norm ε.

Loss: untargeted, the margin z_y − max_{j≠y} z_j; targeted, CE to the target (success when
max_{j≠t} z_j − z_t ≤ 0) — both on the logits averaged over the target's R draws.

Differences from the reference code (fra31/auto-attack, autoattack/square.py), all ours:
positions, signs and patch orientations are drawn per sample from the keyed `noise` (the
reference shares one window per iteration across the batch); a window may start at any of the
h − s + 1 rows (the reference never picks the last one); the ℓ2 start grid crops a patch
that would cross the image border instead of failing.
"""
from __future__ import annotations

import bisect
import functools
import math

import torch
import torch.nn.functional as F

from pipeline.attacks.base import (
    Attack,
    AttackResult,
    AttackTarget,
    BreakTracker,
    Goal,
    Recheck,
    project,
    restrict,
)
from pipeline.registry import ATTACKS
from pipeline.seeding import Noise

# iterations after which p halves again (the reference's p_selection table)
P_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(it: int, p_init: float, n_queries: int, rescale: bool = True) -> float:
    """Fraction of pixels changed at iteration `it` (0-based). With `rescale` the table, written
    for 10,000 queries, is stretched to n_queries as the reference does (resc_schedule=True);
    AutoAttack itself runs it unscaled."""
    if rescale:
        it = int(it / n_queries * 10000)
    return p_init / 2 ** bisect.bisect_left(P_BOUNDS, it)


def square_side(p: float, h: int, w: int, norm: str) -> int:
    """Side of a window covering ≈ p·h·w pixels: ≥ 1 (ℓ∞), odd and ≥ 3 (ℓ2), ≤ min(h, w)."""
    s = int(round(math.sqrt(p * h * w)))
    if norm == "linf":
        s = max(s, 1)
    else:
        s = max(s, 3)
        s += 1 - s % 2
    return min(s, h, w)


def centred_rings(a: int, b: int) -> torch.Tensor:
    """[a, b]: cell (i, j) holds Σ_{r=d}^{R−1} 1/(r+1)², d its Chebyshev distance to the
    centre cell (a//2, b//2), R = max(a//2, b//2) + 1 — nested rectangles, heavier inside."""
    R = max(a // 2, b // 2) + 1
    w = 1.0 / torch.arange(1, R + 1, dtype=torch.float32) ** 2
    tail = w.flip(0).cumsum(0).flip(0)  # tail[d] = Σ_{r ≥ d} w[r]
    di = (torch.arange(a) - a // 2).abs()
    dj = (torch.arange(b) - b // 2).abs()
    return tail[torch.maximum(di[:, None], dj[None, :])]


@functools.lru_cache(maxsize=64)
def l2_patch(s: int) -> torch.Tensor:
    """[s, s] unit-ℓ2 update shape: rings on the top s//2 rows, minus rings below, each half
    of equal norm (paper §3.2, Fig. 2). Cached: callers must not modify it in place."""
    halves = []
    for rows, sign in ((s // 2, 1.0), (s - s // 2, -1.0)):
        h = centred_rings(rows, s)
        halves.append(sign * h / h.norm().clamp_min(1e-12))
    patch = torch.cat(halves, 0)
    return patch / patch.norm()


def square_mask(row: torch.Tensor, col: torch.Tensor, s: int, h: int, w: int) -> torch.Tensor:
    """[B, 1, h, w] bool: the s×s window at (row[b], col[b]) of every sample."""
    r = torch.arange(h, device=row.device)
    c = torch.arange(w, device=col.device)
    in_r = (r >= row[:, None]) & (r < row[:, None] + s)
    in_c = (c >= col[:, None]) & (c < col[:, None] + s)
    return (in_r[:, :, None] & in_c[:, None, :]).unsqueeze(1)


def _window_index(row: torch.Tensor, col: torch.Tensor, s: int):
    ar = torch.arange(s, device=row.device)
    b = torch.arange(row.shape[0], device=row.device)
    return b[:, None, None], (row[:, None] + ar)[:, :, None], (col[:, None] + ar)[:, None, :]


def _read_window(t: torch.Tensor, idx) -> torch.Tensor:
    return t[idx[0], :, idx[1], idx[2]].permute(0, 3, 1, 2)  # [B, s, s, C] → [B, C, s, s]


def _l2_rescale(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """x + ε·δ/‖δ‖₂ projected onto the ball ∩ [0, 1]: the reference always uses the full budget."""
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    return project(x + eps * delta / n, x, eps, "l2")


def margin_and_loss(logits: torch.Tensor, goal: Goal) -> tuple[torch.Tensor, torch.Tensor]:
    """(margin [B], loss [B]) from logits [B, R, K] averaged over draws; both are minimised,
    margin ≤ 0 means the goal is met."""
    z = logits.mean(1).float()
    cls = (goal.y_target if goal.targeted else goal.y_true).to(z.device).view(-1, 1)
    z_c = z.gather(1, cls).squeeze(1)
    other = z.scatter(1, cls, float("-inf")).amax(1)
    if goal.targeted:
        return other - z_c, F.cross_entropy(z, cls.view(-1), reduction="none")
    return z_c - other, z_c - other


@ATTACKS.register("square")
class Square(Attack):
    """Square Attack: gradient-free random search on the margin (untargeted) or CE (targeted) loss.

    Paper: Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient black-box
    adversarial attack via random search", ECCV 2020, https://arxiv.org/abs/1912.00049 (as used
    in AutoAttack; differences from the reference code in the module docstring).
    Threat model: ℓ∞ or ℓ2 ball of radius eps (image units) ∩ [0, 1].
    Shapes: x [B, C, H, W] in [0, 1], y [B] → x_adv [B, C, H, W]; the target's logits are
    [B, R, K], averaged over R. nfe per sample ≤ n_queries + 1 (`sample_nfe`: each sample's own).
    Query 0 is the start point, query i + 1 the proposal of iteration i (the target's `step`).
    Each iteration queries only the samples not yet broken (AutoAttack), so the run stops once
    every sample has met the goal. Returns, per sample, the first query that met the goal
    (confirmed by `recheck` if given), else the last accepted point.

    Arguments:
        eps (float): radius in [0, 1] image units, ℓ∞ ≤ 1. Paper. (Default: required)
        norm (str): "linf" or "l2". Paper. (Default: "linf")
        n_queries (int): iterations after the first query, ≥ 1. Paper. (Default: 5000)
        p_init (float): fraction of pixels in the first windows, in (0, 1]. Paper. (Default: 0.8)
        rescale_schedule (bool): stretch the p table (written for 10,000 queries) to n_queries,
            as the reference code's resc_schedule=True; False runs it unscaled, as AutoAttack
            does. Reference code's. (Default: True)
        targeted (bool): CE towards a target class instead of the margin. Paper. (Default: False)
        target_mode (str): targeted only: "given" (y is the target), "top", "least_likely" or
            "random" (y is the true label; see Attack). Ours. (Default: "given")
        recheck_draws (int): H ≥ 0 draws of the real defense that confirm each candidate break
            (Hill et al. 2021); 0: the attack's own forward decides. Hill et al.'s. (Default: 0)
    """

    name = "square"
    checks_returned_image = True   # x_best is a queried point
    uses_gradient = False

    def __init__(self, eps: float, norm: str = "linf", n_queries: int = 5000, p_init: float = 0.8,
                 rescale_schedule: bool = True, targeted: bool = False, target_mode: str = "given",
                 recheck_draws: int = 0):
        # the loss is the margin / CE of the mean logits, whatever the base class records
        super().__init__(eps, norm, targeted, "mean_logits", "ce", target_mode, recheck_draws)
        if int(n_queries) < 1:
            raise ValueError(f"n_queries must be ≥ 1, got {n_queries}")
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init}")
        self.n_queries = int(n_queries)
        self.p_init = float(p_init)
        self.rescale_schedule = bool(rescale_schedule)

    def params(self):
        p = {"eps": self.eps, "norm": self.norm, "n_queries": self.n_queries, "p_init": self.p_init,
             "rescale_schedule": self.rescale_schedule, "targeted": self.targeted}
        if self.targeted:
            p["target_mode"] = self.target_mode
        if self.recheck_draws:
            p["recheck_draws"] = self.recheck_draws
        return p

    def perturb(self, target: AttackTarget, x: torch.Tensor, y: torch.Tensor,
                noise: Noise, recheck: Recheck | None = None) -> AttackResult:
        (goal,) = self.goals(target, x, y, noise)
        tracker = BreakTracker(x, recheck)
        x_best = self._init_linf(x, noise) if self.norm == "linf" else self._init_l2(x, noise)
        logits = _query(target, x_best, 0)
        tracker.update(x_best, logits, goal, 0)
        _, loss_min = margin_and_loss(logits, goal)
        nfe = 1
        sample_nfe = torch.ones(x.shape[0], dtype=torch.int64, device=x.device)
        propose = self._propose_linf if self.norm == "linf" else self._propose_l2
        rows = torch.empty(0, dtype=torch.int64)
        for i in range(self.n_queries):
            # as AutoAttack: only the samples not yet broken are queried
            active = (~tracker.broken).nonzero().squeeze(1).to(x.device)
            if active.numel() == 0:
                break
            if active.numel() != rows.numel():   # breaks only add up: a sample broke, new sub-batch
                rows, sub_target, sub_noise, sub_goal = active, restrict(target, active, x), \
                    noise.select(active), goal.select(active)
            x_new = propose(x[rows], x_best[rows], sub_noise, i)
            logits = _query(sub_target, x_new, i + 1)
            nfe += 1
            sample_nfe[rows] += 1
            tracker.update(x_new, logits, sub_goal, i + 1, rows)
            margin, loss = margin_and_loss(logits, sub_goal)
            improved = loss < loss_min[rows]
            accept = improved | (margin <= 0)  # an unconfirmed candidate is kept too
            loss_min[rows] = torch.where(improved, loss, loss_min[rows])
            x_best[rows] = torch.where(accept.view(-1, *[1] * (x.dim() - 1)), x_new, x_best[rows])
        return tracker.result(tracker.merge(x_best), nfe, goal.y_target if self.targeted else None, sample_nfe)

    # ------------------------------------------------------------------ ℓ∞

    def _init_linf(self, x: torch.Tensor, noise: Noise) -> torch.Tensor:
        _, C, _, W = x.shape
        sign = noise.randint((C, 1, W), "square_init", high=2).to(x) * 2 - 1  # one sign per column
        return project(x + self.eps * sign, x, self.eps, "linf")

    def _propose_linf(self, x: torch.Tensor, x_best: torch.Tensor, noise: Noise, i: int) -> torch.Tensor:
        _, C, H, W = x.shape
        s = square_side(self._p(i), H, W, "linf")
        u = _draws(noise, i, 2 + C, x.device)
        row, col = u[:, 0] % (H - s + 1), u[:, 1] % (W - s + 1)
        sign = (u[:, 2:] % 2).to(x).view(-1, C, 1, 1) * 2 - 1
        # +2ε·sign and projection set the window to x ± ε (then [0, 1])
        step = 2 * self.eps * sign * square_mask(row, col, s, H, W)
        return project(x_best + step, x, self.eps, "linf")

    # ------------------------------------------------------------------ ℓ2

    def _init_l2(self, x: torch.Tensor, noise: Noise) -> torch.Tensor:
        B, C, H, W = x.shape
        s = max(H // 5, 1)
        starts_r = [(H - 5 * s) // 2 + k * s for k in range(H // s)]
        starts_c = [max((W - 5 * s) // 2, 0) + k * s for k in range(W // s)]
        cells = [(r, c) for r in starts_r for c in starts_c if r < H and c < W]
        signs = noise.randint((len(cells), C), "square_init_sign", high=2).to(x) * 2 - 1
        flips = noise.randint((len(cells),), "square_init_flip", high=2).to(x.device).bool()
        patch = l2_patch(s).to(x)
        delta = torch.zeros_like(x)
        for n, (r, c) in enumerate(cells):
            p = torch.where(flips[:, n].view(-1, 1, 1, 1), patch.T, patch)  # [B, 1, s, s]
            hh, ww = min(s, H - r), min(s, W - c)  # crop a cell crossing the border
            delta[:, :, r:r + hh, c:c + ww] += (p * signs[:, n].view(B, C, 1, 1))[:, :, :hh, :ww]
        return _l2_rescale(x, delta, self.eps)

    def _propose_l2(self, x: torch.Tensor, x_best: torch.Tensor, noise: Noise, i: int) -> torch.Tensor:
        B, C, H, W = x.shape
        s = square_side(self._p(i), H, W, "l2")
        delta = x_best - x
        u = _draws(noise, i, 5 + C, x.device)
        row1, col1 = u[:, 0] % (H - s + 1), u[:, 1] % (W - s + 1)
        row2, col2 = u[:, 2] % (H - s + 1), u[:, 3] % (W - s + 1)
        flip = (u[:, 4] % 2).bool().view(-1, 1, 1, 1)
        sign = (u[:, 5:] % 2).to(x).view(-1, C, 1, 1) * 2 - 1
        idx1 = _window_index(row1, col1, s)
        both = square_mask(row1, col1, s, H, W) | square_mask(row2, col2, s, H, W)
        old = _read_window(delta, idx1)                                       # [B, C, s, s]
        n_old = old.square().sum((-2, -1), keepdim=True).sqrt()               # [B, C, 1, 1]
        n_img = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        n_both = (delta * both).square().sum((-2, -1), keepdim=True).sqrt()   # [B, C, 1, 1]
        patch = l2_patch(s).to(x)
        new = torch.where(flip, patch.T, patch) * sign + old / (n_old + 1e-12)
        # the window takes the mass of both windows plus a share of the unused budget
        budget = ((self.eps ** 2 - n_img ** 2).clamp_min(0) / C + n_both ** 2).sqrt()
        new = new / (new.square().sum((-2, -1), keepdim=True).sqrt() + 1e-12) * budget
        delta = delta * ~both  # window 2 is emptied (window 1 is rewritten below)
        delta[idx1[0], :, idx1[1], idx1[2]] = new.permute(0, 2, 3, 1)
        return _l2_rescale(x, delta, self.eps)

    # ------------------------------------------------------------------ shared

    def _p(self, i: int) -> float:
        return p_schedule(i, self.p_init, self.n_queries, self.rescale_schedule)



def _draws(noise: Noise, i: int, n: int, device: torch.device) -> torch.Tensor:
    """[B, n] keyed integers in [0, 2³¹) for iteration i, one hash call for all of them
    (positions, flips, signs): taken modulo small ranges, the bias is below 2⁻²⁰."""
    return noise.randint((n,), "square", high=2 ** 31, step=i).to(device)


def _query(target: AttackTarget, x: torch.Tensor, step: int) -> torch.Tensor:
    with torch.no_grad():  # score-based: forward only
        return target(x, step)
