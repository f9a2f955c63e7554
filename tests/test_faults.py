"""One case per failure behaviour of issue 14 (the full matrix is benchmarks/faults.py):
the local raylet killed mid-job → a bounded, named abort (exit 4), then a resume on a fresh
cluster is exactly once; a purifier that returns NaN → per-sample `nonfinite` rows."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import config, schema
from pipeline.io import checkpoints, shards
from pipeline.run import commit, driver
from pipeline.run.worker import ShardWorker
from tests.conftest import ROOT, job_dict

pytestmark = pytest.mark.timeout(300)

# a dead node is declared within ~3 s instead of ~30 s (read by the GCS the driver starts)
FAST_HEALTH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
               "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def _children(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                text = (d / "stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(text[text.rindex(")") + 2:].split()[1]), []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _name(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return text[text.index("(") + 1: text.rindex(")")]


def _advpure(path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, **FAST_HEALTH, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(path)], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find the raylet")
def test_raylet_killed_mid_job_aborts_with_the_cause_then_resumes_exactly_once(digits_shards, digits_models,
                                                                                tmp_path):
    out = tmp_path / "out"
    # three shards commit, then the worker sits on the last one: the kill lands mid-job
    hang = [{"shard": "shard-000003", "mode": "hang", "marker_dir": str(tmp_path / "faults"), "times": 1}]
    job = job_dict(digits_shards["pattern"], digits_models, str(out), attacks=[], faults=hang,
                   cluster={"num_workers": 1, "actor_start_timeout_s": 90})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    proc = _advpure(path, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None and \
                len(list((out / "evaluate").glob("*.done.json"))) < 3:
            time.sleep(0.2)
        raylets = [p for p in _children(proc.pid) if _name(p) == "raylet"]   # only this driver's Ray
        assert proc.poll() is None and len(raylets) == 1, (tmp_path / "first.log").read_text()[-3000:]
        os.kill(raylets[0], signal.SIGKILL)
        killed = time.monotonic()
        code = proc.wait(120)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = (tmp_path / "first.log").read_text()
    assert code == driver.EXIT_ABORTED, text[-3000:]
    assert took < 90, f"abort took {took:.0f}s"
    assert "no node can host a worker" in text and "died" in text and "raylet exited" in text, text[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "no node can host a worker" in manifest["stages"]["evaluate"]["aborted"]

    proc = _advpure(path, tmp_path / "second.log")                # a fresh local cluster
    assert proc.wait(200) == 0, (tmp_path / "second.log").read_text()[-3000:]
    table = commit.load_records(str(out))
    assert table.num_rows == 360 and len(set(table.column("key").to_pylist())) == 360
    statuses = [s["status"] for s in json.loads((out / "manifest.json").read_text())
                ["stages"]["evaluate"]["shards"].values()]
    assert sorted(statuses) == ["committed", "skipped", "skipped", "skipped"]


def test_nan_from_the_purifier_is_a_per_sample_row_not_a_crashed_shard(digits_shards, digits_models, tmp_path):
    ckpt = checkpoints.load_ours(digits_models["dae"])
    poisoned = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                for k, v in ckpt["state_dict"].items()}
    nan_dae = str(tmp_path / "nan_dae.pt")
    checkpoints.save(nan_dae, ckpt["arch"], ckpt["arch_params"], poisoned, ckpt["meta"])
    cfg = config.from_dict(job_dict(digits_shards["pattern"], {**digits_models, "dae": nan_dae},
                                    str(tmp_path / "out")))
    url = shards.expand(digits_shards["pattern"])[0]
    marker = ShardWorker(cfg.to_dict()).process(url, "shard-000000", "evaluate", expected=90)
    rows = commit.load_records(cfg.job.output).to_pylist()
    assert marker["rows"] == len(rows) == 90
    assert {r["status"] for r in rows} == {schema.Status.NONFINITE.value}
    assert all("non-finite purified logits" in r["error"] for r in rows)
    assert all(r["clean_pred"] is not None for r in rows)          # the bare classifier's view is kept
