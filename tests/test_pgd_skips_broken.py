"""PGD (with keep_broken, as every re-checked protocol) takes no further steps on a sample
whose break is confirmed: it returns the breaking iterate whatever comes after. Every record's
verdict and returned image are those of the attack that keeps stepping every sample, on a
stochastic defense (Gaussian noise, keyed draws, re-checked breaks) and a deterministic one,
while the purifier runs fewer rows."""
from __future__ import annotations

import pytest

from pipeline import config
from pipeline.attacks import pgd
from pipeline.evaluation.protocol import build_protocol
from pipeline.io import shards
from tests.conftest import evaluate_counting_purifier_rows, job_dict

ATTACKS = [{"name": "pgd", "params": {"eps": 0.1, "steps": 4, "step_size": 0.03}, "eot": 2},
           {"name": "pgd", "params": {"eps": 0.1, "steps": 3, "step_size": 0.04, "random_start": False},
            "gradient": "classifier"}]
DEFENSES = {"gaussian": ({"name": "gaussian", "params": {"sigma": 0.25}}, 4), "dae": (None, 1)}
SAMPLES = 45
SAME = ("robust", "broken_step", "candidate_step", "adv_pred", "linf", "l2", "final_evaluated",
        "mean_logit_pred", "purified_preds")


def _evaluate(p, samples, monkeypatch, skip: bool) -> tuple[list[dict], int]:
    monkeypatch.setattr(pgd, "SKIP_BROKEN", skip)
    return evaluate_counting_purifier_rows(p, samples, monkeypatch)


@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_no_steps_after_a_confirmed_break_keeps_every_verdict(defense, digits_shards, digits_models, tmp_path,
                                                             monkeypatch):
    purifier, runs = DEFENSES[defense]
    over = {"attacks": ATTACKS, "evaluation": {"runs": runs, "check_samples": 0}}
    if purifier:
        over["purifier"] = purifier
    p = build_protocol(config.from_dict(job_dict(digits_shards["pattern"], digits_models, str(tmp_path), **over)))
    samples = shards.read_shard(shards.expand(digits_shards["pattern"])[0])[:SAMPLES]
    full, full_rows = _evaluate(p, samples, monkeypatch, skip=False)
    saved, saved_rows = _evaluate(p, samples, monkeypatch, skip=True)
    # the test means something: breaks before the last step, and samples that survive
    assert any(0 <= r["broken_step"] < r["attack_steps"] - 1 for r in saved) and any(r["robust"] for r in saved)
    for s, f in zip(saved, full):
        assert (s["attack_index"], s["key"]) == (f["attack_index"], f["key"])
        assert {k: s[k] for k in SAME} == {k: f[k] for k in SAME}, s["key"]
        assert s["attack_nfe"] <= f["attack_nfe"]
        assert (s["attack_nfe"] < f["attack_nfe"]) == (0 <= s["broken_step"] < s["attack_steps"] - 1)
    if purifier:   # the DAE runs no chains for the classifier-gradient attack either way
        assert saved_rows < full_rows
