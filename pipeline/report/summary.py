"""From combined aggregates (pipeline.report.aggregate) to the report document: per-attack
rows, the per-sample worst case per (ε, norm), per-class accuracy, curves, cost, checks.

Everything here walks *aggregated* tables (a row per attack entry, class, step, …), never
records. Intervals are Wilson 95 % intervals from SciPy.
"""
from __future__ import annotations

import json
from typing import Any

from scipy.stats import binomtest

from pipeline.report import record_checks
from pipeline.report.aggregate import ENTRY_KEYS
from pipeline.vocabulary import DEFAULT_DECISION, NO_ATTACK_NAME

REPORT_VERSION = 3   # of the JSON document; bumped when a field changes meaning (2: every decision
                     # rule and the runs curve count a confirmed break as broken; 3: clean_defended
                     # under the job's decision rule, the clean gate's rows broken from step 0)
ACCURACIES = {"robust": "c_robust", "clean_classifier": "c_clean_bare", "clean_defended": "c_clean_defended",
              "adv_classifier": "c_adv_bare", "robust_mean_logit": "c_mean_logit", "robust_vote": "c_vote",
              "robust_mean_softmax": "c_mean_softmax", "robust_worst_of_runs": "c_worst_of_runs"}


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score 95 % interval of a binomial proportion k/n (SciPy); NaN when n = 0."""
    if n == 0:
        return (float("nan"), float("nan"))
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


def accuracy(k: int | None, n: int | None, interval: bool = True) -> dict[str, Any] | None:
    """{k, n, acc[, lo, hi]}; None where nothing was recorded (n = 0)."""
    if not n:
        return None
    out: dict[str, Any] = {"k": int(k or 0), "n": int(n), "acc": (k or 0) / n}
    if interval:
        out["lo"], out["hi"] = wilson(k or 0, n)
    return out


def entry_key(row: dict[str, Any]) -> tuple:
    return tuple(row[k] for k in ENTRY_KEYS)


def _step_stats(rows: list[dict[str, Any]], steps: int | None) -> dict[str, Any]:
    """Late breaks (convergence check) and the no-break-by-step curve of one attack entry.
    Rows carried by a cascade were broken by an earlier attack, and rows the clean gate kept
    from the attack were wrong before it: both count as broken from step 0 in the curve and
    are not this attack's breaks."""
    own: dict[int, int] = {}
    carried = 0
    for r in rows:
        if r["carried"] or r.get("gated"):
            carried += r["rows"]
        else:
            own[r["broken_step"]] = own.get(r["broken_step"], 0) + r["rows"]
    own_n = sum(own.values())
    total = own_n + carried
    if not total:
        return {"own_n": 0, "late_breaks": 0, "curve": None}
    last = max([s for s in own if s >= 0], default=-1)
    length = max(steps or 0, last + 1)
    late = sum(v for s, v in own.items() if s >= 0 and steps and s >= record_checks.LATE_FRACTION * steps)
    broken, curve = carried, []
    for t in range(length):
        broken += own.get(t, 0)
        curve.append((total - broken) / total)
    return {"own_n": own_n, "late_breaks": late, "curve": {"n": total, "no_break_by_step": curve}}


def _whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _cost_columns(e: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    n = e["rows"]
    evals = e["purify_evals_sum"] or 0
    per_run = (e["purify_nfe_sum"] or 0) / evals if evals else None
    runs = e["runs"] or 0
    return {
        "linf": {"mean": e["linf_sum"] / e["linf_count"], "max": e["linf_max"]} if e["linf_count"] else None,
        "l2": {"mean": e["l2_sum"] / e["l2_count"], "max": e["l2_max"]} if e["l2_count"] else None,
        "mean_linf": e["linf_sum"] / e["linf_count"] if e["linf_count"] else 0.0,
        "attack_nfe_per_sample": (e["attack_nfe_sum"] or 0) / n,
        "purify_nfe_per_sample": (e["purify_nfe_sum"] or 0) / n,
        "seconds_per_sample": (e["seconds_sum"] or 0.0) / n, "seconds_total": e["seconds_sum"] or 0.0,
        # one defended prediction: R runs of (purifier evaluations + one classifier evaluation)
        "number_forward_passes": _whole(runs * (per_run + 1)) if per_run is not None and runs else None,
    }


def attack_entries(agg: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per attack entry (attack index and settings), ordered as the job ran them."""
    by_entry: dict[tuple, list[dict[str, Any]]] = {}
    for r in agg["steps"].to_pylist() if agg.get("steps") is not None else []:
        by_entry.setdefault(entry_key(r), []).append(r)
    sources: dict[tuple, list[dict[str, int]]] = {}   # carried rows per entry, by the entry they came from
    for r in agg["cascade"].to_pylist() if agg.get("cascade") is not None else []:
        sources.setdefault(entry_key(r), []).append({"attack_index": r["cascade_from"], "rows": r["rows"]})
    out = []
    for e in agg["entries"].to_pylist():
        params = json.loads(e["attack_params"] or "{}")
        steps = e["attack_steps_max"] or params.get("steps")
        a = {"attack_index": e["attack_index"], "attack": e["attack_name"], "gradient": e["gradient_mode"],
             "params": params, "eps": e["eps"], "eps_255": e["eps"] * 255 if e["eps"] is not None else None,
             "norm": e["norm"], "eot": e["eot"], "runs": e["runs"], "n": e["rows"],
             "sweep_key": record_checks.sweep_key(e["attack_params"]),
             "steps": int(steps) if steps else None, "confirm_draws": e["confirm_draws_max"], "key": entry_key(e),
             # rows with a confirmed break whose final R-run evaluation was not run (broken under every rule)
             "final_skipped": (e["final_skipped_sum"] or 0) - (e["gated_sum"] or 0),
             # rows the clean gate kept from the attack: misclassified clean, counted not robust
             "gated": e["gated_sum"] or 0}
        for name, col in ACCURACIES.items():
            a[name] = accuracy(e[f"{col}_sum"], e[f"{col}_count"])
        a.update(_cost_columns(e, params))
        stats = _step_stats(by_entry.get(a["key"], []), a["steps"])
        a.update({"own_n": stats["own_n"], "late_breaks": stats["late_breaks"], "step_curve": stats["curve"],
                  "cascade_from": sorted(sources.get(a["key"], []), key=lambda s: s["attack_index"])})
        out.append(a)
    return sorted(out, key=lambda a: (a["attack_index"] if a["attack_index"] is not None else -1,
                                      a["norm"] or "", a["eps"] or 0.0, a["eot"] or 0))


def _scored(attacks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Attack entries (not 'none') with a robust verdict: the worst case is over these."""
    return [a for a in attacks if a["attack"] != NO_ATTACK_NAME and a["robust"] is not None]


def worst_case(agg: dict[str, Any], attacks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict]:
    """Per (ε, norm): the fraction of samples robust under *every* attack entry at that ε.
    A sample with fewer rows than entries (a failed row) is counted as incomplete, not in n.
    Returns the rows and {(ε, norm): {label: [k, n]}} for the per-class table."""
    expected: dict[tuple, list[int]] = {}
    for a in _scored(attacks):
        expected.setdefault((a["eps"], a["norm"]), []).append(a["attack_index"])
    counts: dict[tuple, list[int]] = {k: [0, 0, 0] for k in expected}   # k, n, incomplete
    per_class: dict[tuple, dict[int, list[int]]] = {k: {} for k in expected}
    for r in agg["worst"].to_pylist() if agg.get("worst") is not None else []:
        key = (r["eps"], r["norm"])
        if key not in expected:
            continue
        if r["entries"] != len(expected[key]):
            counts[key][2] += r["samples"]
            continue
        counts[key][0] += r["robust_sum"] or 0
        counts[key][1] += r["samples"]
        slot = per_class[key].setdefault(r["label"], [0, 0])
        slot[0] += r["robust_sum"] or 0
        slot[1] += r["samples"]
    rows = []
    for (eps, norm), (k, n, incomplete) in sorted(counts.items(), key=lambda kv: (kv[0][1] or "", kv[0][0])):
        rows.append({"eps": eps, "eps_255": eps * 255, "norm": norm, "attacks": sorted(expected[(eps, norm)]),
                     "entries": len(expected[(eps, norm)]), "incomplete": incomplete,
                     **(accuracy(k, n) or {"k": 0, "n": 0, "acc": None, "lo": None, "hi": None})})
    return rows, per_class


def clean_source(attacks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The entry clean accuracy is read from: the no-attack rows if the job has them, else
    the attack entry with the most rows (every attack row carries its sample's clean columns)."""
    none = [a for a in attacks if a["attack"] == NO_ATTACK_NAME]
    if none:
        return none[0]
    return max(attacks, key=lambda a: (a["n"], -(a["attack_index"] or 0)), default=None)


def per_class(agg: dict[str, Any], attacks: list[dict[str, Any]], worst_by_class: dict) -> list[dict[str, Any]]:
    """Per label: clean accuracy (bare, defended), the worst case per ε, each attack's robust."""
    src = clean_source(attacks)
    index = {a["key"]: a["attack_index"] for a in attacks}
    labels: dict[int, dict[str, Any]] = {}
    for r in agg["classes"].to_pylist() if agg.get("classes") is not None else []:
        slot = labels.setdefault(r["label"], {"label": r["label"], "robust": []})
        key = entry_key(r)
        if src is not None and key == src["key"]:
            slot["clean_classifier"] = accuracy(r["c_clean_bare_sum"], r["c_clean_bare_count"], False)
            slot["clean_defended"] = accuracy(r["c_clean_defended_sum"], r["c_clean_defended_count"], False)
        if r["attack_name"] != NO_ATTACK_NAME and r["c_robust_count"]:
            slot["robust"].append({"attack_index": index[key],
                                   **accuracy(r["c_robust_sum"], r["c_robust_count"], False)})
    for (eps, norm), by_label in sorted(worst_by_class.items(), key=lambda kv: (kv[0][1] or "", kv[0][0])):
        for label, (k, n) in by_label.items():
            labels[label].setdefault("worst_case", []).append({"eps": eps, "norm": norm, **accuracy(k, n, False)})
    return [labels[k] for k in sorted(labels)]


def _point(a: dict[str, Any], **extra: Any) -> dict[str, Any]:
    r = a["robust"]
    return {"attack_index": a["attack_index"], **extra, "acc": r["acc"], "lo": r["lo"], "hi": r["hi"]}


def curves(agg: dict[str, Any], attacks: list[dict[str, Any]], worst: list[dict[str, Any]]) -> dict[str, Any]:
    """Robust accuracy against ε (per sweep of one attack, and the worst case per norm),
    against EOT draws (entries that differ only in EOT), against the attack step (from
    broken_step) and against the number of runs r ≤ R (from the per-run predictions)."""
    scored = _scored(attacks)
    sweeps: dict[tuple, list] = {}
    eots: dict[tuple, list] = {}
    for a in scored:
        sweeps.setdefault((a["attack"], a["gradient"], a["eot"], a["norm"], a["sweep_key"]), []).append(a)
        eots.setdefault((a["attack"], a["gradient"], a["eps"], a["norm"], json.dumps(a["params"], sort_keys=True)),
                        []).append(a)
    eps = [{"attack": k[0], "gradient": k[1], "eot": k[2], "norm": k[3],
            "attack_indices": sorted({a["attack_index"] for a in v if a["attack_index"] is not None}),
            "points": [_point(a, eps=a["eps"], eps_255=a["eps_255"]) for a in sorted(v, key=lambda a: a["eps"])]}
           for k, v in sweeps.items()]
    by_norm: dict[Any, list] = {}
    for w in worst:
        if w["n"]:
            by_norm.setdefault(w["norm"], []).append({k: w[k] for k in ("eps", "eps_255", "acc", "lo", "hi", "n")})
    eot = [{"attack": k[0], "gradient": k[1], "eps": k[2], "norm": k[3],
            "points": [_point(a, eot=a["eot"]) for a in sorted(v, key=lambda a: a["eot"])]}
           for k, v in eots.items() if len({a["eot"] for a in v}) >= 2]
    steps = [{"attack_index": a["attack_index"], "attack": a["attack"], "gradient": a["gradient"], "eps": a["eps"],
              "norm": a["norm"], "steps": a["steps"], "robust": a["robust"]["acc"] if a["robust"] else None,
              **a["step_curve"]} for a in attacks if a["attack"] != NO_ATTACK_NAME and a["step_curve"]]
    return {"eps": eps, "worst_case_eps": [{"norm": k, "points": v} for k, v in by_norm.items()],
            "eot": eot, "steps": steps, "runs": _runs_curves(agg, attacks)}


def _runs_curves(agg: dict[str, Any], attacks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = agg.get("runs_curve")
    if table is None:
        return []
    by_key = {a["key"]: a for a in attacks}
    out: dict[tuple, dict[str, Any]] = {}
    for r in sorted(table.to_pylist(), key=lambda r: r["r"]):
        a = by_key[entry_key(r)]
        slot = out.setdefault(a["key"], {"attack_index": a["attack_index"], "attack": a["attack"],
                                         "gradient": a["gradient"], "eps": a["eps"], "runs": a["runs"], "points": []})
        slot["points"].append({"r": r["r"], "worst_of_r": accuracy(r["worst_sum"], r["rows"], False),
                               "vote_of_r": accuracy(r["vote_sum"], r["rows"], False)})
    return list(out.values())


def cost(agg: dict[str, Any], attacks: list[dict[str, Any]], markers: list[dict[str, Any]]) -> dict[str, Any]:
    """Compute spent: model evaluations and seconds, in total and per sample."""
    totals = agg["totals"].to_pylist()[0] if agg.get("totals") is not None else {"rows": 0, "samples": 0}
    samples = totals["samples"] or 0
    seconds = sum(a["seconds_total"] for a in attacks)
    attack_nfe = sum(a["attack_nfe_per_sample"] * a["n"] for a in attacks)
    purify_nfe = sum(a["purify_nfe_per_sample"] * a["n"] for a in attacks)
    passes = {a["number_forward_passes"] for a in attacks if a["number_forward_passes"] is not None}
    return {"samples": samples, "rows": totals["rows"], "seconds_total": seconds,
            "seconds_per_sample": seconds / samples if samples else None,
            "attack_nfe_total": attack_nfe, "purify_nfe_total": purify_nfe,
            "model_evaluations_per_sample": (attack_nfe + purify_nfe) / samples if samples else None,
            "number_forward_passes": max(passes) if passes else None,
            "shard_seconds_total": sum(m.get("seconds") or 0.0 for m in markers),
            "shards": len(markers), "hosts": sorted({m["host"] for m in markers if m.get("host")}),
            "devices": sorted({m["device"] for m in markers if m.get("device")})}


def _single(values: set) -> Any:
    """One value as itself, several as a sorted list (a report over mixed records says so)."""
    if not values:
        return None
    return next(iter(values)) if len(values) == 1 else sorted(values, key=str)


def document(agg: dict[str, Any], markers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The report of one run (or of any set of records) as a JSON-serialisable dict."""
    markers = markers or []
    attacks = attack_entries(agg)
    worst, worst_by_class = worst_case(agg, attacks)
    src = clean_source(attacks)
    meta = {k: _single(v) for k, v in agg["meta"].items()}
    if meta.get("verdict") == "recheck":   # no prediction was made of R runs: "R × …" counts nothing real
        for a in attacks:
            a["number_forward_passes"] = None
    totals = agg["totals"].to_pylist()[0] if agg.get("totals") is not None else {"rows": 0, "samples": 0}
    failed = {r["status"]: r["rows"] for r in agg["failed"].to_pylist()} if agg.get("failed") is not None else {}
    clean = None if src is None else {"from_attack_index": src["attack_index"], "classifier": src["clean_classifier"],
                                      "defended": src["clean_defended"]}
    classes = per_class(agg, attacks, worst_by_class)
    doc = {
        "version": REPORT_VERSION, "kind": "run", "job": meta["job"], "stage": meta["stage"],
        "config_hash": meta["config_hash"], "purifier": meta["purifier"], "classifier": meta["classifier"],
        "decision": meta["decision"] or DEFAULT_DECISION, "verdict": meta.get("verdict") or "runs",
        "samples": totals["samples"], "rows": totals["rows"],
        "failed_rows": sum(failed.values()), "failed": failed,
        "clean": clean, "worst_case": worst, "attacks": attacks, "per_class": classes,
        "cost": cost(agg, attacks, markers), "curves": curves(agg, attacks, worst),
        "checks": {"record": record_checks.run_record_checks(attacks) + record_checks.run_data_checks(clean, classes),
                   "shard": {}, "sample": None},
        "models": {"classifier": meta["classifier"], "classifier_sha256": meta["classifier_sha256"],
                   "purifier": meta["purifier"], "purifier_params": meta["purifier_params"],
                   "purifier_sha256": meta["purifier_sha256"], "seed": meta["seed"],
                   "schema_version": meta["schema_version"]},
    }
    for a in attacks:
        del a["key"], a["step_curve"]   # internal: the join key, and the curve (now under curves)
    return json.loads(json.dumps(doc, default=_jsonable), parse_constant=lambda c: None)


def _jsonable(v: Any) -> Any:
    if isinstance(v, set):
        return sorted(v, key=str)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")
