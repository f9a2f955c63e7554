"""`evaluation.verdict: recheck` — Hill et al.'s record instead of R-run evaluations.

The clean verdict: the first attack's EOT draws nominate the samples they misclassify, its
re-check draws confirm; robust: attacked and no break confirmed at any step (the returned
image's included), with no final R-run evaluation. On a stochastic defense the attack itself
is the same sample for sample whichever verdict is asked for (its draws are keyed), a sample
robust under R runs is robust under the re-check record, and the purifier runs fewer rows. On
a deterministic defense (the forward is exact) the two verdicts agree sample for sample."""
from __future__ import annotations

import pytest
import torch

from pipeline import config, report, schema
from pipeline.evaluation import batch
from pipeline.evaluation.protocol import build_protocol
from pipeline.io import shards
from tests.conftest import evaluate_counting_purifier_rows, job_dict

PGD = {"name": "pgd", "params": {"eps": 0.05, "steps": 3, "step_size": 0.025, "recheck_draws": 6}, "eot": 2}
SAMPLES = 64
PER_RUN = ("purified_preds", "purified_mean_logits", "mean_logit_pred", "vote_pred", "mean_softmax_pred",
           "worst_of_runs_correct", "clean_purified_preds")
ATTACK = ("broken_step", "candidate_step", "adv_pred", "attack_nfe", "attack_steps", "linf", "l2")
GAUSSIAN = {"name": "gaussian", "params": {"sigma": 0.5}}


def _job(digits_shards, digits_models, tmp_path, purifier=None, attacks=None, **evaluation) -> dict:
    extra = {"purifier": purifier} if purifier else {}
    return job_dict(digits_shards["pattern"], digits_models, str(tmp_path), attacks=attacks or [PGD],
                    evaluation={"runs": 4, "check_samples": 0, **evaluation}, **extra)


def _samples(digits_shards):
    return shards.read_shard(shards.expand(digits_shards["pattern"])[0])[:SAMPLES]


def _evaluate(job: dict, samples, monkeypatch) -> tuple[list[dict], int, list[tuple[str, int, int]]]:
    """Rows, purifier rows, and every defended evaluation's (context, samples, draws)."""
    p = build_protocol(config.from_dict(job))
    calls, defended = [], batch.defended

    def logged(defense, x, keys, seed, context, runs, *args, **kwargs):
        calls.append((context, len(keys), runs))
        return defended(defense, x, keys, seed, context, runs, *args, **kwargs)

    monkeypatch.setattr(batch, "defended", logged)
    rows, purifier_rows = evaluate_counting_purifier_rows(p, samples, monkeypatch)
    monkeypatch.setattr(batch, "defended", defended)
    return rows, purifier_rows, calls


def test_on_a_stochastic_defense_the_attack_is_unchanged_and_only_the_verdict_differs(
        digits_shards, digits_models, tmp_path, monkeypatch):
    samples = _samples(digits_shards)
    runs, runs_rows, _ = _evaluate(_job(digits_shards, digits_models, tmp_path / "a", GAUSSIAN), samples,
                                   monkeypatch)
    job = _job(digits_shards, digits_models, tmp_path / "b", GAUSSIAN, verdict="recheck")
    rechecked, recheck_rows, calls = _evaluate(job, samples, monkeypatch)
    # the clean verdict: one nominating forward of every sample with the attack's EOT draws, one
    # re-check of the nominated ones with its H draws; no R-run evaluation of anything
    clean = [c for c in calls if c[0].startswith("eval/")]
    assert clean[0] == ("eval/clean/nominate", SAMPLES, 2)
    assert all(c[0] == "eval/clean/recheck" and c[2] == 6 for c in clean[1:]) and len(clean) <= 2
    nominated = clean[1][1] if len(clean) == 2 else 0
    wrong = sum(r["clean_decision_pred"] != r["label"] for r in rechecked)
    assert 0 < wrong <= nominated        # a confirmed nomination is a clean error; some were not confirmed
    both = 0
    for r, e in zip(rechecked, runs, strict=True):
        assert r["key"] == e["key"] and r["verdict"] == "recheck" and e["verdict"] == "runs"
        assert r["final_evaluated"] is False and all(r[c] is None for c in PER_RUN)
        clean_right = r["clean_decision_pred"] == r["label"]
        assert r["attacked"] == clean_right
        assert r["robust"] == (clean_right and r["broken_step"] < 0)
        if r["attacked"] and e["attacked"]:   # the same attack, draw for draw
            both += 1
            assert {c: r[c] for c in ATTACK} == pytest.approx({c: e[c] for c in ATTACK}, rel=1e-5, abs=1e-6)
            assert r["robust"] >= e["robust"]   # R runs can only add a wrong final prediction
    # the test means something: most samples attacked under both, breaks confirmed, some survive
    assert both >= SAMPLES // 2
    assert any(r["broken_step"] >= 0 for r in rechecked) and any(r["robust"] for r in rechecked)
    assert recheck_rows < runs_rows


def _margin(logits: list[float]) -> float:
    top = torch.tensor(logits).topk(2).values
    return float(top[0] - top[1])


def test_on_a_deterministic_defense_both_verdicts_agree(digits_shards, digits_models, tmp_path, monkeypatch):
    """The DAE purifier is deterministic and the gradient goes through it: the attack's forward
    is the defense (confirm_draws 0), so nominating and R-run evaluating are the same function
    of the image. A disagreement may only come from float rounding on a near-tie (batches of
    other sizes sum a matmul in another order on some CPUs)."""
    samples = _samples(digits_shards)
    job = _job(digits_shards, digits_models, tmp_path / "a", attacks=[{**PGD, "params": {
        k: v for k, v in PGD["params"].items() if k != "recheck_draws"}, "eot": 1, "gradient": "full"}])
    runs, _, _ = _evaluate(job, samples, monkeypatch)
    rechecked, _, calls = _evaluate({**job, "job": {**job["job"], "output": str(tmp_path / "b")},
                                     "evaluation": {**job["evaluation"], "verdict": "recheck"}}, samples, monkeypatch)
    assert [c[0] for c in calls if c[0].startswith("eval/")] == ["eval/clean/nominate"]   # exact: no re-check
    assert all(r["confirm_draws"] == 0 for r in rechecked)
    assert any(r["robust"] for r in runs) and any(not r["robust"] for r in runs)
    for r, e in zip(rechecked, runs, strict=True):
        if r["robust"] != e["robust"] or r["clean_decision_pred"] != e["clean_decision_pred"]:
            assert e["purified_mean_logits"] is not None and _margin(e["purified_mean_logits"]) < 1e-4, r["key"]


def test_the_report_reads_recheck_records(digits_shards, digits_models, tmp_path, monkeypatch):
    rows, _, _ = _evaluate(_job(digits_shards, digits_models, tmp_path, GAUSSIAN, verdict="recheck"),
                           _samples(digits_shards), monkeypatch)
    common = {"schema_version": schema.SCHEMA_VERSION, "job": "j", "config_hash": "h", "stage": "evaluate",
              "shard": "s", "status": "ok"}
    doc = report.summarize(schema.to_table({**r, **common} for r in rows))
    (a,) = doc["attacks"]
    assert doc["verdict"] == "recheck"
    assert a["robust"]["k"] == sum(r["robust"] for r in rows) and a["robust"]["n"] == SAMPLES
    assert a["clean_defended"]["k"] == sum(r["clean_decision_pred"] == r["label"] for r in rows)
    # no R runs: every decision rule is "not available", not 0 %, and no runs curve is drawn
    for rule in ("robust_mean_logit", "robust_vote", "robust_mean_softmax", "robust_worst_of_runs"):
        assert a[rule] is None or a[rule]["n"] == 0, rule
    assert a["final_skipped"] == 0 and not doc["curves"]["runs"]
    assert a["number_forward_passes"] is None            # "R × …": no prediction was made of R runs
    text = report.format_table(doc)
    assert "verdict recheck (Hill et al.'s record)" in text and "are n/a" in text


def test_a_diverged_purifier_is_a_nonfinite_row_not_a_robust_one(digits_shards, digits_models, tmp_path,
                                                                monkeypatch):
    """Without a final evaluation, only the checks' logits can show a purifier that diverged:
    NaN logits nominate nothing and break nothing, so unmarked every sample would be robust."""
    from pipeline.evaluation import stages

    p = build_protocol(config.from_dict(_job(digits_shards, digits_models, tmp_path, GAUSSIAN, verdict="recheck")))
    b = next(stages.batches(_samples(digits_shards)[:8], 8, p.device))
    purify = p.defense.purifier.purify

    def diverged(x, noise=None):
        out = purify(x, noise)
        out.images.fill_(float("nan"))
        return out

    monkeypatch.setattr(p.defense.purifier, "purify", diverged)
    rows = batch.evaluate_batch(p, b.x, b.y, b.keys)
    assert len(rows) == 8 and all(r["status"] == schema.Status.NONFINITE.value and r["robust"] is False
                                  and "verdict: recheck" in r["error"] for r in rows)


@pytest.mark.parametrize("attack, message", [
    ({"name": "fgsm", "params": {"eps": 0.05}}, "attacks[0]: fgsm returns an image its forward never evaluated"),
    ({"name": "pgd", "params": {"eps": 0.05, "keep_broken": False}},
     "attacks[0]: pgd returns an image its forward never evaluated, so evaluation.verdict: recheck could not "
     "judge it (use verdict: runs, or keep_broken: true)"),
    ({"name": "pgd", "params": {"eps": 0.05, "targeted": True}}, "attacks[0]: a targeted pgd confirms only its target"),
    (None, "evaluation.verdict: recheck reads the attacks' confirmed breaks, but the job has no attack"),
    ("split", "evaluation.verdict: recheck decides the evaluate stage's verdicts, but job.stages is "
              "['attack', 'purify']"),
])
def test_recheck_is_refused_where_it_could_not_judge(attack, message, digits_shards, digits_models, tmp_path):
    job = _job(digits_shards, digits_models, tmp_path, verdict="recheck")
    if attack == "split":
        job["job"] = {**job["job"], "stages": ["attack", "purify"]}
    else:
        job["attacks"] = [attack] if attack else []
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        config.from_dict(job)


def test_the_verdict_is_in_the_hash_only_when_it_is_recheck(digits_shards, digits_models, tmp_path):
    job = _job(digits_shards, digits_models, tmp_path)
    runs = config.from_dict({**job, "evaluation": {**job["evaluation"], "verdict": "runs"}})
    assert runs.hash() == config.from_dict(job).hash()            # jobs judged by runs keep their outputs
    assert config.from_dict({**job, "evaluation": {**job["evaluation"], "verdict": "recheck"}}).hash() != runs.hash()
    with pytest.raises(config.ConfigError, match="evaluation.verdict"):
        config.from_dict({**job, "evaluation": {**job["evaluation"], "verdict": "rechecks"}})
