"""storage.py without a server: the local commit protocol, listing, URL helpers, and the
per-process S3 client. (S3 behaviour against a real server: test_s3.py.)"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pipeline.io import storage

pytestmark = pytest.mark.timeout(60)


def _temporaries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_put_bytes_round_trip_creates_parents(tmp_path):
    url = str(tmp_path / "a" / "b" / "x.bin")
    storage.put_bytes(url, b"\x00\x01data")
    assert storage.read_bytes(url) == b"\x00\x01data"
    assert storage.exists(url)
    storage.put_text(url, "replaced")
    assert storage.read_text(url) == "replaced"
    assert _temporaries(tmp_path / "a" / "b") == []


def test_no_partial_file_is_ever_visible(tmp_path, monkeypatch):
    """While the bytes are written and synced, the target name holds the old content (or
    nothing); the new content appears by one rename."""
    url = tmp_path / "out.parquet"
    seen = []
    real_fsync = os.fsync

    def spying_fsync(fd):
        seen.append((url.read_bytes() if url.exists() else None, _temporaries(tmp_path)))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spying_fsync)
    storage.put_bytes(str(url), b"first" * 1000)
    storage.put_bytes(str(url), b"second" * 1000)
    # first fsync of each put is the data file: target absent / old, one temporary present
    assert seen[0][0] is None and len(seen[0][1]) == 1
    data_syncs = [s for s in seen if s[1]]
    assert [s[0] for s in data_syncs] == [None, b"first" * 1000]
    assert url.read_bytes() == b"second" * 1000
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_put_keeps_old_content_and_removes_temporary(tmp_path, monkeypatch, exc):
    url = str(tmp_path / "out.json")
    storage.put_text(url, "old")

    def boom(src, dst):
        raise exc

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(type(exc)):
        storage.put_text(url, "new")
    assert storage.read_text(url) == "old"
    assert _temporaries(tmp_path) == []


def test_failed_first_put_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(OSError("EIO")))
    with pytest.raises(OSError, match="EIO"):
        storage.put_bytes(str(tmp_path / "x"), b"1")
    assert list(tmp_path.iterdir()) == []


def test_concurrent_puts_never_expose_a_mix(tmp_path):
    url = str(tmp_path / "same")
    payloads = [bytes([i]) * 200_000 for i in range(6)]
    threads = [threading.Thread(target=storage.put_bytes, args=(url, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert storage.read_bytes(url) in payloads
    assert _temporaries(tmp_path) == []


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / ".shard-000001.parquet.abc123.9f8e7d6c.tmp").write_bytes(b"partial")
    (tmp_path / ".shard-000002.done.json.x.tmp").write_bytes(b"partial")
    (tmp_path / "shard-000000.parquet").write_bytes(b"whole")
    (tmp_path / "notes.tmp").write_bytes(b"not ours: no leading dot")
    assert storage.remove_stale_temporaries(str(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp", "shard-000000.parquet"]
    assert storage.remove_stale_temporaries(str(tmp_path / "missing")) == 0


def test_listdir_files_only_sorted_not_recursive(tmp_path):
    for name in ("b.json", "a.parquet", "c.done.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.txt").write_text("x")
    assert storage.listdir(str(tmp_path)) == [str(tmp_path / n) for n in ("a.parquet", "b.json", "c.done.json")]
    assert storage.listdir(str(tmp_path / "missing")) == []


def test_missing_local_file_errors_name_the_path(tmp_path):
    url = str(tmp_path / "nope.bin")
    assert not storage.exists(url)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.read_bytes(url)
    storage.remove(url)  # missing is fine


def test_http_is_read_only():
    with pytest.raises(storage.StorageError, match="read-only"):
        storage.put_bytes("https://example.invalid/x", b"")
    with pytest.raises(storage.StorageError, match="no listing"):
        storage.listdir("https://example.invalid/dir")
    with pytest.raises(storage.StorageError, match="read-only"):
        storage.remove("https://example.invalid/x")


def test_join_basename_dirname():
    assert storage.join("s3://bkt/run/", "evaluate", "/x.parquet") == "s3://bkt/run/evaluate/x.parquet"
    assert storage.join("https://h/a", "b") == "https://h/a/b"
    assert storage.join("/data/run", "evaluate", "x") == "/data/run/evaluate/x"
    assert storage.basename("s3://bkt/run/x.tar") == "x.tar"
    assert storage.basename("s3://bkt/run/") == "run"
    assert storage.basename("/a/b.tar") == "b.tar"
    assert storage.dirname("s3://bkt/run/x.tar") == "s3://bkt/run"
    assert storage.dirname("/a/b/c.tar") == "/a/b"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/s3/b")


def test_s3_url_without_bucket_is_an_error():
    with pytest.raises(storage.StorageError, match="no bucket"):
        storage.read_bytes("s3:///key")


def test_s3_client_is_per_process(monkeypatch):
    """A forked child must build its own client (connection pools do not survive fork)."""
    pytest.importorskip("boto3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never contacted
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    parent = storage._s3()
    assert storage._s3() is parent
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report whether it got a new client, then leave without cleanup
        try:
            os.write(w, b"new" if storage._s3() is not parent else b"same")
        finally:
            os._exit(0)
    os.close(w)
    try:
        answer = os.read(r, 16)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert answer == b"new"
    # another endpoint (another server) → another client
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    assert storage._s3() is not parent
