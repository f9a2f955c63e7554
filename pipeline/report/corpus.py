"""The report of a corpus job (`advpure purify`, stage purify_corpus) from its committed records:
samples in and out, dropped samples by reason (with their first keys and the first error),
image quality (PSNR / SSIM between input and written output), the optional classifier's
predictions before and after purification, and cost. Read one shard file at a time with
running sums, like the evaluation report; nothing here imports torch.
"""
from __future__ import annotations

import html
import json
import math
from typing import Any

import pyarrow as pa

from pipeline.report import load, summary, tables

STAGE = load.CORPUS_STAGE
EXAMPLE_KEYS = 5
COLUMNS = ["job", "config_hash", "key", "status", "error", "purifier", "classifier", "runs", "purify_nfe",
           "psnr", "ssim", "label", "pred_before", "vote_after", "seconds"]


class _Running:
    """Count, sum, min and max of a column's finite values; `inf` counts the infinite ones
    (PSNR of an output identical to its input)."""

    def __init__(self) -> None:
        self.n, self.total, self.inf = 0, 0.0, 0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, values: list[float | None]) -> None:
        for v in values:
            if v is None or math.isnan(v):
                continue
            if math.isinf(v):
                self.inf += 1
                continue
            self.n, self.total = self.n + 1, self.total + v
            self.lo, self.hi = min(self.lo, v), max(self.hi, v)

    def doc(self) -> dict[str, Any] | None:
        if not self.n and not self.inf:
            return None
        mean = self.total / self.n if self.n else None
        return {"n": self.n, "mean": mean, "min": self.lo if self.n else None, "max": self.hi if self.n else None,
                "identical": self.inf}


class _Tally:
    """What one pass over the shard files gathers."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.examples: dict[str, dict[str, Any]] = {}
        self.psnr, self.ssim = _Running(), _Running()
        self.counts = {"agree": 0, "compared": 0, "right_before": 0, "right_after": 0, "labelled": 0}
        self.nfe, self.seconds, self.runs = 0, 0.0, set()
        self.meta: dict[str, set] = {"job": set(), "config_hash": set(), "purifier": set(), "classifier": set()}

    def add(self, t: pa.Table) -> None:
        rows = t.to_pydict()
        for c in self.meta:
            self.meta[c].update(v for v in rows.get(c, []) if v is not None)
        self.runs.update(v for v in rows.get("runs", []) if v is not None)
        self.seconds += sum(v for v in rows.get("seconds", []) if v is not None)
        self.nfe += sum(v for v in rows.get("purify_nfe", []) if v is not None)
        for key, status, error in zip(rows["key"], rows["status"], rows["error"]):
            self.status[status] = self.status.get(status, 0) + 1
            if status != "ok":
                ex = self.examples.setdefault(status, {"keys": [], "error": error})   # the first key's error
                if len(ex["keys"]) < EXAMPLE_KEYS:
                    ex["keys"].append(key)
        ok = [s == "ok" for s in rows["status"]]
        self.psnr.add([v for v, good in zip(rows["psnr"], ok) if good])
        self.ssim.add([v for v, good in zip(rows["ssim"], ok) if good])
        for label, before, after in zip(rows["label"], rows["pred_before"], rows["vote_after"]):
            if before is None or after is None:
                continue
            self.counts["compared"] += 1
            self.counts["agree"] += int(before == after)
            if label is not None:
                self.counts["labelled"] += 1
                self.counts["right_before"] += int(before == label)
                self.counts["right_after"] += int(after == label)


def _one(values: set) -> Any:
    return next(iter(values)) if len(values) == 1 else (sorted(map(str, values)) or None)


def run_report(output: str) -> dict[str, Any]:
    """The corpus job's report document from the committed records of `output`."""
    tally = _Tally()
    markers = []
    for _sid, marker, table in load.iter_committed(output, STAGE, COLUMNS):
        tally.add(table)
        markers.append(marker)
    c = tally.counts
    samples = sum(tally.status.values())
    ok = tally.status.get("ok", 0)
    manifest = (load.run_documents(output).get("manifest.json") or {}).get("stages", {}).get(STAGE, {})
    return {
        "version": summary.REPORT_VERSION, "kind": "corpus", "run": output, "stage": STAGE,
        "job": _one(tally.meta["job"]), "config_hash": _one(tally.meta["config_hash"]),
        "purifier": _one(tally.meta["purifier"]), "classifier": _one(tally.meta["classifier"]),
        "runs": _one(tally.runs), "committed_shards": len(markers),
        "quarantined_shards": manifest.get("quarantined", []), "samples": samples, "ok": ok,
        "dropped": {s: {"n": n, **tally.examples[s]}
                    for s, n in sorted(tally.status.items()) if s != "ok"},
        "quality": {"psnr": tally.psnr.doc(), "ssim": tally.ssim.doc()},
        "predictions": None if not c["compared"] else {
            "agreement": summary.accuracy(c["agree"], c["compared"]),
            "accuracy_before": summary.accuracy(c["right_before"], c["labelled"]),
            "accuracy_after": summary.accuracy(c["right_after"], c["labelled"])},
        "cost": {"purify_nfe_per_sample": tally.nfe / ok if ok else None, "seconds": tally.seconds,
                 "seconds_per_sample": tally.seconds / samples if samples else None},
    }


def _stat(d: dict[str, Any] | None, fmt: str) -> list[str]:
    if d is None:
        return ["n/a"] * 5
    return [str(d["n"]), *(tables._num(d[k], fmt) for k in ("mean", "min", "max")), str(d["identical"])]


def sections(doc: dict[str, Any]) -> list[tables.Section]:
    out = [tables.Section("Samples", ["status", "samples", "first keys", "first error"],
                          [["ok", str(doc["ok"]), "", ""]]
                          + [[s, str(d["n"]), ", ".join(d["keys"]), d.get("error") or ""]
                             for s, d in doc["dropped"].items()])]
    q = doc["quality"]
    out.append(tables.Section("Quality of the written images (ok samples)",
                              ["metric", "n", "mean", "min", "max", "identical"],
                              [["PSNR (dB)", *_stat(q["psnr"], ".2f")], ["SSIM", *_stat(q["ssim"], ".4f")]]))
    p = doc["predictions"]
    if p is not None:
        out.append(tables.Section("Classifier (Wilson 95 % intervals)", ["figure", "%", "n"],
                                  [[name, tables.pct(p[k]), str((p[k] or {}).get("n", 0))] for name, k in (
                                      ("prediction unchanged by purification", "agreement"),
                                      ("accuracy before (labelled samples)", "accuracy_before"),
                                      ("accuracy after (vote over runs)", "accuracy_after"))]))
    cost = doc["cost"]
    out.append(tables.Section("Cost", ["purifier evaluations / sample", "seconds / sample", "seconds in all"],
                              [[tables._num(cost["purify_nfe_per_sample"]), tables._num(cost["seconds_per_sample"]),
                                tables._num(cost["seconds"], ".1f")]]))
    return out


def headline(doc: dict[str, Any]) -> str:
    text = (f"job {doc['job']}  stage {doc['stage']}  purifier {doc['purifier']}  classifier {doc['classifier']}  "
            f"samples {doc['samples']}  ok {doc['ok']}  dropped {doc['samples'] - doc['ok']}  "
            f"shards {doc['committed_shards']}  config {doc['config_hash']}")
    if doc["quarantined_shards"]:
        text += f"\nQUARANTINED shards, not in any figure: {', '.join(doc['quarantined_shards'])}"
    return text


def render(doc: dict[str, Any], fmt: str) -> str:
    """The corpus report as text, markdown, html or json (robustbench has nothing to export)."""
    if fmt == "json":
        return json.dumps(doc, indent=1)
    if fmt == "markdown":
        return "\n".join([f"## {doc['job']} ({doc['stage']})", "", headline(doc).replace("\n", "  \n"),
                          tables.render_markdown(sections(doc))])
    if fmt == "html":
        title = html.escape(f"advpure report: {doc['job']} ({doc['stage']})")
        return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{title}</title></head>"
                f"<body><h1>{title}</h1><p>{html.escape(headline(doc))}</p>\n{tables.render_html(sections(doc))}"
                "\n</body></html>\n")
    if fmt == "robustbench":
        raise ValueError(f"{doc['run']}: a corpus job ({STAGE}) has no robust accuracy to export to RobustBench; "
                         "use --format text, markdown, html or json")
    return "\n".join([headline(doc), tables.render_text(sections(doc))])
