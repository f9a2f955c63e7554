"""The output shard, built as samples complete.

Members go to a spooled temporary file (memory up to shards.SPOOL_BYTES, local disk beyond), so
building a shard does not hold it twice; the whole shard is read back once for the atomic
`storage.put_bytes` (a temporary name + rename locally, one PUT or a completed multipart
upload on S3): a reader sees the complete shard or none. Headers are reproducible (mtime 0,
mode 0644, no owner); names are the input's, `<key>.<extension>`.
"""
from __future__ import annotations

from pipeline.io.shards import TarBuilder


class TarSink:
    """The output shard: each sample's members carried over as they are, under the input's
    key (no key checks: a corpus keeps its names), spooled by `shards.TarBuilder`."""

    def __init__(self) -> None:
        self._tar = TarBuilder(pax=True)
        self.samples = 0

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        for ext, data in members:
            self._tar.add_member(f"{key}.{ext}", data)
        self.samples += 1

    def finish(self) -> bytes:
        """The complete shard (end-of-archive blocks written); the sink is closed."""
        return self._tar.finish()

    def discard(self) -> None:
        self._tar.discard()
