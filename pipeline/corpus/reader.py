"""Stream a WebDataset shard into samples without holding the shard in memory.

Members are read as they arrive (tarfile stream mode 'r|' over `storage.open_read`, so local,
s3:// and https:// alike) and grouped into samples by WebDataset's rule: the key is the member
name up to the first dot of its base name, and a sample's members are adjacent. Every member's
bytes are kept as they are, so the writer can carry them over unchanged.

In stream mode tarfile stops quietly at a missing, cut-short or broken header, so a truncated
archive would look complete. The reader therefore watches the raw bytes and, once tarfile
stops, requires at least two zero blocks where it stopped and nothing but zeros after them.
"""
from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipeline.io import storage
from pipeline.io.shards import ShardError
from pipeline.schema import CorpusStatus

log = logging.getLogger(__name__)

BLOCK = 512
MAX_MEMBER_BYTES = 256 * 2**20   # a bigger member is not read (a sample with it becomes an error row)
_READ = 1 << 16                  # bytes per read from the raw stream (tarfile's buffer size)
_TAIL = 4 * _READ                # raw bytes kept for the end check: more than tarfile's read-ahead


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


class _Tracked:
    """A raw byte stream that counts what was read and keeps the last `_TAIL` bytes, so the
    end of the archive can be checked after tarfile (which buffers) has stopped."""

    def __init__(self, raw: Any, url: str):
        self.raw, self.url = raw, url
        self.pos = 0
        self.tail = bytearray()

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.raw.read(n) if n is not None and n >= 0 else self.raw.read()
        except Exception as err:  # boto3 / urllib / OS errors mid-stream: the shard is retried
            raise ShardError(f"{self.url}: read failed after {self.pos} bytes: {err}") from err
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > 2 * _TAIL:  # trim now and then, not on every read
            del self.tail[:-_TAIL]
        return data

    def check_end(self, end: int) -> None:
        """The archive proper ends at `end`; from there on only zero blocks, at least two."""
        start = self.pos - len(self.tail)
        if end < start:
            raise ShardError(f"{self.url}: cannot check the end of the archive (stopped at {end}, "
                             f"tracked from {start})")
        after = bytes(self.tail[end - start:])
        clean = after.count(0) == len(after)
        while clean:  # what tarfile did not read: padding up to the record size, or junk
            chunk = self.read(_READ)
            if not chunk:
                break
            clean = chunk.count(0) == len(chunk)
        if not clean:
            raise ShardError(f"{self.url}: corrupt tar: non-zero bytes from byte {end} on, where the archive "
                             "stopped (a broken member header, or data after the end-of-archive blocks)")
        if self.pos - end < 2 * BLOCK:
            raise ShardError(f"{self.url}: truncated tar: no end-of-archive blocks after byte {end} "
                             f"({self.pos} bytes in all; file cut short?)")


class ShardReader:
    """Iterate the samples of one shard; raises ShardError (naming the shard) for what makes
    the whole shard unusable: missing, not a tar, truncated, corrupt."""

    def __init__(self, url: str, max_member_bytes: int = MAX_MEMBER_BYTES):
        self.url = url
        self.max_member_bytes = max_member_bytes
        self.non_file_members = 0   # directories, links: no data, not part of any sample
        self.samples = 0            # keyed samples (what an index counts); stray members excluded
        self._src: _Tracked | None = None

    @property
    def bytes_read(self) -> int:
        """Raw bytes read so far (the archive is read as it is consumed, never ahead of it)."""
        return self._src.pos if self._src is not None else 0

    def __iter__(self) -> Iterator[RawSample]:
        try:
            raw = storage.open_read(self.url)
        except FileNotFoundError:
            raise ShardError(f"{self.url}: shard not found") from None
        except OSError as err:
            raise ShardError(f"{self.url}: cannot read shard: {err}") from err
        src = self._src = _Tracked(raw, self.url)
        try:
            with tarfile.open(fileobj=src, mode="r|", bufsize=_READ) as tar:
                yield from self._group(self._members(tar))
                end = tar.offset
            src.check_end(end)
        except tarfile.TarError as err:
            what = "empty file (0 bytes), not a tar" if src.pos == 0 else f"corrupt or truncated tar: {err}"
            raise ShardError(f"{self.url}: {what}") from err
        finally:
            raw.close()

    def _members(self, tar: tarfile.TarFile) -> Iterator[tuple[str, bytes, str | None]]:
        """(name, bytes, problem) per regular member, read as it arrives."""
        for m in tar:
            if not m.isfile():
                self.non_file_members += 1
                log.debug("%s: member %r is not a regular file; not part of any sample", self.url, m.name)
                continue
            if m.size > self.max_member_bytes:  # not read: tarfile skips its data on the next header
                yield m.name, b"", f"member {m.name!r} has {m.size} bytes, over the {self.max_member_bytes} limit"
                continue
            f = tar.extractfile(m)
            yield m.name, (f.read() if f else b""), None

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
