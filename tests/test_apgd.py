"""APGD: checkpoint schedule and halving test (AutoAttack's), first step, strength relative
to PGD, ℓ2, APGD-T."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.attacks.apgd import APGD, StepSizeControl, step_size_checkpoints
from pipeline.evaluation.defense import Defense
from pipeline.purifiers.identity import IdentityPurifier
from pipeline.registry import ATTACKS
from pipeline.seeding import Noise

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    from pipeline.classifiers.small_cnn import make
    from pipeline.io.datasets import load_digits
    from pipeline.train.loops import train_classifier

    im, lab = load_digits()
    x = torch.tensor(im).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor(lab)
    torch.manual_seed(0)
    model = make(width=16)
    train_classifier(model, x[:1400], y[:1400], epochs=15, lr=5e-3, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), x[1400:1560], y[1400:1560]


def _run(model, x, y, name, **kw):
    keys = [f"k{i}" for i in range(len(x))]
    target = Defense(model, IdentityPurifier()).attack_target("full", 0, keys, "a", 1)
    r = ATTACKS.build(name, **kw)(target, x, y, Noise.for_batch(0, keys, "noise"))
    with torch.no_grad():
        return r, float((model(r.x_adv).argmax(1) == y).float().mean())


def _robust(model, x_adv, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def _no_weaker(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Attack a is no weaker than attack b on the same images ([n] bool: still robust), up to
    sampling noise: a's robust accuracy may exceed b's by 3σ of the paired difference plus one
    image. Only images on which exactly one attack succeeds carry noise; if the attacks were
    equally strong each such image would side with either by a fair coin, so the difference of
    the counts has σ = √(#discordant) (McNemar). The extra image absorbs a tie flipped by
    floating-point differences between machines (a fixed 0.02 once failed by one image)."""
    n = a.numel()
    discordant = int((a != b).sum())
    return float(a.float().mean() - b.float().mean()) <= (3 * math.sqrt(discordant) + 1) / n


def _at_most(rate: float, bound: float, n: int) -> bool:
    """rate ≤ bound up to the binomial noise of n images: 3·√(bound(1 − bound)/n) + 1/n."""
    return rate <= bound + 3 * math.sqrt(bound * (1 - bound) / n) + 1 / n


def _autoattack_checks(n_iter: int, losses=None, f0=0.0, rho=0.75):
    """AutoAttack's step-size bookkeeping (autopgd_base.py, attack_single_run) re-stated for
    one sample: [(iteration, halved)] at every check. `losses[i]` is the loss of iterate i+1."""
    k = max(int(0.22 * n_iter), 1)
    n_iter_min, size_decr = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    loss_steps = [0.0] * n_iter                # zero-initialised history, indexed as AutoAttack
    loss_best, best_last_check, reduced_last_check = f0, f0, True
    counter, out = 0, []
    for i in range(n_iter):
        y1 = 0.0 if losses is None else losses[i]
        loss_steps[i] = y1
        loss_best = max(loss_best, y1)
        counter += 1
        if counter == k:
            # loss_steps[i - c - 1] wraps to the end of the list for i - c - 1 = -1, as in torch
            ups = sum(loss_steps[i - c] > loss_steps[i - c - 1] for c in range(k))
            halve = ups <= k * rho or (not reduced_last_check and best_last_check >= loss_best)
            reduced_last_check, best_last_check = halve, loss_best
            out.append((i + 1, halve))
            k, counter = max(k - size_decr, n_iter_min), 0
    return out


def test_checkpoint_schedule_is_autoattacks():
    # read off AutoAttack's code: k = 22, 19, 16, 13, 10, 7, 6, 6 for N = 100; for N = 10 the
    # first period is ⌊2.2⌋ = 2, then ⌊0.6⌋ and ⌊0.3⌋ are lifted to 1: a check every step
    assert step_size_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert step_size_checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert step_size_checkpoints(50) == [11, 21, 30, 38, 45]
    for n in (10, 20, 50, 100, 200):
        assert step_size_checkpoints(n) == [w for w, _ in _autoattack_checks(n)], n
    assert step_size_checkpoints(20) == [4, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    # the paper's real-valued schedule, kept as schedule="paper"
    assert step_size_checkpoints(100, "paper") == [22, 41, 57, 70, 80, 87, 93, 99]
    assert step_size_checkpoints(10, "paper") == [3, 5, 6, 7, 8, 9]
    assert step_size_checkpoints(1000, "paper")[:3] == [220, 410, 570]
    with pytest.raises(ValueError):
        step_size_checkpoints(10, "nope")


@pytest.mark.parametrize("n_iter", [10, 20, 50, 100])
def test_halving_decisions_match_autoattack(n_iter):
    """Per-sample halvings of StepSizeControl equal the re-stated AutoAttack loop on loss
    sequences built to hit every branch: rises, falls, plateaus, negative losses (DLR)."""
    g = torch.Generator().manual_seed(n_iter)
    B = 256
    up = torch.rand(B, 1, generator=g)  # per-sample probability of a rising step
    steps = torch.where(torch.rand(B, n_iter, generator=g) < up, 1.0, -1.0)
    steps = steps * torch.randint(0, 3, (B, n_iter), generator=g).float()  # 0: a plateau
    start = torch.randn(B, generator=g)                    # the path: above or below zero
    f0 = start + 2 * torch.randn(B, generator=g)           # the start point: above or below it
    losses = start[:, None] + steps.cumsum(1) * 0.1                       # [B, N]
    control = StepSizeControl(f0, n_iter, 0.75)
    f_max, got = f0.clone(), []
    for i in range(n_iter):
        f_max = torch.maximum(f_max, losses[:, i])
        h = control.observe(losses[:, i], f_max)
        if h is not None:
            got.append((i + 1, h))
    for b in range(B):
        want = _autoattack_checks(n_iter, losses[b].tolist(), float(f0[b]))
        assert [(w, bool(h[b])) for w, h in got] == want, b
    decisions = torch.stack([h for _, h in got])
    assert decisions.any() and not decisions.all()  # both outcomes were exercised


def test_oscillation_test_is_at_most_rho_k():
    # N = 20: first check after k = 4 steps; 3 rises of 4 = ρ·k → AutoAttack halves (≤),
    # the paper's strict < does not (its first check is after 5 steps: 3 < 3.75 halves there)
    f0 = torch.zeros(1)
    seq = [1.0, 2.0, 3.0, 2.5]  # rises at steps 1 (from the zero slot), 2, 3; falls at 4
    control = StepSizeControl(f0, 20, 0.75)
    out = [control.observe(torch.tensor([v]), torch.tensor([3.0])) for v in seq]
    assert out[:3] == [None, None, None] and bool(out[3])
    f0 = torch.full((1,), -1.0)  # a start point below zero: AutoAttack's first comparison is with 0
    control = StepSizeControl(f0, 20, 0.75)
    rises = [-0.5, -0.4, -0.3, -0.2]  # four rises from f0, but the first is not one above 0
    out = [control.observe(torch.tensor([v]), torch.tensor([v])) for v in rises]
    assert bool(out[3])  # 3 counted rises ≤ 3 → halve
    paper = StepSizeControl(f0, 20, 0.75, "paper")
    out = [paper.observe(torch.tensor([v]), torch.tensor([v])) for v in rises + [-0.1]]
    assert out[:4] == [None] * 4 and not bool(out[4])  # 5 rises of 5 steps: no halving


def test_first_step_is_two_eps_sign_then_projection():
    lin = nn.Linear(16, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(48.0).view(3, 16).sin())
        lin.bias.zero_()
    target = lambda xx, step: lin(xx.flatten(1)).unsqueeze(1)  # noqa: E731
    x = torch.full((2, 1, 4, 4), 0.5)
    y = lin(x.flatten(1)).argmax(1)  # correctly classified start: the result is x¹ (broken or best)
    r = APGD(eps=0.1, steps=1, random_start=False)(target, x, y, Noise.for_batch(0, ["a", "b"], "n"))
    # η = 2ε overshoots the ball and is projected back: |δ| = ε everywhere along sign(∇)
    xg = x.clone().requires_grad_(True)
    g = torch.autograd.grad(nn.functional.cross_entropy(lin(xg.flatten(1)), y, reduction="sum"), xg)[0]
    assert torch.allclose(r.x_adv - x, 0.1 * g.sign(), atol=1e-7)
    assert r.nfe == 2


def test_apgd_at_least_as_strong_as_pgd(digits):
    model, x, y = digits
    n = len(y)
    clean = _robust(model, x, y)
    for eps in (0.05, 0.1, 0.2):
        pgd, _ = _run(model, x, y, "pgd", eps=eps, steps=20)
        apgd, a = _run(model, x, y, "apgd", eps=eps, steps=20)
        dlr, a_dlr = _run(model, x, y, "apgd", eps=eps, steps=20, loss="dlr")
        pgd_ok = _robust(model, pgd.x_adv, y)
        assert _no_weaker(_robust(model, apgd.x_adv, y), pgd_ok), eps  # same budget, no weaker
        assert a_dlr <= float(clean.float().mean()) - 0.1
        # the margin has teeth on these data: no attack at all is rejected against PGD
        if eps >= 0.1:
            assert not _no_weaker(clean, pgd_ok)
    assert _at_most(a, 0.02, n)  # ε = 0.2 on 8×8 digits: nearly everything breaks
    _, a0 = _run(model, x, y, "apgd", eps=0.0)
    assert a0 == float(clean.float().mean())


def test_apgd_l2(digits):
    model, x, y = digits
    r, a = _run(model, x, y, "apgd", eps=1.5, norm="l2", steps=20)
    assert ((r.x_adv - x).flatten(1).norm(dim=1) <= 1.5 + 1e-5).all()
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    pgd, _ = _run(model, x, y, "pgd", eps=1.5, norm="l2", steps=20)
    assert a <= 0.3 and _no_weaker(_robust(model, r.x_adv, y), _robust(model, pgd.x_adv, y))


def test_apgd_targeted_dlr_hits_targets(digits):
    model, x, y = digits
    r, a = _run(model, x, y, "apgd", eps=0.2, steps=20, targeted=True, loss="dlr", n_target_classes=3)
    assert a <= 0.05
    broken = r.broken_step >= 0
    with torch.no_grad():
        pred = model(r.x_adv).argmax(1)
    assert torch.equal(pred[broken], r.target_class[broken])       # success = the target class
    z = model(x).scatter(1, y.view(-1, 1), -1e9)
    top3 = z.topk(3, dim=1).indices
    assert (top3 == r.target_class.view(-1, 1)).any(1).all()        # one of the 3 most likely wrong
    assert r.nfe <= 3 * 21


def test_apgd_t_can_count_any_wrong_class_as_autoattack(digits):
    """targeted_success="misclassified": the same runs (same loss, same iterates), but an
    iterate misclassified into any class breaks the sample, as AutoAttack's APGD-T counts."""
    model, x, y = digits
    # the least likely class is hard to reach; on the way the model often says something else
    kw = dict(eps=0.1, steps=10, targeted=True, loss="dlr", target_mode="least_likely")
    hit, _ = _run(model, x, y, "apgd", **kw)
    wrong, _ = _run(model, x, y, "apgd", targeted_success="misclassified", **kw)
    b_hit, b_wrong = hit.broken_step >= 0, wrong.broken_step >= 0
    assert not (b_hit & ~b_wrong).any()                                   # every hit is a break
    assert (wrong.broken_step[b_hit] <= hit.broken_step[b_hit]).all()     # and no later
    assert b_wrong.sum() > b_hit.sum()       # some iterates fooled the model into another class
    assert not _robust(model, wrong.x_adv, y)[b_wrong].any()
    least = model(x).scatter(1, y.view(-1, 1), float("inf")).argmin(1)
    assert torch.equal(wrong.target_class, least)  # the run's target, broken or not
    with pytest.raises(ValueError, match="true label"):
        APGD(eps=0.1, targeted=True, target_mode="given", targeted_success="misclassified")


def test_apgd_restarts_never_hurt(digits):
    model, x, y = digits
    _, one = _run(model, x, y, "apgd", eps=0.08, steps=10)
    r, two = _run(model, x, y, "apgd", eps=0.08, steps=10, restarts=3)
    assert two <= one
    assert int(r.broken_step.max()) < 3 * 11


class _Recorder:
    """A linear model (5 classes, 3×4×4 inputs) whose class 0 wins by a margin no ε ≤ 1 can
    close, recording every call as (step, rows, x). `select_rows` returns itself: the model
    is row-wise, so this is the restricted view the attacks ask for."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.W = torch.randn(5, 48, generator=g)
        self.bias = torch.tensor([10.0, 0, 0, 0, 0])
        self.calls: list[tuple[int, int, torch.Tensor]] = []

    def __call__(self, x, step):
        self.calls.append((step, x.shape[0], x.detach().clone()))
        return (self.bias + 1e-3 * x.flatten(1) @ self.W.T).unsqueeze(1)

    def select_rows(self, rows):
        return self


def _pair():
    x = 0.3 + 0.4 * torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    # sample 0 is labelled 1: misclassified from the start; sample 1 (class 0) can never break
    return x, torch.tensor([1, 0]), Noise.for_batch(0, ["a", "b"], "own")


def test_apgd_t_draws_a_fresh_start_per_target_class():
    """AutoAttack's apgd-t calls attack_single_run per (target class, restart), each drawing a
    new random start; ours keys run j's start by j: every target gets its own."""
    x, y, noise = _pair()
    rec, steps = _Recorder(), 2
    APGD(eps=0.1, steps=steps, targeted=True, loss="dlr", n_target_classes=3, restarts=2)(rec, x, y, noise)
    starts = [xs[-1] for step, _, xs in rec.calls if step >= 0 and step % (steps + 1) == 0]
    assert len(starts) == 6  # 3 targets × 2 restarts, sample 1 (never broken) in every run
    for i in range(6):
        assert (starts[i] - x[1]).abs().max() <= 0.1 + 1e-6 and not torch.equal(starts[i], x[1])
        for j in range(i):
            assert not torch.allclose(starts[i], starts[j])


@pytest.mark.parametrize("restrictable", [True, False])
def test_apgd_t_attacks_only_unbroken_samples(restrictable):
    """Sample 0 breaks at the first step of the first run; the rest of that run and the later
    runs (target classes) evaluate sample 1 alone (AutoAttack's ind_to_fool between runs; a
    broken sample's steps within a run cannot change its result). A target without
    `select_rows` sees the whole batch every call; the result is the same."""
    x, y, noise = _pair()
    rec, steps = _Recorder(), 3
    target = rec if restrictable else (lambda x, step: rec(x, step))
    r = APGD(eps=0.1, steps=steps, targeted=True, loss="dlr", n_target_classes=3,
             targeted_success="misclassified")(target, x, y, noise)
    n = steps + 1
    assert r.broken_step.tolist() == [0, -1] and r.nfe == 3 * n
    assert r.sample_nfe.tolist() == [1, 3 * n]
    rows = [b for step, b, _ in rec.calls if step >= 0]
    assert rows == ([2] + [1] * (3 * n - 1) if restrictable else [2] * 3 * n)
    # the broken sample's result is its breaking iterate, the first run's start point
    start = rec.calls[1][2][0]
    assert torch.equal(r.x_adv[0], start) and (r.x_adv[0] - x[0]).abs().max() <= 0.1 + 1e-6
    assert r.target_class[0] == 0  # broken in the run on its most likely wrong class, 0


class _Linear64(nn.Module):
    """logits = V·x in float64, rounded to float32: a row's logits do not depend on its batch."""

    def __init__(self):
        super().__init__()
        self.V = torch.randn(5, 48, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def forward(self, x):
        return (x.flatten(1).double() @ self.V.T).float()


def test_apgd_t_on_a_keyed_defense_same_result_alone_or_in_a_batch():
    """Runs on the unbroken rows only (the Defense's `select_rows`): each sample keeps its
    keyed draws, so its result is the same alone as in a batch where others break first."""
    from pipeline.purifiers.gaussian import GaussianPurifier, GaussianSettings

    defense = Defense(_Linear64(), GaussianPurifier(GaussianSettings(sigma=0.05)))
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    y = defense.classifier(x).argmax(1)
    keys = [f"s{i}" for i in range(6)]
    attack = APGD(eps=0.03, steps=4, targeted=True, loss="dlr", n_target_classes=3, targeted_success="misclassified")

    def run(idx):
        ks = [keys[i] for i in idx]
        return attack(defense.attack_target("full", 0, ks, "a", 2), x[idx], y[idx], Noise.for_batch(0, ks, "own"))

    full = run(list(range(6)))
    assert 0 < int((full.broken_step >= 0).sum()) < 6   # some break early, some never
    assert len(set(full.sample_nfe.tolist())) > 1
    for i in range(6):
        one = run([i])
        assert torch.allclose(one.x_adv, full.x_adv[i:i + 1], atol=1e-6)
        assert torch.equal(one.broken_step, full.broken_step[i:i + 1])
        assert one.sample_nfe.tolist() == full.sample_nfe[i:i + 1].tolist()
