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
