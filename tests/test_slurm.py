"""`advpure submit --slurm` and status / logs / stop of `slurm:<id>`, against a real Slurm.

The script's pieces and the parsing of Slurm's answers are tested on their own (no Slurm
needed); the rest runs against munged + slurmctld + slurmd started on 127.0.0.1 by
tests/slurmcluster.py (Debian's slurm-wlm and munge; skipped without them, except on CI, where
they fail unless .ci/run set ADVPURE_NO_SLURM to say why it could not install them):

- `--dry-run` prints a script `sbatch --test-only` accepts;
- more GPUs than the partition has → exit 2 naming the resource (our check, and sbatch's own
  refusal turned into the same kind of message);
- a small digits job submitted with `--slurm` gives the same records as `advpure run`;
- scancel mid-job → no process of the job is left (every process Slurm started for it carries
  SLURM_JOB_ID in its environment: the Ray head, raylet, workers, driver); resubmitting the
  same job resumes from the committed shards → every sample exactly once.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import config as config_mod
from pipeline.io import storage
from pipeline.run import commit, slurm
from tests import slurmcluster
from tests.conftest import ROOT, job_dict
from tests.s3server import kill_group

pytestmark = pytest.mark.timeout(300)

# ---------------------------------------------------------------------------- without Slurm


def _cfg(tmp_path: Path, **cluster) -> config_mod.Config:
    d = job_dict("shards/shard-{000000..000001}.tar", {"cnn": "m/cnn.pt", "dae": "m/dae.pt"}, str(tmp_path / "out"))
    d["cluster"].update(cluster)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(d))
    return config_mod.load(path, check_components=False)


def _script(cfg, req: slurm.Request | None = None, **kw) -> str:
    return slurm.job_script(cfg, req or slurm.Request(), python="/opt/venv/bin/python", workdir="/home/u/exp",
                            log_file="/home/u/exp/advpure-slurm-%j.out", **kw)


def _bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_script_embeds_the_resolved_job_and_the_request(tmp_path):
    cfg = _cfg(tmp_path, address="10.0.0.1:6379")
    req = slurm.Request(nodes=3, gpus_per_node=2, cpus_per_node=8, partition="gpu", time="4:00:00",
                        account="lab", qos="normal", sbatch_args=("--mem=64G", "--constraint=a100"))
    script = _script(cfg, req)
    _bash_syntax_ok(script, tmp_path)
    head = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert head == ["#SBATCH --job-name=advpure-test", "#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1",
                    "#SBATCH --cpus-per-task=8", "#SBATCH --output=/home/u/exp/advpure-slurm-%j.out",
                    "#SBATCH --chdir=/home/u/exp", "#SBATCH --gres=gpu:2", "#SBATCH --partition=gpu",
                    "#SBATCH --time=4:00:00", "#SBATCH --account=lab", "#SBATCH --qos=normal",
                    "#SBATCH --mem=64G", "#SBATCH --constraint=a100"]
    # sbatch reads directives up to the first command: all of them come first
    first_command = next(i for i, line in enumerate(script.splitlines()[1:], 1)
                         if line.strip() and not line.startswith("#"))
    assert all(script.splitlines().index(line) < first_command for line in head)
    assert "{{" not in script and "--num-gpus=\"$GPUS_PER_NODE\"" in script and "GPUS_PER_NODE=2" in script
    # the job travels inside the script, joining the job's own Ray (cluster.address cleared)
    body = re.search(r"<<'(ADVPURE_JOB_YAML_*)'\n(.*?)\n\1\n", script, re.S).group(2)
    expected = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, address=None)).to_dict()
    assert yaml.safe_load(body) == expected


def test_heredoc_terminator_never_occurs_in_the_job(tmp_path):
    d = yaml.safe_load(Path(_cfg(tmp_path).source).read_text())
    d["job"]["name"] = "ADVPURE_JOB_YAML"
    (tmp_path / "odd.yaml").write_text(yaml.safe_dump(d))
    script = _script(config_mod.load(tmp_path / "odd.yaml", check_components=False))
    assert "<<'ADVPURE_JOB_YAML_'" in script
    _bash_syntax_ok(script, tmp_path)


def test_default_cpus_and_fit_checks(tmp_path):
    assert slurm.cpus_for(_cfg(tmp_path, num_workers=4, cpus_per_worker=2), slurm.Request(nodes=2)) == 4
    gpu_auto = _cfg(tmp_path, num_workers="auto", workers_per_gpu=2, cpus_per_worker=1)
    assert slurm.cpus_for(gpu_auto, slurm.Request(gpus_per_node=4)) == 8
    with pytest.raises(slurm.RequestError, match="--cpus-per-node"):
        slurm.cpus_for(_cfg(tmp_path, num_workers="auto"), slurm.Request())
    with pytest.raises(slurm.RequestError, match="add --gpus-per-node"):
        _script(_cfg(tmp_path, gpus_per_worker=1))
    with pytest.raises(slurm.RequestError, match=r"num_workers is 4 .* host 2"):
        _script(_cfg(tmp_path, num_workers=4, gpus_per_worker=1), slurm.Request(gpus_per_node=1, nodes=2))
    with pytest.raises(slurm.RequestError, match="one sbatch option"):
        _script(_cfg(tmp_path), slurm.Request(sbatch_args=("mem=4G",)))


def test_per_job_ports_do_not_collide_and_stay_below_the_ephemeral_range():
    bases = [slurm.port_block(job) for job in range(5000, 5000 + slurm.PORT_SLOTS)]
    assert len(set(bases)) == slurm.PORT_SLOTS
    assert min(bases) >= 10000 and max(bases) + 9 < 32768


def test_render_refuses_a_missing_value():
    with pytest.raises(KeyError, match="no value for"):
        slurm.render("echo {{a}} {{b}}", {"a": "1"})


def test_parse_slurm_answers():
    assert [slurm.parse_gpus(g) for g in ("(null)", "gpu:2", "gpu:a100:4(S:0-1)", "gpu:1,shard:8", "gpu")] \
        == [0, 2, 4, 1, 1]
    default, parts = slurm.parse_sinfo_nodes("cpu*|n1|32|(null)\ncpu*|n2|32|(null)\ngpu|g1|64|gpu:a100:4(S:0-1)\n")
    assert default == "cpu" and [n.name for n in parts["cpu"]] == ["n1", "n2"] and parts["gpu"][0].gpus == 4
    with pytest.raises(slurm.RequestError, match=r"2 GPUs per node requested .* partition 'cpu' has at most 0"):
        slurm.check_partition(slurm.Request(gpus_per_node=2), 4, default, parts)
    with pytest.raises(slurm.RequestError, match=r"3 nodes requested .* has 2 such node"):
        slurm.check_partition(slurm.Request(nodes=3), 4, default, parts)
    with pytest.raises(slurm.RequestError, match="at most 64 per node"):
        slurm.check_partition(slurm.Request(partition="gpu"), 128, default, parts)
    with pytest.raises(slurm.RequestError, match="no partition 'tpu'"):
        slurm.check_partition(slurm.Request(partition="tpu"), 1, default, parts)
    slurm.check_partition(slurm.Request(nodes=1, gpus_per_node=4, partition="gpu"), 64, default, parts)

    line = ("JobId=7 JobName=advpure-x JobState=CANCELLED Reason=None ExitCode=0:15 TRES=cpu=2,node=1 "
            "Command=/a b/c.sh WorkDir=/w StdOut=/w/advpure-slurm-7.out")
    f = slurm.parse_scontrol(line)
    assert (f["JobState"], f["TRES"], f["Command"], f["StdOut"]) == \
        ("CANCELLED", "cpu=2,node=1", "/a b/c.sh", "/w/advpure-slurm-7.out")
    assert slurm.parse_sacct("7|advpure-x|CANCELLED by 0|0:15|2026-01-01T00:00:00|Unknown|n1\n")["JobState"] \
        == "CANCELLED by 0"
    assert slurm.slurm_id("slurm:12") == "12" and slurm.slurm_id("12") == "12"
    with pytest.raises(slurm.RequestError, match="not a Slurm job id"):
        slurm.slurm_id("advpure-job-1a2b")


def test_missing_resources_names_what_is_missing():
    assert slurm.missing_resources([{"CPU": 4, "GPU": 2}] * 2, nodes=2, cpus=4, gpus=2) == []
    assert slurm.missing_resources([{"CPU": 4.0}], nodes=2, cpus=4, gpus=1) == [
        "2 node(s) requested, 1 joined", "2 GPUs requested (1 per node), cluster has 0",
        "8 CPUs requested (4 per node), cluster has 4"]


# ---------------------------------------------------------------------------- against a real Slurm

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # on CI a missing Slurm is a failure, unless .ci/run could not install it and says why
    if os.environ.get("ADVPURE_NO_SLURM"):
        pytest.skip(f"Slurm not installed: {os.environ['ADVPURE_NO_SLURM']}")
    on_ci = os.environ.get("CI") == "true"
    missing = slurmcluster.missing_binaries()
    if missing:
        (pytest.fail if on_ci else pytest.skip)(f"Slurm not installed ({', '.join(missing)}): "
                                                 f"apt-get install slurm-wlm munge")
    try:
        srv = slurmcluster.start(tmp_path_factory.mktemp("slurm"))
    except slurmcluster.SlurmUnavailable as err:
        (pytest.fail if on_ci else pytest.skip)(f"no Slurm could be started: {err}")
    try:
        yield srv
    finally:
        srv.stop()


def _env(cluster: slurmcluster.Slurm) -> dict[str, str]:
    # sbatch exports this environment to the job: our package, no Ray auth, Ray on loopback
    return cluster.env({**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})


def advpure(cluster, cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=_env(cluster),
                          capture_output=True, text=True, timeout=timeout)


def _write_job(tmp_path: Path, shards: str, models: dict, out: str, steps: int = 3, name: str = "job.yaml",
               eps: float = 0.2, **kw) -> Path:
    d = job_dict(shards, models, out, attacks=[{"name": "pgd", "params": {"eps": eps, "steps": steps,
                                                                           "step_size": 0.02}}], **kw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return path


def test_dry_run_is_a_script_sbatch_accepts(cluster, tmp_path):
    job = _write_job(tmp_path, "shards/s-{000000..000001}.tar", {"cnn": "c.pt", "dae": "d.pt"}, "out")
    dry = advpure(cluster, tmp_path, "submit", "--slurm", str(job), "--dry-run", "--partition", cluster.partition,
                  "--time", "5:00", "--sbatch-arg=--job-name=renamed")
    assert dry.returncode == 0, dry.stderr
    script = tmp_path / "job.sh"
    script.write_text(dry.stdout)
    test = cluster.run("sbatch", "--test-only", str(script))
    assert test.returncode == 0 and "to start at" in test.stderr, test.stderr
    assert cluster.run("squeue", "-h").stdout.strip() == ""       # nothing was submitted


def test_more_gpus_than_the_partition_has_fails_naming_the_resource(cluster, tmp_path):
    job = _write_job(tmp_path, "shards/s-{000000..000001}.tar", {"cnn": "c.pt", "dae": "d.pt"}, "out")
    proc = advpure(cluster, tmp_path, "submit", "--slurm", str(job), "--gpus-per-node", "2")
    assert proc.returncode == 2, proc.stderr
    assert f"2 GPUs per node requested (--gpus-per-node), but partition '{cluster.partition}' has at most 0" \
        in proc.stderr
    # the same request past our check: sbatch's own refusal becomes an error naming it
    script = _script(_cfg(tmp_path), slurm.Request(gpus_per_node=2)).replace("/home/u/exp", str(tmp_path))
    os.environ["SLURM_CONF"], saved = str(cluster.conf), os.environ.get("SLURM_CONF")
    try:
        with pytest.raises(slurm.RequestError, match=r"Slurm refused the job: .*generic resource \(gres\)"):
            slurm.sbatch(script)
    finally:
        os.environ.pop("SLURM_CONF") if saved is None else os.environ.__setitem__("SLURM_CONF", saved)
    assert cluster.run("squeue", "-h").stdout.strip() == ""


def _wait_state(cluster, cwd: Path, job_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        st = advpure(cluster, cwd, "status", job_id)
        doc = yaml.safe_load(st.stdout) if st.stdout.strip() else {"status": f"? {st.stderr}"}
        if not slurm.is_active(doc["status"]) or time.monotonic() > deadline:
            return doc
        time.sleep(1)


def _submit(cluster, cwd: Path, job: Path) -> str:
    proc = advpure(cluster, cwd, "submit", "--slurm", str(job), "--start-timeout", "120")
    assert proc.returncode == 0, proc.stderr
    return re.search(r"submitted (slurm:\d+)", proc.stdout).group(1)


def _log(cwd: Path, job_id: str) -> str:
    path = cwd / f"advpure-slurm-{job_id.split(':')[1]}.out"
    return path.read_text(errors="replace")[-5000:] if path.exists() else "(no log)"


VOLATILE = {"seconds", "node_id", "host", "device"}   # where and how fast, not what


def _records(out: str) -> dict:
    table = commit.load_records(out)
    rows = sorted(table.to_pylist(), key=lambda r: (r["key"], r["attack_index"]))
    return {name: [r[name] for r in rows] for name in table.column_names if name not in VOLATILE}


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> dict:
    from pipeline.io.make_shards import make_shards

    d = tmp_path_factory.mktemp("slurm_shards")
    two = make_shards("digits", str(d / "two"), split="test", samples_per_shard=30, limit=60)
    twelve = make_shards("digits", str(d / "twelve"), split="test", samples_per_shard=10, limit=120)
    return {"two": two["pattern"], "twelve": twelve["pattern"]}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict:
    """Barely trained nets (seconds, not the suite's tiny_models): these tests compare and
    count records, they do not judge accuracy."""
    from pipeline.train import recipes

    d = tmp_path_factory.mktemp("slurm_models")
    recipes.train_small_cnn(str(d / "cnn.pt"), "digits", "train", epochs=1, width=8)
    recipes.train_small_dae(str(d / "dae.pt"), "digits", "train", epochs=1, width=8)
    return {"cnn": str(d / "cnn.pt"), "dae": str(d / "dae.pt")}


@pytest.mark.slow
def test_slurm_job_gives_the_same_records_as_advpure_run(cluster, small_shards, tiny_models, tmp_path):
    local, viaslurm = str(tmp_path / "local"), str(tmp_path / "slurm")
    local_job = _write_job(tmp_path, small_shards["two"], tiny_models, local, name="local.yaml")
    # `advpure run` and the Slurm job side by side: most of either is Ray starting
    run = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(local_job)], cwd=tmp_path,
                           env=_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        job_id = _submit(cluster, tmp_path, _write_job(tmp_path, small_shards["two"], tiny_models, viaslurm))
        doc = _wait_state(cluster, tmp_path, job_id, 180)
        _, err = run.communicate(timeout=180)
    finally:
        kill_group(run)                 # whatever of its local Ray is left
    assert run.returncode == 0, err[-3000:]
    assert doc["status"] == "COMPLETED" and doc["exit_code"] == "0:0", _log(tmp_path, job_id)
    a, b = _records(local), _records(viaslurm)
    assert len(a["key"]) == 60 and a.keys() == b.keys()
    for name in a:
        if name == "purified_mean_logits":   # null where a confirmed break needed no final evaluation
            assert [v is None for v in a[name]] == [v is None for v in b[name]], name
            assert np.allclose(np.array([v for v in a[name] if v is not None]),
                               np.array([v for v in b[name] if v is not None]), atol=1e-5), name
        else:
            assert a[name] == b[name], name
    log = advpure(cluster, tmp_path, "logs", job_id)
    assert "Ray cluster ready: 1 node(s), 2 CPUs, 0 GPUs" in log.stdout and "results:" in log.stdout
    assert "at 127.0.0.1:" in log.stdout     # a one-node job keeps Ray on the loopback


def _job_processes(job: str) -> list[str]:
    """Processes whose environment carries SLURM_JOB_ID=<job> (everything the job started)."""
    needle, found = f"\0SLURM_JOB_ID={job}\0".encode(), []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and needle in b"\0" + (d / "environ").read_bytes():
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{d.name} {cmdline[:120]}")
        except OSError:
            continue
    return found


def _markers(out: str) -> int:
    folder = storage.join(out, "evaluate")
    return sum(u.endswith(".done.json") for u in storage.listdir(folder)) if Path(folder).exists() else 0


@pytest.mark.slow
def test_scancel_mid_job_then_resubmit_every_sample_once(cluster, small_shards, tiny_models, tmp_path):
    out = str(tmp_path / "out")
    # a radius too small to break most samples: PGD stops stepping a broken sample, and the
    # cancel must land while the job still has work (every step of every sample runs)
    job = _write_job(tmp_path, small_shards["twelve"], tiny_models, out, steps=100, eps=0.002)
    first = _submit(cluster, tmp_path, job)
    deadline = time.monotonic() + 150
    while _markers(out) < 1 and time.monotonic() < deadline:
        time.sleep(0.3)
    stop = advpure(cluster, tmp_path, "stop", first, "--timeout", "60")
    assert stop.returncode == 0 and stop.stdout.strip() == f"{first}: CANCELLED", stop.stdout + stop.stderr
    raw = first.split(":")[1]
    deadline = time.monotonic() + 30
    while _job_processes(raw) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _job_processes(raw) == [], "processes of the cancelled job are left"
    committed = _markers(out)
    assert 1 <= committed < 12, f"the cancel should land mid-job ({committed} of 12): {_log(tmp_path, first)}"
    # the driver ended cleanly (not aborted): it released the job lease, so a resubmission whose
    # head lands on another node is not refused until the lease times out
    assert not Path(out, "lease.json").exists(), _log(tmp_path, first)

    second = _submit(cluster, tmp_path, job)
    doc = _wait_state(cluster, tmp_path, second, 200)
    assert doc["status"] == "COMPLETED", _log(tmp_path, second)
    assert f"{12 - committed} shards to run, {committed} already committed" in _log(tmp_path, second)
    table = commit.load_records(out)
    keys = list(zip(table.column("key").to_pylist(), table.column("attack_index").to_pylist()))
    assert len(keys) == 120 and len(set(keys)) == 120
    assert _markers(out) == 12 and _job_processes(second.split(":")[1]) == []
