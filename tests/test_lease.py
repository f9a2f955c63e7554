"""The job lease: conditional writes, one holder, refusal naming the holder, take-over of a
stale or dead holder, self-fencing; two real drivers on one output (slow)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.io import storage
from pipeline.run import commit, driver, lease
from tests.conftest import ROOT, job_dict

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------- conditional writes (local)

def test_put_if_absent_has_exactly_one_winner(tmp_path):
    url = str(tmp_path / "d" / "x.json")
    wins: list[str] = []
    barrier = threading.Barrier(8)

    def racer(i: int) -> None:
        barrier.wait()
        if storage.put_if_absent(url, f"writer {i}".encode()) is not None:
            wins.append(f"writer {i}")

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and storage.read_text(url) == wins[0]
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["x.json"]   # no temporaries left


def test_put_and_remove_if_match_compare_versions(tmp_path):
    url = str(tmp_path / "x.json")
    v1 = storage.put_if_absent(url, b"one")
    assert storage.read_versioned(url) == (b"one", v1)
    v2 = storage.put_if_match(url, b"two", v1)
    assert v2 and v2 != v1 and storage.read_text(url) == "two"
    assert storage.put_if_match(url, b"three", v1) is None          # stale version: refused
    assert storage.remove_if_match(url, v1) is False and storage.exists(url)
    assert storage.remove_if_match(url, v2) is True and not storage.exists(url)
    assert storage.put_if_match(url, b"four", v2) is None           # gone: refused


# ---------------------------------------------------------------------------- the lease

def _take(out: str, timeout_s: float = 30, heartbeat_s: float = 5) -> lease.Lease:
    return lease.acquire(out, "job", timeout_s, heartbeat_s)


def test_second_driver_refuses_naming_the_holder_and_how_to_take_over(tmp_path):
    out = str(tmp_path / "out")
    with _take(out) as held:
        with pytest.raises(lease.LeaseHeld) as err:
            _take(out)
        msg = str(err.value)
        assert held.holder in msg and f"pid {os.getpid()}" in msg
        assert "cluster.lease_timeout_s" in msg and lease.lease_url(out) in msg
        assert json.loads(storage.read_text(lease.lease_url(out)))["holder"] == held.holder
    assert not storage.exists(lease.lease_url(out))                 # released


def test_stale_heartbeat_is_taken_over(tmp_path):
    out = str(tmp_path / "out")
    old = {"holder": "elsewhere", "host": "other-host", "pid": 1, "machine": "another machine",
           "job": "job", "heartbeat": time.time() - 31}
    storage.put_text(lease.lease_url(out), json.dumps(old))
    with _take(out, timeout_s=30) as held:
        assert held.took_over["holder"] == "elsewhere"
        assert json.loads(storage.read_text(lease.lease_url(out)))["holder"] == held.holder
    old["heartbeat"] = time.time() - 5                              # fresh: refused
    storage.put_text(lease.lease_url(out), json.dumps(old))
    with pytest.raises(lease.LeaseHeld, match="host other-host, pid 1"):
        _take(out, timeout_s=30)


def test_sigkilled_holder_on_this_machine_is_taken_over_at_once(tmp_path):
    out = str(tmp_path / "out")
    code = ("import sys, time; from pipeline.run import lease; "
            f"lease.acquire({out!r}, 'job', 600, 60); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(lease.LeaseHeld, match=f"pid {proc.pid}"):
            _take(out, timeout_s=600)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        with _take(out, timeout_s=600) as held:                    # heartbeat fresh, process gone
            assert held.took_over["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait(10)


def test_holder_notices_a_take_over_and_keeps_its_hands_off(tmp_path):
    out = str(tmp_path / "out")
    held = _take(out, timeout_s=3, heartbeat_s=0.1)
    try:
        first = json.loads(storage.read_text(lease.lease_url(out)))["heartbeat"]
        time.sleep(0.5)
        assert json.loads(storage.read_text(lease.lease_url(out)))["heartbeat"] > first   # renewed
        held.check()
        thief = {"holder": "thief", "host": "h", "pid": 2, "job": "j", "heartbeat": time.time()}
        storage.put_text(lease.lease_url(out), json.dumps(thief))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not held._lost:
            time.sleep(0.05)
        with pytest.raises(lease.LeaseLost, match="taken over by holder thief"):
            held.check()
    finally:
        held.release()
    assert json.loads(storage.read_text(lease.lease_url(out)))["holder"] == "thief"   # not removed


def test_holder_that_cannot_renew_fences_itself_before_the_timeout(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    held = _take(out, timeout_s=1.5, heartbeat_s=0.1)
    try:
        def unreachable(*a, **k):
            raise storage.StorageError("store unreachable")
        monkeypatch.setattr(storage, "put_if_match", unreachable)
        time.sleep(lease.SELF_FENCE * 1.5 + 0.3)
        with pytest.raises(lease.LeaseLost, match="could not renew"):
            held.check()
    finally:
        monkeypatch.undo()
        held.release()


def test_unwritable_output_is_a_clear_error_before_any_work(tmp_path, digits_shards):
    import ray

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = config.from_dict(job_dict(digits_shards["pattern"], {"cnn": "x.pt", "dae": "y.pt"},
                                    str(blocker / "out")), check_components=False)
    with pytest.raises(config.ConfigError, match=f"job.output {blocker / 'out'} is not writable"):
        driver.run(cfg)
    assert not ray.is_initialized()


# ---------------------------------------------------------------------------- two real drivers

def _advpure(path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(path)], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_drivers_one_runs_one_refuses_then_a_killed_drivers_lease_is_taken_over(
        digits_shards, digits_models, tmp_path):
    out = tmp_path / "out"
    # the first driver commits three shards, then hangs on the last one until it is killed
    hang = [{"shard": "shard-000003", "mode": "hang", "marker_dir": str(tmp_path / "faults"), "times": 1}]
    job = job_dict(digits_shards["pattern"], digits_models, str(out), faults=hang, attacks=[],
                   cluster={"num_workers": 1, "lease_timeout_s": 600, "lease_heartbeat_s": 1})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    first = _advpure(path, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and len(list((out / "evaluate").glob("*.done.json"))) < 3:
            time.sleep(0.2)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        holder = json.loads((out / "lease.json").read_text())
        second = _advpure(path, tmp_path / "second.log")
        assert second.wait(60) == 1
        refusal = (tmp_path / "second.log").read_text()
        assert f"holder {holder['holder']}" in refusal and f"pid {first.pid}" in refusal, refusal
        assert first.poll() is None                                # the holder was not disturbed
        os.killpg(first.pid, signal.SIGKILL)                       # then it dies
        first.wait(30)
        third = _advpure(path, tmp_path / "third.log")             # same machine: taken over at once
        assert third.wait(200) == 0, (tmp_path / "third.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
    assert "took over the job lease" in (tmp_path / "third.log").read_text()
    statuses = [s["status"] for s in json.loads((out / "manifest.json").read_text())
                ["stages"]["evaluate"]["shards"].values()]
    assert sorted(statuses) == ["committed", "skipped", "skipped", "skipped"]
    table = commit.load_records(str(out))
    keys = list(zip(table.column("key").to_pylist(), table.column("attack_index").to_pylist()))
    assert len(keys) == 360 and len(set(keys)) == 360
    assert len(list((out / "evaluate").glob("*.parquet"))) == 4   # no orphan from the killed driver
    assert not (out / "lease.json").exists()
    print("\n--- second driver (refused) ---\n" + refusal.strip())
