"""pipeline.evaluation.preflight: a model fed the wrong images is refused before work starts
(input size against the checkpoint's recorded one, labels against the classifier's classes).
The report's clean-accuracy-above-chance check: tests/test_record_checks.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import config
from pipeline.config import ConfigError
from pipeline.evaluation import preflight
from pipeline.io import checkpoints, shards
from tests.conftest import job_dict


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict:
    """Checkpoints as training writes them (accuracy does not matter here): one quick epoch."""
    from pipeline.train import recipes

    d = tmp_path_factory.mktemp("tiny_models")
    recipes.train_small_cnn(str(d / "cnn.pt"), "digits", "train", epochs=1, width=4, limit=64)
    recipes.train_small_dae(str(d / "dae.pt"), "digits", "train", epochs=1, width=4)
    return {"cnn": str(d / "cnn.pt"), "dae": str(d / "dae.pt")}


def _write_shard(directory, size: int, labels: list[int]) -> str:
    w = shards.ShardWriter(str(directory), samples_per_shard=len(labels))
    rng = np.random.default_rng(0)
    for i, label in enumerate(labels):
        w.write(f"img-{i:03d}", rng.integers(0, 256, (size, size, 1), dtype=np.uint8), label)
    w.close()
    return w.pattern()


def _cfg(pattern: str, models: dict, tmp_path) -> config.Config:
    return config.from_dict(job_dict(pattern, models, str(tmp_path / "out")), "job.yaml")


# ---------------------------------------------------------------------------- before work starts

def test_checkpoints_record_the_training_input_shape(tiny_models):
    assert checkpoints.input_shape(tiny_models["cnn"]) == (1, 8, 8)
    assert checkpoints.input_shape(tiny_models["dae"]) == (1, 8, 8)


def test_images_of_another_size_are_refused_naming_both_sizes(tiny_models, tmp_path):
    pattern = _write_shard(tmp_path / "big", 28, [0, 1, 2])
    with pytest.raises(ConfigError) as err:
        preflight.check(_cfg(pattern, tiny_models, tmp_path), shards.expand(pattern)[0])
    assert str(err.value) == (
        f"job.yaml: data.shards: the images are 1×28×28 (C×H×W; sample img-000 of {tmp_path / 'big'}/shard-000000.tar)"
        f" but the classifier (classifier.params.checkpoint: {tiny_models['cnn']}) was trained on 1×8×8 images; "
        "resize the images to 8×8 before `advpure make-shards`, or use a classifier trained on 28×28 images")


def test_the_right_size_passes_and_a_first_label_outside_the_classes_is_refused(tiny_models, tmp_path):
    pattern = _write_shard(tmp_path / "small", 8, [0, 9, 3])
    preflight.check(_cfg(pattern, tiny_models, tmp_path), shards.expand(pattern)[0])
    pattern = _write_shard(tmp_path / "twelve", 8, [12, 3])
    with pytest.raises(ConfigError, match=r"sample img-000 of .*: labels 12 are outside the classifier's 10 classes"):
        preflight.check(_cfg(pattern, tiny_models, tmp_path), shards.expand(pattern)[0])


def test_a_later_label_outside_the_classes_fails_its_shard_by_name(tiny_models, tmp_path):
    from pipeline.run.worker import ShardWorker

    pattern = _write_shard(tmp_path / "late", 8, [1, 2, 3, 14, 15, -1])
    cfg = config.from_dict(job_dict(pattern, tiny_models, str(tmp_path / "out"), attacks=[]))
    with pytest.raises(ValueError, match=r"labels -1, 14, 15 are outside the classifier's 10 classes \(0–9"):
        ShardWorker(cfg.to_dict()).process(shards.expand(pattern)[0], "shard-000000")
    preflight.check_labels(torch.arange(10), 10, "x")
