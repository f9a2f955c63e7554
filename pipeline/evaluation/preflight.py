"""Checks of a job's data against its models made before any work starts (exit 2 from the CLI).

A model fed images of another size often runs anyway (adaptive pooling, a fully
convolutional purifier) and reports numbers near chance that look like results. Our
checkpoints record the (C, H, W) they were trained on (`checkpoints.INPUT_SHAPE`); the
first sample of the first shard is compared with it, and its label with the classifier's
classes. Later shards are checked by the worker as they are read (`check_labels`).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from pipeline.config import Config, ConfigError, is_file_param
from pipeline.io import checkpoints, shards

log = logging.getLogger(__name__)


def _fmt(shape: tuple[int, ...]) -> str:
    return "×".join(str(v) for v in shape)


def model_files(cfg: Config) -> list[tuple[str, str, str]]:
    """(role, dotted key, URL) of every checkpoint the classifier and purifier name."""
    out = []
    for role, m in (("classifier", cfg.classifier), ("purifier", cfg.purifier)):
        for name, value in (m.params if m is not None else {}).items():
            if is_file_param(name) and isinstance(value, str) and not name.endswith("_path"):
                out.append((role, f"{role}.params.{name}", value))
    return out


def first_sample(url: str) -> shards.Sample | None:
    """The first decodable sample of a shard (None when the first one is broken: the worker
    records it as a failed row)."""
    stream = shards.iter_shard(url)
    try:
        sample = next(stream, None)
    finally:
        stream.close()
    return sample if sample is not None and sample.image is not None else None


def check_input_size(cfg: Config, sample: shards.Sample, url: str) -> None:
    """The sample's (C, H, W) must be what every checkpoint that records one was trained on."""
    h, w, c = sample.image.shape
    for role, key, ckpt in model_files(cfg):
        trained = checkpoints.input_shape(ckpt)
        if trained is None or trained == (c, h, w):
            continue
        raise ConfigError(
            f"{cfg.source}: data.shards: the images are {_fmt((c, h, w))} (C×H×W; sample {sample.key} of "
            f"{url}) but the {role} ({key}: {ckpt}) was trained on {_fmt(trained)} images; resize the "
            f"images to {trained[1]}×{trained[2]} before `advpure make-shards`, or use a {role} trained on "
            f"{h}×{w} images")


def check_labels(labels: torch.Tensor | list[int], num_classes: int, where: str) -> None:
    """Every label must be one of the classifier's classes 0 … K−1 (a missing label is −1)."""
    bad = sorted({int(v) for v in labels if not 0 <= int(v) < num_classes})
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ValueError(f"{where}: labels {shown} are outside the classifier's {num_classes} classes "
                         f"(0–{num_classes - 1}; −1 is a sample without a .cls label): the shards are labelled "
                         "for another class set, or the classifier is the wrong one")


def num_classes(cfg: Config) -> int | None:
    from pipeline.registry import CLASSIFIERS

    if cfg.classifier is None:
        return None
    net: Any = CLASSIFIERS.build(cfg.classifier.name, **cfg.classifier.params)
    k = getattr(net, "num_classes", None)
    return int(k) if k is not None else None


def check(cfg: Config, url: str) -> None:
    """All pre-work checks against the first sample of shard `url`; ConfigError names the fix."""
    sample = first_sample(url)
    if sample is None:
        return
    check_input_size(cfg, sample, url)
    k = num_classes(cfg)
    if k is not None:
        try:
            check_labels([sample.label], k, f"data.shards: sample {sample.key} of {url}")
        except ValueError as err:
            raise ConfigError(f"{cfg.source}: {err}") from None
