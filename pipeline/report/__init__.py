"""`advpure report`: summaries computed from the committed Parquet records alone — the
per-sample worst case per (ε, norm), per-attack accuracy with Wilson 95 % intervals,
per-class accuracy, norms, cost and checks — as text, Markdown, HTML, JSON or RobustBench
ModelInfo files (docs/report.md).

  load         read only the files commit markers name, checksum-verified, one shard at a time
  aggregate    additive pyarrow.compute aggregates per shard file, combined across files
  summary      aggregates → the report document (per attack, worst case, classes, curves, cost)
  record_checks  torch-free checks over the per-attack figures (ε sweep, ordering, masking)
  compare      paired statistics between runs on the same samples
  tables       text / Markdown / HTML tables;  html: the self-contained page (matplotlib)
  images       example images from the job's image shards;  robustbench: ModelInfo export
  build        one run's document, or a comparison of several
  corpus       an `advpure purify` output's document: samples and drops, quality, predictions, cost

The entry points are below: summarize, summarize_run, format_table, render. Nothing here
imports torch.
"""
from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipeline import extras
from pipeline.report import aggregate, build, corpus, summary, tables
from pipeline.report.summary import wilson  # noqa: F401  (public: the interval every figure uses)

FORMATS = ("text", "markdown", "html", "json", "robustbench")


def summarize(table: pa.Table) -> dict[str, Any]:
    """The report document of records held in memory (any stage, any number of shards)."""
    return summary.document(aggregate.combine([aggregate.partial(table)]))


def summarize_run(run_dir: str, stage: str | None = None) -> dict[str, Any]:
    """The report document of a run, from its committed records, markers and job files; with
    no `stage`, the run's own (evaluate, else purify, else attack)."""
    return build.run_report(run_dir, stage)[0]


def format_table(doc: dict[str, Any]) -> str:
    """A run's (or a comparison's) report as plain text."""
    return tables.format_text(doc)


def render(runs: list[str], fmt: str = "text", stage: str | None = None, dataset: str | None = None,
           examples: int = 8) -> str | dict[str, str]:
    """The report of one or more runs in a format. robustbench returns {relative path: JSON
    text}, one ModelInfo file per (run, threat model); every other format one string."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; expected one of {FORMATS}")
    if fmt == "html":
        extras.require("matplotlib")   # before reading any record: one line saying what to install
    doc = build.report(runs, stage)
    if doc.get("kind") == "corpus":   # advpure purify's output: samples, quality, predictions
        return corpus.render(doc, fmt)
    if fmt == "json":
        return json.dumps(doc, indent=1)
    if fmt == "markdown":
        return tables.format_markdown(doc)
    if fmt == "html":
        from pipeline.report import html  # matplotlib: only for this format

        return html.page(doc, examples)
    if fmt == "robustbench":
        from pipeline.report import robustbench

        docs = doc["runs"] if doc.get("kind") == "comparison" else [doc]
        return {path: json.dumps(info, indent=2) for d in docs for path, info in robustbench.export(d, dataset).items()}
    return tables.format_text(doc)
