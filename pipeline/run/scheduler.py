"""The driver's scheduler: one stage's shards on the job's workers — skips committed ones,
schedules the rest, retries failures, quarantines what keeps failing. It never touches
tensors, and never imports torch (the workers are named, `actor_host.WorkerKind`). The job
around the stages (lease, checks, manifest) is `job_runner`'s.

One stage = resume (`pending_shards`) → the job's `ActorPool` (started before the first stage
for the data check, `check_data_on_a_worker`, and kept across stages; or, with
`cluster.executor: local`, a `LocalPool` that runs one worker in this process) that starts,
replaces and expires actors → a loop over `ray.wait` that hands out shards, each with the
next one reserved to the same actor so it prefetches it, and applies `retry_or_quarantine`.
Scheduling is an explicit queue (not Ray's ActorPool, which loses track of failed work);
actors run with max_restarts=0 and max_task_retries=0: every retry is decided here.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline import stage_table
from pipeline.config import Config, ConfigError
from pipeline.run import commit
from pipeline.run.actor_host import SHARD_WORKER, WorkerKind, actor_class
from pipeline.run.lease import Lease, LeaseLost
from pipeline.run.local_pool import LocalPool, choose_executor, ray_started
from pipeline.run.pool import Task, WorkerPool
from pipeline.run.signals import handle_sigterm, raise_if_terminated

log = logging.getLogger(__name__)


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
    workers: list[dict[str, Any]] = field(default_factory=list)   # each actor's ready(): node, GPU, pid

    @property
    def quarantined(self) -> list[str]:
        return [s.sid for s in self.shards.values() if s.status == "quarantined"]


def pending_shards(cfg: Config, stage: str, states: list[ShardState]) -> dict[str, dict]:
    """Resume: mark the committed shards skipped, remove what no marker names; returns the
    markers. A shard committed under another config hash is refused."""
    done = commit.committed(cfg.job.output, stage)
    commit.clean_stage(cfg.job.output, stage, done)
    for s in states:
        if s.sid in done:
            if done[s.sid].get("config_hash") != cfg.hash():
                raise ConfigError(f"{cfg.source}: {stage}/{s.sid} was committed under config hash "
                                  f"{done[s.sid].get('config_hash')}, not {cfg.hash()}")
            s.status, s.rows = "skipped", int(done[s.sid].get("rows", 0))
    return done


def retry_or_quarantine(s: ShardState, err: str, max_attempts: int) -> bool:
    """Record a failed attempt; True if the shard should be retried."""
    s.attempts += 1
    s.errors.append(err)
    if s.attempts >= max_attempts:
        s.status = "quarantined"
        log.error("shard %s quarantined after %d attempts: %s", s.sid, s.attempts, err)
        return False
    log.warning("shard %s attempt %d failed, requeued: %s", s.sid, s.attempts, err)
    return True


# ---------------------------------------------------------------------------- ray

def _private_cluster(cfg: Config) -> bool:
    """True when this driver starts its own local Ray (nothing can add nodes to it)."""
    return cfg.cluster.address in (None, "", "local") and not os.environ.get("RAY_ADDRESS")


def _connect(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    addr = cfg.cluster.address
    if addr is None and os.environ.get("RAY_ADDRESS"):
        addr = "auto"  # submitted with `ray job submit`: join that cluster
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if addr in (None, "", "local"):
        # a private local cluster, no dashboard; workers inherit this process's environment and sys.path
        ray.init(address="local", include_dashboard=False, **kwargs)
    else:
        ray.init(address=addr, **kwargs)
    handle_sigterm()   # after ray.init, which installs its own handler


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one worker actor asks for: CPUs, and GPUs (1/k of one with workers_per_gpu k)."""
    import ray

    c = cfg.cluster
    g = c.gpus_per_worker
    if g == "auto":
        g = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    g = float(g) / c.workers_per_gpu if g else 0.0
    return {"CPU": c.cpus_per_worker, "GPU": g}


def _fmt(req: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in req.items() if v) or "no resources"


@dataclass
class ClusterView:
    """The cluster's nodes as the GCS sees them: totals of the alive ones, deaths with reasons."""
    alive: list[dict[str, float]]
    dead: list[str]
    error: str | None = None

    def capacity(self, req: dict[str, float]) -> int:
        """How many workers the alive nodes could host if nothing else ran (a worker never
        spans nodes)."""
        def fits(node: dict[str, float]) -> int:
            need = [node.get(k, 0.0) / v for k, v in req.items() if v > 0]
            return int(min(need) + 1e-9) if need else 1
        return sum(fits(n) for n in self.alive)

    def describe(self, req: dict[str, float]) -> str:
        if self.error:
            return f"cannot read the cluster's nodes: {self.error}"
        text = f"{len(self.alive)} alive node(s)"
        if self.alive and not self.capacity(req):
            largest = max(self.alive, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
            text += f", none with {_fmt(req)} (largest: {_fmt({k: largest.get(k, 0) for k in req})})"
        if self.dead:
            text += f"; {len(self.dead)} dead: {'; '.join(self.dead[-3:])}"
        return text


def gcs_address() -> str | None:
    """host:port of the GCS this driver is connected to (None before ray.init)."""
    import sys

    ray = sys.modules.get("ray")   # never imported (the local executor): no GCS, and no second spent importing it
    return ray.get_runtime_context().gcs_address if ray is not None and ray.is_initialized() else None


def gcs_reachable(address: str, timeout_s: float = 1.0) -> bool:
    """Whether something accepts connections at the GCS's port (a bounded check: Ray's own
    calls to a dead GCS block for up to gcs_rpc_server_reconnect_timeout_s)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def cluster_view() -> ClusterView:
    import ray

    address = gcs_address()
    if address and not gcs_reachable(address):   # ray.nodes() would block; GcsWatch decides
        return ClusterView([], [], f"Ray's GCS at {address} does not answer")
    try:
        nodes = ray.nodes()
    except Exception as err:  # noqa: BLE001 - the GCS is unreachable: reported, judged by the caller
        return ClusterView([], [], _short(err))
    alive = [dict(n.get("Resources") or {}) for n in nodes if n.get("Alive")]
    dead = [f"node {n.get('NodeID', '?')[:12]} ({n.get('NodeManagerAddress')}) died: "
            f"{n.get('DeathReasonMessage') or n.get('DeathReason') or 'unknown reason'}"
            for n in nodes if not n.get("Alive")]
    return ClusterView(alive, dead)


class ActorPool(WorkerPool):
    """Worker actors: starting (ready ref → actor, since), idle, and running (task ref →
    Task). One pool serves every stage of a job (an actor's models are built once); how
    many to keep is the caller's decision."""

    def __init__(self, cfg: Config, worker: WorkerKind = SHARD_WORKER):
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        c = cfg.cluster
        self.req = worker_resources(cfg)
        self._cls = ray.remote(actor_class(worker)).options(num_cpus=self.req["CPU"], num_gpus=self.req["GPU"],
                                                    max_restarts=0, max_task_retries=0)
        # stages registered outside the table go along: the actors' processes know only the built-in ones
        added = stage_table.added(cfg.job.stages)
        self._args = (worker, cfg.to_dict(), c.cpus_per_worker, *([added] if added else []))
        super().__init__(cfg, worker)
        self.task_errors = (RayTaskError,)      # the call raised; the actor is still healthy
        self.worker_errors = (RayActorError,)   # the actor died (os._exit, OOM) or is unreachable

    def start(self, n: int = 1) -> None:
        for _ in range(n):
            a = self._cls.remote(*self._args)
            self.starting[a.ready.remote()] = (a, time.monotonic())

    def call(self, worker: Any, method: str, *args: Any) -> Any:
        return getattr(worker, method).remote(*args)

    def submit(self, s: ShardState, stage: str, reserve: ShardState | None = None) -> None:
        """Run `s` on an idle actor; with `reserve` (only when the worker class prefetches),
        that shard is named to the actor as its next one (it starts decoding it) and goes back
        to the queue's front when `s` ends."""
        a = self.idle.pop()
        if reserve is not None:
            ref = a.process.remote(s.url, s.sid, stage, s.expected, (reserve.url, reserve.expected))
        else:
            ref = a.process.remote(s.url, s.sid, stage, s.expected)
        self.running[ref] = Task(a, s, time.time(), reserve)

    def steal(self) -> ShardState | None:
        """A shard reserved behind a running one, taken back for an idle actor (the end of
        a stage: better another actor computes it now than it waits its turn)."""
        for t in self.running.values():
            if t.reserved is not None:
                s, t.reserved = t.reserved, None
                return s
        return None

    def wait(self, refs: list[Any]) -> tuple[list[Any], list[Any]]:
        import ray

        return ray.wait(refs, num_returns=1, timeout=1.0)

    def get(self, ref: Any) -> Any:
        import ray

        return ray.get(ref)

    def kill(self, actor: Any) -> None:
        _kill(actor)

    def expired(self, timeout_s: float) -> list[Task]:
        """Running tasks past their deadline, removed from the pool."""
        now = time.time()
        late = [ref for ref, t in self.running.items() if now - t.started > timeout_s]
        return [self.running.pop(ref) for ref in late]

    def kill_all(self) -> None:
        actors = self.idle + [t.actor for t in self.running.values()] + [v[0] for v in self.starting.values()]
        self.idle, self.running, self.starting = [], {}, {}
        address = gcs_address()
        if actors and address and not gcs_reachable(address):
            # ray.kill goes through the GCS and would block until Ray's core ends this process;
            # without their GCS the nodes' raylets end the actors themselves
            log.warning("not stopping %d worker(s): Ray's GCS at %s does not answer", len(actors), address)
            return
        for a in actors:
            _kill(a)


def _kill(actor) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead or unreachable
        pass


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    # Ray wraps the remote traceback; the last line names the original exception
    return (text[-1] if text else type(err).__name__)[:500]


class _Progress:
    """samples/s (tqdm's rate) and model evaluations/s (the markers' nfe) side by side."""

    def __init__(self, total: int | None, stage: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=stage, unit="sample", dynamic_ncols=True, mininterval=1.0)
        self.text = ""
        self._shown = 0.0
        self.nfe, self._t0 = 0, time.monotonic()

    def add(self, n: int, nfe: int = 0) -> None:
        self.nfe += nfe
        self.bar.update(n)

    def rate(self) -> str:
        """Model evaluations per second since the stage started ('' before the first marker)."""
        return f"{self.nfe / max(1e-9, time.monotonic() - self._t0):,.0f} evals/s" if self.nfe else ""

    def note(self, text: str) -> None:
        """Shown at once when it changes, at most every 2 s (a wait has no samples to tick the bar)."""
        text = " | ".join(filter(None, [self.rate(), text]))
        if text == self.text:
            return
        self.text = text
        due = time.monotonic() - self._shown >= 2.0
        if due:
            self._shown = time.monotonic()
        self.bar.set_postfix_str(text, refresh=due)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------- one stage

def make_pool(cfg: Config, worker: WorkerKind = SHARD_WORKER) -> ActorPool | LocalPool:
    """The job's workers on the executor `choose_executor` picks: Ray actors (connecting to
    Ray first), or one worker in this process (`pipeline.run.local_pool`)."""
    executor, why = choose_executor(cfg)
    log.info("executor: %s (%s)", executor, why)
    if executor == "local":
        return LocalPool(cfg, worker)
    _connect(cfg)
    return ActorPool(cfg, worker)


class JobActors:
    """A job's actor pool: made when the job first needs a worker (after Ray is up), kept
    for the stages after it, killed by `close()` at the job's end."""

    def __init__(self, cfg: Config, worker: WorkerKind = SHARD_WORKER) -> None:
        self.cfg, self.worker = cfg, worker
        self.pool: ActorPool | LocalPool | None = None

    def get(self) -> ActorPool | LocalPool:
        if self.pool is None:
            self.pool = make_pool(self.cfg, self.worker)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.kill_all()


def run_stage(cfg: Config, stage: str, states: list[ShardState], worker: WorkerKind = SHARD_WORKER,
              lease: Lease | None = None, actors: JobActors | None = None) -> StageResult:
    """Run one stage over its shards on workers of `worker`'s class (`process(url, sid, stage,
    expected)` returns the commit marker). With a `lease`, the stage stops as soon as it is
    lost. With `actors` (the job's), their pool is used and left alive for the next stage;
    without, the stage starts its own actors and kills them at its end."""
    t0 = time.time()
    if lease is not None:
        lease.check()  # clean-up of unmarked files only under the lease
    done = pending_shards(cfg, stage, states)
    todo = collections.deque(s for s in states if s.status == "pending")
    result = StageResult(stage, {s.sid: s for s in states}, 0.0)
    if not todo:
        log.info("%s: all %d shards already committed", stage, len(states))
    else:
        log.info("%s: %d shards to run, %d already committed", stage, len(todo), len(states) - len(todo))
        pool = actors.get() if actors is not None else make_pool(cfg, worker)
        try:
            _schedule(cfg, stage, todo, states, result, pool, lease)
        finally:
            if actors is None:
                pool.kill_all()
        lost = [s.sid for s in states if s.status == "pending"]
        if lost:  # the scheduler's own invariant: a shard ends committed or quarantined, never silently
            raise DriverError(f"{stage}: shards neither committed nor quarantined: {', '.join(lost[:5])}")
        done = commit.committed(cfg.job.output, stage)
    result.seconds = time.time() - t0
    result.checks = commit.merge_shard_checks(list(done.values()))
    return result


def check_data_on_a_worker(cfg: Config, actors: JobActors, url: str, shards: int, lease: Lease | None = None) -> None:
    """The job's pre-work data check (its worker's `check_data`: the data against the models,
    torch) on the job's first worker, before any stage work: start the workers the first
    stage will want for `shards` shards (num_workers, or with auto what the cluster hosts:
    all of them start now, not after the check), wait for one as a stage waits (start
    failures, placement, the GCS: DriverError), and ask it about shard `url`. What it finds
    is a ConfigError (exit 2); a check that crashes, a RuntimeError. A Ray started here for
    a check that fails is shut down."""
    ours = not ray_started()
    pool = actors.get()
    try:
        pool.top_up(1 if isinstance(pool, LocalPool) else _Sizer(cfg, pool.req).want(shards))
        worker = _first_ready(cfg, pool, lease)
        try:
            problem = pool.get(pool.call(worker, "check_data", url, cfg.source))
        except pool.task_errors as err:
            raise RuntimeError(f"the data check failed on a worker: {_short(err)}") from None
        except pool.worker_errors as err:
            raise DriverError(f"a worker died during the data check: {_short(err)}") from None
        if problem:
            raise ConfigError(problem)
    except (ConfigError, RuntimeError) as err:
        if not isinstance(err, DriverError):   # the job ends here: no Ray left behind in this process
            actors.close()
            if ours and ray_started():
                import ray

                ray.shutdown()
        raise


def _first_ready(cfg: Config, pool: ActorPool | LocalPool, lease: Lease | None) -> Any:
    """A started worker once it is ready, waited for as `_schedule` waits (lease, GCS, start
    failures, `_StartWait`); its ready() answer goes to the first stage's result with the pool."""
    result = StageResult("", {}, 0.0)   # the abort reason, raised as DriverError
    waiting = _StartWait(cfg, pool, _Sizer(cfg, pool.req), result)
    gcs, logged = GcsWatch(), -1e9
    while not pool.idle:
        if lease is not None:
            lease.check()
        gcs.check()
        if not pool.starting:
            pool.start(1)   # every start so far failed (each counted; _on_started gives up at the limit)
        ready, _ = pool.wait(list(pool.starting))
        for ref in ready:
            _on_started(pool, ref, cfg.cluster.max_actor_failures, result)
        note = waiting.check()
        if note and time.monotonic() - logged >= 10.0:   # no stage's progress bar shows it yet
            log.info("%s", note)
            logged = time.monotonic()
    return pool.idle[-1]


class _Sizer:
    """How many actors to keep: num_workers, or with `auto` what the alive nodes can host
    (re-read every few seconds, so the pool grows when nodes join); never more than the
    shards left, and at least one while work remains (it is the autoscaler's demand)."""

    REFRESH_S = 5.0

    def __init__(self, cfg: Config, req: dict[str, float]):
        self.auto = cfg.cluster.num_workers == "auto"
        self.fixed = 0 if self.auto else int(cfg.cluster.num_workers)
        self.req = req
        self._view: ClusterView | None = None
        self._read = -1e9

    def view(self) -> ClusterView:
        if time.monotonic() - self._read > self.REFRESH_S / 2.5:
            self._view, self._read = cluster_view(), time.monotonic()
        return self._view

    def want(self, remaining: int) -> int:
        if not remaining:
            return 0
        limit = self.fixed
        if self.auto:
            if time.monotonic() - self._read > self.REFRESH_S:
                self._view, self._read = cluster_view(), time.monotonic()
            limit = self._view.capacity(self.req)
        return max(1, min(limit, remaining))


def _schedule(cfg: Config, stage: str, todo: collections.deque, states: list[ShardState],
              result: StageResult, pool: ActorPool, lease: Lease | None = None) -> None:
    """Run the pending shards to commit or quarantine on the pool's actors."""
    c = cfg.cluster
    sizer = _Sizer(cfg, pool.req)
    limit = cfg.data.max_samples_per_shard
    total = sum(min(s.expected, limit or s.expected) for s in todo) if all(s.expected for s in todo) else None
    progress = _Progress(total, stage)
    waiting = _StartWait(cfg, pool, sizer, result)
    gcs = GcsWatch()
    result.workers.extend(pool.info[id(a)] for a in pool.idle)  # the actors kept from earlier stages

    def fail(s: ShardState, err: str) -> None:
        if retry_or_quarantine(s, f"{err}", c.max_attempts):
            todo.append(s)

    def requeue(task: Task) -> None:  # a reserved shard never started: back first, no attempt counted
        if task.reserved is not None:
            todo.appendleft(task.reserved)

    try:
        while todo or pool.running:
            raise_if_terminated()
            if lease is not None:
                _check(lease.check, result)
            _check(gcs.check, result)
            pool.top_up(sizer.want(len(todo) + len(pool.running) + pool.reserved()))
            while pool.idle and (todo or pool.reserved()):
                s = todo.popleft() if todo else pool.steal()
                # reserve only what no other idle or starting actor is about to take
                spare = pool.prefetch and len(todo) > len(pool.idle) - 1 + len(pool.starting)
                pool.submit(s, stage, todo.popleft() if spare else None)
            ready, _ = pool.wait(pool.refs())
            for ref in ready:
                if ref in pool.starting:
                    _on_started(pool, ref, c.max_actor_failures, result)
                else:
                    _on_finished(pool, ref, fail, requeue, progress)
            for task in pool.expired(c.shard_timeout_s):
                fail(task.shard, f"timed out after {c.shard_timeout_s:.0f}s; worker killed")
                requeue(task)
                pool.info.pop(id(task.actor), None)
                pool.kill(task.actor)
            committed = sum(1 for x in states if x.status in ("committed", "skipped"))
            note = f"shards {committed}/{len(states)} workers {pool.live()}"
            progress.note(" | ".join(filter(None, [note, waiting.check()])))
    finally:
        progress.close()  # the pool's owner (run_stage or the job's JobActors) kills its actors


def _check(check: Callable[[], None], result: StageResult) -> None:
    """Run a liveness check (the lease's, the Ray cluster's); its failure (LeaseLost,
    DriverError) is recorded as the stage's abort, then raised."""
    try:
        check()
    except (LeaseLost, DriverError) as err:
        result.aborted = str(err)
        raise


class _StartWait:
    """The bounded wait for actors to start. While no actor is live and some wait to be
    placed: abort at once if no alive node could ever host one on a cluster nothing can grow
    (this driver's private Ray, or every node dead); otherwise wait up to
    `cluster.actor_start_timeout_s` (an autoscaler may be adding nodes), then abort."""

    def __init__(self, cfg: Config, pool: ActorPool, sizer: _Sizer, result: StageResult):
        self.timeout_s = cfg.cluster.actor_start_timeout_s
        self.private = _private_cluster(cfg)
        self.pool, self.sizer, self.result = pool, sizer, result
        self.since: float | None = None

    def check(self) -> str:
        """A progress note saying what the driver waits for ('' when it does not wait)."""
        pool = self.pool
        if pool.live() or not pool.starting:
            self.since = None
            return ""
        if self.since is None:
            self.since = time.monotonic()
        waited = time.monotonic() - self.since
        view = self.sizer.view()
        what = (f"waiting {waited:.0f}s for {len(pool.starting)} worker(s) with {_fmt(pool.req)}: "
                f"{view.describe(pool.req)}")
        final = not view.error and not view.capacity(pool.req) and (self.private or not view.alive)
        if final:
            why = ("" if not self.private else "; this driver's local Ray cannot gain nodes" if view.alive
                   else "; the local Ray node is gone (its raylet exited)")
            self._abort(f"no node can host a worker ({_fmt(pool.req)}): {view.describe(pool.req)}{why}")
        if waited > self.timeout_s:
            self._abort(f"no worker started within cluster.actor_start_timeout_s ({self.timeout_s:.0f}s): {what}")
        return what

    def _abort(self, reason: str) -> None:
        self.result.aborted = reason
        raise DriverError(reason)


class GcsWatch:
    """Ray's GCS (the head node's control store), watched from the driver's loop by a TCP
    connect to its port every few seconds. Without its GCS, Ray's core ends this process by
    itself after gcs_rpc_server_reconnect_timeout_s (60 s) with exit 1 and only a C++ log
    line; this gives up at half that (a GCS restarted by fault tolerance is back well
    within it) with our own cause, so the stage aborts like any other (exit 4, manifest,
    lease released) and the same command resumes once the cluster is back."""

    PERIOD_S = 2.0

    def __init__(self, address: str | None = None):
        self.address = address or gcs_address()
        ray_limit = float(os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", 60))
        self.limit_s = max(2 * self.PERIOD_S, ray_limit / 2)
        self.down_since: float | None = None
        self._last = -1e9

    def check(self) -> None:
        """Raise DriverError once the GCS has not answered for limit_s."""
        now = time.monotonic()
        if not self.address or now - self._last < self.PERIOD_S:
            return
        self._last = now
        if gcs_reachable(self.address):
            self.down_since = None
            return
        if self.down_since is None:
            self.down_since = now
            log.warning("Ray's GCS at %s does not answer; giving up in %.0fs unless it comes back",
                        self.address, self.limit_s)
        elif now - self.down_since >= self.limit_s:
            _forget_cluster()
            raise DriverError(f"Ray's GCS at {self.address} has not answered for {now - self.down_since:.0f}s: "
                              "the head node's gcs_server died or is unreachable, so this cluster can run no more "
                              "work (restart it, e.g. `ray stop; ray start --head ...`)")


_CLUSTER_LOST = threading.Event()


def _forget_cluster() -> None:
    """Skip ray.shutdown at exit: with the GCS gone it blocks until Ray's core ends the
    process (exit 1, a C++ log line) after our message; so does the interpreter's own exit
    (Ray's C++ threads), hence cluster_lost() for the CLI to end the process itself."""
    import atexit

    from ray._private import worker

    atexit.unregister(worker.shutdown)
    _CLUSTER_LOST.set()


def cluster_lost() -> bool:
    """Whether this process gave up on its Ray cluster (its GCS died): the CLI then ends
    with os._exit once its message is out, before Ray's core ends it with exit 1."""
    return _CLUSTER_LOST.is_set()


def _on_started(pool: ActorPool | LocalPool, ref: Any, max_failures: int, result: StageResult) -> None:
    a, _ = pool.starting.pop(ref)
    try:
        info = pool.get(ref)
        log.info("worker ready: %s", info)
        pool.info[id(a)] = {k: info.get(k) for k in ("host", "pid", "node_id", "device", "gpu_ids")}
        result.workers.append(pool.info[id(a)])
        pool.idle.append(a)
    except pool.task_errors + pool.worker_errors as err:
        pool.start_failures += 1
        log.error("worker failed to start (%d/%d): %s", pool.start_failures, max_failures, _short(err))
        if pool.start_failures >= max_failures:
            result.aborted = f"{pool.start_failures} worker start failures; last: {_short(err)}"
            raise DriverError(result.aborted) from None
        pool.kill(a)


def _on_finished(pool: ActorPool | LocalPool, ref: Any, fail, requeue, progress: _Progress) -> None:
    task = pool.running.pop(ref)
    a, s = task.actor, task.shard
    requeue(task)  # first in the queue: the next submit gives it back to this (idle) actor
    try:
        marker = pool.get(ref)
        s.status, s.rows = "committed", int(marker["rows"])
        s.attempts += 1
        progress.add(int(marker["samples"]), int(marker.get("nfe", 0)))
        pool.idle.append(a)
    except pool.task_errors as err:   # the shard raised; the actor is still healthy
        fail(s, _short(err))
        pool.idle.append(a)
    except pool.worker_errors as err:  # the actor died (os._exit, OOM) or is unreachable (node loss)
        fail(s, f"worker died: {_short(err)}")
        pool.info.pop(id(a), None)
        pool.kill(a)  # it may be unreachable but alive; top_up starts a replacement
