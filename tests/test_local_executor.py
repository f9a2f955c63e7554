"""cluster.executor: the in-process executor runs the same worker under the same scheduler
(commit protocol, retries, quarantine, resume) and writes the records Ray's actors write."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import job_dict

from pipeline import config as config_mod
from pipeline.config import ConfigError
from pipeline.run import commit, driver, worker
from pipeline.run.local_pool import choose_executor

VOLATILE = {"seconds", "node_id", "host", "device"}   # where and how fast, not what


@pytest.fixture(scope="module")
def shards4(tmp_path_factory) -> str:
    from pipeline.io.make_shards import make_shards

    d = tmp_path_factory.mktemp("local_shards")
    return make_shards("digits", str(d), split="test", samples_per_shard=8, limit=32)["pattern"]


@pytest.fixture(scope="module")
def tiny_cnn(tmp_path_factory) -> dict:
    """A barely trained classifier: these tests compare and count records, not accuracy."""
    from pipeline.train import recipes

    d = tmp_path_factory.mktemp("local_models")
    recipes.train_small_cnn(str(d / "cnn.pt"), "digits", "train", epochs=1, width=4, limit=64)
    return {"cnn": str(d / "cnn.pt"), "dae": ""}


@pytest.fixture(autouse=True)
def _torch_threads():
    """A local run sets this process's torch threads to cpus_per_worker: put them back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _job(shards: str, models: dict, out: Path, **cluster) -> dict:
    # a stochastic defense (keyed Gaussian noise) and a gradient attack: the records depend on
    # the per-sample draws, so equal records mean the executors computed the same thing
    return job_dict(shards, models, str(out), purifier={"name": "gaussian", "params": {"sigma": 0.1}},
                    attacks=[{"name": "pgd", "params": {"eps": 0.2, "steps": 2, "step_size": 0.1}, "eot": 2}],
                    evaluation={"runs": 2},
                    cluster={"num_workers": 1, "cpus_per_worker": 1, "max_attempts": 2, **cluster})


def _cfg(shards: str, models: dict, out: Path, **cluster) -> config_mod.Config:
    return config_mod.from_dict(_job(shards, models, out, **cluster), source="job.yaml")


def _records(out: Path) -> list[dict]:
    rows = sorted(commit.load_records(str(out)).to_pylist(), key=lambda r: (r["key"], r["attack_index"]))
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def test_a_bad_executor_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster\.executor: 'dask' is not one of \['auto', 'local', 'ray'\]"):
        _cfg("s-{000000..000001}.tar", {"cnn": "c.pt", "dae": ""}, tmp_path, executor="dask")


def test_local_refuses_what_it_cannot_do(tmp_path):
    models = {"cnn": "c.pt", "dae": ""}
    with pytest.raises(ConfigError, match=r"cluster\.num_workers: is 2, but cluster\.executor local runs one worker"):
        _cfg("s.tar", models, tmp_path, executor="local", num_workers=2)
    hang = _job("s.tar", models, tmp_path, executor="local")
    hang["faults"] = [{"shard": "*", "mode": "hang", "marker_dir": str(tmp_path)}]
    with pytest.raises(ConfigError, match=r"faults\[0\]\.mode: hang would end or hang the driver"):
        config_mod.from_dict(hang)


def test_auto_picks_local_only_for_one_worker_and_no_cluster(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def chosen(**cluster) -> tuple[str, str]:
        job = _job("s.tar", {"cnn": "c.pt", "dae": ""}, tmp_path, **cluster)
        return choose_executor(config_mod.from_dict(job, check_components=False))

    assert chosen()[0] == "local"
    assert chosen(num_workers=2) == ("ray", "auto: cluster.num_workers is 2")
    assert chosen(address="10.0.0.1:6379")[0] == "ray"
    assert chosen(executor="ray") == ("ray", "cluster.executor")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert chosen()[0] == "ray"


def test_local_retries_then_quarantines_like_ray(shards4, tiny_cnn, tmp_path, caplog):
    job = _job(shards4, tiny_cnn, tmp_path / "out")
    faults = str(tmp_path / "faults")
    job["faults"] = [{"shard": "shard-000001", "mode": "raise", "marker_dir": faults, "times": 1},
                     {"shard": "shard-000002", "mode": "raise", "marker_dir": faults, "times": 5}]
    caplog.set_level("INFO", logger="pipeline")
    code, manifest = driver.run(config_mod.from_dict(job))
    assert "executor: local (auto: one worker on this machine" in caplog.text
    assert code == driver.EXIT_QUARANTINED
    sh = manifest["stages"]["evaluate"]["shards"]
    assert sh["shard-000001"]["status"] == "committed" and sh["shard-000001"]["attempts"] == 2
    assert sh["shard-000002"]["status"] == "quarantined"
    assert sh["shard-000002"]["errors"] == ["RuntimeError: injected fault on shard shard-000002"] * 2
    assert manifest["stages"]["evaluate"]["workers"][0]["node_id"] is None   # no Ray


def test_an_interrupted_local_run_resumes_with_exactly_the_rest(shards4, tiny_cnn, tmp_path, monkeypatch):
    cfg = _cfg(shards4, tiny_cnn, tmp_path / "out", executor="local")
    process, calls = worker.ShardWorker.process, []

    def interrupted_at_third(self, url, sid, *args):
        calls.append(sid)
        if len(calls) == 3:
            raise KeyboardInterrupt   # Ctrl-C mid-shard: it unwinds, nothing of it is committed
        return process(self, url, sid, *args)

    monkeypatch.setattr(worker.ShardWorker, "process", interrupted_at_third)
    with pytest.raises(KeyboardInterrupt):
        driver.run(cfg)
    first = set(commit.committed(cfg.job.output, "evaluate"))
    assert first == {"shard-000000", "shard-000001"}
    assert not (Path(cfg.job.output) / "lease.json").exists()   # the lease was released
    calls.clear()
    monkeypatch.setattr(worker.ShardWorker, "process", lambda self, url, sid, *a: calls.append(sid) or
                        process(self, url, sid, *a))
    code, manifest = driver.run(cfg)
    assert code == driver.EXIT_OK and calls == ["shard-000002", "shard-000003"]
    status = {sid: s["status"] for sid, s in manifest["stages"]["evaluate"]["shards"].items()}
    assert status == {"shard-000000": "skipped", "shard-000001": "skipped",
                      "shard-000002": "committed", "shard-000003": "committed"}
    assert len(_records(tmp_path / "out")) == 32


def test_local_and_ray_runs_write_identical_records(shards4, tiny_cnn, tmp_path, ray_local):
    # last in this module: ray_local keeps Ray initialised for what follows it
    for name in ("local", "ray"):
        code, _ = driver.run(_cfg(shards4, tiny_cnn, tmp_path / name, executor=name))
        assert code == driver.EXIT_OK, name
    local, ray = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert len(local) == 32 and len({r["key"] for r in local}) == 32
    assert {r["status"] for r in local} == {"ok"}
    for a, b in zip(local, ray, strict=True):
        assert a == b, a["key"]
    markers = commit.committed(str(tmp_path / "ray"), "evaluate").values()
    assert all(m["node_id"] for m in markers)   # the Ray run really ran on actors


def test_the_drivers_modules_import_no_torch_and_the_local_executor_imports_it_at_its_worker(shards4, tiny_cnn,
                                                                                              tmp_path):
    """The driver never touches a tensor: its modules (evaluation and corpus jobs, the runner,
    the scheduler, the CLI) import no torch; the local executor imports the worker's class,
    and torch with it, only when it starts its worker."""
    import pickle
    import subprocess
    import sys

    from conftest import ROOT

    # built here: building a Config checks its components against the registries, which import them
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(_cfg(shards4, tiny_cnn, tmp_path / "out", executor="local")))
    code = ("import pickle, sys\n"
            "import pipeline.cli, pipeline.corpus.job, pipeline.run.driver, pipeline.run.job_runner\n"
            "from pipeline.run import actor_host, local_pool, scheduler\n"
            "assert 'torch' not in sys.modules, 'importing the driver imported torch'\n"
            f"cfg = pickle.loads(open({str(tmp_path / 'cfg.pkl')!r}, 'rb').read())\n"
            "pool = scheduler.make_pool(cfg, actor_host.SHARD_WORKER)\n"
            "assert isinstance(pool, local_pool.LocalPool) and 'torch' not in sys.modules\n"
            "pool.start(1)\n"
            "assert [c.error for c in pool.starting] == [None]\n"
            "assert 'torch' in sys.modules and 'ray' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


def test_a_data_check_that_fails_ends_the_job_before_any_stage_work(shards4, tiny_cnn, tmp_path):
    """The pre-work data check (evaluation.preflight) runs on the job's worker — here in this
    process — and its ConfigError (exit 2 from the CLI) comes before the job state and any shard."""
    from pipeline.io import shards

    w = shards.ShardWriter(str(tmp_path / "big"), samples_per_shard=2)
    for i in range(2):
        w.write(f"img-{i}", torch.zeros(28, 28, 1, dtype=torch.uint8).numpy(), i)
    w.close()
    job = _job(w.pattern(), tiny_cnn, tmp_path / "out", executor="local")
    with pytest.raises(ConfigError) as err:
        driver.run(config_mod.from_dict(job, source="job.yaml"))
    assert str(err.value).startswith("job.yaml: data.shards: the images are 1×28×28 (C×H×W; sample img-0 of "), err
    assert "classifier (classifier.params.checkpoint" in str(err.value)
    assert [p.name for p in (tmp_path / "out").rglob("*") if not p.name.startswith(".lease")] == []
