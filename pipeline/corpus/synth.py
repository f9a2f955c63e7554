"""Synthetic WebDataset image corpora, written the way img2dataset writes them (<key>.jpg,
<key>.txt, <key>.json, optional <key>.cls), for tests and benchmarks; no downloads.

Images are smooth (gradients and a few waves plus mild noise), so JPEG sizes are realistic
rather than those of white noise. Shards are written one at a time: generating a large
corpus never holds more than one shard.
"""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from typing import Iterable

import numpy as np

from pipeline.io import storage


def smooth_image(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    """uint8 [H, W, C]: a random gradient, two random waves, noise of σ ≈ 3 grey levels."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((height, width, channels), np.float32)
    for c in range(channels):
        a, b = rng.uniform(-1, 1, 2)
        f1, f2 = rng.uniform(2, 12, 2)
        p = rng.uniform(0, 6)
        g = 0.5 + 0.25 * (a * xx / max(width, 1) + b * yy / max(height, 1))
        g += 0.12 * np.sin(2 * np.pi * f1 * xx / max(width, 1) + p) * np.cos(2 * np.pi * f2 * yy / max(height, 1))
        out[..., c] = g
    out = out * 255 + rng.normal(0, 3, out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **kw) -> bytes:
    """uint8 / uint16 array → image bytes with Pillow (mode: convert first, e.g. CMYK, P)."""
    from PIL import Image

    im = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    if mode is not None and im.mode != mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" and "quality" not in kw else {}), **kw)
    return buf.getvalue()


def png16_colour(arr: np.ndarray) -> bytes:
    """A 16-bit RGB / RGBA PNG (Pillow cannot write one): the minimal IHDR / IDAT / IEND
    chunks, filter type 0 on every row."""
    h, w, c = arr.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A tar of (name, bytes) members in the given order (any names, any contents)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_members(key: str, image: bytes, ext: str = "jpg", caption: str | None = None,
                   label: int | None = None, meta: dict | None = None) -> list[tuple[str, bytes]]:
    """One img2dataset-style sample: image, caption (.txt), metadata (.json), label (.cls)."""
    out = [(f"{key}.{ext}", image)]
    if caption is not None:
        out.append((f"{key}.txt", caption.encode()))
    out.append((f"{key}.json", json.dumps({"key": key, "caption": caption, **(meta or {})}).encode()))
    if label is not None:
        out.append((f"{key}.cls", str(label).encode()))
    return out


def write_corpus(directory: str, shards: int, per_shard: int, height: int, width: int, fmt: str = "JPEG",
                 seed: int = 0, prefix: str = "train") -> str:
    """`shards` shards of `per_shard` smooth images each (a fresh image every 64 samples, the
    others reuse it: generation stays cheap, every sample is still encoded on its own key).
    Returns the brace pattern."""
    rng = np.random.default_rng(seed)
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    image = b""
    for s in range(shards):
        members: list[tuple[str, bytes]] = []
        for i in range(per_shard):
            n = s * per_shard + i
            if n % 64 == 0:
                image = encode(smooth_image(rng, height, width), fmt)
            members += sample_members(f"{n:09d}", image, ext, caption=f"synthetic image {n}", label=n % 10)
        storage.put_bytes(storage.join(directory, f"{prefix}-{s:06d}.tar"), tar_bytes(members))
    return storage.join(directory, f"{prefix}-{{000000..{shards - 1:06d}}}.tar") if shards > 1 else \
        storage.join(directory, f"{prefix}-000000.tar")
