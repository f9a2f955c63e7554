"""pipeline.io.shards: writing, reading, validating and naming WebDataset shards (making them from
datasets: tests/test_make_shards.py)."""
import io
import tarfile

import numpy as np
import pytest

from pipeline.io import shards
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
