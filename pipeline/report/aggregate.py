"""Additive aggregates of per-sample records, computed with pyarrow.compute.

A run's records are read one committed shard file at a time; each file becomes a few small
*partial* tables (counts and sums grouped by attack entry, class, step, …) and the partials
of all files are combined by summing again. A sample's rows all live in its shard's file
(one Parquet file per (job, stage, shard)), so the per-sample worst case over attacks is
exact per file, and memory is bounded by the largest shard, not by the run.

Correctness columns (c_*) are derived per row; a null prediction stays null, so a stage
that does not record a prediction yields a count of 0 non-null values ("n/a"). Every
decision rule's column (mean logit, vote, summed softmax, worst-of-R, and the runs curve)
counts a confirmed break (broken_step >= 0) as broken, so a row whose final evaluation was
skipped for it (`final_evaluated` false, per-run columns null) is broken under every rule.
A row judged by `evaluation.verdict: recheck` has no R runs at all: every rule's column is
null there (the report shows "n/a"), its verdict is `robust`, and it is in no runs curve.
A row the clean gate kept from the attack (`attacked` false: misclassified clean) has no final
evaluation either and is broken under every rule and at every step, as in the Hill et al.
script (broken at step −1); clean defended accuracy is read under the job's decision rule
(`clean_decision_pred`; records before schema 4: `clean_mean_logit_pred`), the rule the gate
used, so robust ≤ clean holds under the job's rule.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema
from pipeline.vocabulary import DECISION_COLUMNS, DEFAULT_DECISION, NO_ATTACK_NAME

# one attack entry of a job: rows that share these were produced by the same attack settings
ENTRY_KEYS = ["attack_index", "attack_name", "gradient_mode", "attack_params", "eot", "norm", "eps", "runs"]
# record column → derived correctness column (prediction == label)
PREDICTIONS = {"clean_pred": "c_clean_bare", "clean_decision_pred": "c_clean_defended",
               "adv_pred": "c_adv_bare"}
# the defended model on x_adv under each decision rule: correct and no confirmed break
RULES = {"mean_logit_pred": "c_mean_logit", "vote_pred": "c_vote", "mean_softmax_pred": "c_mean_softmax",
         "worst_of_runs_correct": "c_worst_of_runs"}
CORRECT = [*PREDICTIONS.values(), *RULES.values(), "c_robust"]
COSTS = ["linf", "l2", "attack_nfe", "purify_nfe", "seconds"]
META = ["job", "config_hash", "stage", "purifier", "purifier_params", "purifier_sha256", "classifier",
        "classifier_sha256", "decision", "verdict", "seed", "schema_version"]
# the record columns a report reads (list columns other than purified_preds are never decoded)
READ_COLUMNS = sorted({*ENTRY_KEYS, *PREDICTIONS, *RULES, *COSTS, *META, "shard", "key", "label", "status",
                       "clean_mean_logit_pred", "final_evaluated", "attacked", "robust", "broken_step",
                       "attack_steps", "confirm_draws", "cascade_from", "purified_preds"})
# low-cardinality strings, read dictionary-encoded: filters and group keys then move indices
DICTIONARY_COLUMNS = [c for c in READ_COLUMNS if c in (*META, "shard", "status", "attack_name", "gradient_mode",
                                                       "attack_params", "norm")
                      and c not in ("seed", "schema_version")]

# how each partial table is combined: its group keys and, per value column, the reduction
ENTRY_OPS = {**{f"{c}_{op}": "sum" for c in CORRECT for op in ("sum", "count")},
             **{f"{c}_{op}": ("max" if op == "max" else "sum") for c in ("linf", "l2")
                for op in ("sum", "count", "max")},
             **{f"{c}_sum": "sum" for c in ("attack_nfe", "purify_nfe", "seconds")},
             "purify_evals_sum": "sum", "final_skipped_sum": "sum", "gated_sum": "sum", "attack_steps_max": "max",
             "confirm_draws_max": "max", "rows": "sum"}
LAYOUT = {
    "entries": (ENTRY_KEYS, ENTRY_OPS),
    "classes": (ENTRY_KEYS + ["label"], {f"{c}_{op}": "sum" for c in ("c_clean_bare", "c_clean_defended",
                                                                        "c_robust") for op in ("sum", "count")}),
    "worst": (["eps", "norm", "label", "entries"], {"robust_sum": "sum", "samples": "sum"}),
    "steps": (ENTRY_KEYS + ["broken_step", "carried", "gated"], {"rows": "sum"}),
    "cascade": (ENTRY_KEYS + ["cascade_from"], {"rows": "sum"}),
    "runs_curve": (ENTRY_KEYS + ["r"], {"worst_sum": "sum", "vote_sum": "sum", "rows": "sum"}),
    "failed": (["status"], {"rows": "sum"}),
    "totals": ([], {"rows": "sum", "samples": "sum"}),
}


def derive(table: pa.Table) -> pa.Table:
    """The ok rows, with the correctness columns and the verified `c_robust`.

    `robust` is the evaluation's verdict; where it is null (records written before it was
    filled) it is recomputed as: decision-rule prediction correct and no confirmed break.
    """
    is_ok = pc.equal(table["status"], schema.Status.OK.value)
    ok = table if pc.all(is_ok).as_py() else table.filter(is_ok)   # the common case copies nothing
    label = ok["label"]
    cols = {name: pc.equal(_clean_defended(ok) if src == "clean_decision_pred" else ok[src], label)
            for src, name in PREDICTIONS.items()}
    gated = _false(ok, "attacked")   # broken before the attack: no step of it is unbroken
    unbroken = pc.and_(pc.or_kleene(pc.is_null(ok["broken_step"]), pc.less(ok["broken_step"], 0)), pc.invert(gated))
    # verdict recheck: robust came from the attacks' checks, no rule saw R runs (null: "n/a")
    by_recheck = pc.fill_null(pc.equal(ok["verdict"], "recheck"), False) if "verdict" in ok.column_names \
        else pa.array([False] * ok.num_rows)
    # a skipped final evaluation: a confirmed break's, or a gated row's (under either verdict)
    skipped = pc.and_(_false(ok, "final_evaluated"), pc.or_(pc.invert(by_recheck), gated))
    for src, name in RULES.items():   # null where no prediction was recorded, unless the break was confirmed
        right = ok[src] if src == "worst_of_runs_correct" else pc.equal(ok[src], label)
        cols[name] = pc.if_else(by_recheck, pa.scalar(None, pa.bool_()),
                                pc.if_else(skipped, False, pc.and_(right, unbroken)))
    decision = pc.fill_null(ok["decision"], DEFAULT_DECISION)   # records older than the column
    pred = ok[DECISION_COLUMNS[DEFAULT_DECISION]]
    for rule, col in DECISION_COLUMNS.items():
        if rule != DEFAULT_DECISION:
            pred = pc.if_else(pc.equal(decision, rule), ok[col], pred)
    # null where the stage has no defended prediction (an attack stage alone): no verdict
    cols["c_robust"] = pc.coalesce(ok["robust"], pc.if_else(skipped, False, pc.and_(pc.equal(pred, label), unbroken)))
    is_attack = pc.not_equal(pc.fill_null(ok["attack_name"], NO_ATTACK_NAME), NO_ATTACK_NAME)
    # the defended model is evaluated on x (clean columns) and, for an attack row, on x_adv
    evals = pc.add(pc.cast(pc.is_valid(ok["clean_mean_logit_pred"]), pa.int64()),
                   pc.cast(pc.and_(is_attack, pc.is_valid(ok["mean_logit_pred"])), pa.int64()))
    cols.update({"is_attack": is_attack, "carried": pc.is_valid(ok["cascade_from"]), "purify_evals": evals,
                 "final_skipped": skipped, "gated": gated, "unbroken": unbroken, "by_recheck": by_recheck})
    for name, arr in cols.items():
        ok = ok.append_column(name, arr)
    return ok


def _false(ok: pa.Table, column: str) -> pa.Array:
    """Rows where the boolean `column` is false (null: not false); all false in records that
    predate it. `final_evaluated` false: the final R-run evaluation was skipped (the break was
    confirmed first); `attacked` false: the clean gate kept the sample from the attack."""
    if column not in ok.column_names:
        return pa.array([False] * ok.num_rows)
    return pc.fill_null(pc.equal(ok[column], False), False)


def _clean_defended(ok: pa.Table) -> pa.ChunkedArray:
    """The defended clean prediction under the job's decision rule (the gate's); records
    before schema 4 have only the mean-logit one."""
    if "clean_decision_pred" not in ok.column_names:
        return ok["clean_mean_logit_pred"]
    return pc.coalesce(ok["clean_decision_pred"], ok["clean_mean_logit_pred"])


def _rename(table: pa.Table, names: dict[str, str]) -> pa.Table:
    return table.rename_columns([names.get(c, c) for c in table.column_names])


def _agg(table: pa.Table, keys: list[str], aggs: list[tuple]) -> pa.Table:
    """group_by + aggregate, with pyarrow's `count_all` renamed to `rows`."""
    out = _rename(table.group_by(keys, use_threads=True).aggregate(aggs), {"count_all": "rows"})
    plain = [pa.field(f.name, f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in out.schema]
    return out.cast(pa.schema(plain))   # dictionary keys back to plain values: partials concatenate


def _entries(d: pa.Table) -> pa.Table:
    aggs = [(c, op) for c in CORRECT for op in ("sum", "count")]
    aggs += [(c, op) for c in ("linf", "l2") for op in ("sum", "count", "max")]
    aggs += [(c, "sum") for c in ("attack_nfe", "purify_nfe", "seconds", "purify_evals", "final_skipped", "gated")]
    aggs += [("attack_steps", "max"), ("confirm_draws", "max"), ([], "count_all")]
    return _agg(d, ENTRY_KEYS, aggs)


def _classes(d: pa.Table) -> pa.Table:
    aggs = [(c, op) for c in ("c_clean_bare", "c_clean_defended", "c_robust") for op in ("sum", "count")]
    return _agg(d, ENTRY_KEYS + ["label"], aggs)


def _steps(d: pa.Table) -> pa.Table:
    """How many rows of each attack entry were first confirmed broken at each step (gated
    rows: kept from the attack by the clean gate)."""
    keys = ENTRY_KEYS + ["broken_step", "carried", "gated"]
    rows = d.select(keys).filter(pc.and_(d["is_attack"], pc.is_valid(d["broken_step"])))
    return _agg(rows, keys, [([], "count_all")])


def _cascade(d: pa.Table) -> pa.Table:
    """Rows a cascade carried, per attack entry and the entry they came from (cascade_from)."""
    keys = ENTRY_KEYS + ["cascade_from"]
    return _agg(d.select(keys).filter(d["carried"]), keys, [([], "count_all")])


def _worst(d: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Per-sample worst case over the attack entries at each (ε, norm) — robust only if
    every attack row of the sample at that ε is robust — then counted per class and per
    number of entries the sample has (the report keeps samples that have all of them)."""
    keys = ["shard", "key", "label", "eps", "norm"]
    rows = d.select(keys + ["c_robust"]).filter(pc.and_(d["is_attack"], pc.is_valid(d["c_robust"])))
    per_sample = _agg(rows, keys, [("c_robust", "all"), ([], "count_all")])
    per_sample = _rename(per_sample, {"c_robust_all": "robust", "rows": "entries"})
    counts = _agg(per_sample, ["eps", "norm", "label", "entries"], [("robust", "sum"), ([], "count_all")])
    return _rename(counts, {"rows": "samples"}), per_sample


def _vote_curve(preds: np.ndarray, label: np.ndarray) -> np.ndarray:
    """[n, R] → [n, R]: is the majority vote of the first r runs correct (ties → lowest
    class, as the evaluation's vote). Only the r candidates are counted — O(n·R²) vector
    operations whatever the number of classes."""
    n, runs = preds.shape
    p = preds.astype(np.int64)
    big = int(p.max()) + 1 if p.size else 1
    votes = np.zeros((n, runs), dtype=np.int64)    # votes[:, j]: runs so far that agree with run j
    out = np.empty((n, runs), dtype=bool)
    for r in range(runs):
        for j in range(r):
            same = p[:, j] == p[:, r]
            votes[:, j] += same
            votes[:, r] += same
        votes[:, r] += 1
        best = np.argmax(votes[:, :r + 1] * big - p[:, :r + 1], axis=1)   # most votes, then lowest class
        out[:, r] = p[np.arange(n), best] == label
    return out


def _run_predictions(s: pa.Table, runs: int) -> np.ndarray:
    """[n, R] per-run predictions; -1 (no class) for a row whose final evaluation was skipped."""
    preds = np.full((s.num_rows, runs), -1, dtype=np.int64)
    have = pc.is_valid(s["purified_preds"]).to_numpy(zero_copy_only=False)
    if have.any():
        preds[have] = pc.list_flatten(s["purified_preds"].filter(have)).to_numpy().reshape(-1, runs)
    return preds


def _runs_curve(d: pa.Table) -> pa.Table | None:
    """Accuracy from the first r of the R per-run predictions, r = 1..R: worst-of-r (every
    run correct) and vote-of-r — how the verdict depends on the number of runs. A confirmed
    break is wrong at every r (rows whose final evaluation was skipped for it included); rows
    judged by `evaluation.verdict: recheck` made no R runs and are in no curve."""
    recorded = pc.and_(pc.or_(pc.is_valid(d["purified_preds"]), d["final_skipped"]), pc.invert(d["by_recheck"]))
    valid = pc.and_(pc.greater(pc.fill_null(d["runs"], 0), 1), recorded)
    sub = d.select(ENTRY_KEYS + ["label", "purified_preds", "final_skipped", "unbroken"]).filter(valid)
    parts = []
    for runs in pc.unique(sub["runs"]).to_pylist():
        length = pc.fill_null(pc.list_value_length(sub["purified_preds"]), runs)   # skipped rows: no list
        s = sub.filter(pc.and_(pc.equal(sub["runs"], runs), pc.equal(length, runs)))
        if not s.num_rows:
            continue
        preds = _run_predictions(s, runs)   # [n, R]
        label = s["label"].to_numpy()
        unbroken = s["unbroken"].to_numpy(zero_copy_only=False)[:, None]
        curves = {"worst": np.logical_and.accumulate(preds == label[:, None], axis=1) & unbroken,
                  "vote": _vote_curve(preds, label) & unbroken}
        t = s.select(ENTRY_KEYS)
        for name, values in curves.items():
            for r in range(runs):
                t = t.append_column(f"{name}{r + 1}", pa.array(values[:, r]))
        sums = [(c, "sum") for c in t.column_names[len(ENTRY_KEYS):]]
        g = _agg(t, ENTRY_KEYS, sums + [([], "count_all")])
        for r in range(1, runs + 1):   # one row per (entry, r)
            part = g.select(ENTRY_KEYS + ["rows"]).append_column("worst_sum", g[f"worst{r}_sum"])
            part = part.append_column("vote_sum", g[f"vote{r}_sum"])
            parts.append(part.append_column("r", pa.array([r] * g.num_rows, pa.int64())))
    return pa.concat_tables(parts) if parts else None


def partial(table: pa.Table, keep_samples: bool = False) -> dict[str, Any]:
    """The additive aggregates of some records (one shard's file, or any table).

    `keep_samples` also returns the per-sample worst case (key, label, ε, norm, robust,
    entries) that paired comparisons between runs need.
    """
    d = derive(table)
    worst, per_sample = _worst(d)
    failed = table.filter(pc.not_equal(table["status"], schema.Status.OK.value))
    samples = _agg(table.select(["shard", "key"]), ["shard", "key"], []).num_rows
    out: dict[str, Any] = {
        "entries": _entries(d), "classes": _classes(d), "worst": worst, "steps": _steps(d), "cascade": _cascade(d),
        "runs_curve": _runs_curve(d), "failed": _agg(failed, ["status"], [([], "count_all")]),
        "totals": pa.table({"rows": [table.num_rows], "samples": [samples]}),
        "meta": {c: set(pc.unique(table[c]).drop_null().to_pylist()) for c in META if c in table.column_names},
    }
    if keep_samples:
        out["samples"] = per_sample.select(["key", "label", "eps", "norm", "entries", "robust"])
    return out


def _regroup(tables: list[pa.Table], keys: list[str], ops: dict[str, str]) -> pa.Table:
    t = pa.concat_tables(tables, promote_options="permissive")
    if not keys:
        return pa.table({c: [pc.sum(t[c]).as_py() or 0] for c in ops})
    out = t.group_by(keys, use_threads=True).aggregate([(c, op) for c, op in ops.items()])
    return _rename(out, {f"{c}_{op}": c for c, op in ops.items()})


def combine(partials: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Partials of disjoint sets of records → the partial of their union."""
    partials = list(partials)
    out: dict[str, Any] = {}
    for name, (keys, ops) in LAYOUT.items():
        tables = [p[name] for p in partials if p.get(name) is not None]
        out[name] = _regroup(tables, keys, ops) if tables else None
    out["meta"] = {c: set().union(*(p["meta"].get(c, set()) for p in partials)) for c in META}
    if any("samples" in p for p in partials):
        out["samples"] = pa.concat_tables([p["samples"] for p in partials if "samples" in p])
    return out
