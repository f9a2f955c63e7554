"""The three stages over one shard's decoded samples, as pure functions: samples in (a list,
or a stream taken batch by batch), rows (and images for the stages that write them) out.
No I/O: the worker reads and writes; pipeline/stage_table.py names each function as a stage.

- evaluate: every attack on every sample the defended model gets right clean (the clean
  gate, batch.attacked_mask; or, with `cascade`, each attack on the samples every earlier
  attack of the same (norm, ε) failed to break), one row per (sample, attack);
- attack:   adversarial examples for every attack, with their rows;
- purify:   given images purified R times and classified; the first run's images returned.
"""
from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from pipeline.evaluation import preflight, row_chunks
from pipeline.evaluation.batch import (
    CleanEval,
    attack_batch,
    attack_rows,
    clean_eval,
    eot_probe,
    evaluate_batch,
    gradient_checks,
    is_broken,
    purify_batch,
)
from pipeline.evaluation.protocol import NO_ATTACK, PlannedAttack, Protocol
from pipeline.evaluation.row_chunks import is_out_of_memory
from pipeline.io.shards import Sample, ShardError, to_unit_float

log = logging.getLogger(__name__)
T = TypeVar("T")
# where a stage hands its images as batches complete: (output name, [(sample, image, extra)])
ImageSink = Callable[[str, list[tuple[Sample, np.ndarray, dict[str, Any]]]], None]

# what an adversarial sample's lineage carries into the purify stage's records
LINEAGE_COLUMNS = (*NO_ATTACK.keys(), "clean_pred", "linf", "l2", "candidate_step", "broken_step", "attack_steps",
                   "attack_nfe", "attacked")


@dataclass
class Batch:
    samples: list[Sample]
    x: torch.Tensor          # [B, C, H, W] in [0, 1]
    y: torch.Tensor          # [B]
    keys: list[str]


@dataclass
class StageOutput:
    rows: list[dict[str, Any]]
    checks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    check_samples: int = 0   # samples the gradient-masking checks ran on (this shard's share)
    # images to write, per output: {name: [(sample, image [H, W, C] float32, extra fields)]}
    images: dict[str, list[tuple[Sample, np.ndarray, dict[str, Any]]]] = field(default_factory=dict)


def batches(samples: Sequence[Sample], batch_size: int, device: torch.device) -> Iterator[Batch]:
    shapes = {s.image.shape for s in samples}
    if len(shapes) > 1:
        raise ShardError(f"images of different shapes in one shard: {sorted(shapes)}")
    for i in range(0, len(samples), batch_size):
        part = list(samples[i:i + batch_size])
        x = torch.from_numpy(np.stack([to_unit_float(s.image) for s in part])).permute(0, 3, 1, 2)
        y = torch.tensor([s.label for s in part], dtype=torch.int64)
        if device.type == "cuda":  # page-locked host copies: the copy overlaps compute
            x, y = x.contiguous().pin_memory(), y.pin_memory()
        yield Batch(part, x.contiguous().to(device, non_blocking=True), y.to(device, non_blocking=True),
                    [s.key for s in part])


def adaptive(p: Protocol, samples: Iterable[Sample], work: Callable[[Batch], T]) -> Iterator[tuple[Batch, T]]:
    """(batch, work(batch)) over consecutive batches of p.batch_size samples, taken from a
    list or a stream as they are needed (at most one batch of samples held here). On out of
    memory the batch size is halved and the same samples retried; the protocol keeps the new
    size, so this worker's later batches and shards start from what fits. Rows do not depend
    on the batch they ran in (keyed noise), so the results are the same."""
    source = iter(samples)
    pending: list[Sample] = []
    while True:
        pending += itertools.islice(source, max(0, p.batch_size - len(pending)))
        if not pending:
            return
        b = next(batches(pending[:p.batch_size], p.batch_size, p.device))
        k = getattr(p.defense.classifier, "num_classes", None)
        if k is not None:   # a label the classifier cannot predict would count as a wrong answer
            preflight.check_labels([s.label for s in b.samples], int(k), f"samples {b.keys[0]} … {b.keys[-1]}")
        row_chunks.settle(p, b.x, b.y, b.keys)   # max_rows: auto is measured once, on the first batch
        try:
            out = work(b)
        except RuntimeError as err:
            if not is_out_of_memory(err) or len(b.keys) <= 1:
                raise
            p.batch_size = max(1, len(b.keys) // 2)
            log.warning("out of memory at batch size %d; retrying with %d: %s", len(b.keys), p.batch_size,
                        str(err).splitlines()[0][:200])
            del b
            if p.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        yield b, out
        del pending[:len(b.keys)]


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)


def evaluate(p: Protocol, samples: Iterable[Sample]) -> StageOutput:
    """Rows of every (sample, attack), and the checks on the shard's first batch. Streams
    batch by batch, except the cascade: it re-packs survivors across the whole shard."""
    if p.cascade:
        samples = list(samples)
    out = StageOutput([])
    checked = False

    def work(b: Batch) -> tuple[dict | None, list[dict[str, Any]]]:
        first = None if checked else first_batch_checks(p, b)
        return first, ([] if p.cascade else evaluate_batch(p, b.x, b.y, b.keys))

    for b, (first, batch_rows) in adaptive(p, samples if not p.cascade else samples[:p.batch_size], work):
        if not checked:   # the first batch, even when this shard's share of check samples is 0
            out.checks, out.check_samples, checked = first or {}, check_count(p, b), True
        out.rows += batch_rows
    if p.cascade:
        out.rows = cascade(p, samples)
    return out


def check_share(total: int, position: int, shards: int) -> int:
    """Shard `position`'s share (0-based, in the job's shard order) of `total` check samples
    spread evenly over `shards` shards: the first `total % shards` take one more; with fewer
    samples than shards, the shards past the sample take none."""
    if shards < 1 or not 0 <= position < shards:
        raise ValueError(f"shard position {position} outside a job of {shards} shards")
    return total // shards + (1 if position < total % shards else 0)


def check_count(p: Protocol, b: Batch) -> int:
    """Samples of the first batch b the gradient-masking checks take (the shard's share)."""
    return min(p.check_samples, len(b.keys)) if p.attacks else 0


def first_batch_checks(p: Protocol, b: Batch) -> dict[str, list[dict[str, Any]]]:
    """Gradient-masking checks per attack on this shard's share of the job's check samples
    (none: no checks), and the EOT probe if asked."""
    k = check_count(p, b)
    checks = {str(a.index): gradient_checks(p, a, b.x[:k], b.y[:k], b.keys[:k]) for a in p.attacks} if k else {}
    if p.eot_probe:
        n = min(p.eot_probe, len(b.keys))
        for a in p.attacks:
            if a.gradient != "classifier" and p.defense.purifier.stochastic:
                checks.setdefault(str(a.index), []).append(eot_probe(p, a, b.x[:n], b.y[:n], b.keys[:n]))
    return checks


def threat_model(plan: PlannedAttack) -> tuple[str, float]:
    """The (norm, ε) an attack entry's verdict is about; the cascade chains entries only
    within one (a break at ε = 0.2 says nothing about ε = 0.1)."""
    return plan.attack.norm, float(plan.attack.eps)


def cascade_groups(attacks: Sequence[PlannedAttack]) -> list[list[PlannedAttack]]:
    """The attack entries grouped by threat model, each group in config order, groups in
    order of first appearance: an ε sweep of a preset (APGD-CE 0.1, APGD-CE 0.2, APGD-T 0.1,
    …) becomes one chain per ε."""
    groups: dict[tuple[str, float], list[PlannedAttack]] = {}
    for plan in attacks:
        groups.setdefault(threat_model(plan), []).append(plan)
    return list(groups.values())


def cascade(p: Protocol, samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Per threat model (norm, ε), the attacks in config order, each on the samples no
    earlier attack of that threat model broke, re-packed into full batches across the shard
    (AutoAttack); a broken sample's row is carried to the group's later attacks. Noise is
    keyed per sample, so the samples robust at the end of a group are exactly those robust
    under every one of its attacks run alone — at a fraction of the cost. Breaks are never
    carried between groups: not to a smaller ε, not across norms, and not to a larger ε
    either (sound, but then the ε-monotonicity check would hold by construction)."""
    clean: dict[str, CleanEval] = {}
    for b, ce in adaptive(p, samples, lambda b: clean_eval(p, b.x, b.y, b.keys)):
        clean.update({k: ce.take([i]) for i, k in enumerate(b.keys)})
    if not p.attacks:
        return [r for b in batches(samples, p.batch_size, p.device)
                for r in attack_rows(p, None, b.x, b.y, b.keys, CleanEval.stack([clean[k] for k in b.keys]))]
    rows = [r for group in cascade_groups(p.attacks) for r in _chain(p, group, samples, clean)]
    order = {plan.index: i for i, plan in enumerate(p.attacks)}
    return sorted(rows, key=lambda r: order[r["attack_index"]])  # stable: config order, as without cascade


def _chain(p: Protocol, group: Sequence[PlannedAttack], samples: Sequence[Sample],
           clean: dict[str, CleanEval]) -> list[dict[str, Any]]:
    """One threat model's attacks, each on the survivors of the earlier ones."""
    rows: list[dict[str, Any]] = []
    survivors = list(samples)
    broken_rows: dict[str, dict[str, Any]] = {}
    for plan in group:
        for row in broken_rows.values():
            rows.append({**row, **plan.info(), "cascade_from": row.get("cascade_from", row["attack_index"]),
                         "attack_nfe": 0, "attack_steps": 0, "purify_nfe": 0, "seconds": 0.0})
        still = []
        work = functools.partial(_attack_rows, p, plan, clean)
        for b, new in adaptive(p, survivors, work):
            for r, s in zip(new, b.samples):
                rows.append(r)
                if is_broken(r):
                    broken_rows[s.key] = r
                else:
                    still.append(s)
        survivors = still
    return rows


def _attack_rows(p: Protocol, plan: Any, clean: dict[str, CleanEval], b: Batch) -> list[dict[str, Any]]:
    return attack_rows(p, plan, b.x, b.y, b.keys, CleanEval.stack([clean[k] for k in b.keys]))


def _collect(out: StageOutput, emit: ImageSink | None) -> ImageSink:
    """Where a stage's images go: `emit` (the worker encodes and writes them as batches
    complete) or, without one, `out.images` (whole shard in memory)."""
    return emit or (lambda name, items: out.images[name].extend(items))


def attack(p: Protocol, samples: Iterable[Sample], emit: ImageSink | None = None) -> StageOutput:
    """Adversarial examples of every attack; images per attack index, with lineage columns.
    `out.images` names every output (empty lists when the images went to `emit`)."""
    out = StageOutput([], images={str(a.index): [] for a in p.attacks})
    put = _collect(out, emit)
    for b, (rows, images) in adaptive(p, samples, lambda b: attack_batch(p, b.x, b.y, b.keys)):
        out.rows += rows
        by_key = {(r["attack_index"], r["key"]): r for r in rows}
        for idx, x_adv in images.items():
            hwc = _hwc(x_adv)
            put(str(idx), [(s, hwc[j], {c: by_key[(idx, s.key)][c] for c in LINEAGE_COLUMNS})
                           for j, s in enumerate(b.samples)])
    return out


def purify(p: Protocol, samples: Iterable[Sample], emit: ImageSink | None = None) -> StageOutput:
    """Purify given images (an adversarial set with lineage, or any corpus) R times; the
    first run's purified images go out under the name 'purified'."""
    out = StageOutput([], images={"purified": []})
    put = _collect(out, emit)

    def work(b: Batch) -> tuple[list[dict[str, Any]], torch.Tensor]:
        infos = [{**NO_ATTACK, **{k: s.meta[k] for k in LINEAGE_COLUMNS if k in s.meta}} for s in b.samples]
        return purify_batch(p, b.x, b.y, b.keys, infos)

    for b, (rows, purified) in adaptive(p, samples, work):
        out.rows += rows
        hwc = _hwc(purified)
        put("purified", [(s, hwc[j], {}) for j, s in enumerate(b.samples)])
    return out

