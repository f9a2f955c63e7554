"""Gradient-masking checks flag what they should, and return JSON-serialisable dicts."""
from __future__ import annotations

import json

import torch
from torch import nn

from pipeline.evaluation import checks
from pipeline.evaluation.defense import Defense
from pipeline.purifiers.base import Purified, Purifier
from pipeline.purifiers.identity import IdentityPurifier
from pipeline.registry import ATTACKS
from pipeline.report import record_checks
from pipeline.seeding import Noise

torch.set_num_threads(1)

KEYS = [f"s{i}" for i in range(16)]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.rand(16, 1, 4, 4, generator=g)


class Quantize(Purifier):
    """Rounds to 2 levels: a step function, zero gradient almost everywhere."""

    def purify(self, x, noise=None):
        return Purified(torch.round(x), 0)


class KeyedNoise(Purifier):
    stochastic = True

    def purify(self, x, noise=None):
        return Purified((x + 0.2 * self._noise(noise, x).normal(tuple(x.shape[1:]), "n").to(x)).clamp(0, 1), 0)


class GlobalRNGNoise(Purifier):
    """Breaks the rule: randomness from torch's global generator, not the keys."""

    stochastic = True

    def purify(self, x, noise=None):
        return Purified((x + 0.2 * torch.randn_like(x)).clamp(0, 1), 0)


def _roundtrip(r):
    assert set(r) == {"name", "passed", "detail", "values"}
    assert json.loads(json.dumps(r)) == r
    return r


def test_randomness_detection():
    x = _data()
    m = _model()
    det = Defense(m, IdentityPurifier()).attack_target("full", 0, KEYS, "c", 1)
    sto = Defense(m, KeyedNoise()).attack_target("full", 0, KEYS, "c", 2)
    bad = Defense(m, GlobalRNGNoise()).attack_target("full", 0, KEYS, "c", 2)
    with torch.no_grad():
        assert _roundtrip(checks.check_randomness(det(x, 0), det(x, 1), same_keys=False))["passed"]
        r = _roundtrip(checks.check_randomness(sto(x, 0), sto(x, 1), same_keys=False))
        assert not r["passed"] and r["values"]["stochastic"]
        assert checks.check_randomness(sto(x, 0), sto(x, 1), same_keys=False, declared_stochastic=True)["passed"]
        assert not checks.check_randomness(det(x, 0), det(x, 1), False, declared_stochastic=True)["passed"]
        assert checks.check_randomness(sto(x, 0), sto(x, 0), same_keys=True)["passed"]
        r = checks.check_randomness(bad(x, 0), bad(x, 0), same_keys=True)
        assert not r["passed"] and "same noise keys" in r["detail"]


def test_zero_and_nan_gradients():
    g = torch.randn(10, 1, 4, 4)
    assert _roundtrip(checks.check_gradients(g))["passed"]
    g[2] = 0
    g[5, 0, 1, 1] = float("nan")
    r = _roundtrip(checks.check_gradients(g))
    assert not r["passed"]
    assert r["values"]["zero"] == 1 and r["values"]["nonfinite"] == 1
    assert abs(r["values"]["bad_fraction"] - 0.2) < 1e-9
    assert checks.check_gradients(g, max_fraction=0.25)["passed"]


def test_run_gradient_checks_on_targets():
    x, m = _data(), _model()
    y = torch.zeros(16, dtype=torch.long)
    ok = checks.run_gradient_checks(Defense(m, IdentityPurifier()).attack_target("full", 0, KEYS, "c", 1), x, y)
    assert [r["name"] for r in ok] == ["gradients", "randomness", "randomness", "output_range"]
    assert all(r["passed"] for r in ok), ok
    quant = checks.run_gradient_checks(Defense(m, Quantize()).attack_target("full", 0, KEYS, "c", 1), x, y)
    grad = quant[0]
    assert not grad["passed"] and grad["values"]["zero_fraction"] == 1.0
    sto = checks.run_gradient_checks(Defense(m, KeyedNoise()).attack_target("full", 0, KEYS, "c", 3), x, y,
                                     declared_stochastic=True)
    assert all(r["passed"] for r in sto), sto
    s = checks.summarize(quant)
    assert not s["passed"] and s["failed"] == ["gradients"]
    json.dumps(s)


def test_unbounded_eps_flags_masked_model():
    """A quantising defense: zero gradients, so PGD at ε = 1 cannot move — flagged masked."""
    x, m = _data(), _model()
    d = Defense(m, Quantize())
    with torch.no_grad():
        y = m(torch.round(x)).argmax(1)  # the defense is right on every clean input
    noise = Noise.for_batch(0, KEYS, "n")
    pgd = ATTACKS.build("pgd", eps=1.0, steps=10, random_start=False)
    r = pgd(d.attack_target("full", 0, KEYS, "c", 1), x, y, noise)
    with torch.no_grad():
        acc = float((d.logits(r.x_adv, Noise.for_batch(0, KEYS, "e"), "full")[:, 0].argmax(1) == y).float().mean())
    assert acc == 1.0
    masked = _roundtrip(record_checks.check_unbounded_eps(acc, eps=1.0))
    assert not masked["passed"] and "masked" in masked["detail"]
    # BPDA (straight-through) sees through the quantiser and breaks it
    r = pgd(d.attack_target("bpda", 0, KEYS, "c", 1), x, y, noise)
    with torch.no_grad():
        acc = float((d.logits(r.x_adv, Noise.for_batch(0, KEYS, "e"), "full")[:, 0].argmax(1) == y).float().mean())
    assert record_checks.check_unbounded_eps(acc, eps=1.0)["passed"]


def test_test_time_optimisation_check_asks_for_bpda():
    tto = _roundtrip(checks.check_test_time_optimization({"test_time_optimization": True}, "full"))
    assert not tto["passed"] and "BPDA" in tto["detail"]
    assert checks.check_test_time_optimization({"test_time_optimization": False})["passed"]
    assert not checks.check_test_time_optimization({"test_time_optimization": True}, "bpda")["passed"]


def test_eot_check_wants_draws_through_a_stochastic_purifier_only():
    assert not _roundtrip(checks.check_eot({"stochastic": True}, eot=1, gradient_mode="bpda"))["passed"]
    assert checks.check_eot({"stochastic": True}, eot=15)["passed"]
    assert checks.check_eot({"stochastic": True}, eot=1, gradient_mode="classifier")["passed"]


def test_output_range_check_refuses_probabilities_for_logits():
    probs = torch.softmax(torch.randn(8, 10), 1)
    assert not _roundtrip(checks.check_output_range(probs))["passed"]
    assert checks.check_output_range(torch.randn(8, 10) * 3)["passed"]
