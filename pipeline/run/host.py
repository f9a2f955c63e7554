"""The C allocator and torch threads of a process that computes (an evaluation or corpus
worker, `advpure plan`'s calibration), and the Ray node it runs on.

Why the allocator: a purification step allocates and frees the same large buffers again and
again (a checkpointed segment's graph, a batch's activations). glibc by default gives freed
buffers back to the kernel — large ones are mmap'd and unmapped, the heap's top is trimmed —
so every step faults its pages in afresh; on a CPU that costs about as much as the recomputation
checkpointing adds (BENCHMARKS.md, "Gradient checkpointing"). A worker's peak recurs at every
batch, so keeping freed memory costs it nothing at its peak. Only this process is affected.
Between shards the worker hands what it holds back (`release_freed_memory`), so its resident
memory does not creep up with the number of shards it has run.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024      # glibc's largest: buffers below it come from the heap
TRIM_THRESHOLD = 2**31 - 1              # the heap's free top is returned only beyond this (mallopt takes an int)
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc (musl and macOS have no such knobs), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]   # an out-of-range value raises, not wraps
    return libc


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed buffers of up to 32 MiB in the heap and not to trim it below
    2 GiB of free top. True when set; False on another C library, or when the environment
    sets either threshold (the user's setting wins, and is how to opt out)."""
    libc = _glibc()
    if libc is None or any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def prepare_compute_process(cpus: float) -> None:
    """torch's intra-op threads to the CPUs this process was given; freed memory kept."""
    torch.set_num_threads(max(1, int(cpus)))
    keep_freed_memory()


def release_freed_memory() -> None:
    """Hand memory freed so far back to the OS (glibc's malloc_trim; nothing on another C
    library). Called between shards: glibc keeps freed blocks of every thread's arena
    otherwise, and resident memory would creep up with the number of shards."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    ray = sys.modules.get("ray")   # a Ray worker has it; the local executor need not import it
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    except Exception:  # not in a Ray worker
        return None
