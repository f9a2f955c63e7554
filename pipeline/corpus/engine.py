"""The purifier (and an optional classifier) applied to batches of equal-shape images.

Randomness is keyed per sample (pipeline.seeding.Noise with the sample's key), so a sample's
purified image does not depend on its batch, its shard's order, the worker or a retry. R
runs (evaluation.runs) purify each sample R times: the image written is run 0, and the
classifier, when configured, votes over all R.

Channels: the purifier's network has a fixed number of input channels (from its first
convolution, or corpus.channels). A colour image given to a grey network is purified one
channel at a time (each keyed on its own); a grey image given to a colour network is
replicated to RGB and the result averaged back to grey.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from pipeline import config as config_mod
from pipeline.config import Config, ConfigError
from pipeline.evaluation import memory_format, preflight, row_chunks
from pipeline.evaluation.decision import decide
from pipeline.evaluation.defense import Defense
from pipeline.evaluation.protocol import pick_device
from pipeline.io import checkpoints, storage
from pipeline.purifiers import nets
from pipeline.purifiers.nets import InputSizeError
from pipeline.registry import CLASSIFIERS, PURIFIERS
from pipeline.seeding import Noise

log = logging.getLogger(__name__)

NOISE_CONTEXT = "purify_corpus"


@dataclass
class Outcome:
    """One sample's purification: run 0's image [C, h, w] on the CPU, or an error."""

    image: torch.Tensor | None = None
    nfe: int = 0
    seconds: float = 0.0
    error: str | None = None
    pred_before: int | None = None
    preds_after: list[int] | None = None
    vote_after: int | None = None
    classifier_error: str | None = None


def input_channels(module: nn.Module) -> int | None:
    """Input channels of a network: those of its first 2-D convolution (None: it has none,
    like the identity purifier, and takes any)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return None


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def _checksum(params: dict[str, Any]) -> str:
    """sha256 of the first checkpoint-like file among a component's params ('' if none)."""
    for name, value in sorted(params.items()):
        if config_mod.is_file_param(name) and isinstance(value, str) and storage.exists(value):
            return checkpoints.sha256(value)
    return ""


class Engine:
    """Models built once per worker; `run` purifies one batch of equal-shape images."""

    def __init__(self, cfg: Config):
        self.device = pick_device(cfg.evaluation.device)
        self.seed, self.runs = cfg.job.seed, cfg.evaluation.runs
        self.cfg = cfg
        self._trained: list[tuple[int, int, int] | None] = []   # the purifier's training shape, read once when needed
        purifier = _frozen(PURIFIERS.build(cfg.purifier.name, **cfg.purifier.params))
        classifier = None
        if cfg.classifier is not None:
            classifier = _frozen(CLASSIFIERS.build(cfg.classifier.name, **cfg.classifier.params))
        self.has_classifier = classifier is not None
        self.defense = Defense(classifier if classifier is not None else nn.Identity(), purifier,
                               row_chunks.initial_rows(cfg.evaluation.max_rows)).to(self.device)
        self.rows_choice: row_chunks.Choice | None = None   # the chunk in force, once settled
        given = cfg.corpus.channels if cfg.corpus is not None else None
        self.channels = given or input_channels(purifier)
        self.provenance = {
            "purifier": cfg.purifier.name, "purifier_sha256": _checksum(cfg.purifier.params),
            "purifier_params": json.dumps({**cfg.purifier.params, **purifier.record()}, sort_keys=True, default=str),
            "classifier": cfg.classifier.name if cfg.classifier else None,
            "classifier_sha256": _checksum(cfg.classifier.params) if cfg.classifier else None,
            "seed": self.seed, "runs": self.runs,
        }

    def run(self, xs: Sequence[torch.Tensor], keys: Sequence[str]) -> list[Outcome]:
        """Purify a batch ([C, h, w] tensors of one shape). A failure is retried sample by
        sample, so one bad image never costs its batch-mates their output."""
        try:
            return self._batch(torch.stack(list(xs)), list(keys))
        except Exception as err:  # purifier code can raise anything (shape, OOM, NaN checks)
            if len(xs) == 1:
                hint = f"; {self.size_hint(err)}" if isinstance(err, InputSizeError) else ""
                return [Outcome(error=f"{type(err).__name__}: {err}{hint}")]
            log.warning("batch of %d failed (%s: %s); retrying one by one", len(xs), type(err).__name__, err)
            return [self.run([x], [k])[0] for x, k in zip(xs, keys)]

    def trained_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) the purifier's checkpoint was trained on, when it records one."""
        if not self._trained:
            urls = [v for k, v in sorted(self.cfg.purifier.params.items())
                    if config_mod.is_file_param(k) and isinstance(v, str) and storage.exists(v)]
            self._trained.append(checkpoints.input_shape(urls[0]) if urls else None)
        return self._trained[0]

    def size_hint(self, err: InputSizeError) -> str:
        return size_hint(err, self.trained_shape(), self.cfg.corpus.resize if self.cfg.corpus is not None else None)

    def _batch(self, x: torch.Tensor, keys: list[str]) -> list[Outcome]:
        t0 = time.perf_counter()
        x = x.to(self.device)
        self._settle_rows(x, keys)
        with torch.no_grad():  # no attack here: nothing needs gradients (test-time optimisers enable their own)
            images, nfe = self._purify(x, keys)                     # [B, R, C, H, W]
        if images.shape[2:] != x.shape[1:]:
            raise ValueError(f"purifier returned {tuple(images.shape[2:])} for input {tuple(x.shape[1:])}")
        finite = torch.isfinite(images.flatten(1)).all(1).tolist()
        cls = self._classify(x, images) if self.has_classifier else {}
        first = images[:, 0].float().cpu()
        seconds = (time.perf_counter() - t0) / x.shape[0]
        out = []
        for i in range(x.shape[0]):
            if not finite[i]:
                out.append(Outcome(error="purifier output holds NaN or ±inf", seconds=seconds))
                continue
            out.append(Outcome(first[i], nfe, seconds, None, **{k: v[i] for k, v in cls.items()}))
        return out

    def _settle_rows(self, x: torch.Tensor, keys: list[str]) -> None:
        """evaluation.max_rows: auto → timed once, on the first batch: the R-run purify at each
        candidate chunk (pipeline/evaluation/row_chunks.py); an int is kept as configured. Then
        the networks' memory format at that chunk (evaluation.channels_last, memory_format.py)."""
        if self.rows_choice is not None:
            return
        requested, needed = self.cfg.evaluation.max_rows, x.shape[0] * self.runs

        def timer(c: int, whole: bool) -> tuple[float, int]:
            n = x.shape[0] if whole else max(1, min(x.shape[0], c // self.runs))
            old, self.defense.max_rows = self.defense.max_rows, c
            try:
                t0 = time.perf_counter()
                with torch.no_grad():
                    self._purify(x[:n], [f"{row_chunks.CONTEXT}/{k}" for k in keys[:n]])
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                return time.perf_counter() - t0, n * self.runs
            finally:
                self.defense.max_rows = old
        if requested == row_chunks.AUTO:
            self.rows_choice = row_chunks.choose(self.device, needed, timer, f"the {self.runs}-run purify")
        else:
            self.rows_choice = row_chunks.Choice(int(requested), "configured", needed, "pinned in the config")
        self.defense.max_rows = self.rows_choice.rows
        log.info("evaluation.max_rows %s: %d rows per call (%s; %s)", requested, self.rows_choice.rows,
                 self.rows_choice.how, self.rows_choice.detail)
        layout = memory_format.settle(self.cfg.evaluation.channels_last, [self.defense], self.device, timer,
                                      self.runs, self.rows_choice.rows)
        self.rows_choice = dataclasses.replace(self.rows_choice, layout=layout.record())

    def _purify(self, x: torch.Tensor, keys: list[str]) -> tuple[torch.Tensor, int]:
        B, C, H, W = x.shape
        want, R = self.channels, self.runs
        if want is None or want == C:
            return self._runs(x, keys)
        if C == 3 and want == 1:  # each colour channel as a grey image of its own, keyed on its own
            y, nfe = self._runs(x.reshape(B * 3, 1, H, W), [f"{k}/c{c}" for k in keys for c in range(3)])
            return y.view(B, 3, R, 1, H, W).permute(0, 2, 1, 3, 4, 5).reshape(B, R, 3, H, W), nfe
        if C == 1 and want == 3:  # grey replicated to RGB, the result averaged back to grey
            y, nfe = self._runs(x.expand(-1, 3, -1, -1).contiguous(), keys)
            return y.mean(2, keepdim=True), nfe
        raise ValueError(f"a {C}-channel image for a purifier with {want} input channels")

    def _runs(self, x: torch.Tensor, keys: list[str]) -> tuple[torch.Tensor, int]:
        """x [B, C, H, W] → R purified runs [B, R, C, H, W] (sample-major rows) and nfe per row."""
        noise = Noise.for_batch(self.seed, keys, NOISE_CONTEXT, self.runs, x.device)
        out = self.defense.purify(x.repeat_interleave(self.runs, 0), noise)
        return out.images.view(x.shape[0], self.runs, *x.shape[1:]), int(out.nfe)

    def _classify(self, x: torch.Tensor, images: torch.Tensor) -> dict[str, list]:
        """Predictions before (on the purifier's input) and after (each run, and their vote).
        A classifier that cannot take these images leaves the predictions empty, not the output."""
        B = x.shape[0]
        try:
            with torch.no_grad():
                before = self.defense.classify(x).argmax(1)
                logits = self.defense.classify(images.flatten(0, 1)).view(B, self.runs, -1)
            vote = decide(logits, "vote")
            return {"pred_before": before.tolist(), "preds_after": logits.argmax(2).tolist(),
                    "vote_after": vote.tolist()}
        except Exception as err:  # the classifier is optional: its failure is noted per row
            return {"classifier_error": [f"classifier: {type(err).__name__}: {err}"] * B}


def size_hint(err: InputSizeError, trained: tuple[int, int, int] | None, given: int | None) -> str:
    """What to do about images a purifier's network cannot take: the size policy's side N
    (`trained`: the (C, H, W) its checkpoint records; `given`: corpus.resize)."""
    if trained is not None and trained[1] == trained[2] and err.fits(trained[1]):
        example, why = trained[1], ", the size its checkpoint was trained on"
    else:
        example = err.size or err.multiple * max(1, round(min(err.hw) / err.multiple))
        why = "" if trained is None else f" (its checkpoint was trained on {trained[1]}×{trained[2]})"
    need = f"N = {err.size}" if err.size else f"N divisible by {err.multiple}"
    now = f"corpus.resize {given} does not fit it; " if given is not None and not err.fits(given) else ""
    return (f"{now}purify at a size it takes: --resize N (corpus.resize) with {need}, e.g. --resize {example}"
            f"{why}; add --restore-size to write the input's size back")


def check_resize(cfg: Config) -> None:
    """corpus.resize must be a size the purifier's networks take (known from the arch our
    checkpoints record): refused before any work rather than found out sample by sample."""
    side = cfg.corpus.resize if cfg.corpus is not None else None
    for role, key, url in preflight.model_files(cfg) if side is not None else []:
        raw = checkpoints.load_raw(url) if role == "purifier" else None
        if not (isinstance(raw, dict) and "arch" in raw):
            continue   # not ours (a published format): the worker names what fails
        arch, params, meta = raw["arch"], raw.get("arch_params") or {}, raw.get("meta") or {}
        size = int(params.get("image_size", 32)) if arch == "ebm" else None
        if arch not in nets.SIDE_MULTIPLE and size is None:
            continue
        err = InputSizeError(arch, (side, side), multiple=nets.SIDE_MULTIPLE.get(arch), size=size)
        if not err.fits(side):
            shape = meta.get(checkpoints.INPUT_SHAPE)
            trained = tuple(int(v) for v in shape) if isinstance(shape, (list, tuple)) and len(shape) == 3 else None
            raise ConfigError(f"{cfg.source}: corpus.resize {side}: the purifier's {arch} network ({key}: {url}) "
                              f"needs {err.need}; {size_hint(err, trained, None)}")


class Batcher:
    """Groups items of equal shape into batches, in arrival order within a shape.

    A group is released when it is full (`batch_size` items or `max_batch_pixels` pixels),
    when its oldest item is `window` items behind the newest (this bounds the writer's
    reorder buffer: output order is input order), or, oldest group first, while the pending
    items hold more than `max_pending_bytes` (this bounds decoded images held in memory when
    every image has a size of its own). Variable sizes are never padded: padding would
    change what a convolutional purifier does near the border.
    """

    def __init__(self, batch_size: int, max_batch_pixels: int, window: int, max_pending_bytes: int):
        self.batch_size, self.max_batch_pixels = batch_size, max_batch_pixels
        self.window, self.max_pending_bytes = window, max_pending_bytes
        self._groups: dict[tuple, list[tuple[int, Any, int, int]]] = {}   # shape → [(seq, item, pixels, bytes)]
        self._pending_bytes = 0

    def add(self, item: Any, seq: int, shape: tuple, pixels: int, nbytes: int) -> list[list[Any]]:
        """Queue one item; returns the batches that became ready (possibly none)."""
        group = self._groups.setdefault(shape, [])
        group.append((seq, item, pixels, nbytes))
        self._pending_bytes += nbytes
        ready = []
        if len(group) >= self.batch_size or sum(g[2] for g in group) >= self.max_batch_pixels:
            ready.append(self._release(shape))
        while self._groups:
            shape_old = min(self._groups, key=lambda s: self._groups[s][0][0])
            if self._groups[shape_old][0][0] > seq - self.window and self._pending_bytes <= self.max_pending_bytes:
                break
            ready.append(self._release(shape_old))
        return ready

    def drain(self) -> list[list[Any]]:
        """Every pending group, oldest first (end of shard)."""
        order = sorted(self._groups, key=lambda s: self._groups[s][0][0])
        return [self._release(s) for s in order]

    def _release(self, shape: tuple) -> list[Any]:
        group = self._groups.pop(shape)
        self._pending_bytes -= sum(g[3] for g in group)
        return [g[1] for g in group]
