"""Stream a WebDataset shard into samples without holding the shard in memory.

Members are read as they arrive (tarfile stream mode 'r|' over `storage.open_read`, so local,
s3:// and https:// alike) and grouped into samples by WebDataset's rule: the key is the member
name up to the first dot of its base name, and a sample's members are adjacent. Every member's
bytes are kept as they are, so the writer can carry them over unchanged.

The tar level — stream mode, and the end-of-archive check that catches a truncated archive
tarfile's stream mode would take for complete — is `pipeline.io.shards.TarStream`, shared
with the evaluation worker.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

from pipeline.io.shards import TarStream
from pipeline.schema import CorpusStatus

log = logging.getLogger(__name__)

MAX_MEMBER_BYTES = 256 * 2**20   # a bigger member is not read (a sample with it becomes an error row)


@dataclass
class RawSample:
    """One sample as stored: its key and its members (extension as written, bytes), in
    archive order. `status` / `error` are set for problems found at the tar level."""

    key: str
    members: list[tuple[str, bytes]] = field(default_factory=list)
    status: str | None = None
    error: str | None = None

    def fail(self, status: CorpusStatus, error: str) -> None:
        if self.status is None:  # the first problem names the sample's fate
            self.status, self.error = status.value, error


class ShardReader:
    """Iterate the samples of one shard; raises ShardError (naming the shard) for what makes
    the whole shard unusable: missing, not a tar, truncated, corrupt."""

    def __init__(self, url: str, max_member_bytes: int = MAX_MEMBER_BYTES):
        self.url = url
        self.max_member_bytes = max_member_bytes
        self.non_file_members = 0   # directories, links: no data, not part of any sample
        self.samples = 0            # keyed samples (what an index counts); stray members excluded
        self._stream = TarStream(url, max_member_bytes)

    @property
    def bytes_read(self) -> int:
        """Raw bytes read so far (the archive is read as it is consumed, never ahead of it)."""
        return self._stream.bytes_read

    def __iter__(self) -> Iterator[RawSample]:
        yield from self._group(self._members(self._stream))

    def _members(self, stream: TarStream) -> Iterator[tuple[str, bytes, str | None]]:
        """(name, bytes, problem) per regular member, read as it arrives."""
        for m, data in stream:
            if not m.isfile():
                self.non_file_members += 1
                log.debug("%s: member %r is not a regular file; not part of any sample", self.url, m.name)
                continue
            if data is None:  # not read: tarfile skips its data on the next header
                yield m.name, b"", f"member {m.name!r} has {m.size} bytes, over the {self.max_member_bytes} limit"
                continue
            yield m.name, data, None

    def _group(self, members: Iterator[tuple[str, bytes, str | None]]) -> Iterator[RawSample]:
        cur: RawSample | None = None
        seen: set[str] = set()
        for name, data, problem in members:
            base = name.rsplit("/", 1)[-1]
            stem, dot, ext = base.partition(".")
            if not dot or not stem:  # no key.extension: WebDataset cannot place it in a sample
                yield RawSample(name, [(ext, data)], CorpusStatus.BAD_MEMBER.value,
                                f"member {name!r} is not named <key>.<extension>")
                continue
            key = name[: len(name) - len(base)] + stem
            if cur is not None and key != cur.key:
                yield cur
                cur = None
            if cur is None:
                cur = RawSample(key)
                self.samples += 1
                if key in seen:
                    cur.fail(CorpusStatus.DUPLICATE_KEY, f"key {key!r} appears again after other samples "
                                                         "(members of a sample must be adjacent)")
                seen.add(key)
            cur.members.append((ext, data))
            if problem:
                cur.fail(CorpusStatus.BAD_MEMBER, problem)
        if cur is not None:
            yield cur
