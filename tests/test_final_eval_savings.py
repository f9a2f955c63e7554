"""No final R-run evaluation for a sample whose break the attack confirmed: the per-sample
verdicts, the report's headline and its alternative decision rules are those of the protocol
that evaluates every sample, on a stochastic defense (Gaussian noise, keyed draws) and a
deterministic one (a DAE), while the purifier runs R rows fewer per confirmed break."""
from __future__ import annotations

import pytest

from pipeline import config, schema
from pipeline.evaluation import batch
from pipeline.evaluation.protocol import build_protocol
from pipeline.io import shards
from pipeline.report import aggregate, summary, tables
from tests.conftest import evaluate_counting_purifier_rows, job_dict

ATTACKS = [{"name": "pgd", "params": {"eps": 0.2, "steps": 4, "step_size": 0.08}, "eot": 2},
           {"name": "fgsm", "params": {"eps": 0.15}, "gradient": "classifier"}]
DEFENSES = {"gaussian": ({"name": "gaussian", "params": {"sigma": 0.25}}, 4),
            "dae": (None, 1)}   # the fixture's trained DAE, deterministic
SAMPLES = 45


def _protocol(digits_shards, digits_models, tmp_path, defense: str):
    purifier, runs = DEFENSES[defense]
    # max_rows pinned: auto would time (and so count) purifier rows on the first call; every sample
    # attacked: this saving alone (the clean gate, which also skips evaluations, is test_clean_gate.py's)
    over = {"attacks": ATTACKS, "evaluation": {"runs": runs, "max_rows": 4096, "attack_misclassified": True}}
    if purifier:
        over["purifier"] = purifier
    return build_protocol(config.from_dict(job_dict(digits_shards["pattern"], digits_models, str(tmp_path), **over)))


def _evaluate(p, samples, monkeypatch, skip: bool) -> tuple[list[dict], int]:
    """The shard's rows with the saving on or off, and the rows the purifier ran."""
    monkeypatch.setattr(batch, "SKIP_CONFIRMED_BREAKS", skip)
    return evaluate_counting_purifier_rows(p, samples, monkeypatch)


def _document(rows: list[dict]) -> dict:
    table = schema.to_table({**r, "status": "ok", "shard": "s", "schema_version": schema.SCHEMA_VERSION}
                            for r in rows)
    doc = summary.document(aggregate.combine([aggregate.partial(table)]))
    for a in doc["attacks"]:   # what the saving changes: cost, and the count of skipped evaluations
        for k in ("purify_nfe_per_sample", "seconds_per_sample", "seconds_total", "final_skipped",
                  "number_forward_passes"):
            a.pop(k)
    return {k: doc[k] for k in ("worst_case", "attacks", "per_class", "curves", "clean")}


@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_skipping_the_final_evaluation_of_confirmed_breaks_keeps_every_verdict(
        defense, digits_shards, digits_models, tmp_path, monkeypatch):
    p = _protocol(digits_shards, digits_models, tmp_path, defense)
    assert p.defense.purifier.stochastic == (defense == "gaussian")
    samples = shards.read_shard(shards.expand(digits_shards["pattern"])[0])[:SAMPLES]
    full, full_rows = _evaluate(p, samples, monkeypatch, skip=False)
    saved, saved_rows = _evaluate(p, samples, monkeypatch, skip=True)
    assert [(r["attack_index"], r["key"]) for r in saved] == [(r["attack_index"], r["key"]) for r in full]
    skipped = [r for r in saved if not r["final_evaluated"]]
    # the test means something: confirmed breaks to skip, and samples that survive
    assert skipped and any(r["robust"] for r in saved)
    for s, f in zip(saved, full):
        assert f["final_evaluated"] is True
        same = ("robust", "broken_step", "candidate_step", "adv_pred", "clean_purified_preds", "decision")
        assert {k: s[k] for k in same} == {k: f[k] for k in same}, s["key"]
        if s["final_evaluated"]:
            assert (s["purified_preds"], s["vote_pred"], s["mean_logit_pred"]) == \
                (f["purified_preds"], f["vote_pred"], f["mean_logit_pred"])
            assert s["purified_mean_logits"] == pytest.approx(f["purified_mean_logits"], abs=1e-5)
            assert s["purify_nfe"] == f["purify_nfe"]
        else:   # a confirmed break: broken without the evaluation, its per-run columns not evaluated
            assert s["broken_step"] >= 0 and s["robust"] is False
            assert all(s[c] is None for c in ("purified_preds", "purified_mean_logits", "vote_pred",
                                              "mean_logit_pred", "mean_softmax_pred", "worst_of_runs_correct"))
    # the purifier ran exactly R rows fewer per skipped sample
    assert full_rows - saved_rows == p.runs * len(skipped)
    # the report: headline, per-attack verdicts under every rule, curves — unchanged
    assert _document(saved) == _document(full)


def test_a_confirmed_break_is_broken_under_every_rule_in_the_report():
    base = {"schema_version": schema.SCHEMA_VERSION, "status": "ok", "shard": "s", "label": 1, "runs": 3,
            "attack_index": 0, "attack_name": "pgd", "eps": 0.1, "norm": "linf", "eot": 1, "decision": "mean_logit",
            "clean_pred": 1, "clean_mean_logit_pred": 1, "adv_pred": 0}
    evaluated = {"final_evaluated": True, "purified_preds": [1, 1, 1], "mean_logit_pred": 1, "vote_pred": 1,
                 "mean_softmax_pred": 1, "worst_of_runs_correct": True}
    rows = [{**base, **evaluated, "key": "survived", "broken_step": -1, "robust": True},
            # broken at step 2, the final re-evaluation happens to be right: broken all the same
            {**base, **evaluated, "key": "lucky", "broken_step": 2, "robust": False},
            {**base, "key": "skipped", "final_evaluated": False, "broken_step": 0, "robust": False}]
    doc = summary.document(aggregate.combine([aggregate.partial(schema.to_table(rows))]))
    (a,) = doc["attacks"]
    for rule in ("robust", "robust_mean_logit", "robust_vote", "robust_mean_softmax", "robust_worst_of_runs"):
        assert (a[rule]["k"], a[rule]["n"]) == (1, 3), rule
    assert a["final_skipped"] == 1 and doc["worst_case"][0]["k"] == 1
    assert "the final R-run evaluation was not run for the 1 row whose break the attack confirmed" in \
        " ".join(tables.format_text(doc).split())
    (curve,) = doc["curves"]["runs"]
    assert [(pt["worst_of_r"]["k"], pt["vote_of_r"]["k"], pt["vote_of_r"]["n"]) for pt in curve["points"]] == \
        [(1, 1, 3)] * 3
