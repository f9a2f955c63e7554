import io
import json
import pickle
import tarfile

import numpy as np
import pytest

from pipeline.io import datasets, shards
from pipeline.io.make_shards import make_shards
from pipeline.io.shards import ShardError, ShardWriter


def _write(tmp_path, n=10, per_shard=4):
    w = ShardWriter(str(tmp_path), samples_per_shard=per_shard)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)
    for i in range(n):
        w.write(f"s{i:03d}", images[i], i % 10)
    doc = w.close()
    return doc, images


def test_roundtrip_and_index(tmp_path):
    doc, images = _write(tmp_path)
    assert [e["samples"] for e in doc["shards"]] == [4, 4, 2]
    urls = shards.expand(str(tmp_path / "shard-{000000..000002}.tar"))
    counts = shards.expected_counts(urls)
    got = [s for u in urls for s in shards.read_shard(u, counts[u])]
    assert [s.key for s in got] == [f"s{i:03d}" for i in range(10)]
    assert np.array_equal(np.stack([s.image for s in got]), images)   # PNG is lossless
    assert [s.label for s in got] == [i % 10 for i in range(10)]


def test_written_shards_are_readable_by_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    _write(tmp_path, n=4, per_shard=4)
    ds = wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False).decode("l8")
    samples = list(ds)
    assert [s["__key__"] for s in samples] == ["s000", "s001", "s002", "s003"]
    assert samples[0]["png"].shape == (8, 8)


def test_truncated_at_file_boundary_is_named(tmp_path):
    _write(tmp_path, n=4, per_shard=4)
    url = tmp_path / "shard-000000.tar"
    data = url.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        members = t.getmembers()
    # cut right after the 2nd sample's members: a valid-looking tar with no end blocks
    cut = members[4].offset
    url.write_bytes(data[:cut])
    with pytest.raises(ShardError, match="shard-000000.tar: truncated tar: no end-of-archive"):
        shards.read_shard(str(url))


def test_count_mismatch_with_index_is_named(tmp_path):
    _write(tmp_path, n=4, per_shard=4)
    url = str(tmp_path / "shard-000000.tar")
    with pytest.raises(ShardError, match="holds 4 samples, the index says 5"):
        shards.read_shard(url, expected_samples=5)


def test_rebuilt_shorter_tar_caught_by_index(tmp_path):
    """A shard re-packed with fewer samples (valid tar, end blocks present) fails the index count."""
    _write(tmp_path, n=4, per_shard=4)
    url = tmp_path / "shard-000000.tar"
    src = tarfile.open(url)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src.getmembers()[:4]:
            dst.addfile(m, src.extractfile(m))
    src.close()
    url.write_bytes(buf.getvalue())
    counts = shards.expected_counts([str(url)])
    with pytest.raises(ShardError, match="the index says 4"):
        shards.read_shard(str(url), counts[str(url)])


def test_corrupt_and_missing_shards_are_named(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar" * 100 + b"\0" * 1024 + b"x" * (512 - (1700 + 1024) % 512))
    with pytest.raises(ShardError, match="bad.tar"):
        shards.read_shard(str(bad))
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 255, 4096, dtype=np.uint8).tobytes() + b"\0" * 1024)
    with pytest.raises(ShardError, match="garbage.tar"):
        shards.read_shard(str(garbage))
    with pytest.raises(ShardError, match="absent.tar: shard not found"):
        shards.read_shard(str(tmp_path / "absent.tar"))


def test_undecodable_sample_becomes_a_status_not_a_lost_shard(tmp_path):
    w = ShardWriter(str(tmp_path), samples_per_shard=10)
    w.write("good", np.zeros((8, 8, 1), np.uint8), 1)
    w.write("bad", image_bytes=b"not a png", label=2)
    w.close()
    got = shards.read_shard(str(tmp_path / "shard-000000.tar"))
    assert got[0].error is None and got[1].error and got[1].label == 2


def test_brace_expansion_and_ids():
    urls = shards.expand("d/shard-{000000..000002}.tar")
    assert urls == ["d/shard-000000.tar", "d/shard-000001.tar", "d/shard-000002.tar"]
    assert shards.unique_ids(urls) == ["shard-000000", "shard-000001", "shard-000002"]
    ids = shards.unique_ids(["a/s.tar", "b/s.tar"])
    assert len(set(ids)) == 2 and all(i.startswith("s-") for i in ids)


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


def test_cifar_loader_refuses_code_in_pickles(tmp_path):
    src = tmp_path / "c"
    src.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(src / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(datasets.DatasetError, match="refusing to unpickle"):
        datasets.load_cifar10(str(src))


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
