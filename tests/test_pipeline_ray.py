"""End to end on real Ray: resume, retries, quarantine, deadlines, exactly-once output."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import config, report
from pipeline.config import ConfigError
from pipeline.io import datasets
from pipeline.run import commit, driver, scheduler
from tests.conftest import ROOT, job_dict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _cfg(digits_shards, digits_models, tmp_path, **over):
    return config.from_dict(job_dict(digits_shards["pattern"], digits_models, str(tmp_path / "out"), **over))


def _rows(output: str):
    return commit.load_records(output).to_pylist()


def _assert_exactly_once(output: str, n_samples: int, n_attacks: int = 1):
    rows = _rows(output)
    keys = [(r["key"], r["attack_index"]) for r in rows]
    assert len(rows) == n_samples * n_attacks
    assert len(set(keys)) == len(keys), "duplicate rows"


def test_job_end_to_end_then_resume_skips(ray_local, digits_shards, digits_models, tmp_path):
    cfg = _cfg(digits_shards, digits_models, tmp_path)
    code, manifest = driver.run(cfg)
    assert code == driver.EXIT_OK
    _assert_exactly_once(cfg.job.output, 360)
    st = manifest["stages"]["evaluate"]["shards"]
    assert all(s["status"] == "committed" for s in st.values())
    # 4 shards on 2 workers: the first worker ready is given a second shard to prefetch
    assert sum(m["prefetched"] for m in commit.committed(cfg.job.output, "evaluate").values()) >= 1
    mtimes = {p: p.stat().st_mtime_ns for p in Path(cfg.job.output, "evaluate").glob("*.parquet")}
    code, manifest = driver.run(cfg)                      # the same command again
    assert code == driver.EXIT_OK
    assert all(s["status"] == "skipped" for s in manifest["stages"]["evaluate"]["shards"].values())
    assert mtimes == {p: p.stat().st_mtime_ns for p in Path(cfg.job.output, "evaluate").glob("*.parquet")}
    summary = report.summarize(commit.load_records(cfg.job.output))
    assert summary["samples"] == 360 and summary["attacks"][0]["clean_classifier"]["acc"] > 0.8


def test_different_config_in_same_output_is_refused(ray_local, digits_shards, digits_models, tmp_path):
    cfg = _cfg(digits_shards, digits_models, tmp_path, attacks=[])
    assert driver.run(cfg)[0] == driver.EXIT_OK
    other = _cfg(digits_shards, digits_models, tmp_path,
                 attacks=[{"name": "fgsm", "params": {"eps": 0.1}}])
    with pytest.raises(ConfigError, match="holds results of config hash"):
        driver.run(other)


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_fault_once_is_retried_without_duplicates(ray_local, digits_shards, digits_models, tmp_path, mode):
    faults = [{"shard": "shard-000001", "mode": mode, "marker_dir": str(tmp_path / "faults"), "times": 1}]
    cfg = _cfg(digits_shards, digits_models, tmp_path, faults=faults, attacks=[])
    code, manifest = driver.run(cfg)
    assert code == driver.EXIT_OK
    s1 = manifest["stages"]["evaluate"]["shards"]["shard-000001"]
    assert s1["status"] == "committed" and s1["attempts"] == 2
    assert ("injected fault" in s1["errors"][0]) if mode == "raise" else ("worker died" in s1["errors"][0])
    _assert_exactly_once(cfg.job.output, 360)


def test_poisoned_shard_is_quarantined_and_exit_code_nonzero(ray_local, digits_shards, digits_models, tmp_path):
    faults = [{"shard": "shard-000002", "mode": "raise", "marker_dir": str(tmp_path / "faults"), "times": 99}]
    cfg = _cfg(digits_shards, digits_models, tmp_path, faults=faults, attacks=[])
    code, manifest = driver.run(cfg)
    assert code == driver.EXIT_QUARANTINED
    st = manifest["stages"]["evaluate"]
    assert st["quarantined"] == ["shard-000002"]
    assert st["shards"]["shard-000002"]["attempts"] == cfg.cluster.max_attempts
    assert len(_rows(cfg.job.output)) == 270           # the other three shards are complete


def test_hung_shard_hits_deadline_and_is_retried(ray_local, digits_shards, digits_models, tmp_path):
    faults = [{"shard": "shard-000000", "mode": "hang", "marker_dir": str(tmp_path / "faults"), "times": 1}]
    over = {"faults": faults, "attacks": [],
            "cluster": {"num_workers": 2, "max_attempts": 2, "shard_timeout_s": 8}}
    cfg = _cfg(digits_shards, digits_models, tmp_path, **over)
    code, manifest = driver.run(cfg)
    assert code == driver.EXIT_OK
    s0 = manifest["stages"]["evaluate"]["shards"]["shard-000000"]
    assert s0["attempts"] == 2 and "timed out" in s0["errors"][0]
    _assert_exactly_once(cfg.job.output, 360)


def test_worker_that_cannot_start_aborts_the_job(ray_local, digits_shards, digits_models, tmp_path):
    cfg = _cfg(digits_shards, digits_models, tmp_path, attacks=[],
               evaluation={"device": "cuda"}, cluster={"num_workers": 1, "max_actor_failures": 2})
    if __import__("torch").cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    code, manifest = driver.run(cfg)
    assert code == driver.EXIT_ABORTED
    assert "no GPU is visible" in manifest["stages"]["evaluate"]["aborted"]


def _advpure(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_driver_sigkilled_mid_run_then_rerun_is_exactly_once(digits_shards, digits_models, tmp_path):
    """A real driver process (its own local Ray) killed with SIGKILL, then the same command."""
    from pipeline.io.make_shards import make_shards

    doc = make_shards("digits", str(tmp_path / "sh"), split="test", samples_per_shard=30)   # 12 shards
    cfg = job_dict(doc["pattern"], digits_models, str(tmp_path / "out"),
                   attacks=[{"name": "pgd", "params": {"eps": 0.2, "steps": 40}}],
                   cluster={"num_workers": 1, "executor": "ray"})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _advpure("run", str(path))
    out = Path(cfg["job"]["output"], "evaluate")
    deadline = time.time() + 150
    while time.time() < deadline and len(list(out.glob("*.done.json"))) < 2:
        time.sleep(0.2)
    committed_before = len(list(out.glob("*.done.json")))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert 2 <= committed_before < 12, "kill should land mid-run"
    proc = _advpure("run", str(path))
    output, _ = proc.communicate(timeout=200)
    assert proc.returncode == 0, output
    manifest = json.loads(Path(cfg["job"]["output"], "manifest.json").read_text())
    statuses = [s["status"] for s in manifest["stages"]["evaluate"]["shards"].values()]
    assert statuses.count("skipped") >= committed_before and statuses.count("quarantined") == 0
    _assert_exactly_once(cfg["job"]["output"], 360)


def test_ctrl_c_stops_the_driver_at_once_with_a_message_and_a_consistent_output(digits_models, tmp_path):
    """SIGINT (Ctrl-C) while a shard computes: exit 130 within seconds, no traceback, the
    lease released, and every marker beside its Parquet file (nothing half-committed)."""
    from pipeline.io.make_shards import make_shards

    doc = make_shards("digits", str(tmp_path / "sh"), split="test", samples_per_shard=30)
    cfg = job_dict(doc["pattern"], digits_models, str(tmp_path / "out"),
                   attacks=[{"name": "pgd", "params": {"eps": 0.2, "steps": 40}}],
                   cluster={"num_workers": 1, "executor": "ray"})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # a shell's background job ignores SIGINT; a terminal's foreground one does not
    proc = _advpure("run", str(path), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = Path(cfg["job"]["output"], "evaluate")
    deadline = time.time() + 150
    while time.time() < deadline and not list(out.glob("*.done.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - t0 < 30, output
    assert "interrupted: committed shards are kept" in output and "Traceback" not in output, output
    assert not Path(cfg["job"]["output"], "lease.json").exists(), "the lease was not released"
    markers = commit.committed(cfg["job"]["output"], "evaluate")
    assert 1 <= len(markers) < 12
    assert all(Path(cfg["job"]["output"], "evaluate", m["parquet"]).exists() for m in markers.values())


@pytest.mark.skipif(not datasets.mnist_available(),
                    reason="MNIST test set not found at ../shared/data/mnist (set ADVPURE_MNIST_DIR)")
def test_real_mnist_shards_end_to_end(ray_local, tmp_path):
    """Real MNIST: a classifier fitted on the first 8,000 test images, evaluated on 1,000 held out."""
    from pipeline.io.make_shards import make_shards
    from pipeline.train import recipes as models

    doc = make_shards("mnist", str(tmp_path / "sh"), split="t10k-holdout", samples_per_shard=250, limit=1000)
    cnn = str(tmp_path / "cnn.pt")
    models.train_small_cnn(cnn, "mnist", "t10k-fit", epochs=2, width=16)  # ~94% held out
    cfg = config.from_dict({
        "job": {"name": "mnist", "output": str(tmp_path / "out")},
        "data": {"shards": doc["pattern"], "batch_size": 250},
        "classifier": {"name": "small_cnn", "params": {"checkpoint": cnn}},
        "attacks": [{"name": "fgsm", "params": {"eps": 0.3}}],
        "cluster": {"num_workers": 2},
    })
    code, _ = driver.run(cfg)
    assert code == driver.EXIT_OK
    _assert_exactly_once(cfg.job.output, 1000)
    s = report.summarize(commit.load_records(cfg.job.output))["attacks"][0]
    assert s["clean_classifier"]["acc"] > 0.9
    assert s["adv_classifier"]["acc"] < s["clean_classifier"]["acc"] - 0.3


def test_truncated_shard_in_a_job_is_quarantined_with_its_name(ray_local, digits_models, tmp_path):
    from pipeline.io.make_shards import make_shards

    doc = make_shards("digits", str(tmp_path / "sh"), split="test", samples_per_shard=120)
    victim = tmp_path / "sh" / "shard-000001.tar"
    victim.write_bytes(victim.read_bytes()[:20480])          # cut at a 512-byte block boundary
    cfg = config.from_dict(job_dict(doc["pattern"], digits_models, str(tmp_path / "out"), attacks=[]))
    code, manifest = driver.run(cfg)
    assert code == driver.EXIT_QUARANTINED
    st = manifest["stages"]["evaluate"]
    assert st["quarantined"] == ["shard-000001"]
    assert "shard-000001.tar: truncated tar" in st["shards"]["shard-000001"]["errors"][-1]
    assert len(_rows(cfg.job.output)) == 240


def test_on_ray_the_drivers_process_never_imports_torch(digits_shards, digits_models, tmp_path):
    """The job's whole life in the driver's process — lease, the data check (run on the first
    actor: a wrong image size is the ConfigError `advpure run` exits 2 with, before any stage
    work), job state, stages, manifest — imports no torch. The Config is built here and
    unpickled there: building one checks the components against the registries, which
    import them (config.py's part, not the driver's)."""
    import pickle

    import numpy as np

    from pipeline.io import shards

    w = shards.ShardWriter(str(tmp_path / "big"), samples_per_shard=2)
    for i in range(2):
        w.write(f"img-{i}", np.zeros((28, 28, 1), dtype=np.uint8), i)
    w.close()
    good = _cfg(digits_shards, digits_models, tmp_path / "good", attacks=[],
                cluster={"num_workers": 1, "executor": "ray", "cpus_per_worker": 1})
    bad = config.from_dict(job_dict(w.pattern(), digits_models, str(tmp_path / "bad" / "out"), attacks=[],
                                    cluster={"num_workers": 1, "executor": "ray"}), "bad.yaml")
    (tmp_path / "cfgs.pkl").write_bytes(pickle.dumps((good, bad)))
    code = ("import pickle, sys\n"
            "import ray\n"
            "from pipeline.config import ConfigError\n"
            "from pipeline.run import driver\n"
            "ray.init(address='local', num_cpus=2, include_dashboard=False, logging_level='ERROR')\n"
            f"good, bad = pickle.loads(open({str(tmp_path / 'cfgs.pkl')!r}, 'rb').read())\n"
            "try:\n"
            "    driver.run(bad)\n"
            "    raise SystemExit('the data check let 28x28 images through')\n"
            "except ConfigError as err:\n"
            "    print('REFUSED', err)\n"
            "code, manifest = driver.run(good)\n"
            "assert code == driver.EXIT_OK, manifest\n"
            "assert 'torch' not in sys.modules, 'the driver imported torch'\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "REFUSED bad.yaml: data.shards: the images are 1×28×28 (C×H×W; sample img-0 of " in out.stdout, out.stdout
    assert [p.name for p in (tmp_path / "bad" / "out").rglob("*") if not p.name.startswith(".lease")] == []
    assert len(commit.committed(good.job.output, "evaluate")) == 4


def test_sizer_grows_with_the_cluster(digits_shards, digits_models, tmp_path, monkeypatch):
    cfg = _cfg(digits_shards, digits_models, tmp_path, cluster={"num_workers": "auto", "cpus_per_worker": 1})
    views = iter([scheduler.ClusterView([{"CPU": 1}], []), scheduler.ClusterView([{"CPU": 1}, {"CPU": 4}], [])])
    monkeypatch.setattr(scheduler, "cluster_view", lambda: next(views))
    sizer = scheduler._Sizer(cfg, {"CPU": 1, "GPU": 0})
    assert sizer.want(10) == 1
    sizer._read = -1e9                                       # the next refresh: a 4-CPU node joined
    assert sizer.want(10) == 5 and sizer.want(3) == 3 and sizer.want(0) == 0


def test_unplaceable_workers_abort_at_once_naming_the_resources(ray_local, digits_shards, digits_models, tmp_path):
    cfg = _cfg(digits_shards, digits_models, tmp_path, attacks=[],
               cluster={"num_workers": 1, "gpus_per_worker": 1, "actor_start_timeout_s": 120})
    t0 = time.time()
    code, manifest = driver.run(cfg)
    assert code == driver.EXIT_ABORTED and time.time() - t0 < 60
    msg = manifest["stages"]["evaluate"]["aborted"]
    assert "no node can host a worker (CPU 1, GPU 1)" in msg and "1 alive node(s)" in msg, msg


# ---------------------------------------------------------------------------- placement (fake GPUs)
# last in the module: it replaces the module's Ray with one that has two GPU resources

@pytest.fixture
def ray_fake_gpus():
    """Ray with two GPU resources on this CPU machine: actors asking for GPUs are placed
    and given CUDA_VISIBLE_DEVICES, but torch sees no GPU (the worker falls back to CPU)."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    yield ray
    ray.shutdown()


def test_actors_are_placed_per_gpu_and_records_say_where(ray_fake_gpus, digits_shards, digits_models, tmp_path):
    # k = 2: four actors at half a GPU each, as many as the cluster hosts (num_workers auto)
    cfg = _cfg(digits_shards, digits_models, tmp_path, attacks=[], data={"shards": digits_shards["pattern"],
               "max_samples_per_shard": 30}, cluster={"num_workers": "auto", "workers_per_gpu": 2,
                                                      "cpus_per_worker": 0.5})
    assert scheduler.worker_resources(cfg) == {"CPU": 0.5, "GPU": 0.5}
    code, manifest = driver.run(cfg)
    assert code == driver.EXIT_OK
    workers = manifest["stages"]["evaluate"]["workers"]
    assert sorted(tuple(w["gpu_ids"]) for w in workers) == [("0",), ("0",), ("1",), ("1",)], workers
    rows = _rows(cfg.job.output)
    assert len(rows) == 120 and all(r["node_id"] and r["host"] and r["device"] == "cpu" for r in rows)
    markers = commit.committed(cfg.job.output, "evaluate").values()
    assert {m["pid"] for m in markers} <= {w["pid"] for w in workers}
    # k = 1: one actor per GPU, each with its own CUDA_VISIBLE_DEVICES
    one = _cfg(digits_shards, digits_models, tmp_path / "one", cluster={"workers_per_gpu": 1})
    pool = scheduler.ActorPool(one)
    assert pool.req == {"CPU": 1.0, "GPU": 1.0}
    pool.start(2)
    try:
        infos = ray_fake_gpus.get(list(pool.starting), timeout=120)
    finally:
        pool.kill_all()
    assert sorted(i["cuda_visible_devices"] for i in infos) == ["0", "1"], infos
