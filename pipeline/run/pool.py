"""What a pool of shard workers keeps for the driver's scheduler (`scheduler._schedule`), whatever
runs the workers: Ray actors (`scheduler.ActorPool`) or the driver's own process
(`local_pool.LocalPool`). The subclasses differ in how a worker starts, runs a shard and ends."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.run.actor_host import WorkerKind


@dataclass
class Task:
    """A shard running on a worker, and the shard reserved to follow it there (prefetched)."""
    actor: Any
    shard: Any   # scheduler.ShardState
    started: float
    reserved: Any = None


class WorkerPool:
    """Workers starting (ready call → worker, since), idle, and running (shard call → Task)."""

    max_workers: int | None = None   # None: as many as the caller wants

    def __init__(self, cfg: Any, worker: WorkerKind):
        self.prefetch = cfg.cluster.prefetch_shards and worker.prefetch
        self.starting: dict[Any, tuple[Any, float]] = {}
        self.idle: list[Any] = []
        self.running: dict[Any, Task] = {}
        self.info: dict[int, dict[str, Any]] = {}   # id(worker) → its ready() answer
        self.start_failures = 0

    def start(self, n: int = 1) -> None:
        raise NotImplementedError

    def call(self, worker: Any, method: str, *args: Any) -> Any:
        """Call one of a worker's methods; the returned call is read with `get`."""
        raise NotImplementedError

    def live(self) -> int:
        return len(self.idle) + len(self.running)

    def reserved(self) -> int:
        return sum(t.reserved is not None for t in self.running.values())

    def top_up(self, want: int) -> None:
        """Start workers until live + starting reaches `want` (at most max_workers)."""
        if self.max_workers is not None:
            want = min(want, self.max_workers)
        self.start(max(0, want - self.live() - len(self.starting)))

    def refs(self) -> list[Any]:
        return list(self.running) + list(self.starting)
