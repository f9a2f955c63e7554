"""Example images for the HTML report: clean / adversarial / purified, read from the image
shards the job's attack and purify stages wrote (named by their commit markers' outputs),
with the clean source found from the markers' `source` and the adversarial samples' lineage
(`source_shard`). A job that ran only the evaluate stage wrote no images."""
from __future__ import annotations

import base64
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io import shards, storage
from pipeline.report import aggregate, load
from pipeline.run import commit

log = logging.getLogger(__name__)
IMAGE_DIRS = {"attack": "adversarial", "purify": "purified"}   # as pipeline.run.worker writes them


def png_b64(image: np.ndarray) -> str:
    """uint8 or [0, 1] float32 [H, W, C] → base64 PNG."""
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    return base64.b64encode(shards.encode_png(image)).decode()


def _read(url: str) -> dict[str, shards.Sample]:
    return {s.key: s for s in shards.read_shard(url) if s.image is not None}


def _pick(records, keys: set[str], limit: int) -> list[dict[str, Any]]:
    """Up to `limit` samples that have every image: half robust, half broken where possible."""
    d = aggregate.derive(records)
    d = d.filter(pc.is_in(d["key"], value_set=pa.array(sorted(keys), type=d["key"].type)))
    cols = ["key", "label", "adv_pred", "mean_logit_pred", "c_robust", "attack_index"]
    robust = d.filter(pc.fill_null(d["c_robust"], False)).select(cols).slice(0, limit // 2).to_pylist()
    broken = d.filter(pc.invert(pc.fill_null(d["c_robust"], False))).select(cols)
    return robust + broken.slice(0, limit - len(robust)).to_pylist()


def _from_purify(output: str, limit: int) -> tuple[list[dict[str, Any]], str]:
    sid, marker = sorted(commit.committed(output, "purify").items())[0]
    purified = _read(storage.join(output, IMAGE_DIRS["purify"], marker["outputs"][0]["name"]))
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
    return out, f"shard {sid}: {', '.join(columns)} (purify stage; first purification run)"


def _from_attack(output: str, limit: int) -> tuple[list[dict[str, Any]], str]:
    sid, marker = sorted(commit.committed(output, "attack").items())[0]
    clean = _read(marker["source"])
    adversarial = {o["name"]: _read(storage.join(output, IMAGE_DIRS["attack"], o["name"]))
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


def examples(output: str, limit: int = 8) -> tuple[list[dict[str, Any]], str]:
    """(examples, a sentence saying where they come from or why there are none)."""
    try:
        if commit.committed(output, "purify"):
            return _from_purify(output, limit)
        if commit.committed(output, "attack"):
            return _from_attack(output, limit)
    except (shards.ShardError, OSError, KeyError, IndexError) as err:
        log.warning("example images of %s unavailable: %s", output, err)
        return [], f"example images unavailable: {type(err).__name__}: {err}"
    return [], ("this job wrote no image shards: only the attack stage (adversarial/) and the purify stage "
                "(purified/) write images; run job.stages [attack, purify] to see examples")
