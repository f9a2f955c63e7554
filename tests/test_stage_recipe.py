"""The new-stage recipe of ARCHITECTURE.md, proved: a stage registered from outside the
pipeline package (here, this file: no other module edited) runs through the real driver on
local Ray, writes its image shards and commits its records, and the commit/resume logic,
the output index and the report's stage list find them; a second run has nothing to do.

The toy stage flips each image left-right (numpy only). Fast on purpose: an untrained small
CNN (the protocol every worker builds needs a classifier; the stage never calls it), the
no purifier, no attacks, digits shards capped at 24 samples."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pytest
import torch

from pipeline import config, stage_table
from pipeline.classifiers import small_cnn
from pipeline.evaluation.stages import StageOutput
from pipeline.io import checkpoints, shards
from pipeline.io.shards import Sample, to_unit_float
from pipeline.report import load
from pipeline.run import commit, driver
from pipeline.stage_table import ImageOutput, Origin, Stage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CAP = 24   # samples per shard
# the worker actors import the stage's functions by these names (Ray puts the driver's working
# directory, the repository root, on their path; `tests` is a namespace package)
FLIP = Stage("flip", "tests.test_stage_recipe:flip",
             images=ImageOutput("flipped", "{sid}-{output}.tar", "tests.test_stage_recipe:flip_lineage"))


def flip(p: Any, samples: Iterable[Sample], emit=None) -> StageOutput:
    """The stage: each sample's image flipped left-right, one record per sample."""
    out = StageOutput([], images={"lr": []})
    put = emit or (lambda name, items: out.images[name].extend(items))
    chunk: list[tuple[Sample, np.ndarray, dict[str, Any]]] = []
    for s in samples:
        chunk.append((s, np.ascontiguousarray(to_unit_float(s.image)[:, ::-1]), {"flip": "left-right"}))
        out.rows.append({"key": s.key, "label": s.label})
        if len(chunk) == p.batch_size:
            put("lr", chunk)
            chunk = []
    if chunk:
        put("lr", chunk)
    return out


def flip_lineage(sample: Sample, extra: dict[str, Any], origin: Origin) -> dict[str, Any]:
    return {"source_shard": origin.url, "source_key": sample.key, "config_hash": origin.provenance["config_hash"],
            **extra}


@pytest.fixture
def flip_stage():
    stage_table.register(FLIP)
    yield FLIP
    stage_table.unregister(FLIP.name)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> str:
    torch.manual_seed(0)
    url = str(tmp_path_factory.mktemp("cnn") / "cnn.pt")
    params = {"in_channels": 1, "num_classes": 10, "width": 4}
    checkpoints.save(url, small_cnn.ARCH, params, small_cnn.make(**params).state_dict())
    return url


def _job(digits_shards, cnn: str, out: Path) -> dict[str, Any]:
    return {"job": {"name": "flip", "output": str(out), "seed": 0, "stages": ["flip"]},
            "data": {"shards": digits_shards["pattern"], "batch_size": 16, "max_samples_per_shard": CAP},
            "classifier": {"name": "small_cnn", "params": {"checkpoint": cnn}},
            "purifier": {"name": "none"}, "attacks": [],
            "evaluation": {"runs": 1, "device": "cpu"},
            "cluster": {"num_workers": 2, "cpus_per_worker": 1, "max_attempts": 1, "shard_timeout_s": 120}}


def _check_images(output: str, markers: dict[str, dict[str, Any]]) -> None:
    """Every committed shard's image shard: the source images flipped, with their lineage."""
    index = json.loads(Path(output, "flipped", shards.INDEX_NAME).read_text())
    assert index["stage"] == "flip" and index["total_samples"] == CAP * len(markers)
    assert sorted(e["name"] for e in index["shards"]) == sorted(f"{sid}-lr.tar" for sid in markers)
    for sid, marker in markers.items():
        assert [o["name"] for o in marker["outputs"]] == [f"{sid}-lr.tar"]
        source = {s.key: s for s in shards.read_shard(marker["source"])}
        flipped = shards.read_shard(str(Path(output, "flipped", f"{sid}-lr.tar")))
        assert len(flipped) == CAP
        for s in flipped:
            assert s.meta["source_key"] == s.key and s.meta["source_shard"] == marker["source"]
            assert s.meta["flip"] == "left-right" and s.label == source[s.key].label
            np.testing.assert_allclose(to_unit_float(s.image), to_unit_float(source[s.key].image)[:, ::-1])


def test_a_registered_stage_runs_through_the_driver_and_resumes(ray_local, flip_stage, digits_shards, cnn,
                                                                 tmp_path):
    cfg = config.from_dict(_job(digits_shards, cnn, tmp_path / "out"))
    out = cfg.job.output
    code, manifest = driver.run(cfg)
    assert code == driver.EXIT_OK, manifest
    assert all(s["status"] == "committed" for s in manifest["stages"]["flip"]["shards"].values())
    markers = commit.committed(out, "flip")
    assert len(markers) == 4 and commit.committed_counts(out)["flip"] == 4
    rows = commit.load_records(out, "flip").to_pylist()
    assert len(rows) == 4 * CAP and len({r["key"] for r in rows}) == 4 * CAP
    assert {r["stage"] for r in rows} == {"flip"} and {r["status"] for r in rows} == {"ok"}
    _check_images(out, markers)
    assert load.committed_stages(out) == ["flip"]          # the report finds the stage's records

    files = {p: p.stat().st_mtime_ns for p in Path(out).rglob("*") if p.suffix in (".parquet", ".tar")}
    code, manifest = driver.run(cfg)                        # the same job again: nothing to do
    assert code == driver.EXIT_OK
    assert all(s["status"] == "skipped" for s in manifest["stages"]["flip"]["shards"].values())
    assert files == {p: p.stat().st_mtime_ns for p in Path(out).rglob("*") if p.suffix in (".parquet", ".tar")}


def test_a_stage_is_known_to_config_only_while_registered(flip_stage, digits_shards, cnn, tmp_path):
    job = _job(digits_shards, cnn, tmp_path / "out")
    assert config.from_dict(job).job.stages == ("flip",)
    stage_table.unregister("flip")
    with pytest.raises(config.ConfigError, match=r"job.stages\[0\]: 'flip' is not one of \['evaluate', 'attack', "):
        config.from_dict(job)


def test_the_table_refuses_what_would_break_a_job(flip_stage):
    with pytest.raises(ValueError, match="already registered"):
        stage_table.register(Stage("flip", "tests.test_stage_recipe:other"))
    with pytest.raises(ValueError, match="reads 'evaluate', which is no registered stage writing images"):
        stage_table.register(Stage("after", "tests.test_stage_recipe:flip", reads="evaluate"))
    with pytest.raises(ValueError, match="not a 'module:function' name"):
        stage_table.register(Stage("bare", "flip"))
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        stage_table.get("nope")
    assert stage_table.added(["evaluate", "flip"]) == [FLIP]
