"""Report figures from records alone: worst case, per-attack accuracy, intervals, checks."""
import json

import pytest
from scipy.stats import binomtest

from pipeline import report, schema
from pipeline.report import aggregate, tables


def _row(key, attack_index, name="pgd", gradient="full", eps=0.1, correct=True, label=1, **over):
    """One ok record: `correct` sets every defended prediction (and the bare adv one)."""
    pred = label if correct else label + 1
    row = {"schema_version": schema.SCHEMA_VERSION, "job": "j", "config_hash": "h", "stage": "evaluate",
           "shard": "s", "key": key, "label": label, "status": "ok", "attack_index": attack_index,
           "attack_name": name, "gradient_mode": gradient, "eps": eps, "eps_255": eps * 255, "eot": 1,
           "norm": "linf", "attack_params": json.dumps({"eps": eps, "norm": "linf"}), "runs": 1,
           "clean_pred": label, "clean_mean_logit_pred": label, "adv_pred": pred, "mean_logit_pred": pred,
           "vote_pred": pred, "mean_softmax_pred": pred, "worst_of_runs_correct": correct, "broken_step": -1,
           "linf": eps, "l2": 0.0, "seconds": 0.1, "attack_nfe": 10, "purify_nfe": 2}
    row.update(over)
    return row


def _rows(attack_index, name, gradient, eps, correct, n=20, **over):
    return [_row(f"k{i}", attack_index, name, gradient, eps, i < correct, **over) for i in range(n)]


def _doc(rows):
    return report.summarize(schema.to_table(rows))


def _checks(rows):
    doc = _doc(rows)
    return {c["name"]: c for c in doc["checks"]["record"]}, doc


def test_eps_sweep_monotone_and_unbounded():
    rows = _rows(0, "pgd", "full", 0.1, 15) + _rows(1, "pgd", "full", 0.2, 17) + _rows(2, "pgd", "full", 1.0, 3)
    checks, doc = _checks(rows)
    assert not checks["eps_monotone"]["passed"]            # 75 % at 0.1 but 85 % at 0.2
    assert not checks["unbounded_eps"]["passed"]           # 15 % left at ε = 1
    assert tables.FLAGGED in report.format_table(doc)
    good = _rows(0, "pgd", "full", 0.1, 15) + _rows(1, "pgd", "full", 0.2, 9) + _rows(2, "pgd", "full", 1.0, 0)
    checks, doc = _checks(good)
    assert checks["eps_monotone"]["passed"] and checks["unbounded_eps"]["passed"]
    assert "checks: all" in report.format_table(doc)


def test_transfer_attack_beating_the_adaptive_one_is_flagged():
    checks, _ = _checks(_rows(0, "pgd", "classifier", 0.15, 10) + _rows(1, "pgd", "bpda", 0.15, 12))
    assert not checks["attack_ordering"]["passed"]
    assert "attack 0 (pgd, classifier)" in checks["attack_ordering"]["detail"]
    checks, _ = _checks(_rows(0, "pgd", "classifier", 0.15, 14) + _rows(1, "pgd", "bpda", 0.15, 12))
    assert checks["attack_ordering"]["passed"]


def test_square_beating_every_gradient_attack_is_flagged():
    rows = _rows(0, "pgd", "full", 0.1, 12) + _rows(1, "apgd", "bpda", 0.1, 11) + _rows(2, "square", "none", 0.1, 8)
    checks, _ = _checks(rows)
    sq = checks["square_vs_gradient"]
    assert not sq["passed"] and "attack 2 (square, none)" in sq["detail"] and sq["values"]["best_gradient"] == 0.55
    rows = _rows(0, "pgd", "full", 0.1, 12) + _rows(1, "apgd", "bpda", 0.1, 7) + _rows(2, "square", "none", 0.1, 8)
    assert _checks(rows)[0]["square_vs_gradient"]["passed"]   # one gradient attack does better than Square


def test_convergence_flags_breaks_in_the_last_steps():
    # 100 steps: 2 of 20 samples first broken at step 95 (≥ 0.9·100) → 10 % > 1 %
    rows = [_row(f"k{i}", 0, correct=i >= 5, attack_steps=100, broken_step=(95 if i < 2 else 10 if i < 5 else -1))
            for i in range(20)]
    conv = _checks(rows)[0]["convergence"]
    assert not conv["passed"] and conv["values"]["late_breaks"] == 2 and conv["values"]["n"] == 20
    rows = [{**r, "broken_step": 10 if r["broken_step"] >= 0 else -1} for r in rows]
    assert _checks(rows)[0]["convergence"]["passed"]
    # attack_steps not recorded: the attack's own `steps` parameter stands in
    old = [{**r, "attack_steps": None, "broken_step": 19 if r["broken_step"] >= 0 else -1,
            "attack_params": json.dumps({"eps": 0.1, "steps": 20})} for r in rows]
    assert not _checks(old)[0]["convergence"]["passed"]


def test_accuracies_and_intervals_from_scipy():
    doc = _doc(_rows(0, "pgd", "full", 0.1, 5))
    a = doc["attacks"][0]
    assert a["robust"]["acc"] == 0.25 and a["robust"]["k"] == 5 and a["robust"]["n"] == 20
    assert a["clean_classifier"]["acc"] == 1.0 and a["robust_mean_logit"]["acc"] == 0.25
    ci = binomtest(5, 20).proportion_ci(method="wilson")
    assert (a["robust"]["lo"], a["robust"]["hi"]) == (ci.low, ci.high)
    assert report.wilson(0, 10)[0] == 0.0 and report.wilson(10, 10)[1] == 1.0


def test_wilson_interval_hand_computed():
    lo, hi = report.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


def test_worst_case_is_the_per_sample_intersection():
    """Attack 0 leaves k0..k9 robust, attack 1 k5..k14: the worst case is k5..k9 (5 of 20),
    not the minimum of the two accuracies (10 of 20)."""
    a0 = [_row(f"k{i}", 0, eps=0.1, correct=i < 10) for i in range(20)]
    a1 = [_row(f"k{i}", 1, gradient="bpda", eps=0.1, correct=5 <= i < 15) for i in range(20)]
    clean = [_row(f"k{i}", -1, name="none", gradient="none", eps=0.0, correct=i < 18, norm=None,
                  clean_mean_logit_pred=1 if i < 18 else 0) for i in range(20)]
    failed = [{"schema_version": schema.SCHEMA_VERSION, "shard": "s", "key": "bad", "label": 3,
               "status": "decode_error", "error": "x"}]
    doc = _doc(a0 + a1 + clean + failed)
    (w,) = doc["worst_case"]
    assert (w["k"], w["n"], w["attacks"], w["incomplete"]) == (5, 20, [0, 1], 0)
    assert [a["robust"]["acc"] for a in doc["attacks"] if a["attack"] != "none"] == [0.5, 0.5]
    assert doc["clean"]["defended"]["acc"] == 0.9 and doc["clean"]["from_attack_index"] == -1
    assert doc["failed_rows"] == 1 and doc["failed"] == {"decode_error": 1} and doc["samples"] == 21
    text = report.format_table(doc)
    assert text.index("worst case of attacks 0, 1") < text.index("Per attack")


def test_worst_case_counts_samples_missing_a_row_as_incomplete():
    a0 = [_row(f"k{i}", 0) for i in range(10)]
    a1 = [_row(f"k{i}", 1, gradient="bpda") for i in range(8)]   # k8, k9 have no row for attack 1
    (w,) = _doc(a0 + a1)["worst_case"]
    assert (w["n"], w["k"], w["incomplete"]) == (8, 8, 2)


def test_robust_column_wins_and_null_falls_back_to_the_decision_rule():
    rows = [_row("a", 0, robust=False),                          # verified broken although final is right
            _row("b", 0, robust=None, broken_step=3),           # fallback: confirmed break at step 3
            _row("c", 0, robust=None),                          # fallback: correct, never broken
            _row("d", 0, robust=None, decision="vote", vote_pred=2, label=1)]   # the vote decides: wrong
    a = _doc(rows)["attacks"][0]
    # the mean-logit rule on the final iterate: right for all four, but b's break was confirmed
    assert a["robust"]["k"] == 1 and a["robust_mean_logit"]["k"] == 3


def test_curves_over_steps_and_runs():
    rows = [_row(f"k{i}", 0, correct=i >= 2, attack_steps=4, broken_step=i if i < 2 else -1) for i in range(4)]
    # R = 3 runs, per-run predictions of the label 1: k0 [1, 2, 2] k1 [1, 1, 2] k2 [2, 1, 1] k3 [1, 1, 1]
    runs = {"k0": [1, 2, 2], "k1": [1, 1, 2], "k2": [2, 1, 1], "k3": [1, 1, 1]}
    rows = [{**r, "runs": 3, "purified_preds": runs[r["key"]]} for r in rows]
    curves = _doc(rows)["curves"]
    (steps,) = curves["steps"]
    assert steps["no_break_by_step"] == [0.75, 0.5, 0.5, 0.5] and steps["steps"] == 4
    (rc,) = curves["runs"]
    # k0 and k1 were confirmed broken (steps 0 and 1): wrong at every r, whatever their runs say
    assert [p["worst_of_r"]["k"] for p in rc["points"]] == [1, 1, 1]
    # vote of the first r (ties → lowest class): k2 r=1 wrong, r=2 [2, 1] → 1 right, r=3 right; k3 right
    assert [p["vote_of_r"]["k"] for p in rc["points"]] == [1, 2, 2]


def test_per_class_and_markdown():
    rows = [_row(f"k{i}", 0, label=i % 2, correct=i < 6) for i in range(10)]
    doc = _doc(rows)
    by = {c["label"]: c for c in doc["per_class"]}
    assert by[0]["worst_case"][0]["k"] == 3 and by[0]["worst_case"][0]["n"] == 5
    assert by[1]["clean_defended"]["acc"] == 1.0 and by[1]["robust"][0]["k"] == 3
    md = tables.format_markdown(doc)
    assert "| label | n | clean (bare) |" in md and "### Per attack" in md


def test_summarize_of_parts_equals_summarize_of_the_whole():
    """The aggregates are additive: combining per-shard partials gives the figures of the whole."""
    rows = []
    for s in range(3):
        for i in range(15):
            for idx, eps in ((0, 0.1), (1, 0.1), (2, 0.2)):
                rows.append(_row(f"s{s}k{i}", idx, eps=eps, shard=f"s{s}", label=i % 3,
                                 correct=(i * (idx + 1) + s) % 4 != 0, broken_step=(i % 5) - 1, attack_steps=5))
    whole = report.summarize(schema.to_table(rows))
    parts = [aggregate.partial(schema.to_table([r for r in rows if r["shard"] == f"s{s}"])) for s in range(3)]
    from pipeline.report import summary

    combined = summary.document(aggregate.combine(parts))
    _assert_close(combined, whole)   # counts exactly; sums of seconds up to float rounding
    assert combined["worst_case"] == whole["worst_case"] and combined["per_class"] == whole["per_class"]


def _assert_close(a, b, path="doc"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-12), path
    else:
        assert a == b, path


def test_refuses_unknown_format():
    with pytest.raises(ValueError, match="unknown report format"):
        report.render(["nowhere"], "pdf")


def _carried(rows, source):
    """Rows of `rows` whose sample is wrong become rows a cascade carried from `source`."""
    return [{**r, "cascade_from": source, "attack_nfe": 0} if r["mean_logit_pred"] != r["label"] else r
            for r in rows]


def test_cascade_chain_across_threat_models_is_flagged():
    """The shape of issue 22's records: an ε sweep cascaded as one chain, so the entries at
    ε = 0.1 carry the breaks of ε = 0.2 (and an ℓ2 entry those of an ℓ∞ one)."""
    l2 = {"norm": "l2", "attack_params": json.dumps({"eps": 1.0, "norm": "l2"})}
    bad = (_rows(0, "apgd", "full", 0.1, 16) + _rows(1, "apgd", "full", 0.2, 3)
           + _carried(_rows(2, "apgd", "full", 0.1, 3), 1) + _carried(_rows(3, "square", "full", 1.0, 3, **l2), 0))
    checks = [c for c in _doc(bad)["checks"]["record"] if c["name"] == "cascade_chain"]
    assert [(c["attack_index"], c["passed"]) for c in checks] == [(2, False), (3, False)]
    assert "17 row(s) at linf ε=0.1 carry a cascade break from attack 1 (linf ε=0.2)" in checks[0]["detail"]
    assert "from attack 0 (linf ε=0.1)" in checks[1]["detail"] and "at l2 ε=1" in checks[1]["detail"]
    assert "cascade_chain" in report.format_table(_doc(bad))
    # the same sweep chained per threat model; a break carried from a smaller ε is sound
    good = (_rows(0, "apgd", "full", 0.1, 16) + _rows(1, "apgd", "full", 0.2, 3)
            + _carried(_rows(2, "apgd", "full", 0.1, 14), 0) + _carried(_rows(3, "apgd", "full", 0.2, 2), 0))
    doc = _doc(good)
    checks = [c for c in doc["checks"]["record"] if c["name"] == "cascade_chain"]
    assert [(c["attack_index"], c["passed"]) for c in checks] == [(2, True), (3, True)]
    assert doc["attacks"][2]["cascade_from"] == [{"attack_index": 0, "rows": 6}]
    assert "checks: all" in report.format_table(doc)
