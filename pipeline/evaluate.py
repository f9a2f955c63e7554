"""Per-batch math of the three stages, as plain records (no I/O, no Ray, no pyarrow).

- evaluate: clean → attack → purify (R runs) → classify, one row per (sample, attack);
- attack:   adversarial examples only (the set is written as shards by the worker);
- purify:   purify (R runs) and classify given images — an adversarial set made earlier,
            or any corpus.
Noise contexts are shared between stages, so attack + purify reproduce evaluate exactly.
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

    def info(self) -> dict[str, Any]:
        """The attack's columns of a record."""
        params = self.attack.params()
        if self.surrogate is not None:
            params = {**params, "surrogate": self.surrogate.purifier.params()}
        eps = float(params.get("eps", 0.0))
        return {"attack_index": self.index, "attack_name": self.name,
                "attack_params": json.dumps(params, sort_keys=True), "gradient_mode": self.gradient,
                "eot": self.eot, "norm": params.get("norm"), "eps": eps, "eps_255": eps * 255.0}


NO_ATTACK = {"attack_index": -1, "attack_name": "none", "attack_params": "{}", "gradient_mode": "none",
             "eot": 0, "norm": None, "eps": 0.0, "eps_255": 0.0}


def resolve_gradient(requested: str, defense: Defense) -> str:
    return honest_gradient_mode(defense.purifier) if requested == "auto" else requested


def vote(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Majority vote over runs; preds [B, R] → [B], ties to the lowest class index."""
    counts = torch.zeros(preds.shape[0], num_classes, dtype=torch.int64, device=preds.device)
    counts.scatter_add_(1, preds, torch.ones_like(preds))
    return counts.argmax(1)


def eval_context(attack_index: int) -> str:
    return "eval/clean" if attack_index < 0 else f"eval/attack{attack_index}"


def defended(defense: Defense, x: torch.Tensor, keys: Sequence[str], seed: int, context: str,
             runs: int, keep_images: bool = False) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """Logits [B, R, K] of the defended model, purifier evaluations per row, and (if asked)
    the first run's purified images [B, C, H, W]."""
    before = defense.purifier.nfe
    noise = Noise.for_batch(seed, keys, context, runs, x.device)
    with torch.no_grad():
        purified = defense.purify(x.repeat_interleave(runs, 0), noise)       # [B·R, C, H, W]
        logits = defense.classify(purified).view(x.shape[0], runs, -1)
    first = purified.view(x.shape[0], runs, *x.shape[1:])[:, 0] if keep_images else None
    return logits.float(), defense.purifier.nfe - before, first


def run_attack(defense: Defense, plan: PlannedAttack, x: torch.Tensor, y: torch.Tensor,
               keys: Sequence[str], seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x_adv, broken_step [B], target evaluations per sample) for one planned attack."""
    context = f"attack{plan.index}/{plan.name}"
    target = (plan.surrogate or defense).attack_target(plan.gradient, seed, keys, context, plan.eot)
    own = Noise.for_batch(seed, keys, f"{context}/own", 1, x.device)
    # Hill et al.: candidate breaks are confirmed by the real defense with H draws
    draws = getattr(plan.attack, "recheck_draws", 0)
    recheck = make_defense_recheck(defense, seed, keys, f"{context}/recheck", draws) if draws else None
    result = plan.attack(target, x, y, own, recheck=recheck)
    return result.x_adv.detach(), result.broken_step, result.nfe * plan.eot


def _prediction_columns(defense: Defense, x_adv: torch.Tensor, y: torch.Tensor,
                        logits: torch.Tensor | None) -> dict[str, list]:
    with torch.no_grad():
        cols: dict[str, list] = {"adv_pred": defense.classifier(x_adv).argmax(1).tolist()}
    if logits is not None:
        preds = logits.argmax(2)                       # [B, R]
        cols.update({
            "purified_preds": preds.tolist(),
            "purified_mean_logits": logits.mean(1).tolist(),
            "vote_pred": vote(preds, logits.shape[-1]).tolist(),
            "mean_logit_pred": logits.mean(1).argmax(1).tolist(),
            "mean_softmax_pred": logits.softmax(-1).mean(1).argmax(1).tolist(),
            "worst_of_runs_correct": (preds == y[:, None]).all(1).tolist(),
        })
    return cols


def _rows(B: int, columns: dict[str, list], scalars: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**{k: v[i] for k, v in columns.items()}, **scalars} for i in range(B)]


def _norms(x_adv: torch.Tensor, x: torch.Tensor) -> dict[str, list]:
    delta = (x_adv - x).flatten(1)
    return {"linf": delta.abs().amax(1).tolist(), "l2": delta.norm(dim=1).tolist()}


def clean_columns(defense: Defense, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str], seed: int,
                  runs: int) -> tuple[dict[str, list], torch.Tensor, int]:
    """Per-sample clean columns, the defended clean logits [B, R, K] and purifier NFE."""
    with torch.no_grad():
        clean_pred = defense.classifier(x).argmax(1)
    logits, nfe, _ = defended(defense, x, keys, seed, eval_context(-1), runs)
    cols = {"label": y.tolist(), "key": list(keys), "clean_pred": clean_pred.tolist(),
            "clean_purified_preds": logits.argmax(2).tolist(),
            "clean_mean_logit_pred": logits.mean(1).argmax(1).tolist()}
    return cols, logits, nfe


def attack_rows(defense: Defense, plan: PlannedAttack | None, x: torch.Tensor, y: torch.Tensor,
                keys: Sequence[str], seed: int, runs: int, clean: tuple[dict[str, list], torch.Tensor, int],
                ) -> list[dict[str, Any]]:
    """Rows of one attack (None: no attack) on a batch, given its clean columns."""
    t0 = time.perf_counter()
    base, clean_logits, clean_nfe = clean
    B = x.shape[0]
    if plan is None:
        x_adv, broken, attack_nfe, info = x, torch.full((B,), -1, dtype=torch.int64), 0, NO_ATTACK
        logits, nfe = clean_logits, 0
    else:
        x_adv, broken, attack_nfe = run_attack(defense, plan, x, y, keys, seed)
        logits, nfe, _ = defended(defense, x_adv, keys, seed, eval_context(plan.index), runs)
        info = plan.info()
    cols = {**base, **_prediction_columns(defense, x_adv, y, logits), **_norms(x_adv, x),
            "broken_step": broken.tolist()}
    return _rows(B, cols, {**info, "runs": runs, "attack_nfe": attack_nfe, "purify_nfe": clean_nfe + nfe,
                           "seconds": (time.perf_counter() - t0) / B})


def evaluate_batch(defense: Defense, attacks: Sequence[PlannedAttack], x: torch.Tensor,
                   y: torch.Tensor, keys: Sequence[str], seed: int, runs: int) -> list[dict[str, Any]]:
    """Rows (one per sample and attack) with every prediction the schema records."""
    t0 = time.perf_counter()
    clean = clean_columns(defense, x, y, keys, seed, runs)
    share = (time.perf_counter() - t0) / x.shape[0] / max(1, len(attacks))
    rows: list[dict[str, Any]] = []
    for plan in list(attacks) or [None]:
        rows += [{**r, "seconds": r["seconds"] + share} for r in attack_rows(defense, plan, x, y, keys, seed, runs, clean)]
    return rows


def is_broken(row: dict[str, Any], plan: PlannedAttack) -> bool:
    """A sample the attack defeated: the defended model (mean logits over R runs) is wrong,
    or — for attacks that confirm breaks with the real defense (Hill et al.) — it was
    confirmed broken at some step."""
    if row["mean_logit_pred"] != row["label"]:
        return True
    return bool(getattr(plan.attack, "recheck_draws", 0)) and row["broken_step"] >= 0


def attack_batch(defense: Defense, attacks: Sequence[PlannedAttack], x: torch.Tensor, y: torch.Tensor,
                 keys: Sequence[str], seed: int) -> tuple[list[dict[str, Any]], dict[int, torch.Tensor]]:
    """Adversarial examples for every attack: (rows without purified columns, {index: x_adv})."""
    B = x.shape[0]
    with torch.no_grad():
        clean_pred = defense.classifier(x).argmax(1).tolist()
    rows: list[dict[str, Any]] = []
    images: dict[int, torch.Tensor] = {}
    for plan in attacks:
        t1 = time.perf_counter()
        x_adv, broken, attack_nfe = run_attack(defense, plan, x, y, keys, seed)
        images[plan.index] = x_adv
        cols = {"label": y.tolist(), "key": list(keys), "clean_pred": clean_pred,
                **_prediction_columns(defense, x_adv, y, None), **_norms(x_adv, x), "broken_step": broken.tolist()}
        rows += _rows(B, cols, {**plan.info(), "runs": 0, "attack_nfe": attack_nfe, "purify_nfe": 0,
                                "seconds": (time.perf_counter() - t1) / B})
    return rows, images


def purify_batch(defense: Defense, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str], seed: int,
                 runs: int, attack_infos: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Purify given images (adversarial or not) R times: (rows, first run's purified images).

    `attack_infos[i]` holds sample i's attack columns from its lineage (NO_ATTACK for a plain
    corpus); its attack index picks the same evaluation draws as the evaluate stage.
    """
    t0 = time.perf_counter()
    B = x.shape[0]
    groups: dict[int, list[int]] = {}
    for i, info in enumerate(attack_infos):
        groups.setdefault(int(info["attack_index"]), []).append(i)
    logits = torch.empty(0)
    purified = torch.empty_like(x)
    nfe_total = 0
    for idx, members in groups.items():
        sel = torch.tensor(members, device=x.device)
        lg, nfe, first = defended(defense, x[sel], [keys[i] for i in members], seed, eval_context(idx), runs,
                                  keep_images=True)
        if logits.numel() == 0:
            logits = torch.empty(B, runs, lg.shape[-1], device=lg.device)
        logits[sel], purified[sel] = lg, first
        nfe_total = max(nfe_total, nfe)
    cols = {"label": y.tolist(), "key": list(keys), **_prediction_columns(defense, x, y, logits)}
    seconds = (time.perf_counter() - t0) / B
    rows = []
    for i, row in enumerate(_rows(B, cols, {"runs": runs, "purify_nfe": nfe_total, "seconds": seconds})):
        rows.append({**row, **attack_infos[i]})
    return rows, purified


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
