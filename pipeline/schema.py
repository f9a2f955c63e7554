"""THE Parquet schema of per-sample records. Import it; never re-declare columns elsewhere.

One row per (sample, attack). A job without attacks writes one row per sample with
attack_name "none". Every convention in the literature can be recomputed from a row:
per-run predictions (votes), mean-logit prediction, worst-of-R, worst case over attack
steps (broken_step), the final iterate's result, perturbation norms, cost and provenance.
"""
from __future__ import annotations

import enum
import io
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1


class Status(str, enum.Enum):
    OK = "ok"
    DECODE_ERROR = "decode_error"   # the sample's bytes could not be decoded
    FAILED = "failed"               # evaluation of the sample raised


SCHEMA = pa.schema([
    # provenance
    ("schema_version", pa.int16()),
    ("job", pa.string()),
    ("config_hash", pa.string()),
    ("stage", pa.string()),
    ("shard", pa.string()),
    ("key", pa.string()),
    ("label", pa.int64()),
    ("seed", pa.int64()),
    ("classifier", pa.string()),
    ("classifier_sha256", pa.string()),
    ("purifier", pa.string()),
    ("purifier_params", pa.string()),        # JSON
    ("purifier_sha256", pa.string()),
    # attack
    ("attack_index", pa.int16()),
    ("attack_name", pa.string()),
    ("attack_params", pa.string()),          # JSON, ε in [0, 1] units
    ("gradient_mode", pa.string()),          # full | bpda | classifier | none
    ("eot", pa.int32()),
    ("norm", pa.string()),
    ("eps", pa.float64()),                   # [0, 1] units
    ("eps_255", pa.float64()),               # the same ε ×255, for reading
    # predictions
    ("runs", pa.int32()),
    ("clean_pred", pa.int64()),              # bare classifier on x
    ("clean_purified_preds", pa.list_(pa.int64())),   # defended model on x, per run
    ("clean_mean_logit_pred", pa.int64()),
    ("adv_pred", pa.int64()),                # bare classifier on x_adv
    ("purified_preds", pa.list_(pa.int64())),          # defended model on x_adv, per run
    ("purified_mean_logits", pa.list_(pa.float32())),  # mean logits over runs, [K]
    ("vote_pred", pa.int64()),               # majority vote over runs (ties → lowest class)
    ("mean_logit_pred", pa.int64()),         # argmax of mean logits
    ("mean_softmax_pred", pa.int64()),       # argmax of summed softmax (ADP's second ensemble rule)
    ("worst_of_runs_correct", pa.bool_()),   # every run correct
    ("broken_step", pa.int32()),             # first attack step that fooled the attack's view, -1 never
    ("cascade_from", pa.int16()),            # cascade: the earlier attack whose break this row carries
    # perturbation and cost
    ("linf", pa.float64()),
    ("l2", pa.float64()),
    ("attack_nfe", pa.int64()),
    ("purify_nfe", pa.int64()),
    ("seconds", pa.float64()),
    ("status", pa.string()),
    ("error", pa.string()),
])

COLUMNS = tuple(SCHEMA.names)


def to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    rows = list(rows)
    for r in rows:
        extra = set(r) - set(COLUMNS)
        if extra:
            raise KeyError(f"record has columns not in the schema: {sorted(extra)}")
    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)


def to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_parquet_bytes(data: bytes) -> pa.Table:
    table = pq.read_table(io.BytesIO(data))
    version = table.column("schema_version")[0].as_py() if table.num_rows else SCHEMA_VERSION
    if version != SCHEMA_VERSION:
        raise ValueError(f"records have schema version {version}; this advpure reads {SCHEMA_VERSION}")
    return table
