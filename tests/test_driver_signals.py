"""The driver's own ending when it is stopped or its cluster goes away, on real Ray:

- SIGTERM (`advpure stop`, `ray job stop`, a batch scheduler) → one line, exit 143, workers
  stopped and the lease released, instead of Ray's C++ stack dump;
- the head node's GCS killed mid-job → our cause and the resume hint, exit 4, lease
  released, before Ray's core would end the process itself (exit 1, a C++ log line).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import s3server
from tests.conftest import ROOT, job_dict
from tests.test_cluster import _start_node, _stat

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

LONG = [{"name": "pgd", "params": {"eps": 0.2, "steps": 5000, "step_size": 0.01}}]   # minutes per shard


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}


def _start_driver(tmp_path: Path, job: dict, env: dict) -> tuple[subprocess.Popen, Path]:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    log = tmp_path / "driver.log"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(path)], cwd=tmp_path, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)


def _ended(proc: subprocess.Popen, timeout_s: float) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise


def test_sigterm_ends_the_driver_with_one_line(digits_shards, digits_models, tmp_path):
    out = tmp_path / "out"
    job = job_dict(digits_shards["pattern"], digits_models, str(out), attacks=LONG,
                   cluster={"num_workers": 1, "cpus_per_worker": 1, "executor": "ray"})
    proc, log = _start_driver(tmp_path, job, _env())
    try:
        _wait_for(log, "worker ready", proc)
        assert (out / "lease.json").exists()
        proc.send_signal(signal.SIGTERM)
        code = _ended(proc, 30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert code == 143, text[-3000:]
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1].startswith("stopped (SIGTERM)")
    assert not (out / "lease.json").exists()


def _gcs_pid(node) -> int:
    pids = [p for p in node.processes() if (_stat(p) or ("",))[0] == "gcs_server"]
    assert len(pids) == 1, pids
    return pids[0]


def test_gcs_loss_mid_job_ends_with_our_cause(digits_shards, digits_models, tmp_path):
    # Ray's core gives up on a dead GCS after gcs_rpc_server_reconnect_timeout_s: 20 s here
    # (60 by default); the driver gives up at half that with its own message
    env = _env(RAY_gcs_rpc_server_reconnect_timeout_s="20")
    port, client = s3server.free_ports(2)
    head = _start_node("head", ["--head", f"--port={port}", "--include-dashboard=false", "--node-ip-address=127.0.0.1",
                                f"--ray-client-server-port={client}", "--num-cpus=1", "--num-gpus=0",
                                "--disable-usage-stats", f"--object-store-memory={100 * 2**20}"],
                       env, [str(Path(sys.executable).parent / "ray")])
    out = tmp_path / "out"
    job = job_dict(digits_shards["pattern"], digits_models, str(out), attacks=LONG,
                   cluster={"address": f"127.0.0.1:{port}", "num_workers": 1, "cpus_per_worker": 1,
                            "gpus_per_worker": 0})
    proc, log = _start_driver(tmp_path, job, env)
    try:
        _wait_for(log, "worker ready", proc)
        os.kill(_gcs_pid(head), signal.SIGKILL)
        killed = time.monotonic()
        code = _ended(proc, 60)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)
    text = log.read_text(errors="replace")
    assert code == 4, text[-3000:]
    assert "Ray's GCS at 127.0.0.1:" in text and "the same command resumes" in text, text[-3000:]
    assert took < 20, f"ended {took:.0f}s after the GCS died: Ray's core would have ended it at 20 s"
    assert not (out / "lease.json").exists()
