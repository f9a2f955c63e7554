"""RobustBench-shaped export: one ModelInfo JSON per (defense, threat model), with the fields
RobustBench writes (accuracies as percent strings, ε as "8/255", number_forward_passes,
dataset) plus the protocol fields it has no place for and randomized defenses need:
R, EOT, gradient mode, decision rule, verdict, n_examples, the attack list and interval.

The robust figure goes in "external" — RobustBench's field for an evaluation stronger than
its standard AutoAttack run, read before "autoattack_acc" — as it is this job's per-sample
worst case over its own (adaptive) attacks, not AutoAttack. docs/report.md says which
RobustBench rule purification defenses cannot meet.
"""
from __future__ import annotations

import re
from typing import Any

THREAT_MODELS = {"linf": "Linf", "l2": "L2"}


def eps_string(eps: float, norm: str | None) -> str:
    """ε as RobustBench writes it: "8/255" for ℓ∞ budgets on the 1/255 grid, else the number."""
    k = eps * 255
    if (norm or "linf") == "linf" and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{eps:g}"


def _name(doc: dict[str, Any]) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{doc['job']}_{doc['purifier']}_{doc['classifier']}")


def _protocol(doc: dict[str, Any], w: dict[str, Any]) -> dict[str, Any]:
    entries = [a for a in doc["attacks"] if a["attack_index"] in w["attacks"] and a["eps"] == w["eps"]
               and a["norm"] == w["norm"]]
    return {
        "n_examples": w["n"], "R": max((a["runs"] or 0 for a in entries), default=None),
        "EOT": sorted({a["eot"] for a in entries}), "gradient_mode": sorted({a["gradient"] for a in entries}),
        "decision_rule": doc["decision"],
        "verdict": doc.get("verdict") or "runs",   # runs: R-run evaluations; recheck: Hill et al.'s record
        "attacks": [{"attack_index": a["attack_index"], "name": a["attack"], "gradient_mode": a["gradient"],
                     "eot": a["eot"], "steps": a["steps"], "params": a["params"],
                     "robust_acc": f"{100 * a['robust']['acc']:.2f}"} for a in entries],
        "robust_acc_ci95": [f"{100 * w['lo']:.2f}", f"{100 * w['hi']:.2f}"],
        "robust_acc_definition": "per-sample worst case: robust under every attack above"
                                 + ("" if doc.get("verdict") != "recheck" else
                                    " (verdict recheck: no break confirmed at any step, no R-run evaluation)"),
        "number_forward_passes_definition": "R × (purifier evaluations + 1 classifier evaluation) per prediction",
        "config_hash": doc["config_hash"], "checks_flagged": _flagged(doc),
    }


def _flagged(doc: dict[str, Any]) -> list[str]:
    checks = doc.get("checks") or {}
    names = [c["name"] for c in checks.get("record", []) if not c["passed"]]
    names += [c["name"] for v in (checks.get("shard") or {}).values() for c in v if not c["passed"]]
    return sorted(set(names))


def export(doc: dict[str, Any], dataset: str | None = None) -> dict[str, dict[str, Any]]:
    """{"<dataset>/<threat model>/<name>.json": model info} for each (ε, norm) of a run's
    worst case (a second ε of the same norm gets its ε in the file name)."""
    dataset = dataset or "unknown"
    clean = (doc.get("clean") or {}).get("defended")
    out: dict[str, dict[str, Any]] = {}
    per_norm: dict[str, int] = {}
    for w in doc["worst_case"]:
        per_norm[w["norm"]] = per_norm.get(w["norm"], 0) + 1
    for w in doc["worst_case"]:
        threat = THREAT_MODELS.get(w["norm"] or "linf")
        if threat is None or not w["n"]:
            continue
        passes = max((a["number_forward_passes"] or 0 for a in doc["attacks"] if a["attack_index"] in w["attacks"]),
                     default=0)
        # ModelInfo's fields in its order, null where the records cannot know (paper, authors, …)
        info = {
            "link": None, "name": f"{doc['purifier']} + {doc['classifier']} ({doc['job']})", "authors": None,
            "additional_data": None, "number_forward_passes": passes or None, "dataset": dataset, "venue": None,
            "architecture": f"{doc['classifier']} behind {doc['purifier']} purification",
            "eps": eps_string(w["eps"], w["norm"]),
            "clean_acc": f"{100 * clean['acc']:.2f}" if clean else None,
            "reported": None, "external": f"{100 * w['acc']:.2f}",
            "footnote": "Purification defense evaluated by advpure: per-sample worst case over adaptive "
                        "attacks (not AutoAttack); randomized and test-time-optimising defenses are outside "
                        "RobustBench's rules.",
            "unreliable": bool(_flagged(doc)),
            **_protocol(doc, w),
        }
        suffix = f"_eps{eps_string(w['eps'], w['norm']).replace('/', '-')}" if per_norm[w["norm"]] > 1 else ""
        # accuracy fields it lacks (autoattack_acc, corruptions_*) are left out, not null:
        # RobustBench's readers parse every accuracy field present as a number
        out[f"{dataset}/{threat}/{_name(doc)}{suffix}.json"] = info
    return out
