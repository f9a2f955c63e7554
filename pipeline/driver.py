"""The driver: lists shards, skips committed ones, schedules them on worker actors, retries
failures, quarantines what keeps failing, and writes the manifest. It never touches tensors.

Scheduling is an explicit queue over `ray.wait` (not ActorPool, which loses track of failed
work). Actors run with max_restarts=0 and max_task_retries=0: every retry is decided here.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline import config as config_mod, report, shards, storage
from pipeline.config import Config, ConfigError
from pipeline.worker import MARKER_SUFFIX, ShardProcessor

log = logging.getLogger(__name__)

EXIT_OK, EXIT_QUARANTINED, EXIT_ABORTED = 0, 3, 4


class DriverError(RuntimeError):
    pass


@dataclass
class ShardState:
    url: str
    sid: str
    expected: int | None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    status: str = "pending"          # pending | committed | skipped | quarantined
    rows: int = 0


@dataclass
class StageResult:
    stage: str
    shards: dict[str, ShardState]
    seconds: float
    aborted: str | None = None
    checks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def quarantined(self) -> list[str]:
        return [s.sid for s in self.shards.values() if s.status == "quarantined"]


# ---------------------------------------------------------------------------- job state

def check_job_state(cfg: Config) -> None:
    """Refuse to mix results of a different configuration in the same output; record ours."""
    out = cfg.job.output
    job_url = storage.join(out, "job.json")
    if storage.exists(job_url):
        prev = json.loads(storage.read_text(job_url))
        if prev.get("config_hash") != cfg.hash():
            raise ConfigError(
                f"{cfg.source}: output {out} holds results of config hash {prev.get('config_hash')} "
                f"but this config hashes to {cfg.hash()}; use a new job.output (or delete the old one)")
    else:
        storage.put_text(job_url, json.dumps({"job": cfg.job.name, "config_hash": cfg.hash(),
                                              "created": time.time()}))
    storage.put_text(storage.join(out, "config.yaml"), config_mod.dump(cfg))


def committed_markers(output: str, stage: str) -> dict[str, dict]:
    """{shard id: marker} for the shards whose commit marker exists."""
    d = storage.join(output, stage)
    out = {}
    for url in storage.listdir(d):
        name = storage.basename(url)
        if name.endswith(MARKER_SUFFIX):
            out[name[: -len(MARKER_SUFFIX)]] = json.loads(storage.read_text(url))
    return out


def plan_shards(cfg: Config) -> list[ShardState]:
    urls = shards.expand(cfg.data.shards)
    missing = [u for u in urls if not storage.exists(u)]
    if missing:
        raise ConfigError(f"{cfg.source}: data.shards: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    counts = shards.expected_counts(urls, cfg.data.index)
    return [ShardState(u, sid, counts[u]) for u, sid in zip(urls, shards.unique_ids(urls))]


# ---------------------------------------------------------------------------- ray

def _connect(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    addr = cfg.cluster.address
    if addr is None and os.environ.get("RAY_ADDRESS"):
        addr = "auto"  # submitted with `ray job submit`: join that cluster
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if addr in (None, "", "local"):
        # a private local cluster; workers inherit this process's environment and sys.path
        ray.init(address="local", include_dashboard=False, **kwargs)
    else:
        ray.init(address=addr, **kwargs)


def _gpus_per_worker(cfg: Config) -> float:
    import ray

    g = cfg.cluster.gpus_per_worker
    if g == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return float(g)


class _Progress:
    def __init__(self, total: int | None, stage: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=stage, unit="sample", dynamic_ncols=True, mininterval=1.0)

    def add(self, n: int) -> None:
        self.bar.update(n)

    def note(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        self.bar.close()


def run_stage(cfg: Config, stage: str, states: list[ShardState]) -> StageResult:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    t0 = time.time()
    done = committed_markers(cfg.job.output, stage)
    storage.remove_stale_temporaries(storage.join(cfg.job.output, stage))
    remove_orphans(cfg.job.output, stage, done)
    for s in states:
        if s.sid in done:
            if done[s.sid].get("config_hash") != cfg.hash():
                raise ConfigError(f"{cfg.source}: {stage}/{s.sid} was committed under config hash "
                                  f"{done[s.sid].get('config_hash')}, not {cfg.hash()}")
            s.status, s.rows = "skipped", int(done[s.sid].get("rows", 0))
    todo = collections.deque(s for s in states if s.status == "pending")
    result = StageResult(stage, {s.sid: s for s in states}, 0.0)
    if not todo:
        log.info("%s: all %d shards already committed", stage, len(states))
        result.seconds = time.time() - t0
        result.checks = report.merge_shard_checks(list(done.values()))
        return result
    log.info("%s: %d shards to run, %d already committed", stage, len(todo), len(states) - len(todo))

    _connect(cfg)
    c = cfg.cluster
    gpus = _gpus_per_worker(cfg)
    actor_cls = ray.remote(ShardProcessor)
    cfg_dict = cfg.to_dict()
    n_actors = min(c.num_workers, len(todo))

    def start_actor():
        a = actor_cls.options(num_cpus=c.cpus_per_worker, num_gpus=gpus, max_restarts=0,
                              max_task_retries=0).remote(cfg_dict, c.cpus_per_worker)
        return a, a.ready.remote()

    starting: dict[Any, Any] = {}          # ready ref → actor
    idle: list[Any] = []
    running: dict[Any, tuple[Any, ShardState, float]] = {}   # task ref → (actor, shard, start)
    init_failures = 0
    for _ in range(n_actors):
        a, ref = start_actor()
        starting[ref] = a

    limit = cfg.data.max_samples_per_shard
    total = (sum(min(s.expected, limit or s.expected) for s in todo)
             if all(s.expected for s in todo) else None)
    progress = _Progress(total, stage)

    def fail(s: ShardState, err: str) -> None:
        s.attempts += 1
        s.errors.append(err)
        if s.attempts >= c.max_attempts:
            s.status = "quarantined"
            log.error("%s: shard %s quarantined after %d attempts: %s", stage, s.sid, s.attempts, err)
        else:
            log.warning("%s: shard %s attempt %d failed, requeued: %s", stage, s.sid, s.attempts, err)
            todo.append(s)

    try:
        while todo or running:
            # hand out work
            while idle and todo:
                a = idle.pop()
                s = todo.popleft()
                ref = a.process.remote(s.url, s.sid, stage, s.expected)
                running[ref] = (a, s, time.time())
            if not running and not starting:
                # every actor is gone and none is starting: start replacements
                for _ in range(min(n_actors, len(todo))):
                    a, ref = start_actor()
                    starting[ref] = a
            refs = list(running) + list(starting)
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in starting:
                    a = starting.pop(ref)
                    try:
                        info = ray.get(ref)
                        log.info("worker ready: %s", info)
                        idle.append(a)
                    except (RayActorError, RayTaskError) as err:
                        init_failures += 1
                        log.error("worker failed to start (%d/%d): %s", init_failures, c.max_actor_failures,
                                  _short(err))
                        if init_failures >= c.max_actor_failures:
                            result.aborted = f"{init_failures} worker start failures; last: {_short(err)}"
                            raise DriverError(result.aborted)
                        a2, ref2 = start_actor()
                        starting[ref2] = a2
                    continue
                a, s, started = running.pop(ref)
                try:
                    marker = ray.get(ref)
                    s.status, s.rows = "committed", int(marker["rows"])
                    s.attempts += 1
                    progress.add(int(marker["samples"]))
                    idle.append(a)
                except RayTaskError as err:   # the shard raised; the actor is still healthy
                    fail(s, _short(err))
                    idle.append(a)
                except RayActorError as err:  # the actor died (os._exit, OOM) or is unreachable (node loss)
                    _kill(a)  # an unreachable actor may still be alive: make sure it stops
                    fail(s, f"worker died: {_short(err)}")
                    a2, ref2 = start_actor()
                    starting[ref2] = a2
            # deadlines for hung shards
            now = time.time()
            for ref, (a, s, started) in list(running.items()):
                if now - started > c.shard_timeout_s:
                    running.pop(ref)
                    _kill(a)
                    fail(s, f"timed out after {c.shard_timeout_s:.0f}s; worker killed")
                    a2, ref2 = start_actor()
                    starting[ref2] = a2
            committed = sum(1 for x in states if x.status in ("committed", "skipped"))
            progress.note(f"shards {committed}/{len(states)} workers {len(idle) + len(running)}")
    finally:
        progress.close()
        for a in idle + [v[0] for v in running.values()] + list(starting.values()):
            _kill(a)
    result.seconds = time.time() - t0
    result.checks = report.merge_shard_checks(list(committed_markers(cfg.job.output, stage).values()))
    return result


def _kill(actor) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead or unreachable
        pass


def remove_orphans(output: str, stage: str, markers: dict[str, dict]) -> int:
    """Delete records files no marker names (attempts that never committed); only called
    while no worker of this job runs."""
    named = {m.get("parquet") for m in markers.values()}
    n = 0
    for url in storage.listdir(storage.join(output, stage)):
        name = storage.basename(url)
        if name.endswith(".parquet") and name not in named:
            storage.remove(url)
            n += 1
    return n


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    # Ray wraps the remote traceback; the last line names the original exception
    return (text[-1] if text else type(err).__name__)[:500]


# ---------------------------------------------------------------------------- job

def write_manifest(cfg: Config, results: list[StageResult]) -> dict[str, Any]:
    doc = {
        "job": cfg.job.name,
        "config_hash": cfg.hash(),
        "finished": time.time(),
        "stages": {
            r.stage: {
                "seconds": r.seconds,
                "aborted": r.aborted,
                "quarantined": r.quarantined,
                "checks": r.checks,
                "shards": {s.sid: {"status": s.status, "attempts": s.attempts, "rows": s.rows,
                                   "errors": s.errors, "source": s.url} for s in r.shards.values()},
            } for r in results
        },
    }
    storage.put_text(storage.join(cfg.job.output, "manifest.json"), json.dumps(doc, indent=1))
    return doc


def publish_outputs(cfg: Config, stage: str) -> list[ShardState]:
    """Index the shards a stage wrote (adversarial or purified images) from its commit
    markers, and return them as the next stage's input."""
    from pipeline.worker import ADVERSARIAL_DIR, PURIFIED_DIR

    folder = storage.join(cfg.job.output, ADVERSARIAL_DIR if stage == "attack" else PURIFIED_DIR)
    entries = sorted((e for m in committed_markers(cfg.job.output, stage).values() for e in m.get("outputs", [])),
                     key=lambda e: e["name"])
    shards.write_index(folder, entries, {"stage": stage, "job": cfg.job.name, "config_hash": cfg.hash()})
    return [ShardState(storage.join(folder, e["name"]), shard_id_of(e["name"]), int(e["samples"])) for e in entries]


def shard_id_of(name: str) -> str:
    return name[:-4] if name.endswith(".tar") else name


def run(cfg: Config) -> tuple[int, dict[str, Any]]:
    """Run the job's stages in order, each resumed independently; returns (exit code, manifest).

    evaluate and attack read data.shards; purify reads the adversarial shards of an attack
    stage earlier in the same job, or data.shards (an adversarial set from another job, or
    any corpus to purify offline).
    """
    states = plan_shards(cfg)
    check_job_state(cfg)
    results: list[StageResult] = []
    code = EXIT_OK
    inputs = states
    for stage in cfg.job.stages:
        if stage == "purify" and "attack" in cfg.job.stages[: cfg.job.stages.index(stage)]:
            inputs = publish_outputs(cfg, "attack")
        else:
            inputs = states
        try:
            r = run_stage(cfg, stage, [ShardState(s.url, s.sid, s.expected) for s in inputs])
        except DriverError as err:
            results.append(StageResult(stage, {}, 0.0, aborted=str(err)))
            log.error("%s aborted: %s", stage, err)
            return EXIT_ABORTED, write_manifest(cfg, results)
        results.append(r)
        if stage in ("attack", "purify"):
            publish_outputs(cfg, stage)
        if r.quarantined:
            code = EXIT_QUARANTINED
    return code, write_manifest(cfg, results)
