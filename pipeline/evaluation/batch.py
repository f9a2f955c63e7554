"""Per-batch math of the three stages, as plain records (no I/O, no Ray, no pyarrow).

- evaluate: clean → attack → purify (R runs; not for a confirmed break) → classify, one row
            per (sample, attack); a sample the defended model gets wrong clean is not
            attacked and counts not robust (the clean gate; `evaluation.attack_misclassified`);
- attack:   adversarial examples only (the set is written as shards by the worker);
- purify:   purify (R runs) and classify given images — an adversarial set made earlier,
            or any corpus.
Noise contexts are shared between stages, so attack + purify reproduce evaluate exactly
(purify, which writes every image, also runs the R runs evaluate leaves out for a confirmed break)
when evaluate attacks every sample: attack + purify have no clean defended evaluation to gate on.
Each stage's contexts are declared in its pipeline/stage_table.py entry (`noise`), which
tests/test_stage_table.py holds to exactly the contexts these functions draw from.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from pipeline.attacks.recheck import make_defense_recheck
from pipeline.evaluation.decision import decide, decide_all
from pipeline.evaluation.defense import Defense
from pipeline.evaluation.protocol import NO_ATTACK, PlannedAttack, Protocol
from pipeline.schema import Status
from pipeline.seeding import Noise
from pipeline.vocabulary import DECISION_COLUMNS


@dataclass
class AttackOutcome:
    x_adv: torch.Tensor          # [B, C, H, W]
    candidate_step: torch.Tensor  # [B] first step the attack's own forward met the goal, -1 never
    broken_step: torch.Tensor    # [B] first confirmed break, -1 never
    steps: int                   # target steps the attack ran
    nfe: list[int]               # attack-view evaluations of each sample (its steps × EOT draws)
    nonfinite: torch.Tensor | None = None   # [B] bool (CPU): some forward or re-check gave NaN / inf logits


@dataclass
class CleanEval:
    """A batch's clean columns and defended clean logits, computed once per batch."""
    columns: dict[str, list]
    logits: torch.Tensor         # [B, R, K] (verdict recheck: the nominating draws, [B, EOT, K])
    nfe: list[int]               # purifier evaluations of each row's clean evaluation
    pred: torch.Tensor           # [B] (CPU) the defended clean prediction under the job's decision rule
    finite: torch.Tensor         # [B] bool (CPU) the logits it came from were finite

    def wrong(self, y: torch.Tensor) -> torch.Tensor:
        """[B] bool (CPU): the defended model's clean prediction is wrong (false where its
        logits are not finite: argmax of NaN is no prediction)."""
        return (self.pred != y.cpu()) & self.finite

    def take(self, rows: Sequence[int]) -> CleanEval:
        rows = list(rows)
        return CleanEval({c: [v[i] for i in rows] for c, v in self.columns.items()}, self.logits[rows],
                         [self.nfe[i] for i in rows], self.pred[rows], self.finite[rows])

    @staticmethod
    def stack(parts: Sequence[CleanEval]) -> CleanEval:
        cols = {c: [v for p in parts for v in p.columns[c]] for c in parts[0].columns}
        return CleanEval(cols, torch.cat([p.logits for p in parts]), [n for p in parts for n in p.nfe],
                         torch.cat([p.pred for p in parts]), torch.cat([p.finite for p in parts]))


# no final R-run evaluation of a sample whose break the attack confirmed: its verdict is
# "broken" whatever that evaluation says (switched off only to test that verdicts agree)
SKIP_CONFIRMED_BREAKS = True
# the per-run columns of the final evaluation (with the decision rules' DECISION_COLUMNS)
FINAL_COLUMNS = ("purified_preds", "purified_mean_logits", "worst_of_runs_correct")


def eval_context(attack_index: int) -> str:
    return "eval/clean" if attack_index < 0 else f"eval/attack{attack_index}"


def defended(defense: Defense, x: torch.Tensor, keys: Sequence[str], seed: int, context: str,
             runs: int, keep_images: bool = False) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """Logits [B, R, K] of the defended model, purifier evaluations per row, and (if asked)
    the first run's purified images [B, C, H, W]."""
    noise = Noise.for_batch(seed, keys, context, runs, x.device)
    with torch.no_grad():
        purified, nfe, _ = defense.purify(x.repeat_interleave(runs, 0), noise)  # [B·R, C, H, W]
        logits = defense.classify(purified).view(x.shape[0], runs, -1)
    first = purified.view(x.shape[0], runs, *x.shape[1:])[:, 0] if keep_images else None
    return logits.float(), nfe, first


def run_attack(p: Protocol, plan: PlannedAttack, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str],
               context: str | None = None, eot: int | None = None) -> AttackOutcome:
    """One planned attack on a batch. Candidate breaks are confirmed with `plan.confirm_draws`
    fresh draws of the real defense (Hill et al. 2021), so a lucky draw never counts as a break
    and the attack keeps pushing until a break is confirmed."""
    context = context or f"attack{plan.index}/{plan.name}"
    eot = eot or plan.eot
    target = (plan.surrogate or p.defense).attack_target(plan.gradient, p.seed, keys, context, eot)
    own = Noise.for_batch(p.seed, keys, f"{context}/own", 1, x.device)
    recheck = (make_defense_recheck(p.defense, p.seed, keys, f"{context}/recheck", plan.confirm_draws)
               if plan.confirm_draws else None)
    result = plan.attack(target, x, y, own, recheck=recheck)
    candidate = result.candidate_step if result.candidate_step is not None else result.broken_step
    per_sample = result.sample_nfe.tolist() if result.sample_nfe is not None else [result.nfe] * x.shape[0]
    nonfinite = result.nonfinite.cpu() if result.nonfinite is not None else torch.zeros(x.shape[0], dtype=torch.bool)
    return AttackOutcome(result.x_adv.detach(), candidate.cpu(), result.broken_step.cpu(), result.nfe,
                         [n * eot for n in per_sample], nonfinite)


def _prediction_columns(p: Protocol, x_adv: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None,
                        broken_step: torch.Tensor, evaluated: torch.Tensor | None = None,
                        judged_by_recheck: torch.Tensor | None = None) -> dict[str, list]:
    """The bare classifier on x_adv and, where the defended model was evaluated (logits
    [B, R, K]; `evaluated` [B] bool, None: every row), its per-run columns and the verdict.
    A row not evaluated has null per-run columns and `final_evaluated` false (see
    `final_evaluation`); logits None with `evaluated` None: a stage without them.
    `judged_by_recheck` [B] bool (verdict recheck: clean-correct and attacked): robust where
    no break was confirmed, with no R-run evaluation at all."""
    with torch.no_grad():
        cols: dict[str, list] = {"adv_pred": p.defense.classifier(x_adv).argmax(1).tolist()}
    if logits is None and evaluated is None:
        return cols
    B = len(y)
    done = torch.ones(B, dtype=torch.bool) if evaluated is None else evaluated.cpu()
    per_run: dict[str, list] = {c: [None] * B for c in (*FINAL_COLUMNS, *DECISION_COLUMNS.values())}
    correct = torch.zeros(B, dtype=torch.bool) if judged_by_recheck is None else judged_by_recheck.cpu()
    if logits is not None:
        preds = logits.argmax(2)                       # [B, R]
        decided = decide_all(logits)                   # every rule's prediction is recorded
        correct = (decided[p.decision].cpu() == y.cpu()) & done
        per_run = {
            "purified_preds": preds.tolist(),
            "purified_mean_logits": logits.mean(1).tolist(),
            **{DECISION_COLUMNS[rule]: pred.tolist() for rule, pred in decided.items()},
            "worst_of_runs_correct": (preds == y[:, None]).all(1).tolist(),
        }
        skipped = (~done).nonzero().squeeze(1).tolist()
        for values in per_run.values():
            for i in skipped:
                values[i] = None
    verdict = "recheck" if judged_by_recheck is not None else "runs"
    cols.update({**per_run, "final_evaluated": done.tolist(), "decision": [p.decision] * B,
                 "verdict": [verdict] * B, "robust": ((broken_step.cpu() < 0) & correct).tolist()})
    return cols


def _rows(B: int, columns: dict[str, list], scalars: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**{k: v[i] for k, v in columns.items()}, **scalars} for i in range(B)]


def _norms(x_adv: torch.Tensor, x: torch.Tensor) -> dict[str, list]:
    delta = (x_adv - x).flatten(1)
    return {"linf": delta.abs().amax(1).tolist(), "l2": delta.norm(dim=1).tolist()}


def _finite(logits: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits).flatten(1).all(1).cpu()


def clean_eval(p: Protocol, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str]) -> CleanEval:
    """Per-sample clean columns, the defended clean logits and purifier NFE: R runs of every
    sample (`evaluation.verdict: runs`) or the nominate-and-confirm scheme (`recheck`)."""
    with torch.no_grad():
        clean_pred = p.defense.classifier(x).argmax(1)
    if p.verdict == "recheck":
        logits, pred, mean_logit, finite, nfe = _clean_by_recheck(p, x, y, keys)
        per_run: list = [None] * len(keys)    # no R runs were made
    else:
        logits, runs_nfe, _ = defended(p.defense, x, keys, p.seed, eval_context(-1), p.runs)
        pred, mean_logit = decide(logits, p.decision).cpu(), decide(logits, "mean_logit").cpu()
        finite, nfe, per_run = _finite(logits), [runs_nfe] * len(keys), logits.argmax(2).tolist()
    cols = {"label": y.tolist(), "key": list(keys), "clean_pred": clean_pred.tolist(),
            "clean_purified_preds": per_run, "clean_mean_logit_pred": mean_logit.tolist(),
            "clean_decision_pred": pred.tolist()}
    return CleanEval(cols, logits, nfe, pred, finite)


def _clean_by_recheck(p: Protocol, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """The clean verdict as Hill et al.'s script reaches it (its step −1): the first attack's
    EOT draws of the real defense nominate the samples they misclassify under the job's
    decision rule, and its re-check draws confirm each nomination; a sample not nominated, or
    not confirmed, is clean-correct. (nominating logits [B, EOT, K]; the deciding draws'
    decision and mean-logit predictions and finiteness, the re-check's where one ran; NFE per row.)"""
    plan = p.attacks[0]
    logits, nfe, _ = defended(p.defense, x, keys, p.seed, "eval/clean/nominate", plan.eot)
    pred, mean_logit = decide(logits, p.decision).cpu(), decide(logits, "mean_logit").cpu()
    finite = _finite(logits)
    nfes = [nfe] * len(keys)
    nominated = ((pred != y.cpu()) & finite).nonzero().squeeze(1)
    if plan.confirm_draws and nominated.numel():   # 0: the forward is the deterministic defense itself
        rows = nominated.tolist()
        checked, more, _ = defended(p.defense, x[nominated.to(x.device)], [keys[i] for i in rows], p.seed,
                                    "eval/clean/recheck", plan.confirm_draws)
        pred[nominated], mean_logit[nominated] = decide(checked, p.decision).cpu(), decide(checked, "mean_logit").cpu()
        finite[nominated] = _finite(checked)
        for i in rows:
            nfes[i] += more
    return logits, pred, mean_logit, finite, nfes


def final_evaluation(p: Protocol, plan: PlannedAttack, x_adv: torch.Tensor, keys: Sequence[str],
                     broken_step: torch.Tensor, attacked: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """The R-run evaluation of the returned images (`eval/attack{i}` draws), for the attacked
    rows (`attacked` [B] bool, None: every row) without a confirmed break only
    (SKIP_CONFIRMED_BREAKS): (logits [B, R, K], zeros where not evaluated, or None if no row
    was; the evaluated mask [B]; purifier evaluations per row). Draws are keyed per sample,
    so a row's logits do not depend on which others ran."""
    need = (broken_step < 0) if SKIP_CONFIRMED_BREAKS else torch.ones_like(broken_step, dtype=torch.bool)
    if attacked is not None:
        need = need & attacked
    idx = need.nonzero().squeeze(1)
    if idx.numel() == len(keys):
        logits, nfe, _ = defended(p.defense, x_adv, keys, p.seed, eval_context(plan.index), p.runs)
        return logits, need, nfe
    if idx.numel() == 0:
        return None, need, 0
    sub, nfe, _ = defended(p.defense, x_adv[idx.to(x_adv.device)], [keys[i] for i in idx.tolist()], p.seed,
                           eval_context(plan.index), p.runs)
    logits = sub.new_zeros(len(keys), *sub.shape[1:])
    logits[idx.to(sub.device)] = sub
    return logits, need, nfe


def attacked_mask(p: Protocol, clean: CleanEval, y: torch.Tensor) -> torch.Tensor:
    """[B] bool (CPU): the samples the evaluate stage attacks. The clean gate (AutoAttack's
    run_standard_evaluation; the Hill et al. script's step −1): a sample the defended model
    misclassifies clean, under the job's decision rule, is not attacked and counts not robust;
    `evaluation.attack_misclassified` attacks every sample. Non-finite clean logits (a diverged
    purifier) are not a misclassification: the sample goes on, and the worker marks its row
    `nonfinite` from the final evaluation's logits, as without the gate."""
    if p.attack_misclassified:
        return torch.ones(len(y), dtype=torch.bool)
    return ~clean.wrong(y)


def run_gated(p: Protocol, plan: PlannedAttack, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str],
              attacked: torch.Tensor) -> AttackOutcome:
    """The attack on the `attacked` rows only (none: no attack call); the others keep x, never
    broken, 0 evaluations. Noise is keyed per sample, so an attacked row is what the attack on
    the whole batch would give it."""
    if bool(attacked.all()):
        return run_attack(p, plan, x, y, keys)
    B = len(keys)
    out = AttackOutcome(x, torch.full((B,), -1, dtype=torch.int64), torch.full((B,), -1, dtype=torch.int64), 0,
                        [0] * B, torch.zeros(B, dtype=torch.bool))
    idx = attacked.nonzero().squeeze(1)
    if idx.numel() == 0:
        return out
    dev = idx.to(x.device)
    sub = run_attack(p, plan, x[dev], y[dev], [keys[i] for i in idx.tolist()])
    out.x_adv = x.clone()
    out.x_adv[dev] = sub.x_adv
    out.candidate_step[idx], out.broken_step[idx] = sub.candidate_step, sub.broken_step
    out.nonfinite[idx] = sub.nonfinite
    for i, n in zip(idx.tolist(), sub.nfe):
        out.nfe[i] = n
    out.steps = sub.steps
    return out


def attack_rows(p: Protocol, plan: PlannedAttack | None, x: torch.Tensor, y: torch.Tensor,
                keys: Sequence[str], clean: CleanEval) -> list[dict[str, Any]]:
    """Rows of one attack (None: no attack) on a batch, given its clean evaluation. A row the
    clean gate keeps from the attack (`attacked` false) is x itself, not robust, with no final
    evaluation (per-run columns null, `final_evaluated` false), broken_step −1, 0 attack NFE."""
    t0 = time.perf_counter()
    B = x.shape[0]
    judged = None
    if plan is None:
        never = torch.full((B,), -1, dtype=torch.int64)
        out = AttackOutcome(x, never, never, 0, [0] * B)
        logits, evaluated, nfe, info = clean.logits, torch.ones(B, dtype=torch.bool), 0, NO_ATTACK
        attacked: list = [None] * B
    else:
        gate = attacked_mask(p, clean, y)
        out = run_gated(p, plan, x, y, keys, gate)
        if p.verdict == "recheck":   # the attack checked every iterate it evaluated, the returned one included
            logits, evaluated, nfe = None, torch.zeros(B, dtype=torch.bool), 0
            judged = gate & ~clean.wrong(y)
        else:
            logits, evaluated, nfe = final_evaluation(p, plan, out.x_adv, keys, out.broken_step, gate)
        info, attacked = plan.info(), gate.tolist()
    cols = {**clean.columns, **_prediction_columns(p, out.x_adv, y, logits, out.broken_step, evaluated, judged),
            **_norms(out.x_adv, x), "broken_step": out.broken_step.tolist(),
            "candidate_step": out.candidate_step.tolist(), "attack_nfe": out.nfe, "attacked": attacked,
            "attack_steps": [0 if a is False else out.steps for a in attacked],
            "purify_nfe": [c + (nfe if e else 0) for c, e in zip(clean.nfe, evaluated.tolist())]}
    rows = _rows(B, cols, {**info, "runs": p.runs, "seconds": (time.perf_counter() - t0) / B})
    if judged is not None:   # no final evaluation shows a diverged purifier: the checks' logits must
        for i in (~clean.finite | out.nonfinite).nonzero().squeeze(1).tolist():
            rows[i].update(status=Status.NONFINITE.value, robust=False,
                           error="non-finite defended logits (NaN or inf) in the clean or the attack's checks "
                                 "(evaluation.verdict: recheck): the purifier or classifier diverged")
    return rows


def evaluate_batch(p: Protocol, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str]) -> list[dict[str, Any]]:
    """Rows (one per sample and attack) with every prediction the schema records."""
    t0 = time.perf_counter()
    clean = clean_eval(p, x, y, keys)
    share = (time.perf_counter() - t0) / x.shape[0] / max(1, len(p.attacks))
    rows: list[dict[str, Any]] = []
    for plan in list(p.attacks) or [None]:
        rows += [{**r, "seconds": r["seconds"] + share} for r in attack_rows(p, plan, x, y, keys, clean)]
    return rows


def attack_batch(p: Protocol, x: torch.Tensor, y: torch.Tensor,
                 keys: Sequence[str]) -> tuple[list[dict[str, Any]], dict[int, torch.Tensor]]:
    """Adversarial examples for every attack: (rows without purified columns, {index: x_adv})."""
    B = x.shape[0]
    with torch.no_grad():
        clean_pred = p.defense.classifier(x).argmax(1).tolist()
    rows: list[dict[str, Any]] = []
    images: dict[int, torch.Tensor] = {}
    for plan in p.attacks:
        t1 = time.perf_counter()
        out = run_attack(p, plan, x, y, keys)
        images[plan.index] = out.x_adv
        cols = {"label": y.tolist(), "key": list(keys), "clean_pred": clean_pred,
                **_prediction_columns(p, out.x_adv, y, None, out.broken_step), **_norms(out.x_adv, x),
                "broken_step": out.broken_step.tolist(), "candidate_step": out.candidate_step.tolist(),
                "attack_nfe": out.nfe, "attacked": [True] * B}
        rows += _rows(B, cols, {**plan.info(), "runs": 0, "attack_steps": out.steps,
                                "purify_nfe": 0, "seconds": (time.perf_counter() - t1) / B})
    return rows, images


def purify_batch(p: Protocol, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str],
                 attack_infos: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Purify given images (adversarial or not) R times: (rows, first run's purified images).

    `attack_infos[i]` holds sample i's attack columns from its lineage (NO_ATTACK for a plain
    corpus); its attack index picks the same evaluation draws as the evaluate stage, and its
    confirmed break (broken_step) carries into the verdict.
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
        lg, nfe, first = defended(p.defense, x[sel], [keys[i] for i in members], p.seed, eval_context(idx), p.runs,
                                  keep_images=True)
        if logits.numel() == 0:
            logits = torch.empty(B, p.runs, lg.shape[-1], device=lg.device)
        logits[sel], purified[sel] = lg, first
        nfe_total = max(nfe_total, nfe)
    broken = torch.tensor([int(info.get("broken_step", -1)) for info in attack_infos], dtype=torch.int64)
    cols = {"label": y.tolist(), "key": list(keys), **_prediction_columns(p, x, y, logits, broken)}
    seconds = (time.perf_counter() - t0) / B
    rows = []
    for i, row in enumerate(_rows(B, cols, {"runs": p.runs, "purify_nfe": nfe_total, "seconds": seconds})):
        rows.append({**row, **attack_infos[i]})
    return rows, purified


def is_broken(row: dict[str, Any]) -> bool:
    """A sample the attack defeated: a confirmed break at some step, or a wrong final
    prediction under the job's decision rule."""
    return not row["robust"]


def gradient_checks(p: Protocol, plan: PlannedAttack, x: torch.Tensor, y: torch.Tensor,
                    keys: Sequence[str]) -> list[dict[str, Any]]:
    """The auto-attack style checks of one attack's view on one batch (plus the flag checks).
    The view is drawn once per sample and call, not EOT times: a zero or non-finite gradient,
    randomness outside the keys and a stochastic view show in one draw (AutoAttack's checks
    call a randomized model once), and EOT draws would multiply the checks' cost — 16 samples ×
    EOT 8 × 3 forwards were 384 Langevin chains, 15 % of a 20-image Hill job."""
    from pipeline.evaluation import checks

    flags = p.defense.purifier.flags()
    target = (plan.surrogate or p.defense).attack_target(plan.gradient, p.seed, keys, f"checks{plan.index}", 1)
    results = checks.run_gradient_checks(target, x, y, declared_stochastic=flags["stochastic"]
                                         if plan.gradient != "classifier" else False)
    results.append(checks.check_test_time_optimization(flags, plan.gradient))
    results.append(checks.check_eot(flags, plan.eot, plan.gradient))
    return results


def eot_probe(p: Protocol, plan: PlannedAttack, x: torch.Tensor, y: torch.Tensor,
              keys: Sequence[str], max_drop: float = 0.02) -> dict[str, Any]:
    """Re-run an attack with its EOT draws doubled on a few samples: if robust accuracy
    drops by more than `max_drop`, the attack had not converged in EOT (too few draws)."""
    acc = {}
    for eot in (plan.eot, 2 * plan.eot):
        out = run_attack(p, plan, x, y, keys, context=f"probe{plan.index}/eot{eot}", eot=eot)
        logits, _, _ = defended(p.defense, out.x_adv, keys, p.seed, f"probe{plan.index}/eval{eot}", p.runs)
        robust = (out.broken_step < 0) & (decide(logits, p.decision).cpu() == y.cpu())
        acc[eot] = float(robust.float().mean())
    drop = acc[plan.eot] - acc[2 * plan.eot]
    return {"name": "eot_probe", "passed": drop <= max_drop,
            "detail": f"robust accuracy {100 * acc[plan.eot]:.1f}% at EOT {plan.eot}, "
                      f"{100 * acc[2 * plan.eot]:.1f}% at EOT {2 * plan.eot} on {len(keys)} samples",
            "values": {"eot": plan.eot, "acc": acc[plan.eot], "acc_doubled": acc[2 * plan.eot], "n": len(keys)}}
