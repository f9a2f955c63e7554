"""The results protocol: how a shard's records become a result, in one place.

Invariant: **a shard's result exists if and only if its commit marker exists, and the marker
names the one Parquet file it vouches for (by name and sha256).**

- write (worker): the records go to `<output>/<stage>/<shard>.<attempt>.parquet`, a name of
  its own per attempt, atomically (temporary name + fsync + rename locally, one PUT or a
  completed multipart upload on S3); then the marker `<shard>.done.json` is written, last.
  A worker given up for lost that finishes late can only overwrite the marker with one that
  names its own, complete file, so a marker never disagrees with the file it names.
- resume (driver): `committed()` lists the markers; those shards are skipped. Before any
  worker of the stage starts, `clean_stage()` removes temporaries and every Parquet file no
  marker names (attempts that never committed).
- read (report, tests): `read_marked()` is the one reader of a committed file: the file a
  marker names, checked against the marker's sha256 and the schema version this code reads;
  `iter_marked()` and `load_records()` read a stage's committed shards through it.

Pure I/O on top of `pipeline.io.storage` and `pipeline.schema`: no torch, no Ray.
"""
from __future__ import annotations

import hashlib
import io
import json
import uuid
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema, stage_table
from pipeline.io import storage

MARKER_SUFFIX = ".done.json"


class CommitError(RuntimeError):
    """Committed results that are missing or do not match their marker."""


def marker_url(output: str, stage: str, sid: str) -> str:
    return storage.join(output, stage, f"{sid}{MARKER_SUFFIX}")


def commit_records(output: str, stage: str, sid: str, rows: list[dict[str, Any]],
                   marker: dict[str, Any], table_schema: pa.Schema | None = None) -> dict[str, Any]:
    """Write a shard's records, then its marker (the commit); returns the marker.

    `marker` holds the caller's fields (source, samples, config hash, checks, outputs, …);
    the file name, row count, checksum and schema version are added here. `table_schema`:
    the records' schema (default schema.SCHEMA; the corpus job passes schema.CORPUS_SCHEMA).
    """
    table = schema.to_table(rows, table_schema or schema.SCHEMA)
    data = schema.to_parquet_bytes(table)
    name = f"{sid}.{uuid.uuid4().hex[:8]}.parquet"
    storage.put_bytes(storage.join(output, stage, name), data)  # atomic
    full = {"shard": sid, **marker, "parquet": name, "rows": table.num_rows,
            "sha256": hashlib.sha256(data).hexdigest(), "schema_version": schema.schema_version(table.schema)}
    storage.put_text(marker_url(output, stage, sid), json.dumps(full))  # the commit, last
    return full


def committed(output: str, stage: str) -> dict[str, dict[str, Any]]:
    """{shard id: marker} of the shards of a stage whose commit marker exists."""
    out = {}
    for url in storage.listdir(storage.join(output, stage)):
        name = storage.basename(url)
        if name.endswith(MARKER_SUFFIX):
            out[name[: -len(MARKER_SUFFIX)]] = json.loads(storage.read_text(url))
    return out


def committed_counts(output: str) -> dict[str, int]:
    """{stage: committed shards} over every stage that writes results: an output where all
    are 0 holds no results (a job that aborted before its first commit)."""
    return {stage: len(committed(output, stage)) for stage in stage_table.result_stages()}


def clean_stage(output: str, stage: str, markers: dict[str, dict[str, Any]]) -> int:
    """Remove temporaries and the records files no marker names. Only safe while no worker
    of this job writes to the stage (the driver calls it before starting any)."""
    folder = storage.join(output, stage)
    storage.remove_stale_temporaries(folder)
    named = {m.get("parquet") for m in markers.values()}
    n = 0
    for url in storage.listdir(folder):
        name = storage.basename(url)
        if name.endswith(".parquet") and name not in named:
            storage.remove(url)
            n += 1
    return n


def read_marked(output: str, stage: str, sid: str, marker: dict[str, Any], columns: Sequence[str] | None = None,
                read_dictionary: Sequence[str] = ()) -> pa.Table:
    """The records a shard's commit marker vouches for: the file it names, whose bytes must
    match the marker's sha256 (else CommitError) and whose schema version must be one
    this advpure reads for its kind of records (else ValueError). `columns`: the ones of
    these the file has (None: all); `read_dictionary`: string columns read dictionary-encoded."""
    url = storage.join(output, stage, marker["parquet"])
    data = storage.read_bytes(url)
    if hashlib.sha256(data).hexdigest() != marker["sha256"]:
        raise CommitError(f"{marker_url(output, stage, sid)}: the Parquet file does not match "
                          "its commit marker's checksum")
    pf = pq.ParquetFile(io.BytesIO(data), read_dictionary=list(read_dictionary) or None)
    expected = schema.schema_version(pf.schema_arrow)     # evaluation or corpus records
    version = marker.get("schema_version", expected)
    readable = schema.readable_versions(pf.schema_arrow)
    if version not in readable:
        raise ValueError(f"{url}: records have schema version {version}; this advpure reads "
                         f"{' or '.join(map(str, readable))}")
    names = pf.schema_arrow.names
    return pf.read(columns=None if columns is None else [c for c in columns if c in names])


def read_committed(output: str, stage: str, sid: str) -> pa.Table:
    """One shard's committed records (its marker read first; see `read_marked`)."""
    marker = json.loads(storage.read_text(marker_url(output, stage, sid)))
    return read_marked(output, stage, sid, marker)


def iter_marked(output: str, stage: str, columns: Sequence[str] | None = None, read_dictionary: Sequence[str] = (),
                ) -> Iterator[tuple[str, dict[str, Any], pa.Table]]:
    """(shard id, marker, records) of every committed shard of a stage, in shard order, one
    file at a time (see `read_marked`); CommitError when the stage has none."""
    markers = committed(output, stage)
    if not markers:
        raise CommitError(f"no committed results under {storage.join(output, stage)}")
    for sid, marker in sorted(markers.items()):
        yield sid, marker, read_marked(output, stage, sid, marker, columns, read_dictionary)


def load_records(output: str, stage: str = "evaluate") -> pa.Table:
    """Every committed record of a stage in one table; files without a marker are not results."""
    return pa.concat_tables([table for _, _, table in iter_marked(output, stage)])


def check_sample(markers: list[dict[str, Any]]) -> dict[str, int] | None:
    """The gradient-masking checks' sample over the committed shards: {samples, shards (those
    that ran checks), of_shards}; None when no marker records it (written before it was)."""
    counted = [int(m["check_samples"]) for m in markers if m.get("check_samples") is not None]
    if not counted:
        return None
    return {"samples": sum(counted), "shards": sum(1 for n in counted if n), "of_shards": len(markers)}


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
