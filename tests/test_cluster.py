"""A real two-node Ray cluster on 127.0.0.1: `ray start --head` + `ray start --address`,
each node its own process tree, the job driven by `python -m pipeline.cli run job.yaml`
exactly as on a cluster, with shards, checkpoints and output on S3 (no shared folder).

- both nodes host a worker and the job completes;
- node loss: the second node is SIGKILLed mid-job (its `ray start`, raylet, agents and
  actor processes: what a machine dying looks like) → the job still completes, every
  sample exactly once.

Teardown stops only the processes these tests started (never the global `ray stop`,
which would also kill other Ray sessions on the machine).
"""
from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # see _cluster_env

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline.io import storage
from pipeline.run import commit
from tests import s3server
from tests.conftest import ROOT, job_dict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

if not Path("/proc/self/stat").exists():
    pytest.skip("needs Linux /proc to follow the nodes' process trees", allow_module_level=True)


# ---------------------------------------------------------------------------- processes (/proc)

def _stat(pid: int) -> tuple[str, str, int, int] | None:
    """(name, state, parent pid, start time) of a process, None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1: text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return name, fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int, started: int | None = None) -> bool:
    """Running (not a zombie) and, if `started` is given, still the same process (no pid reuse)."""
    st = _stat(pid)
    return st is not None and st[1] not in ("Z", "X") and (started is None or st[3] == started)


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None:
            parents.setdefault(st[2], []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_all(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _wait_gone(started: dict[int, int], timeout_s: float) -> list[int]:
    """Wait until the processes {pid: start time} are gone; returns those still running."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p, t in started.items() if _alive(p, t)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p, started[p])]
    return alive


# `ray start` resolves 127.0.0.1 to the machine's outward address unless
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, but with that set it refuses to add a worker node.
# So worker nodes run the same CLI with the loopback address kept as given.
_WORKER_NODE_LAUNCHER = (
    "import sys\n"
    "import ray._private.ray_constants as c, ray._private.services as s\n"
    "c.ENABLE_RAY_CLUSTER = True\n"
    "s.resolve_ip_for_localhost = lambda host: host\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "sys.exit(main())\n"
)


def _cluster_env(s3: s3server.S3Server) -> dict[str, str]:
    return {**os.environ, **s3.env(),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",       # every Ray address stays 127.0.0.1
            # notice a dead node within a few seconds (defaults: ~30 s)
            "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@dataclass
class Node:
    name: str
    proc: subprocess.Popen            # `ray start --block`: the node's supervisor
    log: Path
    temp_dir: str
    _seen: dict = field(default_factory=dict)     # pid → start time

    def processes(self) -> list[int]:
        """The supervisor and everything below it (raylet, agents, workers), remembered so
        that teardown still reaches workers that were reparented after a kill; a pid that
        now belongs to another process (reuse) is never returned."""
        if _alive(self.proc.pid):
            for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
                if pid not in self._seen and (st := _stat(pid)) is not None:
                    self._seen[pid] = st[3]
        return [p for p, started in self._seen.items() if _alive(p, started)]

    def raylet_pid(self) -> int | None:
        return next((p for p in self.processes() if (_stat(p) or ("",))[0] == "raylet"), None)

    def kill_hard(self) -> None:
        """SIGKILL every process of the node at once: the machine is gone."""
        _kill_all(self.processes(), signal.SIGKILL)
        self.proc.wait(10)
        _wait_gone(self._seen, 15)

    def stop(self) -> None:
        """SIGTERM the supervisor (it stops its processes), then SIGKILL what is left."""
        self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        _kill_all(_wait_gone(self._seen, 5), signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        _wait_gone(self._seen, 10)


def _start_node(name: str, args: list[str], env: dict, launcher: list[str], timeout_s: float = 90) -> Node:
    temp_dir = tempfile.mkdtemp(prefix=f"apr-{name}-", dir="/tmp")   # short: unix socket paths
    log = Path(temp_dir, "ray-start.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([*launcher, "start", *args, f"--temp-dir={temp_dir}", "--block"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    node = Node(name, proc, log, temp_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "Ray runtime started" in text:
            node.processes()
            return node
        if proc.poll() is not None:
            break
        time.sleep(0.25)
    node.stop()
    raise RuntimeError(f"ray node {name} did not start: {log.read_text(errors='replace')[-3000:]}")


@dataclass
class Cluster:
    address: str
    head: Node
    worker: Node
    env: dict


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    yield from s3server.pytest_fixture_body(tmp_path_factory)


@pytest.fixture(scope="module")
def cluster(s3):
    env = _cluster_env(s3)
    ray_cli = [str(Path(sys.executable).parent / "ray")]
    port, dash, client, agent_h, agent_w = s3server.free_ports(5)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats",
              "--min-worker-port=0", "--max-worker-port=0", f"--object-store-memory={100 * 2**20}"]
    nodes: list[Node] = []
    try:
        nodes.append(_start_node("head", ["--head", f"--port={port}", "--include-dashboard=false",
                                          f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                                          f"--dashboard-agent-listen-port={agent_h}", *common], env, ray_cli))
        nodes.append(_start_node("worker", [f"--address=127.0.0.1:{port}",
                                            f"--dashboard-agent-listen-port={agent_w}", *common],
                                 env, [sys.executable, "-c", _WORKER_NODE_LAUNCHER]))
        yield Cluster(f"127.0.0.1:{port}", nodes[0], nodes[1], env)
    finally:
        for node in reversed(nodes):
            node.stop()
            shutil.rmtree(node.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(s3, digits_models) -> dict:
    """12 shards of 30 digits and the two checkpoints, all on S3."""
    from pipeline.io.make_shards import make_shards

    root = s3.url("cluster-inputs")
    doc = make_shards("digits", storage.join(root, "shards"), split="test", samples_per_shard=30)
    models = {}
    for name, path in digits_models.items():
        models[name] = storage.join(root, Path(path).name)
        storage.put_bytes(models[name], Path(path).read_bytes())
    return {"pattern": doc["pattern"], "models": models, "shards": len(doc["shards"])}


class Driver:
    """`python -m pipeline.cli run job.yaml` against the cluster; notes which node hosts each
    ShardWorker actor (a child of that node's raylet) while the job runs."""

    def __init__(self, cluster: Cluster, job: dict, workdir: Path):
        self.cluster = cluster
        path = workdir / "job.yaml"
        path.write_text(yaml.safe_dump(job))
        self.log = workdir / "driver.log"
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(path)], cwd=workdir,
                                     env=cluster.env, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.actor_nodes: dict[int, str] = {}     # actor pid → node name
        self.busy_nodes: set[str] = set()         # nodes seen running ShardWorker.process
        self._stop = threading.Event()
        self._raylets = {cluster.head.raylet_pid(): "head", cluster.worker.raylet_pid(): "worker"}
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for raylet, name in self._raylets.items():
                for pid in _descendants(raylet) if raylet else []:
                    title = _cmdline(pid)      # Ray sets it: ray::ShardWorker[.method]
                    if title.startswith("ray::ShardWorker"):
                        self.actor_nodes[pid] = name
                    if title.startswith("ray::ShardWorker.process"):
                        self.busy_nodes.add(name)
            self._stop.wait(0.2)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        self._watcher.join(5)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._out.close()


def _job(cluster: Cluster, inputs: dict, out: str, steps: int) -> dict:
    return job_dict(inputs["pattern"], inputs["models"], out,
                    attacks=[{"name": "pgd", "params": {"eps": 0.2, "steps": steps, "step_size": 0.02}}],
                    cluster={"address": cluster.address, "num_workers": 2, "cpus_per_worker": 1,
                             "gpus_per_worker": 0, "max_attempts": 3, "shard_timeout_s": 120})


def _markers(out: str) -> list[dict]:
    return [json.loads(storage.read_text(u)) for u in storage.listdir(storage.join(out, "evaluate"))
            if u.endswith(".done.json")]


def _assert_exactly_once(out: str, n: int) -> None:
    table = commit.load_records(out)
    keys = list(zip(table.column("key").to_pylist(), table.column("attack_index").to_pylist()))
    assert len(keys) == n, f"{len(keys)} rows for {n} samples"
    assert len(set(keys)) == n, "duplicate rows"


def test_job_runs_on_both_nodes(cluster, inputs, s3, tmp_path):
    out = s3.url("cluster-out", uuid.uuid4().hex[:6])
    driver = Driver(cluster, _job(cluster, inputs, out, steps=40), tmp_path)
    try:
        code = driver.wait(180)
    finally:
        driver.close()
    assert code == 0, driver.text()[-4000:]
    _assert_exactly_once(out, 360)
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert all(s["status"] == "committed" for s in manifest["stages"]["evaluate"]["shards"].values())
    markers = _markers(out)
    assert len(markers) == inputs["shards"]
    # one actor per node; which of them commits which shard is timing (a slow start on one
    # node can leave it no work), so only placement is asserted, and that markers name a node
    assert sorted(set(driver.actor_nodes.values())) == ["head", "worker"], driver.actor_nodes
    assert all(m.get("node_id") for m in markers)
    # provenance: the manifest names each actor's node, every record its node, host and device
    workers = manifest["stages"]["evaluate"]["workers"]
    assert len({w["node_id"] for w in workers}) == 2, workers
    table = commit.load_records(out)
    assert set(table.column("node_id").to_pylist()) <= {w["node_id"] for w in workers}
    assert None not in table.column("host").to_pylist() and set(table.column("device").to_pylist()) == {"cpu"}


def test_node_loss_mid_job_every_sample_exactly_once(cluster, inputs, s3, tmp_path):
    out = s3.url("cluster-out", uuid.uuid4().hex[:6])
    driver = Driver(cluster, _job(cluster, inputs, out, steps=40), tmp_path)
    try:
        # kill once the worker node's actor is processing a shard and some shards are committed
        deadline = time.monotonic() + 150
        committed = 0
        while time.monotonic() < deadline and driver.proc.poll() is None:
            committed = len(_markers(out))
            if committed >= 1 and "worker" in driver.busy_nodes:
                break
            time.sleep(0.3)
        assert driver.proc.poll() is None and 1 <= committed < inputs["shards"], \
            f"kill should land mid-run ({committed} committed): {driver.text()[-3000:]}"
        cluster.worker.kill_hard()
        killed_at = time.monotonic()
        code = driver.wait(180)
    finally:
        driver.close()
    assert code == 0, driver.text()[-4000:]
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    shards = manifest["stages"]["evaluate"]["shards"]
    assert all(s["status"] == "committed" for s in shards.values()), shards
    died = [sid for sid, s in shards.items() if any("worker died" in e for e in s["errors"])]
    assert died, f"the killed node held no shard: {shards}"
    assert all(shards[sid]["attempts"] >= 2 for sid in died)
    _assert_exactly_once(out, 360)
    assert len(_markers(out)) == inputs["shards"]
    print(f"recovered in {time.monotonic() - killed_at:.1f}s after the node loss; retried {died}")
