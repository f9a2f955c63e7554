"""The `advpure` command as a user runs it (subprocesses, real files, real Ray)."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, job_dict


def advpure(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_list_shows_registered_components():
    out = advpure("list")
    assert out.returncode == 0
    assert "small_cnn" in out.stdout and "pgd" in out.stdout and "dae" in out.stdout and "none" in out.stdout


def test_bad_config_exits_2_naming_the_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("job: {name: x, output: o, sed: 1}\ndata: {shards: a.tar}\nclassifier: {name: small_cnn}\n")
    out = advpure("run", str(p))
    assert out.returncode == 2
    assert "unknown key job.sed" in out.stderr and str(p) in out.stderr


def test_missing_shards_exit_2_before_work(tmp_path, digits_models):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(job_dict(str(tmp_path / "none-{0..3}.tar"), digits_models, str(tmp_path / "o"))))
    out = advpure("run", str(p))
    assert out.returncode == 2 and "shard(s) not found" in out.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_quarantine_exit_code_then_report_json(tmp_path, digits_shards, digits_models):
    cfg = job_dict(digits_shards["pattern"], digits_models, str(tmp_path / "out"), attacks=[],
                   faults=[{"shard": "shard-000003", "mode": "raise", "marker_dir": str(tmp_path / "f"), "times": 9}])
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = advpure("run", str(p), "--set", "cluster.max_attempts=2")
    assert out.returncode == 3, out.stderr
    assert "shard shard-000003 QUARANTINED after 2 attempts" in out.stderr
    assert "samples 270" in out.stdout
    rep = advpure("report", str(tmp_path / "out"), "--format", "json")
    assert rep.returncode == 0
    summary = json.loads(rep.stdout)
    assert summary["samples"] == 270 and summary["attacks"][0]["attack"] == "none"
    assert (tmp_path / "out" / "config.yaml").exists()
    resolved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert resolved["cluster"]["max_attempts"] == 2


def test_make_shards_command(tmp_path):
    out = advpure("make-shards", "digits", str(tmp_path), "--split", "test", "--samples-per-shard", "200")
    assert out.returncode == 0, out.stderr
    assert "wrote 360 samples in 2 shards" in out.stdout
    bad = advpure("make-shards", "mnist", str(tmp_path / "m"), "--path", str(tmp_path / "nowhere"))
    assert bad.returncode == 1 and "MNIST file not found" in bad.stderr
