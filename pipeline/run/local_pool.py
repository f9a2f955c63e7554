"""The in-process executor (`cluster.executor: local`): the job's one worker (a ShardWorker,
or the corpus job's CorpusWorker) is built in the driver's own process, so a small job pays
no Ray start (8 s of a 13.5 s job on a 2-core machine, BENCHMARKS.md "Executors"). The
driver schedules it exactly as it schedules actors —
the same queue, commit markers, lease, resume, retries and quarantine (`scheduler._schedule`);
only what an actor is and how its calls return differ, so `LocalPool` has ActorPool's interface.

Why in the driver's process and not a child: a child would pay torch's import and the models
as an actor does, and a synchronous call needs no messages, pickling or process management.
The worker's class (and with it torch) is imported only when this executor starts it: the
driver on Ray imports neither. What that costs:
- a shard runs in the driver's main thread, so the driver checks its lease and prints
  progress between shards, not during one;
- `cluster.shard_timeout_s` cannot be enforced (a Python call cannot be killed): a shard
  past it is logged, not killed; a hung shard needs Ctrl-C (or SIGTERM), which unwinds it
  like any interruption — nothing of it is committed;
- a worker that dies (os._exit, out of memory) takes the driver with it; the next run resumes
  from the committed shards. Hence `auto` picks Ray for fault injection that kills or hangs.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Any

from pipeline.config import Config
from pipeline.run.actor_host import WorkerKind
from pipeline.run.pool import Task, WorkerPool

log = logging.getLogger(__name__)


def choose_executor(cfg: Config) -> tuple[str, str]:
    """(local | ray, why): the executor this job runs on. `auto` picks local for a job that
    asks one machine for one worker — no cluster named (cluster.address, RAY_ADDRESS), none
    already started in this process, num_workers 1 — and Ray otherwise (also for injected
    faults that kill or hang a worker: they need a worker process apart from the driver)."""
    c = cfg.cluster
    if c.executor != "auto":
        return c.executor, "cluster.executor"
    if c.address not in (None, "", "local") or os.environ.get("RAY_ADDRESS"):
        return "ray", "auto: a Ray cluster is named (cluster.address or RAY_ADDRESS)"
    if ray_started():
        return "ray", "auto: Ray is already initialised in this process"
    if c.num_workers != 1:
        return "ray", f"auto: cluster.num_workers is {c.num_workers}"
    if any(f.mode in ("exit", "hang") for f in cfg.faults):
        return "ray", "auto: injected faults that kill or hang a worker need it in its own process"
    return "local", "auto: one worker on this machine (cluster.num_workers 1, no cluster address)"


def ray_started() -> bool:
    """Whether this process has initialised Ray."""
    import sys

    ray = sys.modules.get("ray")   # not imported: not started (and importing it costs a second)
    return bool(ray is not None and ray.is_initialized())


class ShardError(RuntimeError):
    """A shard (or the worker's construction) raised in-process: 'Type: message', as Ray's
    RayTaskError ends, so the driver's messages read the same on both executors."""


class _Call:
    """A finished in-process call: its value, or the error it raised (ActorPool's ObjectRef)."""

    def __init__(self, fn, *args) -> None:
        self.value: Any = None
        self.error: ShardError | None = None
        try:
            self.value = fn(*args)
        except Exception as err:  # noqa: BLE001 - a shard's failure is the scheduler's to judge
            log.info("in-process call failed (the driver retries or quarantines it):\n%s", traceback.format_exc())
            self.error = ShardError(f"{type(err).__name__}: {err}")


class LocalPool(WorkerPool):
    """At most one worker, in this process; ActorPool's interface and bookkeeping
    (starting, idle, running) so that `scheduler._schedule` drives it unchanged. Calls run at
    once, synchronously: `start` builds the worker, `submit` runs the shard, `wait` hands
    back what finished."""

    max_workers = 1
    task_errors: tuple[type[BaseException], ...] = (ShardError,)
    worker_errors: tuple[type[BaseException], ...] = ()   # an in-process worker cannot die alone

    def __init__(self, cfg: Config, worker: WorkerKind) -> None:
        c = cfg.cluster
        self.req = {"CPU": c.cpus_per_worker, "GPU": 0.0}   # nothing is reserved: informational
        # imported at the first start (torch with it); this process knows every stage
        self._make = lambda: worker.load()(cfg.to_dict(), c.cpus_per_worker)
        super().__init__(cfg, worker)
        self._timeout_s = c.shard_timeout_s

    def start(self, n: int = 1) -> None:
        for _ in range(n):
            built = _Call(self._make)   # the worker; its ready() answer is what a start returns
            call = built if built.error is not None else _Call(built.value.ready)
            self.starting[call] = (built.value, time.monotonic())

    def call(self, worker: Any, method: str, *args: Any) -> _Call:
        return _Call(getattr(worker, method), *args)

    def submit(self, s, stage: str, reserve=None) -> None:
        w = self.idle.pop()
        started = time.time()
        if reserve is not None:
            call = _Call(w.process, s.url, s.sid, stage, s.expected, (reserve.url, reserve.expected))
        else:
            call = _Call(w.process, s.url, s.sid, stage, s.expected)
        self.running[call] = Task(w, s, started, reserve)
        took = time.time() - started
        if took > self._timeout_s:
            log.warning("shard %s took %.0fs, past cluster.shard_timeout_s (%.0fs): the local executor cannot stop "
                        "a shard, so that deadline is not enforced (cluster.executor: ray enforces it)",
                        s.sid, took, self._timeout_s)

    def steal(self):
        return None   # one worker: a reserved shard has no other worker to go to

    def wait(self, refs: list[Any]) -> tuple[list[Any], list[Any]]:
        return refs[:1], refs[1:]   # every call has finished by the time it is listed

    def get(self, ref: _Call) -> Any:
        if ref.error is not None:
            raise ref.error
        return ref.value

    def expired(self, timeout_s: float) -> list[Any]:
        return []   # an in-process call cannot be stopped; submit logs one that ran past the deadline

    def kill(self, worker: Any) -> None:
        """Drop a worker (the driver replaces it with a fresh one)."""
        if worker in self.idle:
            self.idle.remove(worker)

    def kill_all(self) -> None:
        workers = self.idle + [t.actor for t in self.running.values()]
        self.idle, self.running, self.starting = [], {}, {}
        for w in workers:
            if hasattr(w, "close"):
                w.close()   # a prefetched shard's decoding thread
