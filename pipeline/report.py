"""Summaries computed from the committed Parquet records alone: accuracy with Wilson 95%
confidence intervals per attack, as a table or JSON."""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import pyarrow as pa

from pipeline import schema, storage
from pipeline.worker import MARKER_SUFFIX


class ReportError(RuntimeError):
    pass


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def load_markers(run_dir: str, stage: str = "evaluate") -> list[dict[str, Any]]:
    d = storage.join(run_dir, stage)
    return [json.loads(storage.read_text(u)) for u in storage.listdir(d) if u.endswith(MARKER_SUFFIX)]


def merge_shard_checks(markers: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per attack index, each check merged over shards: passed only if it passed everywhere;
    the detail of the first failure, and in how many shards it failed."""
    merged: dict[str, dict[str, dict[str, Any]]] = {}
    for m in sorted(markers, key=lambda m: m["shard"]):
        for idx, results in (m.get("checks") or {}).items():
            slot = merged.setdefault(idx, {})
            for r in results:
                cur = slot.setdefault(r["name"], {"name": r["name"], "passed": True, "detail": r["detail"],
                                                  "failed_shards": 0, "shards": 0})
                cur["shards"] += 1
                if not r["passed"]:
                    if cur["passed"]:
                        cur["detail"] = f"{m['shard']}: {r['detail']}"
                    cur["passed"] = False
                    cur["failed_shards"] += 1
    return {idx: list(v.values()) for idx, v in merged.items()}


def load_records(run_dir: str, stage: str = "evaluate", verify: bool = True) -> pa.Table:
    """All committed records of a stage; shards without a marker are not results."""
    d = storage.join(run_dir, stage)
    markers = [u for u in storage.listdir(d) if u.endswith(MARKER_SUFFIX)]
    if not markers:
        raise ReportError(f"no committed results under {d}")
    tables = []
    for m in markers:
        meta = json.loads(storage.read_text(m))
        data = storage.read_bytes(storage.join(d, meta["parquet"]))
        if verify and hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ReportError(f"{m}: the Parquet file does not match its commit marker's checksum")
        tables.append(schema.read_parquet_bytes(data))
    return pa.concat_tables(tables)


def _acc(k: int | None, n: int) -> dict[str, float] | None:
    if k is None:
        return None  # the stage does not record this prediction
    lo, hi = wilson(k, n)
    return {"acc": k / n if n else float("nan"), "lo": lo, "hi": hi}


def summarize(table: pa.Table) -> dict[str, Any]:
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == schema.Status.OK.value]
    failed = len(rows) - len(ok)
    keys = {(r["shard"], r["key"]) for r in rows}
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault((r["attack_index"], r["attack_name"], r["gradient_mode"], r["eps"], r["eot"]), []).append(r)
    out = []
    for (idx, name, grad, eps, eot), rs in sorted(groups.items(), key=lambda kv: kv[0][0]):
        n = len(rs)
        lab = [r["label"] for r in rs]

        def count(col: str) -> int | None:
            if all(r[col] is None for r in rs):
                return None
            return sum(1 for r, y in zip(rs, lab) if r[col] == y)

        out.append({
            "attack_index": idx, "attack": name, "gradient": grad, "eps": eps, "eps_255": eps * 255, "eot": eot,
            "runs": rs[0]["runs"], "n": n,
            "clean_classifier": _acc(count("clean_pred"), n),
            "clean_defended": _acc(count("clean_mean_logit_pred"), n),
            "adv_classifier": _acc(count("adv_pred"), n),
            "robust_mean_logit": _acc(count("mean_logit_pred"), n),
            "robust_vote": _acc(count("vote_pred"), n),
            "robust_mean_softmax": _acc(count("mean_softmax_pred"), n),
            "robust_worst_of_runs": _acc(None if rs[0]["worst_of_runs_correct"] is None else
                                         sum(1 for r in rs if r["worst_of_runs_correct"]), n),
            "robust_all_steps": _acc(None if rs[0]["mean_logit_pred"] is None else
                                     sum(1 for r, y in zip(rs, lab) if r["mean_logit_pred"] == y
                                         and (r["broken_step"] is None or r["broken_step"] < 0)), n),
            "norm": rs[0]["norm"],
            # attacks that differ only in ε share a sweep key (for the monotonicity check)
            "sweep_key": json.dumps({k: v for k, v in json.loads(rs[0]["attack_params"]).items() if k != "eps"},
                                    sort_keys=True),
            "mean_linf": sum(r["linf"] or 0.0 for r in rs) / n,
            "seconds_per_sample": sum(r["seconds"] for r in rs) / n,
        })
    return {"job": rows[0]["job"] if rows else None, "job_checks": sweep_checks(out), "config_hash": rows[0]["config_hash"] if rows else None,
            "purifier": rows[0]["purifier"] if rows else None, "samples": len(keys), "rows": len(rows),
            "failed_rows": failed, "attacks": out}


def sweep_checks(attacks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checks over attacks that differ only in ε: robust accuracy monotone in ε, and
    ≈ 0 at an unbounded ℓ∞ ε (= 1)."""
    from pipeline import checks

    results = []
    groups: dict[tuple, dict[float, float]] = {}
    for a in attacks:
        if a["attack"] == "none":
            continue
        if a["robust_mean_logit"] is None:
            continue  # an attack stage alone: nothing purified to check
        groups.setdefault((a["attack"], a["gradient"], a["eot"], a.get("sweep_key", "")), {})[a["eps"]] = \
            a["robust_mean_logit"]["acc"]
        if a["eps"] >= 1.0 and a.get("norm", "linf") == "linf":
            r = checks.check_unbounded_eps(a["robust_mean_logit"]["acc"], a["eps"], "linf")
            results.append({**r, "attack_index": a["attack_index"]})
    for (name, grad, eot, _), table in groups.items():
        if len(table) >= 2:
            r = checks.check_eps_monotone(table)
            results.append({**r, "attack": name, "gradient": grad})
    # at one ε, an attack that only sees the bare classifier (transfer) must not beat the
    # adaptive ones through the purifier: if it does, the adaptive attack is not working
    by_eps: dict[tuple, dict[str, tuple[str, float]]] = {}
    for a in attacks:
        if a["attack"] != "none" and a["robust_mean_logit"] is not None:
            label = f"attack {a['attack_index']} ({a['attack']}, {a['gradient']})"
            by_eps.setdefault((a["eps"], a.get("norm")), {})[label] = (a["gradient"], a["robust_mean_logit"]["acc"])
    for (eps, _), group in sorted(by_eps.items(), key=lambda kv: kv[0][0]):
        adaptive = {k: acc for k, (g, acc) in group.items() if g in ("full", "bpda")}
        transfer = [k for k, (g, _) in group.items() if g == "classifier"]
        if adaptive and transfer:
            strongest = min(adaptive, key=adaptive.get)
            r = checks.check_attack_ordering({k: acc for k, (_, acc) in group.items()}, strongest, transfer)
            results.append({**r, "eps": eps})
    return results


def format_table(summary: dict[str, Any]) -> str:
    def pct(d: dict[str, float] | None) -> str:
        if d is None:
            return "    n/a".ljust(19)
        return f"{100 * d['acc']:5.1f} [{100 * d['lo']:4.1f},{100 * d['hi']:5.1f}]"

    head = (f"job {summary['job']}  purifier {summary['purifier']}  samples {summary['samples']}  "
            f"rows {summary['rows']}  failed {summary['failed_rows']}  config {summary['config_hash']}")
    cols = ["attack", "grad", "eps·255", "R", "clean (bare)", "clean (defended)", "adv (bare)",
            "robust (mean logit)", "robust (vote)", "worst-of-R"]
    lines = [head, " | ".join(cols)]
    for a in summary["attacks"]:
        lines.append(" | ".join([
            f"{a['attack']}", f"{a['gradient']}", f"{a['eps_255']:.1f}", f"{a['runs']}",
            pct(a["clean_classifier"]), pct(a["clean_defended"]), pct(a["adv_classifier"]),
            pct(a["robust_mean_logit"]), pct(a["robust_vote"]), pct(a["robust_worst_of_runs"])]))
    lines.append("accuracy % with Wilson 95% intervals; 'bare' = classifier alone, 'defended' = purifier + classifier")
    failed = [c for c in summary.get("job_checks", []) if not c["passed"]]
    for idx, results in sorted(summary.get("shard_checks", {}).items()):
        failed += [{**c, "attack_index": int(idx)} for c in results if not c["passed"]]
    if failed:
        lines.append("CHECKS FLAGGED (the numbers above may overstate robustness):")
        for c in failed:
            where = f"attack {c['attack_index']}: " if "attack_index" in c else ""
            lines.append(f"  - {where}{c['name']}: {c['detail']}")
    else:
        lines.append("checks: all passed (gradients, randomness, EOT, ε sweep where present)")
    return "\n".join(lines)


def summarize_run(run_dir: str, stage: str = "evaluate") -> dict[str, Any]:
    """The summary of a run from its committed Parquet and markers."""
    summary = summarize(load_records(run_dir, stage))
    summary["shard_checks"] = merge_shard_checks(load_markers(run_dir, stage))
    return summary
