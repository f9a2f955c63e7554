"""Per-batch evaluation: clean → attack → purify (R runs) → classify, as plain records.

No I/O, no Ray, no pyarrow: the worker turns these dicts into Parquet rows.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from pipeline.attacks.base import Attack
from pipeline.attacks.recheck import make_defense_recheck
from pipeline.defense import Defense, honest_gradient_mode
from pipeline.seeding import Noise


@dataclass
class PlannedAttack:
    index: int
    name: str
    attack: Attack
    gradient: str      # resolved: full | bpda | classifier
    eot: int
    surrogate: Defense | None = None   # the defense the gradient goes through, if not the real one


def resolve_gradient(requested: str, defense: Defense) -> str:
    return honest_gradient_mode(defense.purifier) if requested == "auto" else requested


def vote(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Majority vote over runs; preds [B, R] → [B], ties to the lowest class index."""
    counts = torch.zeros(preds.shape[0], num_classes, dtype=torch.int64, device=preds.device)
    counts.scatter_add_(1, preds, torch.ones_like(preds))
    return counts.argmax(1)


def _defended(defense: Defense, x: torch.Tensor, keys: Sequence[str], seed: int, context: str,
              runs: int) -> tuple[torch.Tensor, int]:
    """Logits [B, R, K] of the defended model, and purifier evaluations per row."""
    before = defense.purifier.nfe
    with torch.no_grad():
        logits = defense.logits(x, Noise.for_batch(seed, keys, context, runs, x.device), mode="full")
    return logits.float(), defense.purifier.nfe - before


def evaluate_batch(defense: Defense, attacks: Sequence[PlannedAttack], x: torch.Tensor,
                   y: torch.Tensor, keys: Sequence[str], seed: int, runs: int) -> list[dict[str, Any]]:
    """Rows (one per sample and attack) with every prediction the schema records."""
    t0 = time.perf_counter()
    B = x.shape[0]
    with torch.no_grad():
        clean_pred = defense.classifier(x).argmax(1)
    clean_logits, clean_nfe = _defended(defense, x, keys, seed, "eval/clean", runs)
    K = clean_logits.shape[-1]
    base = {
        "label": y.tolist(),
        "key": list(keys),
        "clean_pred": clean_pred.tolist(),
        "clean_purified_preds": clean_logits.argmax(2).tolist(),
        "clean_mean_logit_pred": clean_logits.mean(1).argmax(1).tolist(),
    }
    shared_seconds = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    plans = list(attacks) or [None]
    for plan in plans:
        t1 = time.perf_counter()
        if plan is None:
            x_adv, broken, attack_nfe = x, torch.full((B,), -1, dtype=torch.int64), 0
            logits, nfe = clean_logits, clean_nfe
            info = {"attack_index": -1, "attack_name": "none", "attack_params": "{}", "gradient_mode": "none",
                    "eot": 0, "norm": None, "eps": 0.0, "eps_255": 0.0}
        else:
            context = f"attack{plan.index}/{plan.name}"
            target = (plan.surrogate or defense).attack_target(plan.gradient, seed, keys, context, plan.eot)
            own = Noise.for_batch(seed, keys, f"{context}/own", 1, x.device)
            # Hill et al.: candidate breaks are confirmed by the real defense with H draws
            draws = getattr(plan.attack, "recheck_draws", 0)
            recheck = make_defense_recheck(defense, seed, keys, f"{context}/recheck", draws) if draws else None
            result = plan.attack(target, x, y, own, recheck=recheck)
            x_adv, broken, attack_nfe = result.x_adv.detach(), result.broken_step, result.nfe * plan.eot
            logits, nfe = _defended(defense, x_adv, keys, seed, f"eval/attack{plan.index}", runs)
            params = plan.attack.params()
            if plan.surrogate is not None:
                params = {**params, "surrogate": plan.surrogate.purifier.params()}
            info = {"attack_index": plan.index, "attack_name": plan.name,
                    "attack_params": json.dumps(params, sort_keys=True), "gradient_mode": plan.gradient,
                    "eot": plan.eot, "norm": params.get("norm"), "eps": float(params.get("eps", 0.0)),
                    "eps_255": float(params.get("eps", 0.0)) * 255.0}
        with torch.no_grad():
            adv_pred = defense.classifier(x_adv).argmax(1)
        preds = logits.argmax(2)                       # [B, R]
        delta = (x_adv - x).flatten(1)
        seconds = (time.perf_counter() - t1 + shared_seconds / len(plans)) / B
        cols = {
            "adv_pred": adv_pred.tolist(),
            "purified_preds": preds.tolist(),
            "purified_mean_logits": logits.mean(1).tolist(),
            "vote_pred": vote(preds, K).tolist(),
            "mean_logit_pred": logits.mean(1).argmax(1).tolist(),
            "worst_of_runs_correct": (preds == y[:, None]).all(1).tolist(),
            "broken_step": broken.tolist(),
            "linf": delta.abs().amax(1).tolist(),
            "l2": delta.norm(dim=1).tolist(),
        }
        for i in range(B):
            row = {k: v[i] for k, v in base.items()}
            row.update({k: v[i] for k, v in cols.items()})
            row.update(info)
            row.update({"runs": runs, "attack_nfe": attack_nfe, "purify_nfe": clean_nfe + nfe,
                        "seconds": seconds})
            rows.append(row)
    return rows


def gradient_checks(defense: Defense, plan: PlannedAttack, x: torch.Tensor, y: torch.Tensor,
                    keys: Sequence[str], seed: int) -> list[dict[str, Any]]:
    """The auto-attack style checks of one attack's view on one batch (plus the flag checks)."""
    from pipeline import checks

    flags = defense.purifier.flags()
    target = (plan.surrogate or defense).attack_target(plan.gradient, seed, keys, f"checks{plan.index}", plan.eot)
    results = checks.run_gradient_checks(target, x, y, declared_stochastic=flags["stochastic"]
                                         if plan.gradient != "classifier" else False)
    results.append(checks.check_test_time_optimization(flags, plan.gradient))
    results.append(checks.check_eot(flags, plan.eot, plan.gradient))
    return results
