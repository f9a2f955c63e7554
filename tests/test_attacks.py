"""Attacks: projection, FGSM/R+FGSM/PGD behaviour, targeting, determinism, EOT, re-check hook."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks.base import AttackResult, Goal, project, random_start
from pipeline.attacks.eot import dlr_loss, eot_gradient, per_draw_loss
from pipeline.attacks.recheck import make_defense_recheck
from pipeline.evaluation.defense import Defense
from pipeline.purifiers.base import Purified, Purifier
from pipeline.purifiers.identity import IdentityPurifier
from pipeline.registry import ATTACKS
from pipeline.seeding import Noise

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- fixtures

def _digits(n_test: int = 120):
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
    return model.eval(), x[1400:1400 + n_test], y[1400:1400 + n_test]


@pytest.fixture(scope="module")
def digits():
    return _digits()


def keys_for(n: int, offset: int = 0) -> list[str]:
    return [f"sample{i + offset}" for i in range(n)]


def target_for(model, keys, purifier=None, mode="full", eot=1):
    return Defense(model, purifier or IdentityPurifier()).attack_target(mode, 7, keys, "attack", eot)


def acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


class NoisyPurifier(Purifier):
    """x + σ·n, keyed: the stochastic purifier of these tests."""

    stochastic = True

    def __init__(self, sigma: float = 0.1):
        super().__init__()
        self.sigma = sigma

    def purify(self, x, noise=None):
        n = self._noise(noise, x).normal(tuple(x.shape[1:]), "noisy").to(x)
        return Purified((x + self.sigma * n).clamp(0, 1), 0)


class Linear2(nn.Module):
    """Two-class linear model on flattened images."""

    def __init__(self, d: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(d, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(2, d, generator=g))
            self.lin.bias.zero_()

    def forward(self, x):
        return self.lin(x.flatten(1))


# ----------------------------------------------------------------------------- projection

@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_stays_in_ball_and_box(norm):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 8, 8, generator=g)
    far = x + 3 * torch.randn(16, 1, 8, 8, generator=g)
    eps = 0.1 if norm == "linf" else 0.7
    p = project(far, x, eps, norm)
    d = (p - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert p.min() >= 0 and p.max() <= 1
    assert torch.allclose(project(p, x, eps, norm), p, atol=1e-6)  # idempotent
    inside = x + 0.5 * (p - x)
    assert torch.allclose(project(inside, x, eps, norm), inside.clamp(0, 1), atol=1e-6)
    noise = Noise.for_batch(0, keys_for(16), "rs")
    s = random_start(x, eps, norm, noise)
    ds = (s - x).flatten(1)
    assert ((ds.abs().max(1).values if norm == "linf" else ds.norm(dim=1)) <= eps + 1e-6).all()
    assert s.min() >= 0 and s.max() <= 1 and not torch.equal(s, x)


# ----------------------------------------------------------------------------- FGSM on a linear model

def test_fgsm_linear_moves_eps_sign_w():
    d = 64
    model = Linear2(d)
    x = torch.full((4, 1, 8, 8), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    target = lambda xx, step: model(xx).unsqueeze(1)  # noqa: E731  deterministic, R = 1
    res = ATTACKS.build("fgsm", eps=0.1)(target, x, y, Noise.for_batch(0, keys_for(4), "n"))
    w = model.lin.weight.detach()
    expected = 0.1 * torch.sign(w[1] - w[0]).view(1, 1, 8, 8)  # ∇ CE(x, 0) ∝ w1 − w0
    assert torch.allclose(res.x_adv - x, expected.expand_as(x), atol=1e-7)
    fooled = model(x).argmax(1) != y  # FGSM's one forward is at the clean point
    assert res.nfe == 1 and torch.equal(res.broken_step, torch.where(fooled, 0, -1))
    # ℓ2: a step of length ε along w1 − w0
    res2 = ATTACKS.build("fgsm", eps=0.5, norm="l2")(target, x, y, Noise.for_batch(0, keys_for(4), "n"))
    delta = (res2.x_adv - x).flatten(1)
    u = (w[1] - w[0]) / (w[1] - w[0]).norm()
    assert torch.allclose(delta.norm(dim=1), torch.full((4,), 0.5), atol=1e-5)
    assert torch.allclose(delta, 0.5 * u.expand(4, -1), atol=1e-5)


def test_eps_zero_is_identity(digits):
    model, x, y = digits
    for name in ("fgsm", "rfgsm", "pgd", "apgd"):
        res = ATTACKS.build(name, eps=0.0)(target_for(model, keys_for(len(x))), x, y,
                                           Noise.for_batch(0, keys_for(len(x)), "n"))
        assert torch.equal(res.x_adv, x) and (res.broken_step == -1).all() and res.nfe == 0


# ----------------------------------------------------------------------------- strength on digits

def test_pgd_fgsm_rfgsm_strength(digits):
    model, x, y = digits
    keys = keys_for(len(x))
    noise = Noise.for_batch(0, keys, "attack-noise")
    clean = acc(model, x, y)
    assert clean > 0.85
    results = {}
    for eps in (0.02, 0.1, 0.3):
        for name, kw in [("fgsm", {}), ("rfgsm", {}), ("pgd", {"steps": 20})]:
            r = ATTACKS.build(name, eps=eps, **kw)(target_for(model, keys), x, y, noise)
            assert ((r.x_adv - x).abs().flatten(1).max(1).values <= eps + 1e-6).all()
            assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
            results[(name, eps)] = acc(model, r.x_adv, y)
    assert results[("pgd", 0.02)] > clean - 0.15          # a tiny budget barely matters
    assert results[("pgd", 0.3)] <= 0.02                  # a large one breaks ~everything
    assert results[("fgsm", 0.3)] <= 0.2 and results[("rfgsm", 0.3)] <= 0.3
    for eps in (0.02, 0.1, 0.3):                           # iterative ≥ single step
        assert results[("pgd", eps)] <= results[("fgsm", eps)] + 0.02


def test_targeted_pgd_hits_given_target(digits):
    model, x, y = digits
    keys = keys_for(len(x))
    t = (y + 3) % 10
    r = ATTACKS.build("pgd", eps=0.3, steps=30, targeted=True)(target_for(model, keys), x, t,
                                                              Noise.for_batch(0, keys, "n"))
    with torch.no_grad():
        hit = (model(r.x_adv).argmax(1) == t).float().mean()
    assert hit >= 0.9
    assert torch.equal(r.target_class, t)


@pytest.mark.parametrize("mode", ["top", "least_likely", "random"])
def test_targeted_modes_pick_wrong_classes(digits, mode):
    model, x, y = digits
    keys = keys_for(len(x))
    r = ATTACKS.build("pgd", eps=0.3, steps=20, targeted=True, target_mode=mode)(
        target_for(model, keys), x, y, Noise.for_batch(0, keys, "n"))
    assert (r.target_class != y).all() and r.target_class.min() >= 0 and r.target_class.max() < 10
    with torch.no_grad():
        z = model(x)
    if mode == "top":
        assert torch.equal(r.target_class, z.scatter(1, y.view(-1, 1), -1e9).argmax(1))
    with torch.no_grad():
        hit = (model(r.x_adv).argmax(1) == r.target_class).float().mean()
    assert hit >= (0.9 if mode != "least_likely" else 0.6)


def test_targeted_dlr_needs_true_labels():
    with pytest.raises(ValueError, match="true label"):
        ATTACKS.build("pgd", eps=0.1, targeted=True, loss="dlr")
    with pytest.raises(ValueError):
        ATTACKS.build("pgd", eps=2.0)  # ℓ∞ eps in [0, 1]
    with pytest.raises(ValueError):
        ATTACKS.build("rfgsm", eps=0.1, alpha=0.1)


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("name,kw", [
    ("pgd", {"steps": 5}),
    ("rfgsm", {}),
    ("apgd", {"steps": 6, "restarts": 2}),
    ("apgd", {"steps": 5, "loss": "dlr", "targeted": True, "target_mode": "random", "n_target_classes": 2}),
    ("pgd", {"steps": 4, "eot_reduction": "sign_sum"}),
])
def test_same_keys_same_result_regardless_of_batch(digits, name, kw):
    """A sample's adversarial example depends on its keys only: not on batch size or mates."""
    model, x, y = digits
    x, y = x[:12], y[:12]
    keys = keys_for(12)
    pur = NoisyPurifier(0.05)
    attack = ATTACKS.build(name, eps=0.1, **kw)

    def run(idx):
        k = [keys[i] for i in idx]
        return attack(target_for(model, k, pur, eot=3), x[idx], y[idx], Noise.for_batch(3, k, "attack-noise"))

    full = run(list(range(12)))
    halves = [run(list(range(6))), run(list(range(6, 12)))]
    shuffled_idx = [11, 3, 7, 0, 5]
    shuffled = run(shuffled_idx)
    x_h = torch.cat([h.x_adv for h in halves])
    b_h = torch.cat([h.broken_step for h in halves])
    assert torch.allclose(full.x_adv, x_h, atol=1e-6)
    assert torch.equal(full.broken_step, b_h)
    assert torch.allclose(full.x_adv[shuffled_idx], shuffled.x_adv, atol=1e-6)
    again = run(list(range(12)))
    assert torch.equal(full.x_adv, again.x_adv)
    # other attack-noise keys → a different random start (where the attack has one)
    if kw.get("restarts") or name == "rfgsm":
        other = attack(target_for(model, keys, pur, eot=3), x, y, Noise.for_batch(4, keys, "attack-noise"))
        assert not torch.equal(other.x_adv, full.x_adv)


# ----------------------------------------------------------------------------- EOT aggregation

class DrawLinear:
    """A constructed EOT target: draw r of sample b computes logits W_r · x_b (fixed W_r)."""

    def __init__(self, R: int = 4, d: int = 6, K: int = 5, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(R, K, d, generator=g)

    def __call__(self, x, step):
        return torch.einsum("rkd,bd->brk", self.W, x.flatten(1))


def test_eot_aggregations_compute_what_they_claim():
    tgt = DrawLinear()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 1, 6, generator=g)
    y = torch.tensor([0, 2, 4])
    R = tgt.W.shape[0]

    def per_draw_grads():
        out = []
        for r in range(R):
            xr = x.clone().requires_grad_(True)
            loss = F.cross_entropy(tgt(xr, 0)[:, r], y, reduction="sum")
            out.append(torch.autograd.grad(loss, xr)[0])
        return torch.stack(out)  # [R, B, ...]

    grads = per_draw_grads()

    def agg(reduction):
        xx = x.clone().requires_grad_(True)
        return eot_gradient(tgt(xx, 0), xx, y, None, "ce", reduction, False)

    obj, d = agg("mean_loss")
    assert torch.allclose(d, grads.mean(0), atol=1e-6)
    with torch.no_grad():
        logits = tgt(x, 0)
    assert torch.allclose(obj, per_draw_loss(logits, y).mean(1), atol=1e-6)
    obj, d = agg("sign_sum")
    assert torch.equal(d, grads.sign().sum(0))
    assert torch.allclose(obj, per_draw_loss(logits, y).mean(1), atol=1e-6)
    obj, d = agg("mean_logits")
    xx = x.clone().requires_grad_(True)
    ref = F.cross_entropy(tgt(xx, 0).mean(1), y, reduction="sum")
    assert torch.allclose(d, torch.autograd.grad(ref, xx)[0], atol=1e-6)
    assert torch.allclose(obj, F.cross_entropy(logits.mean(1), y, reduction="none"), atol=1e-6)
    # the attack uses them: one PGD step with sign_sum moves by step·sign(Σ sign g_r)
    res = ATTACKS.build("pgd", eps=0.5, steps=1, step_size=0.01, random_start=False, keep_broken=False,
                        eot_reduction="sign_sum")(tgt, x, y, Noise.for_batch(0, keys_for(3), "n"))
    assert torch.allclose(res.x_adv, (x + 0.01 * grads.sign().sum(0).sign()).clamp(0, 1), atol=1e-7)


def test_dlr_loss_values():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 5.0]])
    y = torch.tensor([0, 1])
    # sample 0: −(3 − 1)/(3 − 0); sample 1: −(2 − 5)/(5 − 1)
    assert torch.allclose(dlr_loss(z, y, None, False), torch.tensor([-2 / 3, 3 / 4]))
    assert torch.allclose(dlr_loss(2 * z + 7, y, None, False), dlr_loss(z, y, None, False), atol=1e-6)
    t = torch.tensor([2, 0])
    # targeted: −(z_y − z_t)/(z_π1 − (z_π3 + z_π4)/2)
    expect = torch.tensor([-(3 - 0) / (3 - (0 - 1) / 2), -(2 - 0) / (5 - (1 + 0) / 2)])
    assert torch.allclose(dlr_loss(z, y, t, True), expect)
    with pytest.raises(ValueError):
        dlr_loss(z[:, :2], y, None, False)


# ----------------------------------------------------------------------------- keep_broken, re-check

def test_keep_broken_returns_breaking_iterate(digits):
    model, x, y = digits
    keys = keys_for(len(x))
    r = ATTACKS.build("pgd", eps=0.1, steps=10, keep_broken=True)(target_for(model, keys), x, y,
                                                                 Noise.for_batch(0, keys, "n"))
    assert r.nfe == 11
    with torch.no_grad():
        wrong = model(r.x_adv).argmax(1) != y
    assert torch.equal(wrong, r.broken_step >= 0)  # every iterate was checked, the final one too
    assert 0 < int(wrong.sum()) < len(y)


def test_recheck_hook_confirms_breaks(digits):
    model, x, y = digits
    x, y = x[:40], y[:40]
    keys = keys_for(40)
    attack = ATTACKS.build("pgd", eps=0.3, steps=8, recheck_draws=5)
    with pytest.raises(ValueError, match="recheck"):
        attack(target_for(model, keys), x, y, Noise.for_batch(0, keys, "n"))
    calls = []

    def veto_even(x_sub, idx, step):  # the "real defense" never errs on even positions
        calls.append((idx.clone(), step))
        with torch.no_grad():
            z = model(x_sub)
        z[idx % 2 == 0] = F.one_hot(y[idx[idx % 2 == 0]], 10).float() * 10
        return z.unsqueeze(1)

    r = attack(target_for(model, keys), x, y, Noise.for_batch(0, keys, "n"), recheck=veto_even)
    assert (r.broken_step[0::2] == -1).all()
    assert (r.broken_step[1::2] >= 0).float().mean() > 0.8
    with torch.no_grad():
        assert (model(r.x_adv[1::2]).argmax(1) != y[1::2])[r.broken_step[1::2] >= 0].all()
    assert all(int(s) <= 8 for _, s in calls) and calls
    first_idx = calls[0][0]
    assert first_idx.dtype == torch.int64 and first_idx.max() < 40


def test_make_defense_recheck_is_keyed_per_sample(digits):
    model, x, y = digits
    x = x[:10]
    keys = keys_for(10)
    defense = Defense(model, NoisyPurifier(0.2))
    rc = make_defense_recheck(defense, 5, keys, "ctx/recheck", draws=4)
    full = rc(x, torch.arange(10), 3)
    idx = torch.tensor([7, 2, 9])
    sub = rc(x[idx], idx, 3)
    assert full.shape == (10, 4, 10)
    assert torch.allclose(full[idx], sub, atol=1e-5)
    assert not torch.allclose(rc(x, torch.arange(10), 4), full)  # fresh draws per step


def test_bpda_eot_hill_style_run_end_to_end(digits):
    """Hill-style PGD (BPDA, EOT mean logits, H-draw re-check) on a stochastic purifier."""
    from pipeline.attacks.presets import expand_preset

    model, x, y = digits
    x, y = x[:30], y[:30]
    keys = keys_for(30)
    (entry,) = expand_preset("hill2021", {"eps": 0.3, "steps": 10, "step_size": 0.05, "eot": 3,
                                          "recheck_draws": 8})
    attack = ATTACKS.build(entry["name"], **entry["params"])
    defense = Defense(model, NoisyPurifier(0.1))
    target = defense.attack_target(entry["gradient"], 1, keys, "atk", entry["eot"])
    rc = make_defense_recheck(defense, 1, keys, "atk/recheck", attack.recheck_draws)
    r = attack(target, x, y, Noise.for_batch(1, keys, "atk/noise"), recheck=rc)
    assert isinstance(r, AttackResult) and r.nfe == 11
    assert (r.broken_step >= 0).float().mean() > 0.8
    json.dumps(attack.params())


def test_goal_success_on_subset():
    g = Goal(torch.tensor([0, 1, 2]), None, False)
    z = torch.tensor([[[5.0, 0, 0]], [[5.0, 0, 0]]])
    assert g.success(z, torch.tensor([0, 2])).tolist() == [False, True]


def test_params_are_json_and_roundtrip():
    for name, kw in [("fgsm", {"eps": 0.1}), ("rfgsm", {"eps": 0.1}), ("pgd", {"eps": 0.1, "steps": 3}),
                     ("apgd", {"eps": 0.5, "norm": "l2", "targeted": True, "loss": "dlr", "n_target_classes": 3})]:
        a = ATTACKS.build(name, **kw)
        p = a.params()
        json.dumps(p)
        b = ATTACKS.build(name, **p)
        assert b.params() == p
