"""Reading a run for the report: only the Parquet files that commit markers name, each
checked against its marker (`commit.read_marked`), one file at a time, only the columns the
report uses, low-cardinality strings dictionary-encoded."""
from __future__ import annotations

import json
import logging
from typing import Any, Iterator

import pyarrow as pa

from pipeline import schema, stage_table
from pipeline.io import storage
from pipeline.report import aggregate
from pipeline.run import commit

log = logging.getLogger(__name__)
COMBINE_EVERY = 16   # files whose partials are held before they are folded into one
CORPUS_STAGE = "purify_corpus"   # the corpus job's records (pipeline.corpus.worker.STAGE; that module brings torch)


def read_records(output: str, stage: str, sid: str, marker: dict[str, Any]) -> pa.Table:
    """One committed shard's records, the columns the report reads."""
    return commit.read_marked(output, stage, sid, marker, aggregate.READ_COLUMNS, aggregate.DICTIONARY_COLUMNS)


def iter_committed(output: str, stage: str, columns: list[str] | None = None,
                   ) -> Iterator[tuple[str, dict[str, Any], pa.Table]]:
    """(shard id, marker, records) of every committed shard of a stage, in shard order."""
    dictionary = () if stage == CORPUS_STAGE else aggregate.DICTIONARY_COLUMNS   # columns of the evaluation schema
    yield from commit.iter_marked(output, stage, columns or list(schema.COLUMNS), dictionary)


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


def committed_stages(output: str) -> list[str]:
    """The stages of a run that have committed records, the one a report shows by default
    first: evaluate (attack and purify in one), else purify (the verdicts on an attack
    stage's adversarial set), else attack (the bare classifier on its own attacks)."""
    return [stage for stage in stage_table.result_stages()   # the table's report_rank order
            if any(u.endswith(commit.MARKER_SUFFIX) for u in storage.listdir(storage.join(output, stage)))]


def pick_stage(output: str, stage: str | None = None) -> tuple[str, list[str]]:
    """(the stage to report, every stage with records): `stage` if given, else the first
    of committed_stages; CommitError when the run has no committed records at all."""
    found = committed_stages(output)
    if stage is None and not found:
        stages = ", ".join(stage_table.result_stages())
        raise commit.CommitError(f"no committed results under {output} (no stage of {stages} has a commit marker yet)")
    return stage or found[0], found
