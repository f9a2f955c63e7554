"""Loading and saving network weights, local or s3://, always with weights_only=True.

Our own checkpoints are plain dicts: {"arch": str, "arch_params": dict, "state_dict": ...,
"meta": dict}; meta["input_shape"] is [C, H, W] of the training images (recorded since
checkpoints were checked against the data; older ones lack it). Published formats (plain
state dicts, NCSNv2 lists) have loaders next to the networks that read them.
"""
from __future__ import annotations

import hashlib
import io
from typing import Any

import torch

from pipeline.io import storage

INPUT_SHAPE = "input_shape"   # meta key: [C, H, W] of the images the network was trained on


class CheckpointError(RuntimeError):
    pass


def load_raw(url: str) -> Any:
    """torch.load a checkpoint from a local path or URL, safely."""
    if not storage.exists(url):
        raise CheckpointError(f"checkpoint not found: {url}")
    data = storage.read_bytes(url)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickle of a non-tensor object, ...
        raise CheckpointError(f"cannot load checkpoint {url}: {err}") from err


def sha256(url: str) -> str:
    return hashlib.sha256(storage.read_bytes(url)).hexdigest()


def save(url: str, arch: str, arch_params: dict, state_dict: dict, meta: dict | None = None) -> None:
    buf = io.BytesIO()
    torch.save({"arch": arch, "arch_params": dict(arch_params), "state_dict": state_dict,
                "meta": dict(meta or {})}, buf)
    storage.put_bytes(url, buf.getvalue())


def load_ours(url: str, expect_arch: str | None = None) -> dict:
    ckpt = load_raw(url)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "arch" not in ckpt:
        raise CheckpointError(f"{url}: not an advpure checkpoint (expected keys arch, state_dict)")
    if expect_arch is not None and ckpt["arch"] != expect_arch:
        raise CheckpointError(f"{url}: holds a {ckpt['arch']!r} network, expected {expect_arch!r}")
    return ckpt


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    """Remove a DataParallel-style prefix from every key that has it."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_state_strict(module: torch.nn.Module, state_dict: dict, source: str) -> None:
    try:
        missing, unexpected = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{source}: state dict does not fit {type(module).__name__}: {detail}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: state dict does not match {type(module).__name__}: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")


def input_shape(url: str) -> tuple[int, int, int] | None:
    """(C, H, W) the network at `url` was trained on, from an advpure checkpoint's meta;
    None for published formats and older checkpoints that do not record it."""
    ckpt = load_raw(url)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    shape = meta.get(INPUT_SHAPE) if isinstance(meta, dict) else None
    return tuple(int(v) for v in shape) if isinstance(shape, (list, tuple)) and len(shape) == 3 else None
