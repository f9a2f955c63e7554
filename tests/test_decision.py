"""pipeline.evaluation.decision (every decision rule) and pipeline.vocabulary (the shared names)."""
from __future__ import annotations

import pytest
import torch

from pipeline import schema
from pipeline.evaluation.decision import RULES, decide, decide_all, vote
from pipeline.registry import ATTACKS
from pipeline.vocabulary import DECISION_COLUMNS, DECISIONS, DEFAULT_DECISION, GRADIENT_FREE_ATTACKS

# one sample, three runs, three classes: summed logits 10 vs 8, but two of three runs say 1
LOGITS = torch.tensor([[[10.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 4.0, 0.0]]])


def test_rules_hand_computed():
    got = decide_all(LOGITS, RULES)
    assert got["mean_logit"].tolist() == [0]        # mean logits: 10/3 vs 8/3
    assert got["vote"].tolist() == [1]              # two of three runs vote class 1
    assert got["mean_softmax"].tolist() == [1]      # Σ softmax: ≈1.04 vs ≈1.93
    assert got["mean_log_softmax"].tolist() == [0]  # Σ log-softmax: ≈−8.07 vs ≈−10.07


def test_vote_ties_go_to_lowest_class():
    preds = torch.tensor([[2, 1, 2, 1], [3, 3, 0, 1]])
    assert vote(preds, 4).tolist() == [1, 3]
    assert decide(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), "vote").tolist() == [0]


def test_unknown_rule_is_an_error_naming_it_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown decision rule 'median'; expected one of \['mean_logit'"):
        decide(LOGITS, "median")
    with pytest.raises(ValueError, match=r"logits must be \[B, R, K\]"):
        decide(LOGITS[0], "mean_logit")


def test_job_decisions_are_rules_with_a_record_column():
    assert set(decide_all(LOGITS)) == set(DECISIONS) and DEFAULT_DECISION in DECISIONS
    assert set(DECISIONS) <= set(RULES)
    assert set(DECISION_COLUMNS.values()) <= set(schema.COLUMNS)


def test_gradient_free_attacks_are_the_registry_s():
    free = {name for name in ATTACKS.names() if not ATTACKS.get(name).uses_gradient}
    assert free == set(GRADIENT_FREE_ATTACKS)


def test_eot_defense_prediction_by_mean_logits():
    logits = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])  # mean logits favour class 0
    assert decide(logits, "mean_logit").tolist() == [0]
    assert decide(logits, "vote").tolist() == [1]
