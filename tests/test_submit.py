"""`advpure submit / status / logs / stop` against a real two-node Ray cluster on 127.0.0.1
(`ray start --head` with the dashboard's job server on loopback, plus a worker node), with
Ray token authentication ON: the CLI authenticates with the token, a wrong token is refused,
and the token appears in no job log, record, manifest or saved config."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.run import commit
from tests import s3server
from tests.conftest import ROOT, job_dict
from tests.test_cluster import _WORKER_NODE_LAUNCHER, Node, _start_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TOKEN = secrets.token_hex(32)


def _env(token: str = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    venv_bin = str(Path(sys.executable).parent)
    # the nodes run `python` from this venv (as after `source venv/bin/activate && ray start`);
    # no PYTHONPATH: the job's code travels in its runtime env
    return {**env, "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": "",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = _env()
    ray_cli = [str(Path(sys.executable).parent / "ray")]
    port, dash, client, agent_h, agent_w = s3server.free_ports(5)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats",
              "--min-worker-port=0", "--max-worker-port=0", f"--object-store-memory={100 * 2**20}"]
    nodes: list[Node] = []
    try:
        nodes.append(_start_node("head", ["--head", f"--port={port}", "--include-dashboard=true",
                                          "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                                          f"--ray-client-server-port={client}",
                                          f"--dashboard-agent-listen-port={agent_h}", *common], env, ray_cli))
        nodes.append(_start_node("worker", [f"--address=127.0.0.1:{port}",
                                            f"--dashboard-agent-listen-port={agent_w}", *common],
                                 env, [sys.executable, "-c", _WORKER_NODE_LAUNCHER]))
        yield {"address": f"http://127.0.0.1:{dash}", "dash_port": dash, "head": nodes[0]}
    finally:
        for node in reversed(nodes):
            node.stop()
            shutil.rmtree(node.temp_dir, ignore_errors=True)


def advpure(*args: str, token: str = TOKEN, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**_env(token), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def _job_file(tmp_path: Path, shards: str, models: dict, steps: int) -> Path:
    job = job_dict(shards, models, str(tmp_path / "out"),
                   attacks=[{"name": "pgd", "params": {"eps": 0.2, "steps": steps, "step_size": 0.02}}],
                   cluster={"num_workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 0})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _submitted_id(out: str) -> str:
    match = re.search(r"submitted (advpure-[\w-]+) to", out)
    assert match, out
    return match.group(1)


def test_submit_status_logs_against_a_loopback_cluster(cluster, digits_shards, digits_models, tmp_path):
    addr = ["--address", cluster["address"]]
    sub = advpure("submit", str(_job_file(tmp_path, digits_shards["pattern"], digits_models, 3)), *addr)
    assert sub.returncode == 0, sub.stdout
    job_id = _submitted_id(sub.stdout)
    status = advpure("status", job_id, *addr)
    assert status.returncode == 0 and re.search(r"status: (PENDING|RUNNING|SUCCEEDED)", status.stdout), status.stdout
    logs = advpure("logs", job_id, *addr, "--follow")            # returns when the job ends
    assert logs.returncode == 0 and f"results: {tmp_path / 'out'}" in logs.stdout, logs.stdout[-3000:]
    final = advpure("status", job_id, *addr)
    assert final.returncode == 0 and "status: SUCCEEDED" in final.stdout, final.stdout
    assert "output: " + str(tmp_path / "out") in final.stdout
    table = commit.load_records(str(tmp_path / "out"))
    keys = list(zip(table.column("key").to_pylist(), table.column("attack_index").to_pylist()))
    assert len(keys) == 360 and len(set(keys)) == 360
    assert len(set(table.column("node_id").to_pylist())) >= 1 and None not in table.column("host").to_pylist()
    every = [logs.stdout, advpure("logs", job_id, *addr).stdout, final.stdout]
    every += [p.read_bytes().decode(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not [t for t in every if TOKEN in t], "the auth token leaked into an output"
    print(f"\n$ advpure submit job.yaml --address {cluster['address']}\n{sub.stdout}"
          f"$ advpure status {job_id} (while running)\n{status.stdout}"
          f"$ advpure logs {job_id} --follow   (first and last lines)\n"
          + "\n".join(logs.stdout.splitlines()[:3] + ["..."] + logs.stdout.splitlines()[-3:])
          + f"\n$ advpure status {job_id}\n{final.stdout}")


def test_stop_and_a_wrong_token_is_refused(cluster, digits_shards, digits_models, tmp_path):
    addr = ["--address", cluster["address"]]
    sub = advpure("submit", str(_job_file(tmp_path, digits_shards["pattern"], digits_models, 400)), *addr)
    job_id = _submitted_id(sub.stdout)
    refused = advpure("status", job_id, *addr, token=secrets.token_hex(32))
    assert refused.returncode == 2 and cluster["address"] in refused.stdout, refused.stdout
    assert "an authentication problem" in refused.stdout and "is not this cluster's" in refused.stdout
    assert TOKEN not in refused.stdout
    deadline = time.monotonic() + 120                              # stop it once it is running
    while time.monotonic() < deadline and "status: RUNNING" not in advpure("status", job_id, *addr).stdout:
        time.sleep(1)
    stop = advpure("stop", job_id, *addr)
    assert stop.returncode == 0 and f"{job_id}: STOPPED" in stop.stdout, stop.stdout
    after = advpure("status", job_id, *addr)
    assert after.returncode == 1 and "status: STOPPED" in after.stdout
    log = advpure("logs", job_id, *addr).stdout           # our one line, not Ray's SIGTERM stack dump
    assert "stopped (SIGTERM)" in log and "Traceback" not in log and "SIGTERM received" not in log, log[-3000:]


def _listening(port: int) -> list[str]:
    """Addresses with a socket listening on `port` (from /proc/net/tcp{,6}; state 0A = LISTEN)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(addr)
                ip = ".".join(str(b) for b in raw[::-1]) if len(raw) == 4 else raw.hex()
                out.append(ip)
    return out


def test_job_server_listens_on_loopback_only(cluster):
    listening = _listening(cluster["dash_port"])
    assert listening and all(ip == "127.0.0.1" for ip in listening), listening
    doc = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = " ".join(doc["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "RAY_AUTH_MODE=disabled" not in json.dumps(doc)           # token auth stays on
