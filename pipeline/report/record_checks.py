"""Record-level checks: sanity checks computed from a job's per-attack figures alone, after
the checklist of Carlini et al. 2019 and AutoAttack's checks. Torch-free, so that
`advpure report` can run them where only pyarrow is installed.

Each check returns {"name", "passed", "detail", "values"}; `passed: False` warns that a
robustness number may be wrong (masked gradients, an attack that has not converged); it
never stops anything.

  check_eps_monotone      robust accuracy must not rise with ε
  check_unbounded_eps     at an unbounded ε (ℓ∞ ε = 1) robust accuracy must be ≈ 0
  check_attack_ordering   a weaker attack (transfer, single step, …) beats the strongest one
  check_square_vs_gradient  gradient-free Square beats every gradient attack: gradient masking
  check_convergence       an attack still confirms breaks in its last 10 % of steps
  run_record_checks       all of them over a report's attack entries
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping, Sequence

from pipeline.vocabulary import ADAPTIVE_GRADIENT_MODES, GRADIENT_FREE_ATTACKS, GRADIENT_MODES, NO_ATTACK_NAME

GRADIENT_FREE = (*GRADIENT_FREE_ATTACKS, NO_ATTACK_NAME)   # attack names that never read a gradient
LATE_FRACTION = 0.9                  # "late" = broken_step >= 0.9 · attack_steps
LATE_THRESHOLD = 0.01                # more late breaks than this fraction: not converged


def _result(name: str, passed: bool, detail: str, values: Any) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail, "values": values}


def _f(v: float) -> float | None:
    """A JSON-safe float (NaN/inf become None)."""
    v = float(v)
    return v if math.isfinite(v) else None


def check_eps_monotone(table: Mapping[float, float], tol: float = 0.0) -> dict[str, Any]:
    """{ε: robust accuracy} must be non-increasing in ε (within `tol`). Every pair ε_i < ε_j
    with acc_j > acc_i + tol is reported: a larger budget that the same attack uses worse."""
    items = sorted((float(e), float(a)) for e, a in table.items())
    offending = [{"eps_small": e1, "acc_small": a1, "eps_large": e2, "acc_large": a2}
                 for i, (e1, a1) in enumerate(items) for (e2, a2) in items[i + 1:] if a2 > a1 + tol]
    values = {"table": [[e, a] for e, a in items], "offending": offending, "tol": tol}
    if offending:
        w = max(offending, key=lambda o: o["acc_large"] - o["acc_small"])
        return _result("eps_monotone", False, f"robust accuracy rises with ε in {len(offending)} pair(s), e.g. "
                       f"{w['acc_small']:.4f} at ε={w['eps_small']:.5g} but {w['acc_large']:.4f} at "
                       f"ε={w['eps_large']:.5g}: the attack is not converging (masked gradients?)", values)
    return _result("eps_monotone", True, "robust accuracy does not increase with ε", values)


def check_unbounded_eps(robust_accuracy: float, eps: float = 1.0, norm: str = "linf",
                        threshold: float = 0.01) -> dict[str, Any]:
    """With an unbounded budget (ℓ∞ ε = 1 lets the attack draw any image) robust accuracy
    must be ≤ threshold; otherwise the attack cannot find even trivial adversarial examples:
    gradient masking (or a bug)."""
    values = {"robust_accuracy": _f(robust_accuracy), "eps": float(eps), "norm": norm, "threshold": threshold}
    if norm == "linf" and eps < 1.0:
        values["note"] = "ε < 1 in ℓ∞ is not unbounded"
    if not robust_accuracy <= threshold:
        return _result("unbounded_eps", False, f"robust accuracy {robust_accuracy:.4f} > {threshold} at "
                       f"{norm} ε={eps:g}: the attack fails where any image is allowed — gradient masked", values)
    return _result("unbounded_eps", True, f"robust accuracy {robust_accuracy:.4f} ≤ {threshold} at unbounded ε", values)


def check_attack_ordering(accuracies: Mapping[str, float], strongest: str, weaker: Iterable[str],
                          tol: float = 0.0) -> dict[str, Any]:
    """A weaker attack (single-step, transfer, classifier-only, noise, black-box) must not
    beat the strongest white-box one by more than `tol` (AutoAttack's Square check,
    Carlini et al. §5: iterative ≥ single-step, white-box ≥ black-box)."""
    ref = float(accuracies[strongest])
    beats = {w: float(accuracies[w]) for w in weaker if w in accuracies and float(accuracies[w]) < ref - tol}
    values = {"strongest": strongest, "strongest_accuracy": ref, "beating": beats, "tol": tol}
    if beats:
        w = min(beats, key=beats.get)
        return _result("attack_ordering", False, f"{w} reaches {beats[w]:.4f} < {ref:.4f} of {strongest}: the "
                       "white-box attack is not working (masked gradients or bad settings)", values)
    return _result("attack_ordering", True, f"no weaker attack beats {strongest}", values)


def check_square_vs_gradient(square: Mapping[str, float], gradient: Mapping[str, float],
                             tol: float = 0.0) -> dict[str, Any]:
    """Square (gradient-free) reaching lower robust accuracy than *every* gradient-based attack
    at the same ε means the gradients mislead the attacks: gradient masking (AutoAttack's
    flag). {label: accuracy} of the Square entries and of the gradient-based entries."""
    best_gradient = min(gradient.values())
    beats = {k: float(v) for k, v in square.items() if v < best_gradient - tol}
    values = {"square": dict(square), "gradient": dict(gradient), "best_gradient": best_gradient, "tol": tol}
    if beats:
        w = min(beats, key=beats.get)
        return _result("square_vs_gradient", False, f"{w} reaches {beats[w]:.4f}, below every gradient-based "
                       f"attack (best {best_gradient:.4f}): gradient masking — the gradient attacks "
                       "are misled", values)
    return _result("square_vs_gradient", True, "gradient-based attacks do at least as well as Square", values)


def check_convergence(late_breaks: int, n: int, steps: int, fraction: float = LATE_FRACTION,
                      threshold: float = LATE_THRESHOLD) -> dict[str, Any]:
    """An attack that still confirms breaks for more than `threshold` of its samples in its
    last (1 - fraction) of steps had not converged: more steps would lower robust accuracy."""
    share = late_breaks / n if n else 0.0
    values = {"late_breaks": int(late_breaks), "n": int(n), "steps": int(steps), "late_fraction": share,
              "from_step": math.ceil(fraction * steps), "threshold": threshold}
    if share > threshold:
        return _result("convergence", False, f"{late_breaks} of {n} samples ({100 * share:.1f} %) were first "
                       f"broken in the last {100 * (1 - fraction):.0f} % of the {steps} steps: the attack has "
                       "not converged; run more steps", values)
    return _result("convergence", True, f"{100 * share:.1f} % of samples broken in the last steps", values)


def _label(a: Mapping[str, Any]) -> str:
    return f"attack {a['attack_index']} ({a['attack']}, {a['gradient']})"


def _scored(attacks: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Attack entries with a robust accuracy (an attack stage alone purifies nothing)."""
    return [a for a in attacks if a["attack"] != NO_ATTACK_NAME and a.get("robust") is not None]


def _sweep_checks(scored: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Attacks that differ only in ε: monotone in ε, and ≈ 0 at an unbounded ℓ∞ ε."""
    results = []
    groups: dict[tuple, dict[float, float]] = {}
    for a in scored:
        key = (a["attack"], a["gradient"], a["eot"], a.get("norm"), a.get("sweep_key", ""))
        groups.setdefault(key, {})[a["eps"]] = a["robust"]["acc"]
        if a["eps"] >= 1.0 and a.get("norm", "linf") in ("linf", None):
            results.append({**check_unbounded_eps(a["robust"]["acc"], a["eps"], "linf"),
                            "attack_index": a["attack_index"]})
    for (name, grad, _, _, _), table in groups.items():
        if len(table) >= 2:
            results.append({**check_eps_monotone(table), "attack": name, "gradient": grad})
    return results


def _same_eps_checks(scored: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """At one (ε, norm): transfer must not beat adaptive; Square must not beat every gradient attack."""
    results = []
    by_eps: dict[tuple, list[Mapping[str, Any]]] = {}
    for a in scored:
        by_eps.setdefault((a["eps"], a.get("norm") or ""), []).append(a)
    for (eps, norm), group in sorted(by_eps.items()):
        acc = {_label(a): a["robust"]["acc"] for a in group}
        adaptive = [_label(a) for a in group
                    if a["gradient"] in ADAPTIVE_GRADIENT_MODES and a["attack"] not in GRADIENT_FREE]
        transfer = [_label(a) for a in group if a["gradient"] == "classifier" and a["attack"] not in GRADIENT_FREE]
        if adaptive and transfer:
            strongest = min(adaptive, key=acc.get)
            results.append({**check_attack_ordering(acc, strongest, transfer), "eps": eps, "norm": norm or None})
        square = {_label(a): acc[_label(a)] for a in group if a["attack"] == "square"}
        gradient = {_label(a): acc[_label(a)] for a in group
                    if a["attack"] not in GRADIENT_FREE and a["gradient"] in GRADIENT_MODES}
        if square and gradient:
            results.append({**check_square_vs_gradient(square, gradient), "eps": eps, "norm": norm or None})
    return results


def run_record_checks(attacks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every record-level check that the job's attack entries allow. An entry needs
    attack_index, attack, gradient, eot, eps, norm, sweep_key, robust {"acc"} and, for the
    convergence check, steps, late_breaks and own_n (rows the attack itself ran)."""
    scored = _scored(attacks)
    results = _sweep_checks(scored) + _same_eps_checks(scored)
    for a in attacks:
        if a["attack"] != NO_ATTACK_NAME and a.get("steps") and a.get("own_n"):
            results.append({**check_convergence(a["late_breaks"], a["own_n"], a["steps"]),
                            "attack_index": a["attack_index"]})
    return results


def sweep_key(attack_params: str | None) -> str:
    """Attacks whose parameters differ only in ε share a sweep key."""
    params = json.loads(attack_params or "{}")
    return json.dumps({k: v for k, v in params.items() if k != "eps"}, sort_keys=True)
