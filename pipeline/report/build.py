"""The report of one run, or the comparison of several, from committed records alone."""
from __future__ import annotations

import importlib.metadata
import json
import platform
import time
from typing import Any

import pyarrow as pa
import yaml

from pipeline.report import compare, corpus, load, summary
from pipeline.run import commit

VERSIONED = ("advpure", "pyarrow", "numpy", "scipy", "matplotlib", "torch", "ray")


def _versions() -> dict[str, str | None]:
    """Package versions of the environment the report was made in (read from package
    metadata, so nothing heavy is imported)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(doc: dict[str, Any], markers: list[dict[str, Any]], docs: dict[str, Any],
               stage: str) -> dict[str, Any]:
    """Where the figures come from: config (hash and resolved YAML), models and checksums,
    source shards, the manifest's view of the stage, and versions."""
    text = docs.get("config.yaml")
    manifest = (docs.get("manifest.json") or {}).get("stages", {}).get(stage, {})
    # each distinct set once (shards by the same workers repeat it), as data, not str(dict)
    worker_versions = [json.loads(v) for v in sorted({json.dumps(m["versions"], sort_keys=True)
                                                      for m in markers if m.get("versions")})]
    return {
        "config_hash": doc["config_hash"], "job": docs.get("job.json"),
        "config": yaml.safe_load(text) if text else None, "config_yaml": text,
        "models": doc["models"], "sources": sorted({m["source"] for m in markers if m.get("source")}),
        "committed_shards": len(markers), "quarantined_shards": manifest.get("quarantined", []),
        "aborted": manifest.get("aborted"), "worker_versions": worker_versions or None,
        "report_versions": _versions(), "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_report(output: str, stage: str | None = None, keep_samples: bool = False,
               ) -> tuple[dict[str, Any], pa.Table | None]:
    """(report document, per-sample worst case if asked) of one run; with no `stage`, the
    run's own (load.pick_stage), and the document says which stages it has."""
    stage, found = load.pick_stage(output, stage)
    if stage == corpus.STAGE:   # a corpus job's records: a document of their own
        if keep_samples:
            raise ValueError(f"{output}: corpus jobs ({stage}) are reported one at a time, not compared")
        return corpus.run_report(output), None
    agg, markers = load.aggregate_run(output, stage, keep_samples)
    doc = summary.document(agg, markers)
    doc["run"] = output
    doc["stages_with_records"] = found
    doc["checks"]["shard"] = commit.merge_shard_checks(markers)
    doc["checks"]["sample"] = commit.check_sample(markers)
    doc["provenance"] = provenance(doc, markers, load.run_documents(output), stage)
    return doc, agg.get("samples")


def report(outputs: list[str], stage: str | None = None) -> dict[str, Any]:
    """One run's document, or {kind: comparison, runs, comparison} for several runs."""
    if len(outputs) == 1:
        return run_report(outputs[0], stage)[0]
    docs, samples = [], []
    for output in outputs:
        doc, table = run_report(output, stage, keep_samples=True)
        docs.append(doc)
        samples.append(table if table is not None else pa.table({"key": [], "label": [], "eps": [], "norm": [],
                                                                  "entries": [], "robust": []}))
    return {"version": summary.REPORT_VERSION, "kind": "comparison", "runs": docs,
            "comparison": compare.compare(docs, samples)}
