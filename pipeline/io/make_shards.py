"""Convert datasets into WebDataset shards with an index (the `advpure make-shards` command)."""
from __future__ import annotations

import logging
import re
from typing import Any, Iterator

import numpy as np

from pipeline.io import datasets
from pipeline.io.shards import ShardWriter

log = logging.getLogger(__name__)

SOURCES = ("digits", "mnist", "cifar10", "folder", "imagenet")


def _records(source: str, path: str | None, split: str,
             options: dict[str, Any] | None = None) -> tuple[Iterator[tuple[str, Any, int]], dict]:
    if source in ("digits", "mnist", "cifar10"):
        images, labels, idx = datasets.load_split(source, split, path)
        width = len(str(max(idx) if idx else 0))
        recs = ((f"{source}-{i:0{width}d}", images[j], int(labels[j])) for j, i in enumerate(idx))
        return recs, {"num_classes": 10}
    if source == "folder":
        if not path:
            raise datasets.DatasetError("folder needs --path to a folder with one sub-folder per class")
        meta: dict[str, Any] = {}

        def gen():
            for rel, im, ci, classes in datasets.iter_image_folder(path):
                meta["classes"] = classes
                meta["num_classes"] = len(classes)
                key = re.sub(r"[^A-Za-z0-9_-]", "_", rel.rsplit(".", 1)[0])
                arr = np.asarray(im.convert("L" if im.mode in ("L", "1") else "RGB"))
                yield key, arr[..., None] if arr.ndim == 2 else arr, ci

        return gen(), meta
    if source == "imagenet":
        return _imagenet_records(path, **(options or {}))
    raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")


def _imagenet_records(path: str | None, labels: str | None = None, classes: str | None = None,
                      resize: int = datasets.IMAGENET_RESIZE, crop: int = datasets.IMAGENET_CROP
                      ) -> tuple[Iterator[tuple[str, Any, int]], dict]:
    """ImageNet validation images, resized (shorter side `resize`) and centre-cropped to
    crop×crop with Pillow, streamed one at a time."""
    if not path:
        raise datasets.DatasetError("imagenet needs --path to the validation folder")
    meta: dict[str, Any] = {"resize": resize, "crop": crop}

    def gen():
        for key, arr, label, names in datasets.iter_imagenet(path, labels, classes, resize, crop):
            if "classes" not in meta:
                meta.update(classes=names, num_classes=len(names) or None)
            yield re.sub(r"[^A-Za-z0-9_-]", "_", key), arr, label

    return gen(), meta


def make_shards(source: str, out_dir: str, path: str | None = None, split: str = "test",
                samples_per_shard: int = 1000, limit: int | None = None, prefix: str = "shard",
                options: dict[str, Any] | None = None) -> dict:
    """options: source-specific settings (imagenet: labels, classes, resize, crop)."""
    records, meta = _records(source, path, split, options)
    writer = ShardWriter(out_dir, prefix=prefix, samples_per_shard=samples_per_shard,
                         meta={"source": source, "split": split})
    n = 0
    for key, image, label in records:
        if limit is not None and n >= limit:
            break
        writer.write(key, image, label)
        n += 1
    writer.meta.update(meta)
    doc = writer.close()
    doc["pattern"] = writer.pattern()
    log.info("wrote %d samples in %d shards to %s", doc["total_samples"], len(doc["shards"]), out_dir)
    return doc
