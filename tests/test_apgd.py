"""APGD: checkpoint schedule, first step, strength relative to PGD, ℓ2, APGD-T."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.attacks.apgd import APGD, checkpoints
from pipeline.defense import Defense
from pipeline.purifiers.base import Identity
from pipeline.registry import ATTACKS
from pipeline.seeding import Noise

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    from pipeline.classifiers.small_cnn import make
    from pipeline.datasets import load_digits
    from pipeline.training import train_classifier

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
    target = Defense(model, Identity()).attack_target("full", 0, keys, "a", 1)
    r = ATTACKS.build(name, **kw)(target, x, y, Noise.for_batch(0, keys, "noise"))
    with torch.no_grad():
        return r, float((model(r.x_adv).argmax(1) == y).float().mean())


def test_checkpoint_schedule_matches_paper():
    # p: 0, .22, .41, .57, .70, .80, .87, .93, .99 (then ≥ 1)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1000)[:3] == [220, 410, 570]
    c = checkpoints(20)
    assert c == sorted(set(c)) and all(0 < w < 20 for w in c)


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
    clean = float((model(x).argmax(1) == y).float().mean())
    rows = {}
    for eps in (0.05, 0.1, 0.2):
        _, rows[("pgd", eps)] = _run(model, x, y, "pgd", eps=eps, steps=20)
        _, rows[("apgd", eps)] = _run(model, x, y, "apgd", eps=eps, steps=20)
        _, rows[("apgd-dlr", eps)] = _run(model, x, y, "apgd", eps=eps, steps=20, loss="dlr")
        assert rows[("apgd", eps)] <= rows[("pgd", eps)] + 0.02  # same budget, no weaker
        assert rows[("apgd-dlr", eps)] <= clean - 0.1
    assert rows[("apgd", 0.2)] <= 0.02
    _, a0 = _run(model, x, y, "apgd", eps=0.0)
    assert a0 == clean


def test_apgd_l2(digits):
    model, x, y = digits
    r, a = _run(model, x, y, "apgd", eps=1.5, norm="l2", steps=20)
    assert ((r.x_adv - x).flatten(1).norm(dim=1) <= 1.5 + 1e-5).all()
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    _, pgd_a = _run(model, x, y, "pgd", eps=1.5, norm="l2", steps=20)
    assert a <= 0.3 and a <= pgd_a + 0.03


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


def test_apgd_restarts_never_hurt(digits):
    model, x, y = digits
    _, one = _run(model, x, y, "apgd", eps=0.08, steps=10)
    r, two = _run(model, x, y, "apgd", eps=0.08, steps=10, restarts=3)
    assert two <= one
    assert int(r.broken_step.max()) < 3 * 11
