"""Shards read over http(s) from a server on 127.0.0.1."""
import functools
import http.server
import threading

import pytest

from pipeline.io import shards, storage
from pipeline.io.make_shards import make_shards


@pytest.fixture
def http_dir(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(60)
def test_read_shards_and_index_over_http(http_dir):
    root, base = http_dir
    make_shards("digits", str(root / "sh"), split="test", samples_per_shard=200)
    urls = shards.expand(f"{base}/sh/shard-{{000000..000001}}.tar")
    assert all(storage.exists(u) for u in urls)
    counts = shards.expected_counts(urls)
    assert list(counts.values()) == [200, 160]
    got = [s for u in urls for s in shards.read_shard(u, counts[u])]
    assert len(got) == 360 and got[0].key == "digits-0000"
    assert not storage.exists(f"{base}/sh/absent.tar")
    with pytest.raises(shards.ShardError, match="absent.tar"):
        shards.read_shard(f"{base}/sh/absent.tar")


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Serves one blob; the first GET is cut after `cut` bytes (the connection closed), later
    ones honour `Range: bytes=N-` (206) unless `ranges` is off; records each Range asked."""
    blob, cut, ranges, etag = b"", 0, True, '"v1"'
    seen: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        rng = self.headers.get("Range")
        type(self).seen.append((rng, self.headers.get("If-Match")))
        start = int(rng[len("bytes="):-1]) if rng and self.ranges else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(self.blob) - start))
        self.send_header("ETag", self.etag)
        self.end_headers()
        if len(type(self).seen) == 1:
            self.wfile.write(self.blob[:self.cut])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-body
            return
        self.wfile.write(self.blob[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky(tmp_path):
    make_shards("digits", str(tmp_path / "sh"), split="test", samples_per_shard=90)
    blob = (tmp_path / "sh" / "shard-000000.tar").read_bytes()
    handler = type("Handler", (_Flaky,), {"blob": blob, "cut": len(blob) * 2 // 5, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/shard-000000.tar"
    yield handler, url, str(tmp_path / "sh" / "shard-000000.tar")
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(60)
def test_a_dropped_connection_is_resumed_where_it_stopped(flaky, monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.0)
    handler, url, local = flaky
    got = shards.read_shard(url, 90)
    want = shards.read_shard(local, 90)
    assert [(s.key, s.label, s.image.tobytes()) for s in got] == [(s.key, s.label, s.image.tobytes()) for s in want]
    # the second request asked for the rest, from a byte past the start, pinned to the first ETag
    (first, _), (rng, if_match) = handler.seen
    assert first is None and if_match == '"v1"' and 0 < int(rng[len("bytes="):-1]) <= handler.cut


@pytest.mark.timeout(60)
def test_a_server_that_cannot_resume_fails_the_shard_naming_the_byte(flaky, monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.0)
    handler, url, _ = flaky
    handler.ranges = False
    with pytest.raises(shards.ShardError, match=r"does not resume at byte \d+ \(HTTP 200, no range support\)"):
        shards.read_shard(url, 90)


def test_reads_that_keep_failing_give_up_naming_the_byte(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.0)
    opened = []

    class Dead:
        def read(self, n):
            raise ConnectionResetError("reset by peer")

        def close(self):
            pass

    def open_at(url, offset, etag):
        opened.append((offset, etag))
        return Dead(), "e1", None

    with pytest.raises(storage.StorageError, match=r"x://y: reading failed 6 times at byte 0: reset by peer"):
        storage.ResumableRead("x://y", open_at).read(10)
    assert opened == [(0, None)] + [(0, "e1")] * storage.RESUME_ATTEMPTS


def test_identity_over_http_is_a_head_request(http_dir):
    root, base = http_dir
    (root / "x.tar").write_bytes(b"0123456789")
    assert storage.identities([f"{base}/x.tar"]) == {f"{base}/x.tar": {"bytes": 10}}   # no ETag from this server
