"""pipeline.io.make_shards: shards from digits, MNIST, CIFAR-10 batches and image folders
(ImageNet's validation layouts: tests/test_imagenet_shards.py)."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from pipeline.io import datasets, shards
from pipeline.io.make_shards import make_shards


def test_make_shards_digits(tmp_path):
    doc = make_shards("digits", str(tmp_path), split="test", samples_per_shard=100)
    assert doc["total_samples"] == 360 and len(doc["shards"]) == 4
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["source"] == "digits" and index["num_classes"] == 10


@pytest.mark.skipif(not datasets.mnist_available(), reason="MNIST test set not found at ../shared/data/mnist "
                    "(set ADVPURE_MNIST_DIR)")
def test_make_shards_mnist_matches_idx(tmp_path):
    datasets.verify_mnist_test()
    doc = make_shards("mnist", str(tmp_path), split="t10k-holdout", samples_per_shard=1000)
    assert doc["total_samples"] == 2000
    images, labels = datasets.load_mnist()
    got = shards.read_shard(str(tmp_path / "shard-000001.tar"), 1000)
    assert got[0].key == "mnist-9000" and got[0].label == labels[9000]
    assert np.array_equal(got[0].image, images[9000])


def test_make_shards_cifar10_batches(tmp_path):
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(5, 3072), dtype=np.uint8)
    with open(src / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": [3, 1, 4, 1, 5]}, f)
    doc = make_shards("cifar10", str(tmp_path / "out"), path=str(src), split="test", samples_per_shard=2)
    assert doc["total_samples"] == 5 and len(doc["shards"]) == 3
    s = shards.read_shard(str(tmp_path / "out" / "shard-000000.tar"))[0]
    assert s.image.shape == (32, 32, 3) and s.label == 3
    assert np.array_equal(s.image, data[0].reshape(3, 32, 32).transpose(1, 2, 0))


def test_make_shards_image_folder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / cls / f"im.{i}.png")
    doc = make_shards("folder", str(tmp_path / "out"), path=str(tmp_path / "imgs"), samples_per_shard=10)
    assert doc["total_samples"] == 4 and doc["classes"] == ["cat", "dog"]
    got = shards.read_shard(str(tmp_path / "out" / "shard-000000.tar"))
    assert [s.label for s in got] == [0, 0, 1, 1]
    assert got[0].key == "cat_im_0" and got[0].image.shape == (6, 6, 3)
