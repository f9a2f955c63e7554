"""`advpure purify` with input, output and records on S3 (SeaweedFS on 127.0.0.1, moto's
server as the fallback; see tests/s3server.py), through Ray workers, then resumed."""
from __future__ import annotations

import io
import json
import tarfile
import uuid

import pytest

from pipeline import cli
from pipeline.corpus import synth
from pipeline.corpus.worker import STAGE
from pipeline.io import storage
from pipeline.run import commit
from tests import s3server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    yield from s3server.pytest_fixture_body(tmp_path_factory)


@pytest.fixture(scope="module")
def ray_s3(s3):
    """Local Ray started after the S3 environment is set: its workers inherit AWS_*."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_purify_s3_to_s3_then_resume(ray_s3, s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # nothing may land in a local "s3:" folder
    root = s3.url("corpus", uuid.uuid4().hex[:6])
    pattern = synth.write_corpus(storage.join(root, "in"), shards=2, per_shard=6, height=18, width=26)
    out = storage.join(root, "out")
    args = ["purify", pattern, out, "--purifier", "none", "--resize", "8", "--restore-size", "--workers", "2"]
    assert cli.main(args) == 0
    wids = json.loads(storage.read_text(storage.join(out, "wids-index.json")))
    assert [(e["url"], e["nsamples"]) for e in wids["shardlist"]] == [("train-000000.tar", 6), ("train-000001.tar", 6)]
    for e in wids["shardlist"]:
        data = storage.read_bytes(storage.join(out, e["url"]))
        assert len(data) == e["filesize"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = [m.name for m in tar]
        src = storage.read_bytes(storage.join(root, "in", e["url"]))
        with tarfile.open(fileobj=io.BytesIO(src)) as tar:
            assert names == [m.name for m in tar]     # same members, same order
    table = commit.load_records(out, STAGE)
    assert table.num_rows == 12 and set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("output_width").to_pylist()) == {26}      # restored to the input size
    assert list(tmp_path.iterdir()) == []
    markers = {k: m["parquet"] for k, m in commit.committed(out, STAGE).items()}

    assert cli.main(args) == 0                        # resume: nothing left to do
    assert {k: m["parquet"] for k, m in commit.committed(out, STAGE).items()} == markers
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert {s["status"] for s in manifest["stages"][STAGE]["shards"].values()} == {"skipped"}
    assert manifest["corpus"]["ok"] == 12
