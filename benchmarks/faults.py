"""The fault matrix: every failure the pipeline claims to survive, injected into a real job,
each case run to completion and checked for exactly-once output.

    python benchmarks/faults.py [--cases a,b,...] [--shards 20] [--per-shard 50] [--markdown FILE]
                                [--dataset auto|mnist|digits] [--models DIR]

Data: MNIST (held-out test images, ../shared/data/mnist or ADVPURE_MNIST_DIR) when present,
else the bundled digits; a small CNN and DAE trained here; PGD; one driver process per run
(`python -m pipeline.cli run`), exactly as a user runs it. Cases:

  actor_kills      N random SIGKILLs of ShardWorker actor processes mid-job
  node_kill        a two-node `ray start` cluster on 127.0.0.1, the worker node SIGKILLed
  s3_restart       shards, models and output on SeaweedFS, the server restarted mid-job
  driver_kill      the driver SIGKILLed (with its local Ray), then the same command again
  raylet_kill      the local raylet SIGKILLed: a bounded abort naming the cause, then a re-run
  unwritable       job.output under a regular file: refused before any work; then a good output
  disk_full        output on a 96 KiB tmpfs: commits fail without markers, shards quarantined;
                   space added, re-run (needs root for mount; skipped otherwise)
  bad_shards       a truncated shard, a corrupt shard, an undecodable sample: two shards
                   quarantined by name, one per-sample decode_error row, the rest exact
  nan_purifier     a purifier whose weights are NaN: every row `nonfinite`, no shard fails

Prints one row per case: samples, rows, duplicate rows, lost (sample, attack) pairs, the exit
code of each driver run, wall time. `lost` counts pairs with no row; in bad_shards they are
exactly the quarantined shards' samples (reported in the manifest, never silent).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # every Ray address on loopback

import yaml  # noqa: E402

from pipeline.io import datasets, storage  # noqa: E402
from pipeline.io.make_shards import make_shards  # noqa: E402
from pipeline.run import commit  # noqa: E402
from tests import s3server  # noqa: E402
from tests.test_cluster import _WORKER_NODE_LAUNCHER, _cmdline, _descendants, _start_node, _stat  # noqa: E402

FAST_HEALTH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
               "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@dataclass
class Row:
    case: str
    samples: int
    rows: int
    duplicates: int
    lost: int
    exits: list[int]
    seconds: float
    note: str = ""


@dataclass
class Inputs:
    work: Path
    pattern: str
    samples: int
    models: dict[str, str]
    steps: int


# ---------------------------------------------------------------------------- running a job

def job_yaml(inp: Inputs, out: str, name: str, **over: Any) -> Path:
    cfg = {
        "job": {"name": name, "output": out},
        "data": {"shards": inp.pattern, "batch_size": 64},
        "classifier": {"name": "small_cnn", "params": {"checkpoint": inp.models["cnn"]}},
        "purifier": {"name": "dae", "params": {"checkpoint": inp.models["dae"]}},
        "attacks": [{"name": "pgd", "params": {"eps": 0.2, "steps": inp.steps, "step_size": 0.05}}],
        "cluster": {"num_workers": 2, "cpus_per_worker": 1, "max_attempts": 5, "shard_timeout_s": 300,
                    "actor_start_timeout_s": 120},
    }
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = inp.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def slow_attack(inp: Inputs) -> list[dict[str, Any]]:
    """Enough work per shard that a kill lands mid-job, not after the last commit."""
    return [{"name": "pgd", "params": {"eps": 0.2, "steps": max(inp.steps, 40), "step_size": 0.02}}]


def start_driver(path: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **FAST_HEALTH, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(path)], cwd=ROOT, env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout_s: float = 900) -> int:
    try:
        return proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_markers(out: str, n: int, proc: subprocess.Popen, timeout_s: float = 300) -> int:
    """Until `n` shards are committed (or the driver ended); how many are."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        done = len(commit.committed(out, "evaluate"))
        if done >= n:
            return done
        time.sleep(0.3)
    return len(commit.committed(out, "evaluate"))


def tally(case: str, out: str, samples: int, exits: list[int], t0: float, note: str = "") -> Row:
    try:
        table = commit.load_records(out)
        keys = list(zip(table.column("key").to_pylist(), table.column("attack_index").to_pylist()))
    except commit.CommitError:
        keys = []
    return Row(case, samples, len(keys), len(keys) - len(set(keys)), samples - len(set(keys)), exits,
               time.time() - t0, note)


def ray_children(root: int, title: str) -> list[int]:
    return [p for p in _descendants(root) if _cmdline(p).startswith(title)]


# ---------------------------------------------------------------------------- cases

def case_actor_kills(inp: Inputs, kills: int = 4) -> Row:
    out, t0 = str(inp.work / "actor_kills"), time.time()
    proc = start_driver(job_yaml(inp, out, "actor_kills"), inp.work / "actor_kills.log")
    done = 0
    for _ in range(kills):
        deadline = time.monotonic() + 120
        busy: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None and not busy:
            busy = ray_children(proc.pid, "ray::ShardWorker.process")
            time.sleep(0.2)
        if busy:
            os.kill(random.choice(busy), signal.SIGKILL)
            done += 1
            time.sleep(2.0)
    code = finish(proc)
    return tally("actor_kills", out, inp.samples, [code], t0, f"{done} actor SIGKILLs")


def _node_env() -> dict[str, str]:
    return {**os.environ, **FAST_HEALTH, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def case_node_kill(inp: Inputs) -> Row:
    env = _node_env()
    port, dash, client, agent_h, agent_w = s3server.free_ports(5)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats",
              "--min-worker-port=0", "--max-worker-port=0", f"--object-store-memory={100 * 2**20}"]
    nodes = []
    out, t0 = str(inp.work / "node_kill"), time.time()
    try:
        nodes.append(_start_node("head", ["--head", f"--port={port}", "--include-dashboard=false",
                                          f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                                          f"--dashboard-agent-listen-port={agent_h}", *common], env,
                                 [str(Path(sys.executable).parent / "ray")]))
        nodes.append(_start_node("worker", [f"--address=127.0.0.1:{port}",
                                            f"--dashboard-agent-listen-port={agent_w}", *common],
                                 env, [sys.executable, "-c", _WORKER_NODE_LAUNCHER]))
        t0 = time.time()
        path = job_yaml(inp, out, "node_kill", cluster={"address": f"127.0.0.1:{port}", "gpus_per_worker": 0})
        proc = start_driver(path, inp.work / "node_kill.log", env)
        raylet = nodes[1].raylet_pid()
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and proc.poll() is None and not (
                len(commit.committed(out, "evaluate")) >= 1 and ray_children(raylet, "ray::ShardWorker.process")):
            time.sleep(0.3)
        nodes[1].kill_hard()
        code = finish(proc)
    finally:
        for node in reversed(nodes):
            node.stop()
            shutil.rmtree(node.temp_dir, ignore_errors=True)
    return tally("node_kill", out, inp.samples, [code], t0, "worker node SIGKILLed while its actor held a shard")


def case_s3_restart(inp: Inputs) -> Row:
    with s3server.running(inp.work / "s3") as srv:
        if srv.kind != "seaweedfs":
            return Row("s3_restart", inp.samples, 0, 0, 0, [], 0.0, "skipped: needs SeaweedFS")
        root = srv.url("faults")
        doc = _copy_shards_to(inp, storage.join(root, "shards"))
        models = {}
        for name, path in inp.models.items():
            models[name] = storage.join(root, "models", Path(path).name)
            storage.put_bytes(models[name], Path(path).read_bytes())
        s3inp = Inputs(inp.work, doc, inp.samples, models, inp.steps)
        out, t0 = storage.join(root, "out"), time.time()
        proc = start_driver(job_yaml(s3inp, out, "s3_restart"), inp.work / "s3_restart.log", srv.env())
        wait_markers(out, 2, proc)
        srv.restart(3.0)
        code = finish(proc)
        return tally("s3_restart", out, inp.samples, [code], t0, "SeaweedFS down 3 s (+ its restart) mid-job")


def _copy_shards_to(inp: Inputs, dest: str) -> str:
    src = Path(inp.pattern).parent
    for p in sorted(src.iterdir()):
        storage.put_bytes(storage.join(dest, p.name), p.read_bytes())
    return storage.join(dest, Path(inp.pattern).name)


def case_driver_kill(inp: Inputs) -> Row:
    out, t0 = str(inp.work / "driver_kill"), time.time()
    path = job_yaml(inp, out, "driver_kill", cluster={"num_workers": 1}, attacks=slow_attack(inp))
    proc = start_driver(path, inp.work / "driver_kill.log")
    before = wait_markers(out, 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)              # the driver and its local Ray, at once
    first = finish(proc)
    second = finish(start_driver(path, inp.work / "driver_kill.log"))
    return tally("driver_kill", out, inp.samples, [first, second], t0, f"killed after {before} shards")


def case_raylet_kill(inp: Inputs) -> Row:
    out, t0 = str(inp.work / "raylet_kill"), time.time()
    path = job_yaml(inp, out, "raylet_kill", cluster={"num_workers": 1}, attacks=slow_attack(inp))
    log = inp.work / "raylet_kill.log"
    proc = start_driver(path, log)
    wait_markers(out, 1, proc)
    raylet = next(p for p in _descendants(proc.pid) if (_stat(p) or ("",))[0] == "raylet")
    os.kill(raylet, signal.SIGKILL)
    killed = time.monotonic()
    first = finish(proc)
    abort_s = time.monotonic() - killed
    reason = next((ln for ln in log.read_text(errors="replace").splitlines() if "ABORTED" in ln), "?")
    second = finish(start_driver(path, log))
    return tally("raylet_kill", out, inp.samples, [first, second], t0,
                 f"abort {abort_s:.0f}s after the kill: {reason.split(': ', 1)[-1][:200]}")


def case_unwritable(inp: Inputs) -> Row:
    blocker = inp.work / "a-file"
    blocker.write_text("not a folder")
    t0 = time.time()
    log = inp.work / "unwritable.log"
    first = finish(start_driver(job_yaml(inp, str(blocker / "out"), "unwritable"), log))
    refused_s = time.time() - t0
    out = str(inp.work / "unwritable")
    second = finish(start_driver(job_yaml(inp, out, "unwritable"), log))
    said = next((ln for ln in log.read_text().splitlines() if "not writable" in ln), "?")
    return tally("unwritable", out, inp.samples, [first, second], t0,
                 f"refused in {refused_s:.0f}s (CLI start-up included), before Ray started: "
                 f"\"{said.split('is not writable: ')[-1].split(':')[0]}\"; then a writable output")


def case_disk_full(inp: Inputs) -> Row:
    if os.geteuid() != 0:
        return Row("disk_full", inp.samples, 0, 0, 0, [], 0.0, "skipped: needs root to mount a tmpfs")
    mnt = inp.work / "small-disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)]).returncode:
        return Row("disk_full", inp.samples, 0, 0, 0, [], 0.0, "skipped: mount not permitted")
    try:
        out, t0 = str(mnt / "out"), time.time()
        path = job_yaml(inp, out, "disk_full", cluster={"max_attempts": 2})
        log = inp.work / "disk_full.log"
        first = finish(start_driver(path, log))
        markers = commit.committed(out, "evaluate")
        orphan = [m for m in markers.values() if not Path(out, "evaluate", m["parquet"]).exists()]
        if markers:
            commit.load_records(out)                       # every marker's file is whole (sha256)
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        second = finish(start_driver(path, log))
        row = tally("disk_full", out, inp.samples, [first, second], t0,
                    f"{len(markers)} shards committed before ENOSPC, {len(orphan)} markers without a file")
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
    return row


def case_bad_shards(inp: Inputs) -> Row:
    from pipeline.io import shards

    src = Path(inp.pattern).parent
    d = inp.work / "bad-shards"
    shutil.copytree(src, d)
    names = sorted(p.name for p in d.glob("*.tar"))
    truncated, corrupt, junk = d / names[1], d / names[2], d / names[3]
    truncated.write_bytes(truncated.read_bytes()[: 512 * 10])        # cut at a block boundary
    data = bytearray(corrupt.read_bytes())
    data[100:200] = os.urandom(100)                                  # a garbled member header
    corrupt.write_bytes(bytes(data))
    _rewrite_with_junk(junk, shards.read_shard(str(junk)))           # one sample's image → junk bytes
    pattern = str(d / Path(inp.pattern).name)
    lost = len(shards.read_shard(str(src / names[1]))) + len(shards.read_shard(str(src / names[2])))
    out, t0 = str(inp.work / "bad_shards"), time.time()
    path = job_yaml(Inputs(inp.work, pattern, inp.samples, inp.models, inp.steps), out, "bad_shards",
                    data={"shards": pattern, "index": None})
    code = finish(start_driver(path, inp.work / "bad_shards.log"))
    rows = commit.load_records(out).to_pylist()
    decode = sum(r["status"] == "decode_error" for r in rows)
    quarantined = json.loads(Path(out, "manifest.json").read_text())["stages"]["evaluate"]["quarantined"]
    row = tally("bad_shards", out, inp.samples, [code], t0)
    row.note = (f"quarantined {quarantined} ({lost} samples, = lost), {decode} decode_error row(s)")
    return row


def _rewrite_with_junk(path: Path, samples: list) -> None:
    """The shard again, its first sample's image replaced by bytes no decoder accepts."""
    from pipeline.io import shards

    w = shards.TarBuilder()
    for i, s in enumerate(samples):
        w.add_sample(s.key, None if i == 0 else s.image, s.label,
                     image_bytes=b"\x89PNG junk, not an image" if i == 0 else None)
    path.write_bytes(w.finish())


def case_nan_purifier(inp: Inputs) -> Row:
    import torch

    from pipeline.io import checkpoints

    ckpt = checkpoints.load_ours(inp.models["dae"])
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    nan_dae = str(inp.work / "nan_dae.pt")
    checkpoints.save(nan_dae, ckpt["arch"], ckpt["arch_params"], state, ckpt["meta"])
    out, t0 = str(inp.work / "nan_purifier"), time.time()
    path = job_yaml(inp, out, "nan_purifier", purifier={"name": "dae", "params": {"checkpoint": nan_dae}})
    code = finish(start_driver(path, inp.work / "nan_purifier.log"))
    rows = commit.load_records(out).to_pylist()
    nonfinite = sum(r["status"] == "nonfinite" for r in rows)
    return tally("nan_purifier", out, inp.samples, [code], t0, f"{nonfinite} rows status nonfinite, 0 shards failed"
                 if code == 0 else f"{nonfinite} nonfinite rows")


CASES: dict[str, Callable[[Inputs], Row]] = {
    "actor_kills": case_actor_kills, "node_kill": case_node_kill, "s3_restart": case_s3_restart,
    "driver_kill": case_driver_kill, "raylet_kill": case_raylet_kill, "unwritable": case_unwritable,
    "disk_full": case_disk_full, "bad_shards": case_bad_shards, "nan_purifier": case_nan_purifier,
}


# ---------------------------------------------------------------------------- set-up and report

def prepare(work: Path, dataset: str, n_shards: int, per_shard: int, steps: int, models_dir: str | None) -> Inputs:
    """Shards, and a small CNN and DAE trained on the dataset (or cnn.pt / dae.pt from models_dir)."""
    from pipeline.train import recipes

    mnist = dataset == "mnist" or (dataset == "auto" and datasets.mnist_available())
    models = {"cnn": str(work / "cnn.pt"), "dae": str(work / "dae.pt")}
    if mnist:
        doc = make_shards("mnist", str(work / "shards"), split="t10k-holdout", samples_per_shard=per_shard,
                          limit=n_shards * per_shard)
    else:
        doc = make_shards("digits", str(work / "shards"), split="test", samples_per_shard=max(1, 360 // n_shards))
    if models_dir:
        models = {k: str(Path(models_dir, f"{k}.pt")) for k in models}
    elif mnist:
        recipes.train_small_cnn(models["cnn"], "mnist", "t10k-fit", epochs=2, width=16)
        recipes.train_small_dae(models["dae"], "mnist", "t10k-fit", epochs=2, width=16)
    else:
        recipes.train_small_cnn(models["cnn"], "digits", "train", epochs=12, width=16)
        recipes.train_small_dae(models["dae"], "digits", "train", epochs=8, width=16)
    return Inputs(work, doc["pattern"], doc["total_samples"], models, steps)


def table(rows: list[Row], attacks: int = 1) -> str:
    lines = ["| case | samples × attacks | rows | duplicates | lost | exit codes | time (s) | what happened |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.case} | {r.samples} × {attacks} | {r.rows} | {r.duplicates} | {r.lost} | "
                     f"{', '.join(map(str, r.exits)) or '-'} | {r.seconds:.0f} | {r.note} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--dataset", choices=["auto", "mnist", "digits"], default="auto",
                   help="auto: MNIST if its files are present, else the bundled digits")
    p.add_argument("--models", help="a folder with cnn.pt and dae.pt to use instead of training them")
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--per-shard", type=int, default=50)
    p.add_argument("--steps", type=int, default=10, help="PGD steps (the work per sample)")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs of every driver run)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="advpure-faults-", dir="/tmp"))
    inp = prepare(work, args.dataset, args.shards, args.per_shard, args.steps, args.models)
    print(f"inputs: {inp.samples} samples in {len(list(Path(inp.pattern).parent.glob('*.tar')))} shards; "
          f"work folder {work}", flush=True)
    rows = []
    for name in args.cases.split(","):
        threading.current_thread().name = name
        rows.append(CASES[name](inp))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
