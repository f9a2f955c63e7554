"""WebDataset shards: expand patterns, write shards with an index, read and validate them.

A sample is the group of tar members sharing a key (the name up to the first dot):
`<key>.png` (image), `<key>.cls` (label as text), optional `<key>.json` (metadata), and for
adversarial / purified sets `<key>.npy` (float32 [H, W, C] in [0, 1], exact: an 8-bit PNG
would round the perturbation away), which takes precedence over the PNG when present.
Reading checks what a cut-short copy would hide: the end-of-archive blocks and, where
an index exists, the sample count.

Two ways to read, one reader underneath (`iter_shard` over `TarStream`): `read_shard` (every
sample decoded into a list: fine for small shards, the report and the planner) and
`ShardStream` (decoded in a background thread into a bounded queue of chunks: what the
evaluation worker uses, so its memory depends on the batch and queue sizes, not the shard's).
`TarStream` is the streaming tar reader the corpus reader (pipeline/corpus/reader.py) uses too.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import queue
import tarfile
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from pipeline.io import storage

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
BLOCK = 512
STREAM_READ = 1 << 16            # bytes per read from the raw stream (tarfile's buffer size)
_TAIL = 4 * STREAM_READ          # raw bytes kept for the end check: more than tarfile's read-ahead
SPOOL_BYTES = 32 * 2**20         # an image shard being built stays in memory up to this, then on disk
INDEX_FORMAT = "advpure-shards/1"
IMAGE_EXTS = ("png", "jpg", "jpeg", "ppm", "pgm", "bmp", "webp")


class ShardError(RuntimeError):
    """A shard that is missing, truncated or corrupt; the message names it."""


def expand(patterns: str | Sequence[str]) -> list[str]:
    """Brace-expand shard patterns (`shard-{000000..000099}.tar`), keeping order, no repeats."""
    import braceexpand

    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for p in patterns:
        for url in braceexpand.braceexpand(p):
            if url not in out:
                out.append(url)
    return out


def shard_id(url: str) -> str:
    """Stable id of a shard: its file name without .tar (unique within a job's shard list)."""
    name = storage.basename(url)
    return name[:-4] if name.endswith(".tar") else name


def unique_ids(urls: Sequence[str]) -> list[str]:
    ids = [shard_id(u) for u in urls]
    if len(set(ids)) != len(ids):
        # same file names in different folders: qualify with a short hash of the full URL
        ids = [f"{i}-{hashlib.sha256(u.encode()).hexdigest()[:8]}" for i, u in zip(ids, urls)]
    return ids


# ---------------------------------------------------------------------------- decode

@dataclass
class Sample:
    key: str
    image: np.ndarray | None          # uint8 [H, W, C], or float32 [H, W, C] in [0, 1] from .npy
    label: int
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None          # set when the sample could not be decoded


def decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        arr = np.asarray(im.convert("L" if im.mode in ("L", "I", "1", "P") and _is_gray(im) else "RGB"))
    return arr[..., None] if arr.ndim == 2 else arr


def _is_gray(im) -> bool:
    return im.mode in ("L", "I", "1") or (im.mode == "P" and im.palette is not None and im.palette.mode == "L")


def encode_npy(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.dtype != np.float32 or arr.ndim != 3:
        raise ValueError(f"npy image must be float32 [H, W, C], got {arr.dtype} {arr.shape}")
    return arr


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8 → float32 /255; float32 images are already in [0, 1]."""
    return image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    arr = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _group(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    key, parts = None, {}
    for name, data in members:
        base = name.rsplit("/", 1)[-1]
        if "." not in base:
            raise ShardError(f"{url}: member {name!r} has no extension; not a WebDataset shard")
        prefix = name[: len(name) - len(base)]
        k, ext = base.split(".", 1)
        k = prefix + k
        if k != key:
            if key is not None:
                yield key, parts
            key, parts = k, {}
        parts[ext.lower()] = data
    if key is not None:
        yield key, parts


def decode_sample(key: str, parts: dict[str, bytes]) -> Sample:
    label = -1
    try:
        if "cls" in parts:
            label = int(parts["cls"].decode().strip())
        meta = json.loads(parts["json"]) if "json" in parts else {}
        if "npy" in parts:
            return Sample(key, decode_npy(parts["npy"]), label, meta)
        ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if ext is None:
            return Sample(key, None, label, error=f"no image member (have {sorted(parts)})")
        return Sample(key, decode_image(parts[ext]), label, meta)
    except Exception as err:  # a broken sample becomes a status row, not a lost shard
        return Sample(key, None, label, error=f"{type(err).__name__}: {err}")


def read_shard(url: str, expected_samples: int | None = None) -> list[Sample]:
    """All samples of one shard, decoded and validated (`iter_shard`'s checks); raises
    ShardError naming the shard. For small reads: the report's images, the planner."""
    return list(iter_shard(url, expected_samples))


# ---------------------------------------------------------------------------- stream

class TrackedStream:
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
            chunk = self.read(STREAM_READ)
            if not chunk:
                break
            clean = chunk.count(0) == len(chunk)
        if not clean:
            raise ShardError(f"{self.url}: corrupt tar: non-zero bytes from byte {end} on, where the archive "
                             "stopped (a broken member header, or data after the end-of-archive blocks)")
        if self.pos - end < 2 * BLOCK:
            raise ShardError(f"{self.url}: truncated tar: no end-of-archive blocks after byte {end} "
                             f"({self.pos} bytes in all; file cut short?)")


class TarStream:
    """The members of one tar as they arrive: tarfile's stream mode 'r|' over
    `storage.open_read` (local, s3:// and https:// alike), never more than a read buffer ahead.

    In stream mode tarfile stops quietly at a missing, cut-short or broken header, so a
    truncated archive would look complete: once it stops, the raw bytes must hold at least two
    zero blocks where it stopped and nothing but zeros after them. Iterating yields
    (member, its bytes) — None for what is not a regular file or is over `max_member_bytes`
    (its data is skipped, not read) — and raises ShardError naming the shard for what makes
    it unusable, a member's data cut short included."""

    def __init__(self, url: str, max_member_bytes: int | None = None):
        self.url = url
        self.max_member_bytes = max_member_bytes
        self._src: TrackedStream | None = None

    @property
    def bytes_read(self) -> int:
        return self._src.pos if self._src is not None else 0

    def __iter__(self) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
        try:
            raw = storage.open_read(self.url)
        except FileNotFoundError:
            raise ShardError(f"{self.url}: shard not found") from None
        except OSError as err:
            raise ShardError(f"{self.url}: cannot read shard: {err}") from err
        src = self._src = TrackedStream(raw, self.url)
        try:
            with tarfile.open(fileobj=src, mode="r|", bufsize=STREAM_READ) as tar:
                for m in tar:
                    if not m.isfile() or (self.max_member_bytes is not None and m.size > self.max_member_bytes):
                        yield m, None
                        continue
                    f = tar.extractfile(m)  # read here: a cut-short member is the shard's error
                    yield m, (f.read() if f else b"")
                end = tar.offset
            src.check_end(end)
        except tarfile.TarError as err:
            what = "empty file (0 bytes), not a tar" if src.pos == 0 else f"corrupt or truncated tar: {err}"
            raise ShardError(f"{self.url}: {what}") from err
        finally:
            raw.close()


def iter_shard(url: str, expected_samples: int | None = None, limit: int | None = None) -> Iterator[Sample]:
    """The samples of one shard, decoded as their members arrive (one sample's bytes held at a
    time). Only the first `limit` are decoded and yielded, but every one is read and counted.
    Its checks — end-of-archive blocks, adjacent keys, the index's count — raise ShardError
    naming the shard; they end the iteration, so a caller that consumed it to the end has a
    validated shard."""
    stream = TarStream(url)

    def members() -> Iterator[tuple[str, bytes]]:
        for m, data in stream:
            if data is not None:
                yield m.name, data

    seen: set[str] = set()
    for key, parts in _group(members(), url):
        if key in seen:
            raise ShardError(f"{url}: duplicate sample keys (members of a sample must be adjacent)")
        seen.add(key)
        if limit is None or len(seen) <= limit:
            yield decode_sample(key, parts)
    if expected_samples is not None and len(seen) != expected_samples:
        raise ShardError(f"{url}: holds {len(seen)} samples, the index says {expected_samples} (truncated?)")


_END = object()


class _Failed:
    def __init__(self, err: BaseException):
        self.err = err


class ShardStream:
    """One shard's samples, decoded by a background thread into a bounded queue of chunks.

    Decoded samples alive at once: at most `depth` chunks queued, one being filled and what
    the consumer holds — so memory follows chunk and depth, not the shard. Iterating yields
    the good samples (decode errors are kept aside in `errors`, they become status rows);
    it ends only after the whole archive was read and validated, and a ShardError from the
    reader is raised in the consumer. `finish()` says whether that happened: call it before
    committing anything."""

    def __init__(self, url: str, expected_samples: int | None = None, limit: int | None = None,
                 chunk: int = 64, depth: int = 2):
        if chunk < 1 or depth < 1:
            raise ValueError("chunk and depth must be ≥ 1")
        self.url, self.chunk, self.depth = url, chunk, depth
        self.errors: list[Sample] = []
        self.samples = 0          # samples handed out (good and failed): the shard's sample count
        self.produced = 0         # decoded by the thread
        self.consumed = 0         # taken from the queue by the consumer
        self.max_queued = 0       # most chunks seen waiting in the queue (≤ depth)
        self._done = False
        self._q: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._source = iter_shard(url, expected_samples, limit)
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"decode-{storage.basename(url)}")
        self._thread.start()

    def _put(self, obj: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(obj, timeout=0.1)
            except queue.Full:
                continue
            self.max_queued = max(self.max_queued, self._q.qsize())
            return True
        return False

    def _run(self) -> None:
        buf: list[Sample] = []
        try:
            for s in self._source:
                buf.append(s)
                self.produced += 1
                if len(buf) == self.chunk:
                    if not self._put(buf):
                        return
                    buf = []
            if (not buf or self._put(buf)) and self._put(_END):
                return
        except BaseException as err:  # the consumer raises it: the shard fails as a whole
            self._put(_Failed(err))
        finally:
            self._source.close()  # closes the raw stream when the consumer stopped early

    def __iter__(self) -> Iterator[Sample]:
        while True:
            item = self._q.get()
            if item is _END:
                self._done = True
                return
            if isinstance(item, _Failed):
                raise item.err
            self.consumed += len(item)
            for s in item:
                self.samples += 1
                if s.error is None:
                    yield s
                else:
                    self.errors.append(s)

    def finish(self) -> None:
        """Raise unless every sample was consumed and the archive validated."""
        if not self._done:
            raise RuntimeError(f"{self.url}: the stage stopped before the end of the shard; nothing committed")
        self._thread.join()

    def close(self) -> None:
        """Stop the decode thread (after a failure); it closes the shard's stream."""
        self._stop.set()
        self._thread.join(timeout=30.0)


# ---------------------------------------------------------------------------- index

def index_url_for(shard_url: str) -> str:
    return storage.join(storage.dirname(shard_url), INDEX_NAME)


def load_index(url: str) -> dict[str, dict[str, Any]]:
    """{shard file name: entry} from an index.json; {} when there is none."""
    if not storage.exists(url):
        return {}
    try:
        doc = json.loads(storage.read_text(url))
        if doc.get("format") != INDEX_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {INDEX_FORMAT!r}")
        return {e["name"]: e for e in doc["shards"]}
    except (ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{url}: unreadable shard index: {err}") from err


def expected_counts(urls: Sequence[str], index_url: str | None = None) -> dict[str, int | None]:
    """Sample count per shard URL from the index beside each shard (or the given index)."""
    cache: dict[str, dict] = {}
    out: dict[str, int | None] = {}
    for u in urls:
        iu = index_url or index_url_for(u)
        if iu not in cache:
            cache[iu] = load_index(iu)
        entry = cache[iu].get(storage.basename(u))
        out[u] = int(entry["samples"]) if entry else None
    return out


# ---------------------------------------------------------------------------- write

class TarBuilder:
    """One shard's bytes, built with reproducible headers (mtime 0). `pax`: names that ustar
    cannot hold (long, non-ASCII: a web corpus's keys) get an extended header; plain names
    stay plain ustar."""

    def __init__(self, pax: bool = False) -> None:
        # spooled: a large image shard goes to local disk while built, not held twice in memory
        self._buf = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self._tar = tarfile.open(fileobj=self._buf, mode="w",
                                 format=tarfile.PAX_FORMAT if pax else tarfile.USTAR_FORMAT)
        self.keys: set[str] = set()

    def add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0
        self._tar.addfile(info, io.BytesIO(data))

    def add_sample(self, key: str, image: np.ndarray | None = None, label: int | None = None,
                   extra: dict[str, bytes] | None = None, image_bytes: bytes | None = None) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if key in self.keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self.keys.add(key)
        if image_bytes is not None or image is not None:
            png = image_bytes if image_bytes is not None else encode_png(
                image if image.dtype == np.uint8 else np.clip(np.rint(image * 255), 0, 255).astype(np.uint8))
            self.add_member(f"{key}.png", png)
            if image is not None and image.dtype != np.uint8:
                self.add_member(f"{key}.npy", encode_npy(image))
        if label is not None:
            self.add_member(f"{key}.cls", str(int(label)).encode())
        for ext, data in (extra or {}).items():
            self.add_member(f"{key}.{ext}", data)

    def __len__(self) -> int:
        return len(self.keys)

    def finish(self) -> bytes:
        self._tar.close()  # writes the end-of-archive blocks
        self._buf.seek(0)
        data = self._buf.read()
        self._buf.close()
        return data

    def discard(self) -> None:
        self._tar.close()
        self._buf.close()


def index_entry(name: str, samples: int, data: bytes) -> dict[str, Any]:
    return {"name": name, "samples": samples, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_index(directory: str, entries: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> dict:
    doc = {"format": INDEX_FORMAT, **(meta or {}), "total_samples": sum(e["samples"] for e in entries),
           "shards": entries}
    storage.put_text(storage.join(directory, INDEX_NAME), json.dumps(doc, indent=1))
    return doc


class ShardWriter:
    """Writes samples into `<prefix>-NNNNNN.tar` shards of at most `samples_per_shard`,
    each committed atomically, then an index.json listing names, counts and checksums."""

    def __init__(self, directory: str, prefix: str = "shard", samples_per_shard: int = 1000,
                 meta: dict[str, Any] | None = None):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be ≥ 1")
        self.directory = directory
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.meta = dict(meta or {})
        self.entries: list[dict[str, Any]] = []
        self._builder: TarBuilder | None = None
        self._keys: set[str] = set()

    def write(self, key: str, image: np.ndarray | None = None, label: int | None = None,
              extra: dict[str, bytes] | None = None, image_bytes: bytes | None = None) -> None:
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if self._builder is None:
            self._builder = TarBuilder()
        self._builder.add_sample(key, image, label, extra, image_bytes)
        self._keys.add(key)
        if len(self._builder) >= self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if self._builder is None:
            return
        n = len(self._builder)
        data = self._builder.finish()
        name = f"{self.prefix}-{len(self.entries):06d}.tar"
        storage.put_bytes(storage.join(self.directory, name), data)
        self.entries.append(index_entry(name, n, data))
        self._builder = None

    def close(self) -> dict[str, Any]:
        self._flush()
        return write_index(self.directory, self.entries, self.meta)

    def pattern(self) -> str:
        n = len(self.entries)
        if n == 1:
            return storage.join(self.directory, self.entries[0]["name"])
        return storage.join(self.directory, f"{self.prefix}-{{000000..{n - 1:06d}}}.tar")
