"""The output shard, built as samples complete.

Members go to a spooled temporary file (memory up to SPOOL_BYTES, local disk beyond), so
building a shard does not hold it twice; the whole shard is read back once for the atomic
`storage.put_bytes` (a temporary name + rename locally, one PUT or a completed multipart
upload on S3): a reader sees the complete shard or none. Headers are reproducible (mtime 0,
mode 0644, no owner); names are the input's, `<key>.<extension>`.
"""
from __future__ import annotations

import io
import tarfile
import tempfile

SPOOL_BYTES = 32 * 2**20


class TarSink:
    def __init__(self, spool_bytes: int = SPOOL_BYTES):
        self._file = tempfile.SpooledTemporaryFile(max_size=spool_bytes)
        # PAX: long or non-ASCII names get an extended header; plain names stay plain ustar
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.samples = 0

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def finish(self) -> bytes:
        """The complete shard (end-of-archive blocks written); the sink is closed."""
        self._tar.close()
        self._file.seek(0)
        data = self._file.read()
        self._file.close()
        return data

    def discard(self) -> None:
        self._tar.close()
        self._file.close()
