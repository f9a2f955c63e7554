"""The Hill et al. (2021) re-check: confirm a candidate break with H draws of the real defense.

The attack's own forward pass (R = `eot` draws, perhaps through a surrogate purifier) only
nominates candidates; a sample counts as broken once the defense as deployed — the real
purifier, H fresh draws, logits averaged — misclassifies it, and it stays broken. Attacks
call `recheck(x_sub, idx, step)` on the candidate rows (see `pipeline.attacks.base.Recheck`).

The evaluation loop builds one per (batch, attack):

    recheck = make_defense_recheck(defense, seed, keys, f"{context}/recheck", attack.recheck_draws)
    result = attack(target, x, y, noise, recheck=recheck)

Draws are keyed by (seed, sample key, context/step{step}, replica), so a sample's check does
not depend on which other samples were candidates at the same step.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from pipeline.attacks.base import Recheck
from pipeline.seeding import Noise


def make_defense_recheck(defense: Any, seed: int, keys: Sequence[str], context: str, draws: int) -> Recheck:
    """A `Recheck` from a `pipeline.evaluation.defense.Defense` (its `logits(x, noise, mode)` method).

    The check is a plain forward (no gradient) through the real purifier with `draws`
    keyed purification runs per sample. `context` must differ from the evaluation's and the
    attack target's contexts so the check uses its own draws.
    """
    if draws < 1:
        raise ValueError(f"draws must be ≥ 1, got {draws}")
    keys = list(keys)

    def recheck(x_sub: torch.Tensor, idx: torch.Tensor, step: int) -> torch.Tensor:
        sub_keys = [keys[i] for i in idx.tolist()]
        noise = Noise.for_batch(seed, sub_keys, f"{context}/step{step}", draws, x_sub.device)
        with torch.no_grad():  # a check, not an attack step: no gradient needed
            return defense.logits(x_sub, noise, "full")

    return recheck
