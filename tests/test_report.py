"""Summaries and job-level checks computed from records alone."""
import json

from pipeline import report, schema


def _rows(attack_index, name, gradient, eps, correct, n=20, params=None):
    rows = []
    for i in range(n):
        ok = i < correct
        rows.append({"schema_version": schema.SCHEMA_VERSION, "job": "j", "config_hash": "h", "stage": "evaluate",
                     "shard": "s", "key": f"k{i}", "label": 1, "status": "ok", "attack_index": attack_index,
                     "attack_name": name, "gradient_mode": gradient, "eps": eps, "eot": 1, "norm": "linf",
                     "attack_params": json.dumps({"eps": eps, **(params or {})}), "runs": 1,
                     "clean_pred": 1, "clean_mean_logit_pred": 1, "adv_pred": 1 if ok else 0,
                     "mean_logit_pred": 1 if ok else 0, "vote_pred": 1 if ok else 0,
                     "mean_softmax_pred": 1 if ok else 0, "worst_of_runs_correct": ok, "broken_step": -1,
                     "linf": eps, "l2": 0.0, "seconds": 0.1})
    return rows


def _checks(rows):
    summary = report.summarize(schema.to_table(rows))
    return {c["name"]: c for c in summary["job_checks"]}, summary


def test_eps_sweep_monotone_and_unbounded():
    rows = _rows(0, "pgd", "full", 0.1, 15) + _rows(1, "pgd", "full", 0.2, 17) + _rows(2, "pgd", "full", 1.0, 3)
    checks, summary = _checks(rows)
    assert not checks["eps_monotone"]["passed"]            # 75 % at 0.1 but 85 % at 0.2
    assert not checks["unbounded_eps"]["passed"]           # 15 % left at ε = 1
    assert "CHECKS FLAGGED" in report.format_table(summary)
    good = _rows(0, "pgd", "full", 0.1, 15) + _rows(1, "pgd", "full", 0.2, 9) + _rows(2, "pgd", "full", 1.0, 0)
    checks, summary = _checks(good)
    assert checks["eps_monotone"]["passed"] and checks["unbounded_eps"]["passed"]


def test_transfer_attack_beating_the_adaptive_one_is_flagged():
    checks, _ = _checks(_rows(0, "pgd", "classifier", 0.15, 10) + _rows(1, "pgd", "bpda", 0.15, 12))
    assert not checks["attack_ordering"]["passed"]
    assert "attack 0 (pgd, classifier)" in checks["attack_ordering"]["detail"]
    checks, _ = _checks(_rows(0, "pgd", "classifier", 0.15, 14) + _rows(1, "pgd", "bpda", 0.15, 12))
    assert checks["attack_ordering"]["passed"]


def test_accuracies_and_intervals():
    _, summary = _checks(_rows(0, "pgd", "full", 0.1, 5))
    a = summary["attacks"][0]
    assert a["robust_mean_logit"]["acc"] == 0.25 and a["clean_classifier"]["acc"] == 1.0
    lo, hi = a["robust_mean_logit"]["lo"], a["robust_mean_logit"]["hi"]
    assert 0.05 < lo < 0.25 < hi < 0.5
