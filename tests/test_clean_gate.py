"""The clean gate (evaluation.attack_misclassified false, the default): a sample the defended
model misclassifies clean, under the job's decision rule, is not attacked and counts not robust
(AutoAttack's run_standard_evaluation; the Hill et al. script's step −1). On a stochastic
defense (Gaussian noise, keyed draws, re-checked breaks): every other sample's record is the
one of the run that attacks every sample, robust ≤ clean per sample, fewer purifier rows."""
from __future__ import annotations

import pytest
import torch

from pipeline import config, report, schema
from pipeline.evaluation import batch
from pipeline.evaluation.protocol import build_protocol
from pipeline.io import shards
from pipeline.report import aggregate
from tests.conftest import evaluate_counting_purifier_rows, job_dict

ATTACKS = [{"name": "pgd", "params": {"eps": 0.05, "steps": 2, "step_size": 0.025}, "eot": 2},
           {"name": "fgsm", "params": {"eps": 0.05}, "gradient": "classifier"}]
SAMPLES = 64
PER_RUN = ("purified_preds", "purified_mean_logits", "mean_logit_pred", "vote_pred", "mean_softmax_pred",
           "worst_of_runs_correct")
SAME = ("robust", "broken_step", "candidate_step", "adv_pred", "final_evaluated", "attack_nfe", "attack_steps",
        "purify_nfe", "purified_preds", "mean_logit_pred", "vote_pred", "mean_softmax_pred", "worst_of_runs_correct")
# Float columns agree to float32 rounding, not bit for bit: the gated run's batches hold fewer rows, and a
# CPU BLAS may block a matmul differently by its row count (CI's machine differed in the last bits).
CLOSE = ("linf", "l2", "purified_mean_logits")


def _protocol(digits_shards, digits_models, tmp_path, decision="mean_logit", **evaluation):
    job = job_dict(digits_shards["pattern"], digits_models, str(tmp_path), attacks=ATTACKS,
                   purifier={"name": "gaussian", "params": {"sigma": 0.5}},
                   evaluation={"runs": 4, "decision": decision, "check_samples": 0, **evaluation})
    return build_protocol(config.from_dict(job))


def _samples(digits_shards):
    return shards.read_shard(shards.expand(digits_shards["pattern"])[0])[:SAMPLES]


def _evaluate(p, samples, monkeypatch, attack_misclassified: bool) -> tuple[list[dict], int, dict]:
    """Rows, purifier rows, and every row's returned image {(attack index, key): x_adv}."""
    p.attack_misclassified = attack_misclassified
    images, final = {}, batch.final_evaluation

    def keep(p_, plan, x_adv, keys, *args, **kwargs):
        images.update({(plan.index, k): x_adv[i].clone() for i, k in enumerate(keys)})
        return final(p_, plan, x_adv, keys, *args, **kwargs)

    monkeypatch.setattr(batch, "final_evaluation", keep)
    rows, purifier_rows = evaluate_counting_purifier_rows(p, samples, monkeypatch)
    monkeypatch.setattr(batch, "final_evaluation", final)
    return rows, purifier_rows, images


@pytest.mark.parametrize("decision", ["mean_logit", "vote"])
def test_the_gate_keeps_every_clean_correct_record_and_runs_fewer_rows(decision, digits_shards, digits_models,
                                                                      tmp_path, monkeypatch):
    p = _protocol(digits_shards, digits_models, tmp_path, decision)
    samples = _samples(digits_shards)
    every, every_rows, every_images = _evaluate(p, samples, monkeypatch, attack_misclassified=True)
    gated, gated_rows, gated_images = _evaluate(p, samples, monkeypatch, attack_misclassified=False)
    x = {s.key: torch.from_numpy(shards.to_unit_float(s.image)).permute(2, 0, 1) for s in samples}
    wrong = {r["key"] for r in gated if r["clean_decision_pred"] != r["label"]}
    # the test means something: samples gated, a gated one the ungated run calls robust, breaks elsewhere
    assert wrong and any(r["robust"] for r in every if r["key"] in wrong)
    assert any(r["broken_step"] >= 0 for r in gated) and any(r["robust"] for r in gated)
    for g, e in zip(gated, every, strict=True):
        assert (g["attack_index"], g["key"]) == (e["attack_index"], e["key"])
        image = gated_images[(g["attack_index"], g["key"])]
        if g["key"] in wrong:   # not attacked, not re-evaluated, not robust
            assert (g["attacked"], g["robust"], g["final_evaluated"]) == (False, False, False)
            assert (g["broken_step"], g["candidate_step"], g["attack_nfe"], g["attack_steps"]) == (-1, -1, 0, 0)
            assert g["linf"] == g["l2"] == 0 and torch.equal(image, x[g["key"]])
            assert all(g[c] is None for c in PER_RUN) and g["purify_nfe"] <= e["purify_nfe"]
        else:                   # the record of the run that attacks every sample
            assert g["attacked"] is True and e["attacked"] is True
            assert {c: g[c] for c in SAME} == {c: e[c] for c in SAME}, g["key"]
            for c in CLOSE:
                assert (g[c] is None) == (e[c] is None), (g["key"], c)
                if g[c] is not None:
                    assert torch.allclose(torch.tensor(g[c]), torch.tensor(e[c]), rtol=1e-5, atol=1e-6), (g["key"], c)
            assert torch.allclose(image, every_images[(e["attack_index"], e["key"])], atol=1e-6), g["key"]
        assert g["robust"] <= (g["clean_decision_pred"] == g["label"])   # robust ≤ clean, per sample
    assert gated_rows < every_rows


def test_the_gate_reads_the_job_decision_rule(digits_shards, digits_models, tmp_path, monkeypatch):
    p = _protocol(digits_shards, digits_models, tmp_path, "vote")
    rows, _, _ = _evaluate(p, _samples(digits_shards), monkeypatch, attack_misclassified=False)
    for r in rows:
        votes = torch.tensor(r["clean_purified_preds"]).bincount(minlength=10)
        assert r["clean_decision_pred"] == int(votes.argmax())      # the vote, ties to the lowest class
        assert r["attacked"] == (r["clean_decision_pred"] == r["label"])


def test_a_batch_with_nothing_to_attack_makes_no_attack_call(digits_shards, digits_models, tmp_path, monkeypatch):
    p = _protocol(digits_shards, digits_models, tmp_path)
    samples = _samples(digits_shards)[:4]
    bad = [shards.Sample(s.key, s.image, (s.label + 1) % 10, s.meta) for s in samples]   # every clean answer wrong
    calls = []
    monkeypatch.setattr(batch, "run_attack", lambda *a, **k: calls.append(a))
    rows, _ = evaluate_counting_purifier_rows(p, bad, monkeypatch)
    assert not calls and len(rows) == 2 * len(bad)
    assert not any(r["robust"] or r["attacked"] or r["final_evaluated"] for r in rows)


def test_the_cascade_gates_and_carries_gated_rows(digits_shards, digits_models, tmp_path, monkeypatch):
    p = _protocol(digits_shards, digits_models, tmp_path, cascade=True)
    rows, _, _ = _evaluate(p, _samples(digits_shards), monkeypatch, attack_misclassified=False)
    gated = [r for r in rows if r["attacked"] is False]
    assert gated and {r["attack_index"] for r in gated} == {0, 1}
    assert all(not r["robust"] and r["attack_nfe"] == 0 for r in gated)
    assert all(r["cascade_from"] == 0 for r in gated if r["attack_index"] == 1)   # carried, as a break


def test_the_report_states_the_gate_and_robust_never_exceeds_clean(digits_shards, digits_models, tmp_path,
                                                                  monkeypatch):
    p = _protocol(digits_shards, digits_models, tmp_path, "vote")
    rows, _, _ = _evaluate(p, _samples(digits_shards), monkeypatch, attack_misclassified=False)
    common = {"schema_version": schema.SCHEMA_VERSION, "job": "j", "config_hash": "h", "stage": "evaluate",
              "shard": "s", "status": "ok"}
    doc = report.summarize(schema.to_table({**r, **common} for r in rows))
    wrong = sum(r["clean_decision_pred"] != r["label"] for r in rows if r["attack_index"] == 0)
    for a in doc["attacks"]:
        assert a["gated"] == wrong and a["final_skipped"] == sum(
            r["broken_step"] >= 0 and not r["final_evaluated"] for r in rows if r["attack_index"] == a["attack_index"])
        assert a["clean_defended"]["k"] == SAMPLES - wrong        # under the gate's rule (vote)
        for rule in ("robust", "robust_mean_logit", "robust_vote", "robust_mean_softmax", "robust_worst_of_runs"):
            assert a[rule]["acc"] <= a["clean_defended"]["acc"], rule
    for c in doc["curves"]["steps"]:                              # gated rows broken from step 0
        assert c["n"] == SAMPLES and c["no_break_by_step"][0] <= (SAMPLES - wrong) / SAMPLES
    for c in doc["curves"]["runs"]:
        assert all(pt["vote_of_r"]["acc"] <= (SAMPLES - wrong) / SAMPLES for pt in c["points"])
    assert f"{wrong} samples the defended model misclassified clean were not attacked" in report.format_table(doc)


def test_records_before_the_gate_read_as_attacked(digits_shards, digits_models, tmp_path, monkeypatch):
    """Schema 3 files lack `attacked` and `clean_decision_pred`: every sample was attacked, and
    clean defended accuracy is the mean-logit one."""
    p = _protocol(digits_shards, digits_models, tmp_path, "vote")
    rows, _, _ = _evaluate(p, _samples(digits_shards), monkeypatch, attack_misclassified=True)
    common = {"job": "j", "config_hash": "h", "stage": "evaluate", "shard": "s", "status": "ok", "schema_version": 3}
    old = schema.to_table({**r, **common} for r in rows).drop_columns(["attacked", "clean_decision_pred"])
    assert not any(aggregate.derive(old)["gated"].to_pylist())
    doc = report.summarize(old)
    clean = sum(r["clean_mean_logit_pred"] == r["label"] for r in rows if r["attack_index"] == 0)
    for a in doc["attacks"]:
        assert a["gated"] == 0 and a["clean_defended"]["k"] == clean
        assert a["robust"]["k"] == sum(r["robust"] for r in rows if r["attack_index"] == a["attack_index"])
