"""pipeline.report.record_checks: the checks the report runs on committed records (ε sweeps,
attack ordering, Square vs gradient attacks, cascade chains, clean accuracy above chance).
Through report.summarize: tests/test_report.py."""
from __future__ import annotations

import json

import pytest
from scipy.stats import binom

from pipeline.report import record_checks


def _roundtrip(r: dict) -> dict:
    """A check's result: the four keys every check returns, and plain JSON."""
    assert set(r) == {"name", "passed", "detail", "values"}
    assert json.loads(json.dumps(r)) == r
    return r


def test_attack_ordering_flags_a_weaker_attack_beating_the_main_one():
    order = _roundtrip(record_checks.check_attack_ordering({"pgd": 0.4, "fgsm": 0.3, "transfer": 0.5}, "pgd",
                                                           ["fgsm", "transfer"]))
    assert not order["passed"] and order["values"]["beating"] == {"fgsm": 0.3}
    assert record_checks.check_attack_ordering({"pgd": 0.2, "fgsm": 0.3}, "pgd", ["fgsm"])["passed"]


def test_unbounded_eps_without_an_accuracy_records_none():
    assert record_checks.check_unbounded_eps(float("nan"))["values"]["robust_accuracy"] is None


def test_eps_monotone():
    r = _roundtrip(record_checks.check_eps_monotone({0.0: 0.95, 0.1: 0.5, 0.2: 0.6, 0.3: 0.1}))
    assert not r["passed"]
    assert r["values"]["offending"] == [{"eps_small": 0.1, "acc_small": 0.5, "eps_large": 0.2, "acc_large": 0.6}]
    assert record_checks.check_eps_monotone({0.3: 0.0, 0.0: 0.9, 0.1: 0.5, 0.2: 0.5})["passed"]
    assert record_checks.check_eps_monotone({0.1: 0.5, 0.2: 0.505}, tol=0.01)["passed"]


def test_square_vs_gradient_tolerates_autoattacks_0_002():
    """AutoAttack's check_square_sr flags Square only below the best other accuracy − 0.002:
    one extra break in 500 samples is not gradient masking, two are flagged."""
    assert record_checks.check_square_vs_gradient({"sq": 249 / 500}, {"apgd": 250 / 500})["passed"]
    flagged = record_checks.check_square_vs_gradient({"sq": 248 / 500}, {"apgd": 250 / 500, "pgd": 0.6})
    assert not flagged["passed"] and flagged["values"]["tol"] == 0.002
    assert not record_checks.check_square_vs_gradient({"sq": 0.499}, {"apgd": 0.5}, tol=0.0)["passed"]


def test_cascade_chain_names_an_earlier_entry_of_the_same_norm_and_no_larger_eps():
    entries = {0: {"attack_index": 0, "eps": 0.1, "norm": "linf"}, 1: {"attack_index": 1, "eps": 0.2, "norm": "linf"},
               2: {"attack_index": 2, "eps": 0.1, "norm": "l2"}}

    def check(idx, eps, norm, *sources):
        entry = {"attack_index": idx, "eps": eps, "norm": norm,
                 "cascade_from": [{"attack_index": s, "rows": 5} for s in sources]}
        return _roundtrip(record_checks.check_cascade_chain(entry, entries))

    assert check(3, 0.1, "linf", 0)["passed"]            # same threat model
    assert check(3, 0.2, "linf", 0, 1)["passed"]         # from a smaller ε: inside the larger ball
    larger = check(3, 0.1, "linf", 0, 1)                 # issue 22: ε = 0.2's break counted at 0.1
    assert not larger["passed"] and larger["values"]["offending"][0]["attack_index"] == 1
    assert "from attack 1 (linf ε=0.2)" in larger["detail"]
    assert not check(3, 0.1, "linf", 2)["passed"]        # another norm
    assert not check(0, 0.1, "linf", 0)["passed"]        # not an earlier entry
    assert not check(3, 0.1, "linf", 9)["passed"]        # no such entry


def test_chance_bound_is_the_binomial_upper_quantile():
    for n, p in ((10, 0.1), (360, 0.1), (1000, 0.25), (50000, 0.001)):
        b = record_checks.chance_bound(n, p)
        assert binom.sf(b, n, p) <= record_checks.CHANCE_ALPHA < binom.sf(b - 1, n, p)
    # the upper bound is Clopper-Pearson's: at it, k or fewer successes have probability alpha
    for k, n in ((0, 10), (32, 360), (9, 10)):
        up = record_checks.accuracy_upper(k, n)
        assert binom.cdf(k, n, up) == pytest.approx(record_checks.CHANCE_ALPHA, rel=1e-6)


def test_clean_accuracy_near_chance_is_flagged_with_a_margin_from_n():
    balanced = {c: 36 for c in range(10)}
    wrong_images = record_checks.check_clean_above_chance(32, 360, balanced)     # the issue's 8.8 %
    assert not wrong_images["passed"] and "not above chance (10.0 %" in wrong_images["detail"]
    assert record_checks.check_clean_above_chance(330, 360, balanced)["passed"]
    # a tiny job is never flagged, only left undecided: 2 of 10 may be a working model's bad luck
    tiny = record_checks.check_clean_above_chance(2, 10, {c: 1 for c in range(10)})
    assert tiny["passed"] and "10 samples are too few to tell" in tiny["detail"]
    assert record_checks.check_clean_above_chance(4, 5, {c: 1 for c in range(5)})["passed"]
    assert not record_checks.check_clean_above_chance(3, 30, {c: 3 for c in range(10)})["passed"]
    # the best constant guess sets chance: 4 labels, one of them 70 % of the data
    skewed = {0: 70, 1: 10, 2: 10, 3: 10}
    assert not record_checks.check_clean_above_chance(72, 100, skewed)["passed"]


def test_run_data_checks_reads_the_report_fields():
    per_class = [{"label": c, "clean_classifier": {"k": 3, "n": 36}} for c in range(10)]
    clean = {"classifier": {"k": 32, "n": 360}, "defended": {"k": 31, "n": 360}}
    out = record_checks.run_data_checks(clean, per_class)
    assert [(c["name"], c["values"]["which"], c["passed"]) for c in out] == [
        ("clean_above_chance", "classifier", False), ("clean_above_chance", "defended", False)]
    same = {"classifier": {"k": 300, "n": 360}, "defended": {"k": 300, "n": 360}}
    assert len(record_checks.run_data_checks(same, per_class)) == 1 and record_checks.run_data_checks(None, []) == []
