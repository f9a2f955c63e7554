"""Reading a run for the report: only the Parquet files that commit markers name, each
checked against its marker (`commit.read_marked`), one file at a time, only the columns the
report uses, low-cardinality strings dictionary-encoded."""
from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow as pa

from pipeline.io import storage
from pipeline.report import aggregate
from pipeline.run import commit

log = logging.getLogger(__name__)
COMBINE_EVERY = 16   # files whose partials are held before they are folded into one


def read_records(output: str, stage: str, sid: str, marker: dict[str, Any]) -> pa.Table:
    """One committed shard's records, the columns the report reads."""
    return commit.read_marked(output, stage, sid, marker, aggregate.READ_COLUMNS, aggregate.DICTIONARY_COLUMNS)


def aggregate_run(output: str, stage: str = "evaluate", keep_samples: bool = False,
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(combined aggregates, markers) of a run's committed records, file by file."""
    held: list[dict[str, Any]] = []
    markers = []
    for sid, marker, table in commit.iter_marked(output, stage, aggregate.READ_COLUMNS, aggregate.DICTIONARY_COLUMNS):
        held.append(aggregate.partial(table, keep_samples))
        markers.append(marker)
        if len(held) >= COMBINE_EVERY:
            held = [aggregate.combine(held)]
        log.debug("aggregated %s (%d rows)", sid, table.num_rows)
    return aggregate.combine(held), markers


def run_documents(output: str) -> dict[str, Any]:
    """The job's own files beside its records: job.json, the resolved config, the manifest."""
    docs: dict[str, Any] = {}
    for name in ("job.json", "manifest.json"):
        url = storage.join(output, name)
        if storage.exists(url):
            docs[name] = json.loads(storage.read_text(url))
    url = storage.join(output, "config.yaml")
    if storage.exists(url):
        docs["config.yaml"] = storage.read_text(url)
    return docs
