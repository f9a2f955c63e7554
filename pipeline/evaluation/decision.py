"""How the R purification runs of a sample decide one prediction: every decision rule.

logits [B, R, K] → predictions [B]:
  mean_logit        argmax of the mean logits (ADP's "l", summed logits; the EBM defense's
                    eot_defense_ave "logits", Hill et al. 2021)
  mean_softmax      argmax of the mean softmax (ADP's "s"; the EBM defense's "softmax")
  mean_log_softmax  argmax of the mean log-softmax (the EBM defense's "logsoftmax")
  vote              majority vote of the runs' argmaxes, ties → lowest class index (ADP's "o")
A job decides with one of `vocabulary.DECISIONS` (each has its prediction column in the
records); an unknown rule is an error, never a silent fallback.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from pipeline.vocabulary import DECISIONS


def vote(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Majority vote over runs; preds [B, R] → [B], ties to the lowest class index."""
    counts = torch.zeros(preds.shape[0], num_classes, dtype=torch.int64, device=preds.device)
    counts.scatter_add_(1, preds, torch.ones_like(preds))
    return counts.argmax(1)  # argmax returns the first maximum: the lowest tied class


RULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean_logit": lambda logits: logits.mean(1).argmax(1),
    "mean_softmax": lambda logits: logits.softmax(-1).mean(1).argmax(1),
    "mean_log_softmax": lambda logits: logits.log_softmax(-1).mean(1).argmax(1),
    "vote": lambda logits: vote(logits.argmax(2), logits.shape[-1]),
}


def decide(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """[B] predictions from logits [B, R, K] under a decision rule over the R runs."""
    if rule not in RULES:
        raise ValueError(f"unknown decision rule {rule!r}; expected one of {list(RULES)}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, R, K], got {tuple(logits.shape)}")
    return RULES[rule](logits)


def decide_all(logits: torch.Tensor, rules: Iterable[str] = DECISIONS) -> dict[str, torch.Tensor]:
    """{rule: [B] predictions} for several rules at once (by default a job's choices)."""
    return {rule: decide(logits, rule) for rule in rules}
