"""pipeline.evaluation.stages: adversarial sets as a stage (attack → shards with lineage →
purify, on real Ray), and the batch size that adapts to memory."""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import config, report
from pipeline.evaluation import row_chunks, stages
from pipeline.io import shards
from pipeline.run import commit, driver
from tests.conftest import job_dict

pytestmark = pytest.mark.timeout(300)

PGD = {"name": "pgd", "params": {"eps": 0.2, "steps": 5, "step_size": 0.05}}


def _cfg(digits_shards, digits_models, out, **over):
    over.setdefault("attacks", [PGD, {"name": "fgsm", "params": {"eps": 0.1}, "gradient": "classifier"}])
    return config.from_dict(job_dict(digits_shards["pattern"], digits_models, str(out), **over))


def _adversarial(output: str) -> dict[str, tuple[np.ndarray, dict]]:
    """{(shard-a<idx>, key): (float image, lineage)} from an attack stage's shards."""
    folder = Path(output, "adversarial")
    index = json.loads((folder / "index.json").read_text())
    out = {}
    for e in index["shards"]:
        for s in shards.read_shard(str(folder / e["name"]), e["samples"]):
            out[(e["name"], s.key)] = (s.image, s.meta)
    return out


@pytest.fixture(scope="module")
def staged(ray_local, digits_shards, digits_models, tmp_path_factory) -> dict:
    """One [attack, purify] job and the same job as one evaluate stage, run once for the
    cases below (each checks one property of the hand-off)."""
    root = tmp_path_factory.mktemp("staged")
    cfg = _cfg(digits_shards, digits_models, root / "staged", job={
        "name": "staged", "output": str(root / "staged"), "stages": ["attack", "purify"]})
    code, manifest = driver.run(cfg)
    assert code == driver.EXIT_OK, manifest
    # attack + purify have no clean defended evaluation to gate on: evaluate attacks every sample too
    whole = _cfg(digits_shards, digits_models, root / "whole", evaluation={"runs": 1, "attack_misclassified": True})
    assert driver.run(whole)[0] == driver.EXIT_OK
    return {"cfg": cfg, "manifest": manifest, "whole": whole}


@pytest.mark.slow
def test_one_actor_pool_serves_attack_and_purify(staged):
    manifest, out = staged["manifest"], staged["cfg"].job.output
    pids = {st: {w["pid"] for w in manifest["stages"][st]["workers"]} for st in ("attack", "purify")}
    assert pids["attack"] == pids["purify"] and len(pids["attack"]) == 2   # purify starts no new worker
    assert {m["pid"] for m in commit.committed(out, "purify").values()} <= pids["attack"]


@pytest.mark.slow
def test_adversarial_shards_hold_float_images_with_their_lineage(staged):
    cfg = staged["cfg"]
    adv = _adversarial(cfg.job.output)
    assert len(adv) == 360 * 2
    image, lineage = adv[("shard-000000-a0.tar", "digits-0000")]
    assert image.dtype == np.float32 and image.shape == (8, 8, 1)
    assert lineage["source_key"] == "digits-0000" and lineage["attack_name"] == "pgd"
    assert lineage["config_hash"] == cfg.hash() and lineage["source_shard"].endswith("shard-000000.tar")


@pytest.mark.slow
def test_purified_shards_keep_the_keys_of_their_input(staged):
    out = staged["cfg"].job.output
    purified = json.loads(Path(out, "purified", "index.json").read_text())
    assert purified["total_samples"] == 720
    got = shards.read_shard(str(Path(out, "purified", "shard-000000-a0.tar")))
    assert [s.key for s in got] == [f"digits-{i:04d}" for i in range(0, 450, 5)]


@pytest.mark.slow
def test_attack_then_purify_reproduces_evaluate_sample_by_sample(staged):
    ev = {(r["attack_index"], r["key"]): r for r in commit.load_records(staged["whole"].job.output).to_pylist()}
    pu = commit.load_records(staged["cfg"].job.output, "purify").to_pylist()
    assert len(pu) == 720
    for r in pu:
        e = ev[(r["attack_index"], r["key"])]
        assert (r["adv_pred"], r["robust"], r["broken_step"], r["label"]) == \
            (e["adv_pred"], e["robust"], e["broken_step"], e["label"])
        # evaluate skips the final evaluation of a confirmed break; purify writes every image
        assert r["final_evaluated"] and e["final_evaluated"] == (e["broken_step"] < 0)
        if e["final_evaluated"]:
            assert r["purified_preds"] == e["purified_preds"]
        assert r["linf"] == pytest.approx(e["linf"], abs=1e-6)


@pytest.mark.slow
def test_a_rerun_of_attack_then_purify_skips_both_stages(staged):
    code, manifest = driver.run(staged["cfg"])
    assert code == driver.EXIT_OK
    assert set(manifest["stages"]) == {"attack", "purify"}
    assert all(s["status"] == "skipped" for st in manifest["stages"].values() for s in st["shards"].values())


@pytest.mark.slow
def test_adversarial_images_identical_across_batch_size_and_workers(ray_local, digits_shards, digits_models,
                                                                    tmp_path):
    images = []
    for name, bs, workers in (("a", 90, 1), ("b", 7, 2)):
        cfg = _cfg(digits_shards, digits_models, tmp_path / name,
                   job={"name": "adv", "output": str(tmp_path / name), "stages": ["attack"]},
                   data={"shards": digits_shards["pattern"], "batch_size": bs},
                   cluster={"num_workers": workers})
        assert driver.run(cfg)[0] == driver.EXIT_OK
        images.append(_adversarial(cfg.job.output))
    assert images[0].keys() == images[1].keys()
    for k in images[0]:
        assert np.array_equal(images[0][k][0], images[1][k][0]), k


@pytest.mark.slow
def test_purify_stage_consumes_another_jobs_adversarial_set(ray_local, digits_shards, digits_models, tmp_path):
    maker = _cfg(digits_shards, digits_models, tmp_path / "maker", attacks=[PGD],
                 job={"name": "maker", "output": str(tmp_path / "maker"), "stages": ["attack"]})
    assert driver.run(maker)[0] == driver.EXIT_OK
    pattern = str(tmp_path / "maker" / "adversarial" / "shard-{000000..000003}-a0.tar")
    user = config.from_dict(job_dict(pattern, digits_models, str(tmp_path / "user"), attacks=[],
                                     job={"name": "user", "output": str(tmp_path / "user"), "stages": ["purify"]},
                                     evaluation={"runs": 2}))
    assert driver.run(user)[0] == driver.EXIT_OK
    rows = commit.load_records(user.job.output, "purify").to_pylist()
    assert len(rows) == 360 and all(len(r["purified_preds"]) == 2 for r in rows)
    assert {r["attack_name"] for r in rows} == {"pgd"}           # lineage carried through
    summary = report.summarize(commit.load_records(user.job.output, "purify"))
    a = summary["attacks"][0]
    assert a["clean_defended"] is None                             # no clean images in this stage
    clean_acc = sum(r["clean_pred"] == r["label"] for r in rows) / 360  # from the lineage
    assert a["robust_mean_logit"]["acc"] < clean_acc - 0.2
    assert "n/a" in report.format_table(summary)


# ---------------------------------------------------------------------------- adaptive batch size

class _FakeProtocol:
    def __init__(self, batch_size: int):
        self.batch_size, self.device = batch_size, torch.device("cpu")
        self.defense = types.SimpleNamespace(classifier=None)   # no class count: labels unchecked
        self.rows_choice = row_chunks.Choice(4096, "configured", 0, "a fake protocol: nothing to settle")


def _samples(n: int) -> list[shards.Sample]:
    return [shards.Sample(f"k{i}", np.full((2, 2, 1), i, np.uint8), i % 3) for i in range(n)]


def test_batch_size_halves_on_out_of_memory_and_is_remembered():
    p = _FakeProtocol(8)
    seen = []

    def work(b):
        if len(b.keys) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append(list(b.keys))
        return len(b.keys)

    out = [n for _, n in stages.adaptive(p, _samples(10), work)]
    assert p.batch_size == 2 and sum(out) == 10
    assert [k for batch in seen for k in batch] == [f"k{i}" for i in range(10)]  # order kept, nothing twice
    seen.clear()
    list(stages.adaptive(p, _samples(4), work))  # the next shard starts from what fitted
    assert [len(b) for b in seen] == [2, 2]


def test_out_of_memory_on_cpu_and_other_errors():
    assert stages.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not stages.is_out_of_memory(RuntimeError("shape mismatch"))
    p = _FakeProtocol(4)

    def fails(b):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(stages.adaptive(p, _samples(4), fails))

    def always_oom(b):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # even one sample does not fit: raised
        list(stages.adaptive(p, _samples(4), always_oom))
    assert p.batch_size == 1
