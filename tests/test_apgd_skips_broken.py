"""APGD takes no further steps on a sample whose break is confirmed: it returns the breaking
iterate whatever comes after. Every record's verdict and returned image are those of the
attack that keeps stepping every sample of a run — APGD-CE, APGD-DLR and APGD-T, on a
stochastic defense (Gaussian noise, keyed draws, re-checked breaks) and a deterministic one —
while the purifier runs fewer rows; the step-size decisions of the samples still attacked are
the whole run's, sample for sample."""
from __future__ import annotations

import pytest
import torch

from pipeline import config
from pipeline.attacks import apgd
from pipeline.attacks.recheck import make_defense_recheck
from pipeline.evaluation import stages
from pipeline.evaluation.protocol import build_protocol
from pipeline.io import shards
from pipeline.seeding import Noise
from tests.conftest import evaluate_counting_purifier_rows, job_dict

STEPS = 6   # AutoAttack's schedule checks after every step for N < 9: many halvings and restarts
TARGETED = {"targeted": True, "loss": "dlr", "target_mode": "top", "n_target_classes": 2,
            "targeted_success": "misclassified"}
ATTACKS = [{"name": "apgd", "params": {"eps": 0.1, "steps": STEPS, "loss": "ce"}, "eot": 2},
           {"name": "apgd", "params": {"eps": 0.1, "steps": STEPS, "loss": "dlr"}, "eot": 2},
           {"name": "apgd", "params": {"eps": 0.08, "steps": STEPS, **TARGETED}, "eot": 2}]
DEFENSES = {"gaussian": ({"name": "gaussian", "params": {"sigma": 0.25}}, 4), "dae": (None, 1)}
SAMPLES = 24
SAME = ("robust", "broken_step", "candidate_step", "adv_pred", "linf", "l2", "final_evaluated",
        "mean_logit_pred", "purified_preds")


def _broke_before_last_step(broken_step: int) -> bool:
    """A break at step s < N of its run (run j owns steps j(N+1) … j(N+1)+N) leaves steps out."""
    return broken_step >= 0 and broken_step % (STEPS + 1) < STEPS


def _protocol(defense: str, digits_shards, digits_models, tmp_path):
    purifier, runs = DEFENSES[defense]
    over = {"attacks": ATTACKS, "evaluation": {"runs": runs, "check_samples": 0}}
    if purifier:
        over["purifier"] = purifier
    return build_protocol(config.from_dict(job_dict(digits_shards["pattern"], digits_models, str(tmp_path), **over)))


@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_no_steps_after_a_confirmed_break_keeps_every_record(defense, digits_shards, digits_models, tmp_path,
                                                             monkeypatch):
    p = _protocol(defense, digits_shards, digits_models, tmp_path)
    samples = shards.read_shard(shards.expand(digits_shards["pattern"])[0])[:SAMPLES]
    monkeypatch.setattr(apgd, "SKIP_BROKEN", False)
    full, full_rows = evaluate_counting_purifier_rows(p, samples, monkeypatch)
    monkeypatch.setattr(apgd, "SKIP_BROKEN", True)
    saved, saved_rows = evaluate_counting_purifier_rows(p, samples, monkeypatch)
    for i in range(len(ATTACKS)):   # the test means something: early breaks and survivors, per attack
        mine = [r for r in saved if r["attack_index"] == i]
        assert any(_broke_before_last_step(r["broken_step"]) for r in mine) and any(r["robust"] for r in mine)
    for s, f in zip(saved, full, strict=True):
        assert (s["attack_index"], s["key"]) == (f["attack_index"], f["key"])
        assert {k: s[k] for k in SAME} == {k: f[k] for k in SAME}, (s["attack_index"], s["key"])
        assert (s["attack_nfe"] < f["attack_nfe"]) == _broke_before_last_step(s["broken_step"])
        assert s["attack_nfe"] <= f["attack_nfe"]
    assert saved_rows < full_rows   # every attack's gradient runs through the purifier


class _Decisions(apgd.StepSizeControl):
    """StepSizeControl recording every halving decision as (run, check, row of the run) → halved."""

    made: dict[tuple[int, int, int], bool] = {}
    runs = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.run = _Decisions.runs
        _Decisions.runs += 1

    def observe(self, f_new, f_max, rows=None):
        halve = super().observe(f_new, f_max, rows)
        if halve is not None:
            at = range(len(f_new)) if rows is None else rows.tolist()
            _Decisions.made.update({(self.run, self.count, i): h for i, h in zip(at, halve.tolist())})
        return halve


def _attack(p, attack: apgd.APGD, samples, skip: bool, monkeypatch):
    monkeypatch.setattr(apgd, "SKIP_BROKEN", skip)
    monkeypatch.setattr(apgd, "StepSizeControl", _Decisions)
    monkeypatch.setattr(_Decisions, "made", {})
    monkeypatch.setattr(_Decisions, "runs", 0)
    b = next(stages.batches(samples, len(samples), torch.device("cpu")))
    x, y, keys = b.x, b.y, b.keys
    target = p.defense.attack_target("full", p.seed, keys, "a", 2)
    recheck = make_defense_recheck(p.defense, p.seed, keys, "a/recheck", 4) if p.defense.purifier.stochastic \
        else None
    result = attack(target, x, y, Noise.for_batch(p.seed, keys, "a/own"), recheck=recheck)
    return result, dict(_Decisions.made)


@pytest.mark.parametrize("defense", sorted(DEFENSES))
@pytest.mark.parametrize("entry", range(len(ATTACKS)))
def test_step_size_decisions_of_samples_still_attacked_are_the_whole_runs(entry, defense, digits_shards,
                                                                          digits_models, tmp_path, monkeypatch):
    """The returned images are equal bit for bit (a state of a sample still attacked — x_max,
    the momentum pair, η — taken from another row after the broken ones are left out would
    move its iterates), and every decision the skipping attack makes is the full run's."""
    p = _protocol(defense, digits_shards, digits_models, tmp_path)
    samples = shards.read_shard(shards.expand(digits_shards["pattern"])[0])[:SAMPLES]
    attack = apgd.APGD(**ATTACKS[entry]["params"])
    full, full_made = _attack(p, attack, samples, False, monkeypatch)
    saved, saved_made = _attack(p, attack, samples, True, monkeypatch)
    early = torch.tensor([_broke_before_last_step(int(b)) for b in saved.broken_step])
    assert early.any() and (saved.broken_step < 0).any()   # rows left out mid-run, rows never broken
    assert torch.equal(saved.x_adv, full.x_adv)
    assert torch.equal(saved.broken_step, full.broken_step) and torch.equal(saved.candidate_step, full.candidate_step)
    assert (saved.target_class is None) == (full.target_class is None)
    if full.target_class is not None:
        assert torch.equal(saved.target_class, full.target_class)
    assert torch.equal(saved.sample_nfe < full.sample_nfe, early) and bool((saved.sample_nfe <= full.sample_nfe).all())
    assert saved_made.items() <= full_made.items()
    # a run's rows never broken in it decide at every check as in the full run; one decision at least halves
    missing = full_made.keys() - saved_made.keys()
    assert missing and any(full_made.values())
    assert all(_decided_after_break(k, full, attack) for k in missing)


def _decided_after_break(key: tuple[int, int, int], full, attack: apgd.APGD) -> bool:
    """Decision `key` (run, check, row of the run) is one the skipping attack leaves out: its
    row's sample broke in that run before that check. Runs after the first hold the samples no
    earlier run broke, in batch order."""
    run, check, row = key
    step0 = run * (attack.steps + 1)
    in_run = [i for i, b in enumerate(full.broken_step.tolist()) if b < 0 or b >= step0]
    b = int(full.broken_step[in_run[row]])
    return step0 <= b < step0 + check
