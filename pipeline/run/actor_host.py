"""The worker class a job runs, named, not imported: the driver's process stays torch-free.

A job's worker (`run/worker.py` ShardWorker, `corpus/worker.py` CorpusWorker) imports torch and
the models. The driver names it by a "module:Class" string (`WorkerKind`), as the stage table
names its functions; Ray makes actors of `ActorHost`, which imports that class in the actor's
own process and forwards the driver's calls to it. The local executor loads the class in the
driver's process (`WorkerKind.load`), only once it has chosen to run a worker there.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WorkerKind:
    """A job's worker class by name: "module:Class", constructed `(cfg_dict, cpus[, stages])`,
    with `ready()`, `check_data(url, source)`, `process(url, sid, stage, expected[, prefetch])`
    (pipeline/run/worker_base.py). `prefetch`: process() takes the next shard to decode."""
    ref: str
    prefetch: bool = False

    @property
    def name(self) -> str:
        return self.ref.rpartition(":")[2]

    def load(self) -> type:
        """The class (imported now: in a worker's process, or the local executor's)."""
        module, _, name = self.ref.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"worker class {self.ref!r} cannot be loaded: {err}") from err


SHARD_WORKER = WorkerKind("pipeline.run.worker:ShardWorker", prefetch=True)   # the evaluation job's


class ActorHost:
    """What Ray makes an actor of: builds the named worker in the actor's process and forwards
    the driver's calls to it (the methods Ray sees must exist on the class the driver passes)."""

    def __init__(self, kind: WorkerKind, *args: Any) -> None:
        self.worker = kind.load()(*args)

    def ready(self) -> dict[str, Any]:
        return _plain(self.worker.ready())

    def check_data(self, url: str, source: str) -> str | None:
        return self.worker.check_data(url, source)

    def process(self, *args: Any) -> dict[str, Any]:
        return _plain(self.worker.process(*args))


def _plain(doc: dict[str, Any]) -> dict[str, Any]:
    """JSON's own types only: an object of a worker-side class (an enum of a module that imports
    torch) would make the driver import that module when Ray unpickles the answer."""
    return json.loads(json.dumps(doc))


def actor_class(kind: WorkerKind) -> type:
    """ActorHost under the worker's class name: Ray names the actor's process, log prefix and
    dashboard entry after it (`ray::ShardWorker.process`)."""
    return type(kind.name, (ActorHost,), {"__doc__": f"{ActorHost.__doc__} ({kind.ref})"})
