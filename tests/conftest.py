"""Shared fixtures: digits shards, tiny trained models, a local Ray instance."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray on loopback only: read when ray is first imported (docs/storage_and_cluster.md)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# evaluation.channels_last: auto resolves to contiguous in every job the tests run (workers,
# subprocesses and Ray actors inherit it): tests compare separate runs' records bit for bit, and
# two workers' timings may choose different formats. tests/test_memory_format.py unsets it.
os.environ["ADVPURE_CHANNELS_LAST"] = "false"


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> dict:
    """The held-out digits split (360 samples) in 4 shards of 90."""
    from pipeline.io.make_shards import make_shards

    d = tmp_path_factory.mktemp("digits_shards")
    doc = make_shards("digits", str(d), split="test", samples_per_shard=90)
    return {"dir": str(d), "pattern": doc["pattern"], "doc": doc}


@pytest.fixture(scope="session")
def digits_models(tmp_path_factory) -> dict:
    """A small CNN and a small DAE trained briefly on the digits train split."""
    from pipeline.train import recipes as models

    d = tmp_path_factory.mktemp("digits_models")
    cnn, dae = str(d / "cnn.pt"), str(d / "dae.pt")
    models.train_small_cnn(cnn, "digits", "train", epochs=12, width=16)
    models.train_small_dae(dae, "digits", "train", epochs=8, width=16)
    return {"cnn": cnn, "dae": dae}


def evaluate_counting_purifier_rows(p, samples, monkeypatch) -> tuple[list[dict], int]:
    """A shard's evaluate rows, and the rows the purifier ran to make them (the cost a saving
    must cut while every verdict stays). The protocol is settled first (row chunk and memory
    format: their timing runs the purifier too, once per worker, and is not the evaluation's)."""
    from pipeline.evaluation import row_chunks, stages

    b = next(stages.batches(samples[:p.batch_size], p.batch_size, p.device))
    row_chunks.settle(p, b.x, b.y, b.keys)
    purify, count = p.defense.purifier.purify, [0]

    def counting(x, noise=None):
        count[0] += x.shape[0]
        return purify(x, noise)

    monkeypatch.setattr(p.defense.purifier, "purify", counting)
    rows = stages.evaluate(p, samples).rows
    monkeypatch.setattr(p.defense.purifier, "purify", purify)
    return rows, count[0]


def job_dict(shards: str, models: dict, output: str, **overrides) -> dict:
    """A small evaluation job over digits shards; `overrides` replace whole sections."""
    cfg = {
        "job": {"name": "test", "output": output, "seed": 0},
        "data": {"shards": shards, "batch_size": 64},
        "classifier": {"name": "small_cnn", "params": {"checkpoint": models["cnn"]}},
        "purifier": {"name": "dae", "params": {"checkpoint": models["dae"]}},
        "attacks": [{"name": "pgd", "params": {"eps": 0.2, "steps": 3, "step_size": 0.08}}],
        "evaluation": {"runs": 1},
        "cluster": {"num_workers": 2, "cpus_per_worker": 1, "max_attempts": 2, "shard_timeout_s": 120},
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance per test module (the driver reuses an initialised Ray)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    yield ray
    ray.shutdown()
