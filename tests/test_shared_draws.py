"""Two savings issue 23 asked about. Each changes which draws decide a verdict, so on a
stochastic defense (Gaussian noise, keyed draws) some samples' `robust` / `broken_step` differ
from the protocol's.

- Reusing the clean R-run evaluation (`eval/clean` draws) as the step-0 re-check of an attack
  that starts at x itself (the re-check has its own draws, `attack{i}/{name}/recheck/step0`):
  not made.
- Skipping the attack for a sample the clean evaluation gets wrong: made, as a change of
  protocol (the clean gate, evaluation.attack_misclassified false: AutoAttack's and the Hill
  et al. script's convention). Attacking every sample, such a sample can still end robust;
  with the gate it never does (tests/test_clean_gate.py holds the rest sample for sample).
"""
from __future__ import annotations

from pipeline import config
from pipeline.attacks import recheck as recheck_mod
from pipeline.evaluation import batch, stages
from pipeline.evaluation.protocol import build_protocol
from pipeline.io import shards
from tests.conftest import job_dict

# BIM from x (no random start): iterate 0 is x itself, re-checked with R = 4 fresh draws
ATTACKS = [{"name": "pgd", "params": {"eps": 0.05, "steps": 2, "step_size": 0.025, "random_start": False}, "eot": 2}]
SAMPLES = 64


def _setup(digits_shards, digits_models, tmp_path):
    job = job_dict(digits_shards["pattern"], digits_models, str(tmp_path), attacks=ATTACKS,
                   purifier={"name": "gaussian", "params": {"sigma": 0.5}}, evaluation={"runs": 4})
    p = build_protocol(config.from_dict(job))
    assert p.defense.purifier.stochastic and p.attacks[0].confirm_draws == p.runs
    return p, shards.read_shard(shards.expand(digits_shards["pattern"])[0])[:SAMPLES]


def _step0_from_clean(defense, seed, keys, context, draws):
    """The saving: the step-0 re-check reads the clean evaluation's draws (eval/clean)."""
    own = recheck_mod.make_defense_recheck(defense, seed, keys, context, draws)

    def shared(x_sub, idx, step):
        if step:
            return own(x_sub, idx, step)
        return batch.defended(defense, x_sub, [keys[i] for i in idx.tolist()], seed, batch.eval_context(-1), draws)[0]

    return shared


def test_the_clean_evaluation_as_step_0_recheck_would_change_verdicts(
        digits_shards, digits_models, tmp_path, monkeypatch):
    p, samples = _setup(digits_shards, digits_models, tmp_path)
    protocol = stages.evaluate(p, samples).rows
    monkeypatch.setattr(batch, "make_defense_recheck", _step0_from_clean)
    shared = stages.evaluate(p, samples).rows
    differ = [(a["key"], a["broken_step"], b["broken_step"]) for a, b in zip(protocol, shared)
              if (a["robust"], a["broken_step"]) != (b["robust"], b["broken_step"])]
    assert differ, "no verdict moved: the saving would keep verdicts on this data"


def test_a_sample_the_clean_evaluation_gets_wrong_ends_robust_only_if_attacked(digits_shards, digits_models,
                                                                               tmp_path):
    p, samples = _setup(digits_shards, digits_models, tmp_path)
    p.attack_misclassified = True
    rows = stages.evaluate(p, samples).rows
    wrong = [r for r in rows if r["clean_mean_logit_pred"] != r["label"]]
    assert wrong and any(r["robust"] for r in wrong)
    p.attack_misclassified = False   # the default: the clean gate
    gated = [r for r in stages.evaluate(p, samples).rows if r["clean_mean_logit_pred"] != r["label"]]
    assert [r["key"] for r in gated] == [r["key"] for r in wrong] and not any(r["robust"] for r in gated)
