"""Counter-based randomness keyed by (run seed, sample key, context, replica).

Every row of a batch owns a 64-bit key derived on the host from
(seed, sample key, context, replica index). A draw hashes (row key, purpose, step,
element index) with a 32-bit integer mixer, so a row's noise depends on nothing else:
not the batch it sits in, the shard order, the actor, the device count or a retry.
The hash is plain tensor arithmetic, so it runs unchanged on CPU and GPU.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

_MASK32 = 0xFFFFFFFF


def _digest64(*parts: object) -> int:
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


def _i32(c: int) -> int:
    """A uint32 constant as the int32 with the same bits."""
    c &= _MASK32
    return c - 2**32 if c >= 2**31 else c


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    # logical shift on int32 bit patterns (>> is arithmetic on signed ints)
    return (x >> s) & ((1 << (32 - s)) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """"lowbias32" integer hash (C. Wellons) on uint32 bit patterns held in int32.

    int32 multiplication wraps modulo 2**32 on CPU and CUDA, which is the arithmetic
    the hash needs; tests pin it against a pure-Python reference.
    """
    x = x ^ _shr(x, 16)
    x = x * _i32(0x7FEB352D)
    x = x ^ _shr(x, 15)
    x = x * _i32(0x846CA68B)
    return x ^ _shr(x, 16)


class Noise:
    """Keyed noise for N rows; row i is (sample keys[i // replicas], replica i % replicas).

    Rows are sample-major, matching `x.repeat_interleave(replicas, 0)`. Row keys are two
    uint32 words per row, held as int32 bit patterns.
    """

    def __init__(self, row_keys: torch.Tensor):
        if row_keys.dtype != torch.int32 or row_keys.dim() != 2 or row_keys.shape[1] != 2:
            raise ValueError("row_keys must be an int32 tensor of shape [rows, 2]")
        self.row_keys = row_keys

    @classmethod
    def for_batch(
        cls,
        seed: int,
        keys: Sequence[str],
        context: str,
        replicas: int = 1,
        device: torch.device | str = "cpu",
    ) -> "Noise":
        words = []
        for key in keys:
            for r in range(replicas):
                d = _digest64(seed, key, context, r)
                words.append((_i32(d), _i32(d >> 32)))
        rows = torch.tensor(words, dtype=torch.int32, device=device).reshape(-1, 2)
        return cls(rows)

    @classmethod
    def unkeyed(cls, rows: int, device: torch.device | str = "cpu") -> "Noise":
        """Fresh keys from torch's global generator, for ad-hoc use outside the pipeline."""
        keys = torch.randint(-(2**31), 2**31 - 1, (rows, 2), dtype=torch.int32, device=device)
        return cls(keys)

    @property
    def rows(self) -> int:
        return self.row_keys.shape[0]

    @property
    def device(self) -> torch.device:
        return self.row_keys.device

    def to(self, device: torch.device | str) -> "Noise":
        return Noise(self.row_keys.to(device))

    def select(self, index: torch.Tensor | slice) -> "Noise":
        return Noise(self.row_keys[index])

    def repeat(self, replicas: int) -> "Noise":
        """Each row split into `replicas` independent rows (sample-major)."""
        k = self.row_keys.repeat_interleave(replicas, 0)
        r = torch.arange(replicas, device=self.device, dtype=torch.int32).repeat(self.rows)
        k0 = _mix32(k[:, 0] ^ _mix32(r ^ _i32(0x51ED270B)))
        return Noise(torch.stack([k0, _mix32(k[:, 1] ^ k0)], 1))

    def bits(self, shape: Sequence[int], purpose: str, step: int = 0) -> torch.Tensor:
        """uint32 bit patterns (int32) of shape [rows, *shape]."""
        p = _digest64(purpose, step)
        # per-row work first (cheap), then two mixing rounds per element
        a = _mix32(self.row_keys[:, :1] ^ _i32(p))
        b = _mix32(self.row_keys[:, 1:] ^ a ^ _i32(p >> 32))
        elem = torch.arange(math.prod(shape), device=self.device, dtype=torch.int32)
        h = _mix32((elem * _i32(0x9E3779B9))[None, :] ^ a)
        h = _mix32(h ^ b)
        return h.reshape(self.rows, *shape)

    def _unit(self, shape: Sequence[int], purpose: str, step: int, dtype: torch.dtype) -> torch.Tensor:
        # top 24 bits → exactly representable floats in the open interval (0, 1)
        top = _shr(self.bits(shape, purpose, step), 8)
        return (top.to(dtype) + 0.5) * (1.0 / 2**24)

    def uniform(self, shape: Sequence[int], purpose: str, step: int = 0, low: float = 0.0,
                high: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform on the open interval (low, high)."""
        return low + (high - low) * self._unit(shape, purpose, step, dtype)

    def normal(self, shape: Sequence[int], purpose: str, step: int = 0,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal by Box–Muller; both outputs of each uniform pair are used."""
        n = math.prod(shape)
        half = (n + 1) // 2
        u = self._unit((2, half), purpose, step, dtype)
        radius = torch.sqrt(-2.0 * torch.log(u[:, 0]))
        angle = (2.0 * math.pi) * u[:, 1]
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], 1)[:, :n]
        return z.reshape(self.rows, *shape)

    def randint(self, shape: Sequence[int], purpose: str, high: int, step: int = 0) -> torch.Tensor:
        return _shr(self.bits(shape, purpose, step), 1).to(torch.int64) % high


def config_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for torch.Generator derived from a run seed and labels (training jobs)."""
    return _digest64(seed, *parts) & (2**63 - 1)
