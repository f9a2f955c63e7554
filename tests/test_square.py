"""Square Attack: threat model, batch independence, closed-form linear cases, stochastic
targets, no gradients, and the pieces taken from the reference code (p table, ℓ2 patch)."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.attacks.square import Square, centred_rings, l2_patch, p_schedule, square_side
from pipeline.registry import ATTACKS
from pipeline.seeding import Noise

torch.set_num_threads(1)

K, C, H, W = 4, 3, 8, 8


class Linear:
    """logits = V·x (+ antithetic keyed noise when R > 1, so the mean over draws is V·x).

    The product runs in float64 and is rounded to float32, so a row's logits do not depend on
    how many rows share the call (BLAS may sum a batch in another order)."""

    def __init__(self, keys, R: int = 1, sigma: float = 0.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.V = torch.randn(K, C * H * W, generator=g, dtype=torch.float64) * 0.1
        self.keys, self.R, self.sigma = list(keys), R, sigma
        self.calls = 0

    def clean(self, x):
        return (x.flatten(1).double() @ self.V.T).float()

    def __call__(self, x, step):
        if x.requires_grad or torch.is_grad_enabled():
            raise AssertionError("Square must query without gradients")
        self.calls += 1
        z = self.clean(x).unsqueeze(1)                                # [B, 1, K]
        if self.R == 1:
            return z
        n = Noise.for_batch(0, self.keys, f"draws/step{step}", self.R // 2).normal((K,), "draw")
        n = self.sigma * n.view(x.shape[0], self.R // 2, K)
        return torch.cat([z + n, z - n], 1)                           # [B, R, K], mean = z

    def thresholds(self, x, y):
        """Per sample: the smallest ε that can flip it when the box [0, 1] is not active,
        min over j ≠ y of (z_y − z_j) / ‖v_y − v_j‖_* (ℓ∞: dual ℓ1; ℓ2: dual ℓ2), and for ℓ2
        the largest coordinate of the optimal unit direction (v_y − v_j*)/‖v_y − v_j*‖₂."""
        z = self.clean(x).double()
        v = self.V[y][:, None, :] - self.V[None]                      # [B, K, d]
        m = z.gather(1, y[:, None]) - z
        rows = torch.arange(len(y))
        out = []
        for dual in (v.abs().sum(-1), v.norm(dim=-1)):
            ratio = m / dual.clamp_min(1e-12)
            ratio[rows, y] = float("inf")
            out.append(ratio.min(1))
        v_best = v[rows, out[1].indices]
        peak = v_best.abs().amax(1) / v_best.norm(dim=1)
        return out[0].values.float(), out[1].values.float(), peak.float()


def _batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.4 * torch.rand(n, C, H, W, generator=g)  # ≥ 0.3 from the box: ε ≤ 0.3 never clips
    keys = [f"s{i}" for i in range(n)]
    return x, keys


def _attack(target, x, keys, y, **kw):
    return Square(**kw)(target, x, y, Noise.for_batch(5, keys, "square"))


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_stays_in_ball_and_box(norm, eps):
    x, keys = _batch()
    x[:2] = (x[:2] > 0.5).float()       # images on the box's corners exercise the clipping
    x[2, 0] = 0.0
    lin = Linear(keys)
    y = lin.clean(x).argmax(1)
    r = _attack(lin, x, keys, y, eps=eps, norm=norm, n_queries=150)
    d = (r.x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    assert (size[3:] > 0.5 * eps).all()  # it does use the budget (ℓ2: the reference keeps ‖δ‖ = ε)


@pytest.mark.parametrize("norm,eps", [("linf", 0.02), ("l2", 0.3)])
def test_same_key_same_result_alone_or_in_a_batch(norm, eps):
    x, keys = _batch(8)
    y = Linear(keys).clean(x).argmax(1)
    full = _attack(Linear(keys, R=4, sigma=0.05), x, keys, y, eps=eps, norm=norm, n_queries=120)
    for i in (0, 3, 7):
        one = _attack(Linear([keys[i]], R=4, sigma=0.05), x[i:i + 1], [keys[i]], y[i:i + 1],
                      eps=eps, norm=norm, n_queries=120)
        assert torch.allclose(one.x_adv, full.x_adv[i:i + 1], atol=1e-6)
        assert torch.equal(one.broken_step, full.broken_step[i:i + 1])
    rev = list(range(7, -1, -1))
    shuffled = _attack(Linear([keys[i] for i in rev], R=4, sigma=0.05), x[rev], [keys[i] for i in rev],
                       y[rev], eps=eps, norm=norm, n_queries=120)
    assert torch.allclose(shuffled.x_adv, full.x_adv[rev], atol=1e-6)
    other = Square(eps=eps, norm=norm, n_queries=120)(Linear(keys, R=4, sigma=0.05), x, y,
                                                       Noise.for_batch(6, keys, "square"))
    assert not torch.equal(other.x_adv, full.x_adv)  # other keys → other random squares


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_linear_model_closed_form(norm):
    x, keys = _batch(8)
    lin = Linear(keys)
    y = lin.clean(x).argmax(1)
    thr_linf, thr_l2, peak = lin.thresholds(x, y)
    thr = thr_linf if norm == "linf" else thr_l2
    # below every sample's threshold no point of the ball flips it (the box only removes
    # points): nothing may break
    small = _attack(lin, x, keys, y, eps=0.9 * float(thr.min()), norm=norm, n_queries=200)
    assert (small.broken_step == -1).all() and small.nfe == 201
    assert torch.equal(lin.clean(small.x_adv).argmax(1), y)
    assert not torch.equal(small.x_adv, x)
    # at twice the largest threshold every sample can be flipped, the box [0, 1] being out of
    # reach (x is ≥ 0.3 from it; ℓ2: the optimal δ = −ε·v/‖v‖₂ moves no coordinate by 0.3)
    big_eps = 2 * float(thr.max())
    assert big_eps < 0.3 if norm == "linf" else float((big_eps * peak).max()) < 0.3
    big = _attack(lin, x, keys, y, eps=big_eps, norm=norm, n_queries=1000)
    assert (big.broken_step >= 0).all()
    assert (lin.clean(big.x_adv).argmax(1) != y).all()
    assert big.nfe == int(big.broken_step.max()) + 1  # stopped at the query that broke the last one
    assert big.target_class is None


def test_broken_step_is_the_first_query_meeting_the_goal():
    x, keys = _batch(4)
    lin = Linear(keys)
    y = lin.clean(x).argmax(1)
    thr = lin.thresholds(x, y)[0]
    eps = 1.5 * float(thr.max())
    kw = dict(eps=eps, norm="linf", rescale_schedule=False)  # the same p at iteration i for any budget
    full = _attack(lin, x, keys, y, n_queries=400, **kw)
    assert (full.broken_step >= 2).sum() >= 2
    # the same run stopped one query before a sample's break has not broken it yet
    for b in (full.broken_step >= 2).nonzero().view(-1).tolist():
        cut = _attack(lin, x, keys, y, n_queries=int(full.broken_step[b]) - 1, **kw)
        assert cut.broken_step[b] == -1
        assert torch.equal(cut.broken_step[full.broken_step < full.broken_step[b]],
                           full.broken_step[full.broken_step < full.broken_step[b]])
    # with ε = 1 the start (vertical stripes of 0 / 1) fools some samples: their break is query
    # 0 and their image is that start, constant down every column
    huge = _attack(lin, x, keys, y, eps=1.0, norm="linf", n_queries=50)
    at0 = huge.broken_step == 0
    assert at0.any()
    assert torch.equal(huge.x_adv[at0], huge.x_adv[at0][:, :, :1].expand(-1, -1, H, -1))


def test_targeted_ce_hits_given_targets():
    x, keys = _batch(8)
    lin = Linear(keys)
    z = lin.clean(x)
    y = z.argmax(1)
    t = z.scatter(1, y[:, None], float("-inf")).argmax(1)  # runner-up class
    r = Square(eps=0.08, n_queries=800, targeted=True)(lin, x, t, Noise.for_batch(5, keys, "square"))
    assert torch.equal(r.target_class, t)
    hit = lin.clean(r.x_adv).argmax(1) == t
    assert hit.all() and (r.broken_step >= 0).all()


def test_stochastic_target_is_judged_on_mean_logits():
    x, keys = _batch(8)
    noisy = Linear(keys, R=4, sigma=3.0)  # single draws are mostly wrong, their mean is exact
    y = noisy.clean(x).argmax(1)
    with torch.no_grad():
        draws = noisy(x, 0)
    assert (draws.argmax(2) != y[:, None]).float().mean() > 0.3
    thr = noisy.thresholds(x, y)[0]
    small = _attack(noisy, x, keys, y, eps=0.9 * float(thr.min()), norm="linf", n_queries=100)
    assert (small.broken_step == -1).all()
    big = _attack(noisy, x, keys, y, eps=2 * float(thr.max()), norm="linf", n_queries=800)
    assert (big.broken_step >= 0).all() and (noisy.clean(big.x_adv).argmax(1) != y).all()


def test_never_asks_for_gradients():
    x, keys = _batch(4)
    lin = Linear(keys)
    y = lin.clean(x).argmax(1)
    with torch.enable_grad():
        for norm in ("linf", "l2"):
            r = Square(eps=0.05, norm=norm, n_queries=20, targeted=True, target_mode="top")(
                lin, x.clone().requires_grad_(True), y, Noise.for_batch(0, keys, "s"))
            assert not r.x_adv.requires_grad
    assert lin.calls > 40  # the target raises if a query carries gradients


def test_recheck_confirms_candidate_breaks():
    x, keys = _batch(6)
    lin = Linear(keys)
    y = lin.clean(x).argmax(1)
    eps = 2 * float(lin.thresholds(x, y)[0].max())
    calls = []

    def recheck(rule):
        def run(x_sub, idx, step):
            calls.append((int(step), idx.tolist()))
            with torch.no_grad():
                z = lin.clean(x_sub).unsqueeze(1).repeat(1, 3, 1)    # H = 3 draws of a "real" defense
            robust = 10.0 * torch.nn.functional.one_hot(y[idx], K).float().unsqueeze(1).repeat(1, 3, 1)
            return z if rule(idx) else robust                         # robust: the true class wins
        return run

    plain = _attack(lin, x, keys, y, eps=eps, n_queries=300)
    attack = Square(eps=eps, n_queries=300, recheck_draws=3)
    same = attack(lin, x, y, Noise.for_batch(5, keys, "square"), recheck=recheck(lambda idx: True))
    assert torch.equal(same.broken_step, plain.broken_step) and torch.equal(same.x_adv, plain.x_adv)
    assert sorted(i for _, idx in calls for i in idx) == list(range(6))  # each candidate checked once
    calls.clear()
    never = attack(lin, x, y, Noise.for_batch(5, keys, "square"), recheck=recheck(lambda idx: False))
    assert (never.broken_step == -1).all() and never.nfe == 301      # unconfirmed: it keeps going
    assert len(calls) > 6 and all(0 <= st <= 300 for st, _ in calls)  # queries 0 … 300
    with pytest.raises(ValueError, match="recheck"):
        attack(lin, x, y, Noise.for_batch(5, keys, "square"))


def test_p_schedule_matches_reference_table():
    # read off autoattack/square.py p_selection: halvings after iterations 10, 50, 200, 500, 1000, ...
    assert [p_schedule(i, 0.8, 10000) for i in (0, 10, 11, 50, 51, 200, 201)] == [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1]
    assert p_schedule(8000, 0.8, 10000) == 0.8 / 256 and p_schedule(8001, 0.8, 10000) == 0.8 / 512
    # rescaled to 5,000 queries, iteration i reads the table at ⌊2i⌋; AutoAttack runs it unscaled
    assert p_schedule(5, 0.8, 5000) == 0.8 and p_schedule(6, 0.8, 5000) == 0.4
    assert p_schedule(6, 0.8, 5000, rescale=False) == 0.8
    assert square_side(0.8, 8, 8, "linf") == 7 and square_side(0.8, 32, 32, "l2") == 29
    assert square_side(0.8 / 512, 32, 32, "linf") == 1 and square_side(0.8 / 512, 32, 32, "l2") == 3
    assert square_side(0.05, 32, 32, "l2") == 7 and square_side(0.8, 2, 2, "l2") == 2


def _rectangles_loop(a: int, b: int) -> torch.Tensor:
    """The reference's construction re-stated: rectangles growing from the centre cell,
    the r-th adding 1/(r+1)²."""
    out = torch.zeros(a, b)
    ci, cj = a // 2, b // 2
    for r in range(max(a // 2 + 1, b // 2 + 1)):
        out[max(ci - r, 0):min(ci + r + 1, a), max(cj - r, 0):min(cj + r + 1, b)] += 1.0 / (r + 1) ** 2
    return out


def test_l2_patch_shape():
    for a, b in ((1, 3), (2, 5), (3, 5), (4, 7), (6, 13)):
        assert torch.allclose(centred_rings(a, b), _rectangles_loop(a, b))
    for s in (3, 5, 8, 13):
        p = l2_patch(s)
        assert p.shape == (s, s) and abs(float(p.norm()) - 1) < 1e-6
        assert (p[: s // 2] > 0).all() and (p[s // 2:] < 0).all()
        assert abs(float(p[: s // 2].norm()) - float(p[s // 2:].norm())) < 1e-6


def test_params_roundtrip_and_validation():
    a = ATTACKS.build("square", eps=0.5, norm="l2", n_queries=300, targeted=True, target_mode="random")
    p = a.params()
    json.dumps(p)
    assert ATTACKS.build("square", **p).params() == p
    with pytest.raises(ValueError):
        Square(eps=0.1, n_queries=0)
    with pytest.raises(ValueError):
        Square(eps=0.1, p_init=0.0)


class RowCounting(Linear):
    """Linear, counting the rows of every query; `select_rows` gives the view of some rows
    (their keys, shared counter), as the Defense's targets do."""

    def __init__(self, keys, R: int = 1, sigma: float = 0.0, log: list | None = None):
        super().__init__(keys, R, sigma)
        self.log = [] if log is None else log

    def __call__(self, x, step):
        self.log.append((step, x.shape[0]))
        return super().__call__(x, step)

    def select_rows(self, rows):
        sub = RowCounting([self.keys[i] for i in rows.tolist()], self.R, self.sigma, self.log)
        sub.V = self.V
        return sub


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_queries_only_unbroken_samples(norm):
    """AutoAttack's Square queries only the samples whose margin is still > 0: a broken
    sample is never queried again, and its result (breaking query, image) is the one it had
    when every sample was queried every time (a target without `select_rows`)."""
    x, keys = _batch(8)
    plain = Linear(keys, R=4, sigma=0.05)
    y = plain.clean(x).argmax(1)
    y[0] = (y[0] + 1) % K   # misclassified from the start: broken at query 0
    thr = plain.thresholds(x, y)[0 if norm == "linf" else 1].sort().values
    eps = float(thr[4] + thr[5]) / 2   # three samples cannot break at all (closed form)
    counting = RowCounting(keys, R=4, sigma=0.05)
    r = _attack(counting, x, keys, y, eps=eps, norm=norm, n_queries=150)
    ref = _attack(lambda x, step: plain(x, step), x, keys, y, eps=eps, norm=norm, n_queries=150)
    broken = r.broken_step >= 0
    assert broken[0] and r.broken_step[0] == 0 and 1 < int(broken.sum()) < 8
    assert torch.equal(r.sample_nfe, torch.where(broken, r.broken_step + 1, 151))
    assert sum(n for _, n in counting.log) == int(r.sample_nfe.sum()) < 8 * r.nfe
    assert counting.log[1] == (1, 8 - int((r.broken_step == 0).sum()))   # broken at query 0: left out
    assert torch.allclose(r.x_adv, ref.x_adv, atol=1e-6) and torch.equal(r.broken_step, ref.broken_step)
