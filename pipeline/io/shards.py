"""WebDataset shards: expand patterns, write shards with an index, read and validate them.

A sample is the group of tar members sharing a key (the name up to the first dot):
`<key>.png` (image), `<key>.cls` (label as text), optional `<key>.json` (metadata), and for
adversarial / purified sets `<key>.npy` (float32 [H, W, C] in [0, 1], exact: an 8-bit PNG
would round the perturbation away), which takes precedence over the PNG when present.
Reading checks what a cut-short copy would hide: the end-of-archive blocks and, where
an index exists, the sample count.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from pipeline.io import storage

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
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


def _check_trailer(data: bytes, url: str) -> None:
    """A complete tar ends with at least two 512-byte zero blocks after the last member."""
    if len(data) < 1024 or len(data) % 512:
        raise ShardError(f"{url}: truncated tar ({len(data)} bytes is not a whole number of 512-byte blocks)")
    if data[-1024:] != b"\0" * 1024:
        raise ShardError(f"{url}: truncated tar: no end-of-archive blocks (file cut short?)")


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
    """All samples of one shard, validated; raises ShardError naming the shard."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise ShardError(f"{url}: shard not found") from None
    except OSError as err:
        raise ShardError(f"{url}: cannot read shard: {err}") from err
    _check_trailer(data, url)
    members = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if m.isfile():
                    f = tar.extractfile(m)
                    members.append((m.name, f.read() if f else b""))
    except tarfile.TarError as err:
        raise ShardError(f"{url}: corrupt tar: {err}") from err
    samples = [decode_sample(k, parts) for k, parts in _group(members, url)]
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        raise ShardError(f"{url}: duplicate sample keys (members of a sample must be adjacent)")
    if expected_samples is not None and len(samples) != expected_samples:
        raise ShardError(f"{url}: holds {len(samples)} samples, the index says {expected_samples} (truncated?)")
    return samples


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
    """One shard's bytes, built in memory with reproducible headers (mtime 0)."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.USTAR_FORMAT)
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
        return self._buf.getvalue()


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
