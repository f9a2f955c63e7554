"""Example images for the HTML report: clean / adversarial / purified, read from the image
shards the job's attack and purify stages wrote (named by their commit markers' outputs),
with the clean source found from the markers' `source` and the adversarial samples' lineage
(`source_shard`). A job that ran only the evaluate stage wrote no images: its examples are
the clean images of its source shards with each sample's worst-case verdict. Examples come
from up to SHARDS committed shards (a few each), not the first shard only."""
from __future__ import annotations

import base64
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import stage_table
from pipeline.io import shards, storage
from pipeline.report import aggregate, load
from pipeline.run import commit

log = logging.getLogger(__name__)
SHARDS = 4   # shards read for the examples: each is read whole, so a handful


def _folder(stage: str) -> str:
    """Where a stage's image shards are, under its output (pipeline.stage_table)."""
    images = stage_table.get(stage).images
    assert images is not None, stage
    return images.folder


def png_b64(image: np.ndarray) -> str:
    """uint8 or [0, 1] float32 [H, W, C] → base64 PNG."""
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    return base64.b64encode(shards.encode_png(image)).decode()


def _read(url: str) -> dict[str, shards.Sample]:
    return {s.key: s for s in shards.read_shard(url) if s.image is not None}


def _pick(records, keys: set[str], limit: int, verdict: dict[str, bool | None] | None = None
          ) -> list[dict[str, Any]]:
    """Up to `limit` samples that have every image: half robust, half broken where possible
    (by `verdict`, key → robust, where given, else by the records' own c_robust)."""
    d = aggregate.derive(records)
    d = d.filter(pc.is_in(d["key"], value_set=pa.array(sorted(keys), type=d["key"].type)))
    rows = d.select(["key", "label", "adv_pred", "mean_logit_pred", "c_robust", "attack_index",
                     "final_skipped", "gated"]).to_pylist()
    if verdict is not None:
        rows = [{**r, "c_robust": verdict.get(r["key"])} for r in rows]
    robust = [r for r in rows if r["c_robust"]][: limit // 2]
    return robust + [r for r in rows if not r["c_robust"]][: limit - len(robust)]


def _spread(output: str, stage: str, limit: int) -> list[tuple[str, dict[str, Any], int]]:
    """(shard id, marker, how many examples) over up to SHARDS shards spread across the job."""
    markers = sorted(commit.committed(output, stage).items())
    step = max(1, len(markers) // SHARDS)
    chosen = markers[::step][:SHARDS]
    each = -(-limit // len(chosen))
    return [(sid, m, min(each, limit - i * each)) for i, (sid, m) in enumerate(chosen) if limit - i * each > 0]


def _shard_note(parts: list[str]) -> str:
    return f"shard{'s' if len(parts) > 1 else ''} {', '.join(parts)}"


def _from_purify(output: str, limit: int) -> tuple[list[dict[str, Any]], str]:
    out, sids, columns = [], [], ()
    for sid, marker, n in _spread(output, "purify", limit):
        found, columns = _purify_shard(output, sid, marker, n)
        out += found
        sids.append(sid)
    return out, f"{_shard_note(sids)}: {', '.join(columns)} (purify stage; first purification run)"


def _purify_shard(output: str, sid: str, marker: dict[str, Any], limit: int
                  ) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    purified = _read(storage.join(output, _folder("purify"), marker["outputs"][0]["name"]))
    given = _read(marker["source"])          # the adversarial set (or any corpus) that was purified
    lineage = {s.meta.get("source_shard") for s in given.values()} - {None}
    clean: dict[str, shards.Sample] = {}
    for url in sorted(lineage)[:1]:          # one source shard suffices for a handful of examples
        try:
            clean = {s.meta.get("source_key", s.key): s for s in _read(url).values()}
        except (shards.ShardError, OSError) as err:
            log.warning("clean source %s unavailable for the example grid: %s", url, err)
    columns = ("clean", "adversarial", "purified") if lineage else ("input", "purified")
    records = load.read_records(output, "purify", sid, marker)
    picked = _pick(records, set(purified) & set(given), limit)
    out = []
    for r in picked:
        src = given[r["key"]]
        if lineage:
            ck = src.meta.get("source_key", r["key"])
            images = {"clean": png_b64(clean[ck].image) if ck in clean else None, "adversarial": png_b64(src.image)}
        else:
            images = {"input": png_b64(src.image)}
        out.append({**r, "images": {**images, "purified": png_b64(purified[r["key"]].image)}})
    return out, columns


def _from_attack(output: str, limit: int) -> tuple[list[dict[str, Any]], str]:
    sid, marker = sorted(commit.committed(output, "attack").items())[0]
    clean = _read(marker["source"])
    adversarial = {o["name"]: _read(storage.join(output, _folder("attack"), o["name"]))
                   for o in marker["outputs"][:4]}
    records = load.read_records(output, "attack", sid, marker)
    first = next(iter(adversarial.values()))
    records = records.filter(pc.equal(records["attack_index"], pc.min(records["attack_index"])))
    out = []
    for r in _pick(records, set(first) & set(clean), limit):
        images = {"clean": png_b64(clean[r["key"]].image)}
        images.update({name: png_b64(adv[r["key"]].image) for name, adv in adversarial.items() if r["key"] in adv})
        out.append({**r, "images": images})
    return out, f"shard {sid}: clean and adversarial per attack (attack stage; no purification in this job)"


def _from_evaluate(output: str, limit: int) -> tuple[list[dict[str, Any]], str]:
    out, sids = [], []
    for sid, marker, n in _spread(output, "evaluate", limit):
        clean = _read(marker["source"])
        records = load.read_records(output, "evaluate", sid, marker)
        attacked = records.filter(pc.not_equal(pc.fill_null(records["attack_name"], "none"), "none"))
        worst = _worst_verdicts(attacked if attacked.num_rows else records)
        low = pc.min(records["attack_index"])
        first = records if low.as_py() is None else records.filter(pc.equal(records["attack_index"], low))
        for r in _pick(first, set(clean) & set(worst), n, worst):
            out.append({**r, "images": {"clean": png_b64(clean[r["key"]].image)}})
        sids.append(sid)
    return out, (f"{_shard_note(sids)}: clean images with the worst case over every attack (evaluate stage: it "
                 "keeps no adversarial images; job.stages [attack, purify] writes them)")


def _worst_verdicts(records: pa.Table) -> dict[str, bool | None]:
    """key → robust to every attack (False once one broke it; None without a verdict)."""
    d = aggregate.derive(records).select(["key", "c_robust"]).to_pylist()
    out: dict[str, bool | None] = {}
    for r in d:
        v, prev = r["c_robust"], out.get(r["key"], True)
        out[r["key"]] = None if v is None or prev is None else (prev and v)
    return out


def examples(output: str, limit: int = 8) -> tuple[list[dict[str, Any]], str]:
    """(examples, a sentence saying where they come from or why there are none)."""
    try:
        if commit.committed(output, "purify"):
            return _from_purify(output, limit)
        if commit.committed(output, "attack"):
            return _from_attack(output, limit)
        if commit.committed(output, "evaluate"):
            return _from_evaluate(output, limit)
    except (shards.ShardError, OSError, KeyError, IndexError) as err:
        log.warning("example images of %s unavailable: %s", output, err)
        return [], f"example images unavailable: {type(err).__name__}: {err}"
    return [], "no committed shards: no examples"
