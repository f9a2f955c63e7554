"""What every job's worker (run/worker.py ShardWorker, corpus/worker.py CorpusWorker) does
the same, in the worker's process (torch): read its config, set up the process (torch threads,
the host memory policy: `host.prepare_compute_process`), say where it runs (`ready`, the
markers' host / node / device / versions), and run the job's pre-work data check.
"""
from __future__ import annotations

import os
import platform
import socket
import sys
from typing import Any

import torch

from pipeline import config as config_mod
from pipeline.config import Config, ConfigError
from pipeline.run import host


def versions() -> dict[str, str]:
    """The software that produced a result, for the report's provenance."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("advpure", "ray", "pyarrow", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def gpu_ids() -> list[str]:
    """The node's GPU ids Ray assigned to this worker ([] outside Ray or without GPUs)."""
    ray = sys.modules.get("ray")   # a Ray worker has it; the local executor need not import it
    try:
        return [str(g) for g in ray.get_gpu_ids()] if ray is not None and ray.is_initialized() else []
    except Exception:  # not in a Ray worker
        return []


def device_name(device: torch.device) -> str:
    """cpu, or cuda:<id> naming the node's GPU this worker was given."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    ids = gpu_ids()
    # Ray narrows CUDA_VISIBLE_DEVICES to the assigned GPUs: torch's index i is the node's ids[i]
    return f"cuda:{ids[index] if index < len(ids) else index}"


class WorkerBase:
    """A job's worker without Ray (an `actor_host.ActorHost` holds it in an actor; the local
    executor holds it in the driver's process). A subclass builds its models after
    `super().__init__`, sets `device`, and answers `describe` and `data_check`."""

    device: torch.device = torch.device("cpu")

    def __init__(self, cfg_dict: dict[str, Any], cpus: float = 1.0):
        self.cfg_dict = cfg_dict
        self.cfg = config_mod.from_dict(cfg_dict, source="<worker>")
        host.prepare_compute_process(self.compute_threads(cpus))

    def compute_threads(self, cpus: float) -> int:
        """torch's intra-op threads out of the CPUs this worker was given."""
        return max(1, int(cpus))

    def describe(self) -> dict[str, Any]:
        """What `ready()` adds about the worker's models (the purifier's flags, ...)."""
        return {}

    def data_check(self, cfg: Config, url: str) -> None:
        """The job's checks of its data against its models before any work (ConfigError naming
        the fix); `url` is the job's first shard."""

    def ready(self) -> dict[str, Any]:
        """Where this worker runs, for the driver's log and the manifest's `workers`."""
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device),
                "node_id": host.node_id(), "gpu_ids": gpu_ids(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), **self.describe()}

    def placement(self) -> dict[str, Any]:
        """Where a shard was computed, for its commit marker."""
        return {"host": socket.gethostname(), "device": str(self.device), "node_id": host.node_id(),
                "gpu_ids": gpu_ids(), "pid": os.getpid(), "versions": versions()}

    def check_data(self, url: str, source: str) -> str | None:
        """`data_check` with messages naming the user's config file `source`: the problem's
        message, or None when the data passes (other errors raise)."""
        try:
            self.data_check(config_mod.from_dict(self.cfg_dict, source=source), url)
        except ConfigError as err:
            return str(err)
        return None

    def close(self) -> None:
        """Release what outlives a shard (the local executor's worker ends with the job)."""
