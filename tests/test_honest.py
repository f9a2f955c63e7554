"""The honest headline (issue 9): confirmed breaks, the per-sample verdict, and a cascade
that only saves cost — its verdict equals the non-cascade worst case sample for sample."""
import pytest
import torch

from pipeline import config
from pipeline.attacks.base import BreakTracker, Goal
from pipeline.evaluation.defense import Defense
from pipeline.evaluation.protocol import confirm_draws
from pipeline.io import shards
from pipeline.purifiers.dae import DAEPurifier
from pipeline.purifiers.gaussian import GaussianPurifier, GaussianSettings
from pipeline.registry import ATTACKS
from pipeline.run.commit import read_committed
from pipeline.run.worker import ShardWorker
from tests.conftest import job_dict

STOCHASTIC = {"name": "gaussian", "params": {"sigma": 0.3}}
ATTACKS_MIX = [
    {"name": "fgsm", "params": {"eps": 0.06}, "gradient": "classifier"},
    {"name": "pgd", "params": {"eps": 0.06, "steps": 4, "step_size": 0.03}, "eot": 2},
    {"name": "apgd", "params": {"eps": 0.06, "steps": 5}, "eot": 2},
]


def _records(digits_shards, digits_models, out, **over) -> list[dict]:
    cfg = job_dict(digits_shards["pattern"], digits_models, str(out), **over)
    worker = ShardWorker(config.from_dict(cfg).to_dict())
    worker.process(shards.expand(digits_shards["pattern"])[0], "s")
    return read_committed(str(out), "evaluate", "s").to_pylist()


def test_cascade_verdict_equals_non_cascade_worst_case(digits_shards, digits_models, tmp_path):
    """Fails on a cascade that removes a confirmed-broken sample but lets its carried row
    count as robust (the carried-row bug), and on any verdict that ignores confirmed breaks."""
    rows = {}
    for cascade in (False, True):
        rows[cascade] = _records(digits_shards, digits_models, tmp_path / str(cascade), purifier=STOCHASTIC,
                                 attacks=ATTACKS_MIX, evaluation={"runs": 3, "cascade": cascade},
                                 data={"shards": digits_shards["pattern"], "batch_size": 32})
    keys = {r["key"] for r in rows[False]}
    last = len(ATTACKS_MIX) - 1
    worst = {k: all(r["robust"] for r in rows[False] if r["key"] == k) for k in keys}
    final = {r["key"]: r["robust"] for r in rows[True] if r["attack_index"] == last}
    assert final == worst
    assert 0 < sum(worst.values()) < len(keys)  # the test separates something
    # a carried row keeps its verdict and says where it came from
    carried = [r for r in rows[True] if r["cascade_from"] is not None]
    assert carried and not any(r["robust"] for r in carried)


def test_verdict_is_confirmed_break_or_wrong_decision(digits_shards, digits_models, tmp_path):
    rows = _records(digits_shards, digits_models, tmp_path, purifier=STOCHASTIC, attacks=ATTACKS_MIX[1:2],
                    evaluation={"runs": 3, "decision": "vote"})
    for r in rows:
        assert r["robust"] == (r["broken_step"] < 0 and r["vote_pred"] == r["label"])
        assert r["decision"] == "vote" and r["confirm_draws"] == 3
        if r["broken_step"] >= 0:  # a confirmed break was first a candidate, at that step or earlier
            assert 0 <= r["candidate_step"] <= r["broken_step"] < r["attack_steps"]


def test_confirm_draws_follow_the_view_and_the_defense(digits_models):
    from pipeline.purifiers.dae import load_denoiser

    clf = torch.nn.Linear(1, 2)
    det = Defense(clf, DAEPurifier(load_denoiser(digits_models["dae"])))
    sto = Defense(clf, GaussianPurifier(GaussianSettings(sigma=0.1)))
    pgd = ATTACKS.build("pgd", eps=0.1)
    hill = ATTACKS.build("pgd", eps=0.1, recheck_draws=150)
    assert confirm_draws(pgd, "full", None, det, runs=4, configured=None) == 0     # the forward is exact
    assert confirm_draws(pgd, "bpda", None, det, runs=4, configured=None) == 0
    assert confirm_draws(pgd, "classifier", None, det, runs=4, configured=None) == 1
    assert confirm_draws(pgd, "full", det, det, runs=4, configured=None) == 1      # a surrogate view
    assert confirm_draws(pgd, "full", None, sto, runs=4, configured=None) == 4     # R fresh draws
    assert confirm_draws(pgd, "full", None, sto, runs=4, configured=32) == 32
    assert confirm_draws(hill, "full", None, sto, runs=4, configured=32) == 150    # Hill's H wins


def test_unconfirmed_candidate_is_not_a_break():
    """A lucky draw nominates a candidate; the re-check refuses it; the sample is re-checked
    the next time it meets the goal and only then counts as broken."""
    x = torch.zeros(2, 1, 1, 1)
    y = torch.tensor([0, 0])
    wrong = torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]])   # [B, R=1, K]: both predicted 1 ≠ 0
    verdicts = iter([torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]]),   # step 0: re-check says correct
                     torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])])  # step 1: confirms sample 1 only
    tracker = BreakTracker(x, recheck=lambda xs, idx, step: next(verdicts)[idx.cpu()])
    tracker.update(x, wrong, Goal(y, None, False), 0)
    assert tracker.candidate_step.tolist() == [0, 0] and tracker.broken_step.tolist() == [-1, -1]
    tracker.update(x + 0.5, wrong, Goal(y, None, False), 1)
    assert tracker.broken_step.tolist() == [-1, 1]
    assert torch.equal(tracker.merge(x + 0.9)[1], x[1] + 0.5)   # the confirmed iterate is returned
    assert torch.equal(tracker.merge(x + 0.9)[0], x[0] + 0.9)   # the other keeps the attack's point


def test_eot_probe_lands_in_the_checks(digits_shards, digits_models, tmp_path):
    cfg = job_dict(digits_shards["pattern"], digits_models, str(tmp_path), purifier=STOCHASTIC,
                   attacks=ATTACKS_MIX[1:2], evaluation={"runs": 2, "eot_probe": 8})
    marker = ShardWorker(config.from_dict(cfg).to_dict()).process(shards.expand(digits_shards["pattern"])[0], "s")
    probe = [c for c in marker["checks"]["0"] if c["name"] == "eot_probe"]
    assert len(probe) == 1 and probe[0]["values"]["n"] == 8 and probe[0]["values"]["eot"] == 2


def _sweep(steps: int = 2, queries: int = 20, **over) -> list[dict]:
    """autoattack_standard expanded over two ε in ℓ∞ and two in ℓ2: APGD-CE 0.05, APGD-CE
    0.15, APGD-T 0.05, … — the one list issue 22's cascade wrongly treated as one chain."""
    small = {"steps": steps, "n_queries": queries, **over}
    return [{"preset": "autoattack_standard", "overrides": {"eps": [0.05, 0.15], "norm": "linf", **small}},
            {"preset": "autoattack_standard", "overrides": {"eps": [0.4, 1.2], "norm": "l2", **small}}]


def _verdicts(rows) -> dict[tuple, bool]:
    """Per (sample, norm, ε): robust under every attack entry of that threat model."""
    out: dict[tuple, bool] = {}
    for r in rows:
        k = (r["key"], r["norm"], r["eps"])
        out[k] = out.get(k, True) and r["robust"]
    return out


@pytest.fixture(scope="module")
def sweep_off(digits_shards, digits_models, tmp_path_factory):
    """The sweep's records without cascade, per defense (shared by the tests below)."""
    cache: dict[bool, list[dict]] = {}

    def get(stochastic: bool) -> list[dict]:
        if stochastic not in cache:
            out = tmp_path_factory.mktemp(f"sweep_off_{stochastic}")
            cache[stochastic] = _sweep_records(digits_shards, digits_models, out, False, stochastic)
        return cache[stochastic]

    return get


def _sweep_records(digits_shards, digits_models, out, cascade, stochastic):
    over = dict(purifier=STOCHASTIC, evaluation={"runs": 3, "cascade": cascade}) if stochastic else \
        dict(evaluation={"runs": 1, "cascade": cascade})
    return _records(digits_shards, digits_models, out, attacks=_sweep(**({"eot": 2} if stochastic else {})),
                    data={"shards": digits_shards["pattern"], "batch_size": 32, "max_samples_per_shard": 48}, **over)


@pytest.mark.parametrize("stochastic", [False, True], ids=["dae", "gaussian"])
def test_cascade_over_an_eps_sweep_in_two_norms_keeps_every_verdict(digits_shards, digits_models, tmp_path,
                                                                     sweep_off, stochastic):
    """Cascade on and off agree on every (sample, norm, ε) verdict, on a deterministic and on
    a stochastic defense: within a threat model each entry's rows are the same rows (keyed
    draws per sample, so exact, not just in distribution), and nothing crosses threat models."""
    rows = {False: sweep_off(stochastic),
            True: _sweep_records(digits_shards, digits_models, tmp_path, True, stochastic)}
    off, on = _verdicts(rows[False]), _verdicts(rows[True])
    assert on == off and len(off) == 48 * 4
    by_eps = {(n, e): sum(v for (_, nn, ee), v in off.items() if (nn, ee) == (n, e)) for _, n, e in off}
    # the sweep separates: samples robust at the small ε but not the large one (what the bug lost)
    assert by_eps[("linf", 0.05)] > by_eps[("linf", 0.15)] and by_eps[("l2", 0.4)] > by_eps[("l2", 1.2)]
    entry = {r["attack_index"]: (r["norm"], r["eps"]) for r in rows[True]}
    row_off = {(r["attack_index"], r["key"]): r for r in rows[False]}
    for r in rows[True]:
        if r["cascade_from"] is None:   # run by the entry itself: the very row it has without cascade
            assert r["robust"] == row_off[(r["attack_index"], r["key"])]["robust"]
        else:                           # carried within its threat model, from an entry that broke it
            assert entry[r["cascade_from"]] == entry[r["attack_index"]] and r["cascade_from"] < r["attack_index"]
            assert not row_off[(r["cascade_from"], r["key"])]["robust"] and not r["robust"]
    assert sum(r["attack_nfe"] for r in rows[True]) < sum(r["attack_nfe"] for r in rows[False])


def test_issue22_chain_fails_the_record_check(digits_shards, digits_models, tmp_path, sweep_off, monkeypatch):
    """The old cascade (one chain over the whole list) gives wrong verdicts at the small ε,
    and the report's cascade_chain check flags exactly those entries."""
    from pipeline import report
    from pipeline.evaluation import stages

    off = _verdicts(sweep_off(False))
    monkeypatch.setattr(stages, "cascade_groups", lambda attacks: [list(attacks)])
    old = _sweep_records(digits_shards, digits_models, tmp_path / "old", True, False)
    assert _verdicts(old) != off
    doc = report.summarize(read_committed(str(tmp_path / "old"), "evaluate", "s"))
    flagged = {c["attack_index"] for c in doc["checks"]["record"] if c["name"] == "cascade_chain" and not c["passed"]}
    entry = {r["attack_index"]: (r["norm"], r["eps"]) for r in old}
    # carried into another norm or from a larger ε (from a smaller ε of the same norm is sound)
    crossing = {r["attack_index"] for r in old if r["cascade_from"] is not None
                and (entry[r["cascade_from"]][0] != r["norm"] or entry[r["cascade_from"]][1] > r["eps"])}
    assert flagged and flagged == crossing
