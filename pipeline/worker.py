"""ShardWorker: one per GPU (or CPU slot). Builds its models once; turns one shard into one
committed Parquet file. It never decides what runs next: the driver does.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import checkpoints, config as config_mod, schema, shards, storage
from pipeline.attacks.base import Attack
from pipeline.defense import Defense
from pipeline.evaluate import (NO_ATTACK, PlannedAttack, attack_batch, attack_rows, clean_columns, evaluate_batch,
                               gradient_checks, is_broken, purify_batch, resolve_gradient)
from pipeline.registry import ATTACKS, CLASSIFIERS, PURIFIERS

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".done.json"
ADVERSARIAL_DIR, PURIFIED_DIR = "adversarial", "purified"
# what an adversarial sample's lineage carries into the purify stage's records
LINEAGE_COLUMNS = (*NO_ATTACK.keys(), "clean_pred", "linf", "l2", "broken_step", "attack_nfe")
CHECK_SAMPLES = 16   # samples of a shard's first batch used for the gradient-masking checks


def marker_path(output: str, stage: str, sid: str) -> str:
    return storage.join(output, stage, f"{sid}{MARKER_SUFFIX}")


def committed_parquet(output: str, stage: str, sid: str) -> str:
    """The records file a shard's commit marker names."""
    marker = json.loads(storage.read_text(marker_path(output, stage, sid)))
    return storage.join(output, stage, marker["parquet"])


def _checksum_params(params: dict[str, Any]) -> str:
    """sha256 of the first checkpoint-like file among a component's params ('' if none)."""
    for name, value in sorted(params.items()):
        if config_mod._is_file_param(name) and isinstance(value, str) and storage.exists(value):
            return checkpoints.sha256(value)
    return ""


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("evaluation.device is cuda but no GPU is visible to this worker")
        return torch.device("cuda")
    return torch.device("cpu")


def _node_id() -> str | None:
    """The Ray node this worker runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # not in a Ray worker
        return None


def _stack_clean(clean: dict[str, tuple], keys: list[str]) -> tuple[dict[str, list], torch.Tensor, int]:
    """The cached clean columns of some samples, as one batch."""
    parts = [clean[k] for k in keys]
    cols = {c: [v for p in parts for v in p[0][c]] for c in parts[0][0]}
    return cols, torch.cat([p[1] for p in parts]), parts[0][2]


class ShardProcessor:
    """The worker's logic without Ray, so it can be tested and run in-process."""

    def __init__(self, cfg_dict: dict[str, Any], cpus: float = 1.0):
        self.cfg = config_mod.from_dict(cfg_dict, source="<worker>")
        torch.set_num_threads(max(1, int(cpus)))
        self.device = pick_device(self.cfg.evaluation.device)
        c = self.cfg
        classifier = CLASSIFIERS.build(c.classifier.name, **c.classifier.params)
        purifier = PURIFIERS.build(c.purifier.name, **c.purifier.params)
        for p in list(classifier.parameters()) + list(purifier.parameters()):
            p.requires_grad_(False)  # attacks need input gradients only
        self.defense = Defense(classifier.eval(), purifier.eval(), c.evaluation.max_rows).to(self.device)
        self.attacks = []
        for i, a in enumerate(c.attacks):
            attack: Attack = ATTACKS.build(a.name, **a.params)
            surrogate = None
            if a.surrogate:
                sp = PURIFIERS.build(c.purifier.name, **{**c.purifier.params, **a.surrogate})
                for p in sp.parameters():
                    p.requires_grad_(False)
                surrogate = Defense(self.defense.classifier, sp.eval(), c.evaluation.max_rows).to(self.device)
            gradient = resolve_gradient(a.gradient, surrogate or self.defense)
            self.attacks.append(PlannedAttack(i, a.name, attack, gradient, a.eot, surrogate))
        self.config_hash = c.hash()
        self.provenance = {
            "job": c.job.name, "config_hash": self.config_hash, "seed": c.job.seed,
            "classifier": c.classifier.name, "classifier_sha256": _checksum_params(c.classifier.params),
            "purifier": c.purifier.name, "purifier_sha256": _checksum_params(c.purifier.params),
            "purifier_params": json.dumps({**c.purifier.params, **purifier.params()}, sort_keys=True, default=str),
        }

    def ready(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device),
                "flags": self.defense.purifier.flags(),
                "gradients": {p.index: p.gradient for p in self.attacks}}

    def _inject_fault(self, sid: str) -> None:
        for f in self.cfg.faults:
            if not fnmatch(sid, f.shard):
                continue
            Path(f.marker_dir).mkdir(parents=True, exist_ok=True)
            for n in range(f.times):
                try:  # O_EXCL: exactly `times` failures across processes and retries
                    os.close(os.open(Path(f.marker_dir, f"{sid}.{f.mode}.{n}"), os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    continue
                log.warning("injected fault %s on shard %s", f.mode, sid)
                if f.mode == "raise":
                    raise RuntimeError(f"injected fault on shard {sid}")
                if f.mode == "exit":
                    os._exit(17)
                time.sleep(10**6)  # hang

    def process(self, url: str, sid: str, stage: str = "evaluate", expected: int | None = None) -> dict[str, Any]:
        """Turn one shard into one committed result: outputs (shards of adversarial or
        purified images) first, then the records, then the marker."""
        t0 = time.time()
        self._inject_fault(sid)
        samples = shards.read_shard(url, expected)
        limit = self.cfg.data.max_samples_per_shard
        if limit is not None:
            samples = samples[:limit]
        common = {**self.provenance, "schema_version": schema.SCHEMA_VERSION, "stage": stage, "shard": sid}
        rows = [{**common, "key": s.key, "label": s.label, "status": schema.Status.DECODE_ERROR.value,
                 "error": s.error} for s in samples if s.error is not None]
        good = [s for s in samples if s.error is None]
        checks: dict[str, list[dict[str, Any]]] = {}
        outputs: list[dict[str, Any]] = []
        if stage == "evaluate":
            new, checks = self._evaluate(good)
        elif stage == "attack":
            new, outputs = self._attack(good, sid, url)
        elif stage == "purify":
            new, outputs = self._purify(good, sid)
        else:
            raise ValueError(f"unknown stage {stage!r}")
        rows += [{**common, **r, "status": schema.Status.OK.value, "error": None} for r in new]
        table = schema.to_table(rows)
        data = schema.to_parquet_bytes(table)
        # a name of its own per attempt: a lost-but-alive worker finishing late can never make
        # a marker point at another attempt's bytes; the marker names the file it vouches for
        name = f"{sid}.{uuid.uuid4().hex[:8]}.parquet"
        storage.put_bytes(storage.join(self.cfg.job.output, stage, name), data)  # atomic
        marker = {"shard": sid, "source": url, "parquet": name, "rows": table.num_rows, "samples": len(samples),
                  "sha256": hashlib.sha256(data).hexdigest(), "config_hash": self.config_hash,
                  "schema_version": schema.SCHEMA_VERSION, "seconds": time.time() - t0,
                  "host": socket.gethostname(), "device": str(self.device), "node_id": _node_id(),
                  "checks": checks, "outputs": outputs}
        storage.put_text(marker_path(self.cfg.job.output, stage, sid), json.dumps(marker))  # the commit, last
        return marker

    def _batches(self, good: list[shards.Sample]):
        """(samples, x [B, C, H, W] in [0, 1], y [B], keys) in batches of data.batch_size."""
        shapes = {s.image.shape for s in good}
        if len(shapes) > 1:
            raise shards.ShardError(f"images of different shapes in one shard: {sorted(shapes)}")
        bs = self.cfg.data.batch_size
        for i in range(0, len(good), bs):
            batch = good[i:i + bs]
            x = torch.from_numpy(np.stack([shards.to_unit_float(s.image) for s in batch])).permute(0, 3, 1, 2)
            y = torch.tensor([s.label for s in batch], dtype=torch.int64, device=self.device)
            yield batch, x.contiguous().to(self.device), y, [s.key for s in batch]

    def _evaluate(self, good: list[shards.Sample]) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        rows: list[dict[str, Any]] = []
        checks: dict[str, list[dict[str, Any]]] = {}
        seed = self.cfg.job.seed
        runs = self.cfg.evaluation.runs
        for n, (_, x, y, keys) in enumerate(self._batches(good)):
            if n == 0:
                k = min(CHECK_SAMPLES, len(keys))
                checks = {str(p.index): gradient_checks(self.defense, p, x[:k], y[:k], keys[:k], seed)
                          for p in self.attacks}
            if not self.cfg.evaluation.cascade:
                rows += evaluate_batch(self.defense, self.attacks, x, y, keys, seed, runs)
        if self.cfg.evaluation.cascade:
            rows = self._cascade(good)
        return rows, checks

    def _cascade(self, good: list[shards.Sample]) -> list[dict[str, Any]]:
        """Attacks in order, each on the survivors of the earlier ones, re-packed into full
        batches across the shard; a broken sample's row is carried to the later attacks."""
        seed, runs = self.cfg.job.seed, self.cfg.evaluation.runs
        clean: dict[str, tuple] = {}
        for _, x, y, keys in self._batches(good):
            cols, logits, nfe = clean_columns(self.defense, x, y, keys, seed, runs)
            for i, k in enumerate(keys):
                clean[k] = ({c: v[i:i + 1] for c, v in cols.items()}, logits[i:i + 1], nfe)
        if not self.attacks:
            return [r for _, x, y, keys in self._batches(good)
                    for r in attack_rows(self.defense, None, x, y, keys, seed, runs, _stack_clean(clean, keys))]
        rows: list[dict[str, Any]] = []
        survivors = list(good)
        broken_rows: dict[str, dict[str, Any]] = {}
        for plan in self.attacks:
            for key, row in broken_rows.items():
                rows.append({**row, **plan.info(), "cascade_from": row.get("cascade_from", row["attack_index"]),
                             "attack_nfe": 0, "purify_nfe": 0, "seconds": 0.0})
            still = []
            for batch, x, y, keys in self._batches(survivors):
                for r, s in zip(attack_rows(self.defense, plan, x, y, keys, seed, runs, _stack_clean(clean, keys)),
                                batch):
                    rows.append(r)
                    if is_broken(r, plan):
                        broken_rows[s.key] = r
                    else:
                        still.append(s)
            survivors = still
        return rows

    def _attack(self, good: list[shards.Sample], sid: str, url: str) -> tuple[list[dict[str, Any]], list[dict]]:
        """Adversarial examples for every attack, written as one shard per attack with lineage."""
        builders = {p.index: shards.TarBuilder() for p in self.attacks}
        rows: list[dict[str, Any]] = []
        for batch, x, y, keys in self._batches(good):
            new, images = attack_batch(self.defense, self.attacks, x, y, keys, self.cfg.job.seed)
            rows += new
            by_key = {(r["attack_index"], r["key"]): r for r in new}
            for idx, x_adv in images.items():
                hwc = x_adv.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
                for j, s in enumerate(batch):
                    r = by_key[(idx, s.key)]
                    lineage = {"source_shard": url, "source_key": s.key, "shard": sid,
                               "config_hash": self.config_hash, "seed": self.cfg.job.seed,
                               **{k: r[k] for k in LINEAGE_COLUMNS}}
                    builders[idx].add_sample(s.key, hwc[j], s.label, {"json": json.dumps(lineage).encode()})
        outputs = []
        for idx, b in builders.items():
            name = f"{sid}-a{idx}.tar"
            data = b.finish()
            storage.put_bytes(storage.join(self.cfg.job.output, ADVERSARIAL_DIR, name), data)
            outputs.append(shards.index_entry(name, len(b), data))
        return rows, outputs

    def _purify(self, good: list[shards.Sample], sid: str) -> tuple[list[dict[str, Any]], list[dict]]:
        """Purify given images (an adversarial set with lineage, or any corpus); the first
        run's purified images are written as a shard with the same keys."""
        builder = shards.TarBuilder()
        rows: list[dict[str, Any]] = []
        for batch, x, y, keys in self._batches(good):
            infos = [{**NO_ATTACK, **{k: s.meta[k] for k in LINEAGE_COLUMNS if k in s.meta}} for s in batch]
            new, purified = purify_batch(self.defense, x, y, keys, self.cfg.job.seed, self.cfg.evaluation.runs, infos)
            rows += new
            hwc = purified.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
            for j, s in enumerate(batch):
                meta = {**s.meta, "purifier": self.provenance["purifier"],
                        "purifier_params": self.provenance["purifier_params"], "purify_config_hash": self.config_hash}
                builder.add_sample(s.key, hwc[j], s.label, {"json": json.dumps(meta).encode()})
        name = f"{sid}.tar"
        data = builder.finish()
        storage.put_bytes(storage.join(self.cfg.job.output, PURIFIED_DIR, name), data)
        return rows, [shards.index_entry(name, len(builder), data)]
