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

from pipeline import config, datasets, driver, report
from pipeline.config import ConfigError
from tests.conftest import ROOT, job_dict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _cfg(digits_shards, digits_models, tmp_path, **over):
    return config.from_dict(job_dict(digits_shards["pattern"], digits_models, str(tmp_path / "out"), **over))


def _rows(output: str):
    return report.load_records(output).to_pylist()


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
    mtimes = {p: p.stat().st_mtime_ns for p in Path(cfg.job.output, "evaluate").glob("*.parquet")}
    code, manifest = driver.run(cfg)                      # the same command again
    assert code == driver.EXIT_OK
    assert all(s["status"] == "skipped" for s in manifest["stages"]["evaluate"]["shards"].values())
    assert mtimes == {p: p.stat().st_mtime_ns for p in Path(cfg.job.output, "evaluate").glob("*.parquet")}
    summary = report.summarize(report.load_records(cfg.job.output))
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
    from pipeline.make_shards import make_shards

    doc = make_shards("digits", str(tmp_path / "sh"), split="test", samples_per_shard=30)   # 12 shards
    cfg = job_dict(doc["pattern"], digits_models, str(tmp_path / "out"),
                   attacks=[{"name": "pgd", "params": {"eps": 0.2, "steps": 40}}],
                   cluster={"num_workers": 1})
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


@pytest.mark.skipif(not datasets.mnist_available(),
                    reason="MNIST test set not found at ../shared/data/mnist (set ADVPURE_MNIST_DIR)")
def test_real_mnist_shards_end_to_end(ray_local, tmp_path):
    """Real MNIST: a classifier fitted on the first 8,000 test images, evaluated on 1,000 held out."""
    from pipeline import models
    from pipeline.make_shards import make_shards

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
    s = report.summarize(report.load_records(cfg.job.output))["attacks"][0]
    assert s["clean_classifier"]["acc"] > 0.9
    assert s["adv_classifier"]["acc"] < s["clean_classifier"]["acc"] - 0.3


def test_truncated_shard_in_a_job_is_quarantined_with_its_name(ray_local, digits_models, tmp_path):
    from pipeline.make_shards import make_shards

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
