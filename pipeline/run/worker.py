"""ShardWorker: one per GPU (or CPU slot). Builds its models once; turns one shard into one
committed result: read → stage → write images → commit records. It never decides what
runs next: the driver does.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import numpy as np
import torch

from pipeline import config as config_mod
from pipeline import schema
from pipeline.evaluation import shard as stages
from pipeline.evaluation.protocol import build_protocol
from pipeline.io import shards, storage
from pipeline.run import commit, faults

# where the attack and purify stages write their image shards, under the job's output
IMAGE_DIRS = {"attack": "adversarial", "purify": "purified"}


def _versions() -> dict[str, str]:
    """The software that produced a result, for the report's provenance."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("advpure", "ray", "pyarrow", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _node_id() -> str | None:
    """The Ray node this worker runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # not in a Ray worker
        return None


def _gpu_ids() -> list[str]:
    """The node's GPU ids Ray assigned to this worker ([] outside Ray or without GPUs)."""
    try:
        import ray

        return [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:  # not in a Ray worker
        return []


def _device_name(device: torch.device) -> str:
    """cpu, or cuda:<id> naming the node's GPU this worker was given."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    ids = _gpu_ids()
    # Ray narrows CUDA_VISIBLE_DEVICES to the assigned GPUs: torch's index i is the node's ids[i]
    return f"cuda:{ids[index] if index < len(ids) else index}"


def _mark_nonfinite(row: dict[str, Any]) -> dict[str, Any]:
    """A row whose defended logits hold NaN or ±inf (a diverged purifier) is a per-sample
    error, not a result: its predictions would be argmax of garbage."""
    logits = row.get("purified_mean_logits")
    if logits is None or np.isfinite(np.asarray(logits, dtype=np.float64)).all():
        return row
    return {**row, "status": schema.Status.NONFINITE.value,
            "error": "non-finite purified logits (NaN or inf): the purifier or classifier diverged"}


def _total_nfe(rows: list[dict[str, Any]]) -> int:
    """Model evaluations a shard cost: Σ over rows of attack_nfe + purify_nfe (shown as
    evaluations/s by the driver's progress bar)."""
    return int(sum(int(r.get("attack_nfe") or 0) + int(r.get("purify_nfe") or 0) for r in rows))


class ShardWorker:
    """The worker's logic without Ray (the driver wraps it in `ray.remote`), so it can be
    tested and run in-process."""

    def __init__(self, cfg_dict: dict[str, Any], cpus: float = 1.0):
        self.cfg = config_mod.from_dict(cfg_dict, source="<worker>")
        torch.set_num_threads(max(1, int(cpus)))
        self.protocol = build_protocol(self.cfg)

    def ready(self) -> dict[str, Any]:
        p = self.protocol
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(p.device), "node_id": _node_id(),
                "gpu_ids": _gpu_ids(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "flags": p.defense.purifier.flags(), "gradients": {a.index: a.gradient for a in p.attacks}}

    def process(self, url: str, sid: str, stage: str = "evaluate", expected: int | None = None) -> dict[str, Any]:
        """One shard → image shards (attack / purify stages), then records, then the marker."""
        t0 = time.time()
        faults.inject(self.cfg.faults, sid)
        samples = shards.read_shard(url, expected)[: self.cfg.data.max_samples_per_shard]
        if stage not in stages.STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        good = [s for s in samples if s.error is None]
        result = stages.STAGES[stage](self.protocol, good)
        outputs = [self._write_images(stage, sid, url, name, items) for name, items in result.images.items()]
        common = {**self.protocol.provenance, "schema_version": schema.SCHEMA_VERSION, "stage": stage, "shard": sid,
                  "node_id": _node_id(), "host": socket.gethostname(), "device": _device_name(self.protocol.device)}
        rows = [{**common, "key": s.key, "label": s.label, "status": schema.Status.DECODE_ERROR.value,
                 "error": s.error} for s in samples if s.error is not None]
        rows += [_mark_nonfinite({**common, **r, "status": schema.Status.OK.value, "error": None})
                 for r in result.rows]
        return commit.commit_records(self.cfg.job.output, stage, sid, rows, {
            "source": url, "samples": len(samples), "config_hash": self.protocol.provenance["config_hash"],
            "seconds": time.time() - t0, "host": socket.gethostname(), "device": str(self.protocol.device),
            "node_id": _node_id(), "gpu_ids": _gpu_ids(), "pid": os.getpid(), "checks": result.checks,
            "outputs": outputs, "versions": _versions(), "nfe": _total_nfe(result.rows)})

    def _write_images(self, stage: str, sid: str, url: str, name: str, items: list) -> dict[str, Any]:
        """One image shard with the input's keys; each sample's json carries its lineage."""
        prov = self.protocol.provenance
        builder = shards.TarBuilder()
        for sample, image, extra in items:
            if stage == "attack":
                meta = {"source_shard": url, "source_key": sample.key, "shard": sid,
                        "config_hash": prov["config_hash"], "seed": prov["seed"], **extra}
            else:
                meta = {**sample.meta, "purifier": prov["purifier"], "purifier_params": prov["purifier_params"],
                        "purify_config_hash": prov["config_hash"]}
            builder.add_sample(sample.key, image, sample.label, {"json": json.dumps(meta).encode()})
        file = f"{sid}-a{name}.tar" if stage == "attack" else f"{sid}.tar"
        data = builder.finish()
        storage.put_bytes(storage.join(self.cfg.job.output, IMAGE_DIRS[stage], file), data)
        return shards.index_entry(file, len(builder), data)
