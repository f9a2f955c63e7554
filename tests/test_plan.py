"""`advpure plan`: calibration, prediction, suggestions; the markers' nfe and the progress rate."""
from __future__ import annotations

import dataclasses
import json

import torch

from pipeline import config
from pipeline.attacks import pgd
from pipeline.evaluation import batch, row_chunks, stages
from pipeline.evaluation.protocol import build_protocol
from pipeline.io import shards
from pipeline.run import commit, plan
from pipeline.run.worker import ShardWorker
from tests.conftest import job_dict


def _cfg(digits_shards, digits_models, tmp_path, **overrides):
    d = job_dict(digits_shards["pattern"], digits_models, str(tmp_path / "out"), **overrides)
    d["cluster"] = {**d["cluster"], "num_workers": 1}
    return config.from_dict(d)


def _rows_of_whole_job(cfg) -> list[dict]:
    p = build_protocol(cfg)
    rows = []
    for url in shards.expand(cfg.data.shards):
        rows += stages.evaluate(p, shards.read_shard(url)[: cfg.data.max_samples_per_shard]).rows
    return rows


def test_plan_predicts_the_evaluations_the_job_records(digits_shards, digits_models, tmp_path, monkeypatch):
    """PGD's evaluations per sample do not depend on the data: the prediction from one
    calibration batch equals Σ attack_nfe + purify_nfe over every record of the job. (With
    the final evaluation of confirmed breaks skipped, PGD's steps after them, and the clean
    gate's samples not attacked, they do: the plan extrapolates the calibration batch's share
    of them, so the exact count is checked with every sample's.)"""
    monkeypatch.setattr(batch, "SKIP_CONFIRMED_BREAKS", False)
    monkeypatch.setattr(pgd, "SKIP_BROKEN", False)
    cfg = _cfg(digits_shards, digits_models, tmp_path, attacks=[
        {"name": "pgd", "params": {"eps": 0.2, "steps": 3, "step_size": 0.08}, "gradient": "classifier"},
        {"name": "pgd", "params": {"eps": 0.2, "steps": 2, "step_size": 0.08}, "gradient": "auto"}],
        data={"shards": digits_shards["pattern"], "batch_size": 32, "max_samples_per_shard": 40},
        evaluation={"runs": 1, "attack_misclassified": True})
    r = plan.plan(cfg, workers=[1, 2])
    rows = _rows_of_whole_job(cfg)
    assert r["samples"] == 160 and r["shards"] == 4 and r["calibration_batch"] == 32
    assert r["evaluations"] == sum(x["attack_nfe"] + x["purify_nfe"] for x in rows)
    pieces = [(s["stage"], s["piece"]) for s in r["stages"]]
    assert pieces == [("evaluate", "checks"), ("evaluate", "clean"), ("evaluate", "attack0:pgd"),
                      ("evaluate", "attack1:pgd")]
    assert all(s["seconds"] > 0 and s["peak_bytes"] > 0 for s in r["stages"])
    one, two = (w["seconds"] for w in r["per_workers"])
    assert two < one  # four equal shards on two workers
    assert r["batch_size"]["suggested"] >= 1
    assert r["checkpoint_segment"] is None  # the DAE has no steps
    text = plan.format_plan(r)
    assert "model evaluations" in text and "worker(s)" in text and "batch size" in text


def test_plan_stages_attack_then_purify(digits_shards, digits_models, tmp_path):
    cfg = _cfg(digits_shards, digits_models, tmp_path,
               job={"name": "t", "output": str(tmp_path / "o"), "stages": ["attack", "purify"]},
               data={"shards": digits_shards["pattern"], "batch_size": 16, "max_samples_per_shard": 16})
    r = plan.plan(cfg, workers=[1])
    assert {s["stage"] for s in r["stages"]} == {"attack", "purify"}
    purify = next(s for s in r["stages"] if s["stage"] == "purify")
    assert purify["samples"] == 64  # one adversarial set (one attack) per source sample


def test_plan_suggests_a_checkpoint_segment_for_full_gradient_through_langevin(digits_shards, digits_models,
                                                                              tmp_path):
    from pipeline.purifiers.nets.ebm_nets import EBM

    torch.manual_seed(0)
    ebm_path = tmp_path / "ebm.pth"  # a plain state dict, as the published EBM
    arch = {"n_c": 1, "n_f": 4, "image_size": 8}
    torch.save(EBM(**arch).state_dict(), ebm_path)
    cfg = _cfg(digits_shards, digits_models, tmp_path,
               purifier={"name": "langevin_ebm", "params": {"checkpoint": str(ebm_path), "net": arch, "steps": 5}},
               attacks=[{"name": "pgd", "params": {"eps": 0.2, "steps": 1}, "gradient": "full"}],
               data={"shards": digits_shards["pattern"], "batch_size": 4, "max_samples_per_shard": 4})
    seg = plan.plan(cfg, workers=[1])["checkpoint_segment"]
    assert seg["steps"] == 5 and seg["rows"] == 4 and seg["configured"] == -1
    assert seg["graph_bytes_no_checkpoint"] > seg["graph_bytes_auto"] > 0
    assert seg["suggested"] in (0, -1)


def _noise_defense_cfg(digits_shards, digits_models, tmp_path):
    return _cfg(digits_shards, digits_models, tmp_path, purifier={"name": "gaussian", "params": {"sigma": 0.1}},
                attacks=[{"name": "pgd", "params": {"eps": 0.2, "steps": 1}, "gradient": "full", "eot": 8}],
                data={"shards": digits_shards["pattern"], "batch_size": 16, "max_samples_per_shard": 16})


def test_plan_says_what_auto_picks_for_the_attack_steps_rows(digits_shards, digits_models, tmp_path):
    r = plan.plan(_noise_defense_cfg(digits_shards, digits_models, tmp_path), workers=[1])
    mr = r["max_rows"]
    assert mr["configured"] == "auto" and mr["suggested"] == "auto"
    a = mr["auto"]
    assert a["needed"] == 128 and a["how"] == "timed" and a["rows"] in (64, 128)
    assert set(a["seconds_per_row"]) <= {"64", "128"} and "EOT-8 gradient step of attack0:pgd" in a["workload"]
    assert f"max_rows: auto picks {a['rows']} on this machine" in plan.format_plan(r)


def test_a_pinned_max_rows_gives_way_to_auto_only_for_a_clear_gain(digits_shards, digits_models, tmp_path,
                                                                     monkeypatch):
    cfg = _noise_defense_cfg(digits_shards, digits_models, tmp_path)
    cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, max_rows=4096))
    cal, p = plan.calibrate(cfg)
    assert p.defense.max_rows == 4096 and p.rows_choice.how == "configured"  # timing restores the pinned chunk
    for per_row, expected in (({64: 1.0, 128: 2.0}, "auto"), ({64: 1.9, 128: 2.0}, 4096), ({64: 3.0, 128: 2.0}, 4096)):
        monkeypatch.setattr(row_chunks, "time_eot_step",
                            lambda p, a, x, y, keys, n, t=per_row: 1e-4 * t.get(n, t[64]) * len(keys) * a.eot)
        mr = plan.suggest_max_rows(p, cal)
        assert mr["suggested"] == expected and mr["configured"] == 4096
        assert mr["auto"]["rows"] == min(per_row, key=per_row.get)
    assert "max_rows: configured 4096, suggested 4096; auto picks 128" in plan._max_rows_line(mr)


def test_makespan_spreads_longest_first():
    assert plan.makespan([4, 4, 4, 4], 2) == 8
    assert plan.makespan([5, 3, 3, 1], 2) == 6
    assert plan.makespan([1, 1], 8) == 1


def test_suggested_batch_size_fits_the_memory_budget():
    cal = plan.Calibration(0.0, 0.0, baseline_bytes=100 * 2**20, batch=10, probe_row=torch.zeros(1, 1, 8, 8))
    cal.pieces["evaluate"] = [plan.Measured("a", 1.0, 10, 0, peak_bytes=200 * 2**20)]  # 10 MiB per sample
    # 1 GiB: 0.8 · 1024 − 100 = 719 MiB of room → 71 samples → 64
    assert plan.suggest_batch_size(cal, 2**30, shard_size=1000) == 64
    assert plan.suggest_batch_size(cal, 2**30, shard_size=50) == 50   # the whole shard fits
    assert plan.suggest_batch_size(cal, 0, shard_size=50) is None
    assert plan.batch_size_limit(cal, 2**30) == (71, 10 * 2**20)


def test_batch_size_line_says_why():
    r = {"baseline_bytes": 100 * 2**20, "worker_memory_bytes": 2**30,
         "batch_size": {"configured": 64, "memory_limit": 71, "bytes_per_sample": 10 * 2**20, "shard_size": 50,
                        "suggested": 50}}
    line = plan._batch_line(r)
    assert "suggested 50 = the whole shard of 50: a batch never spans shards; memory would allow ~71" in line
    assert "10.00 MiB per sample over a 100 MiB baseline, 80 % of 1,024 MiB worker memory" in line
    r["batch_size"].update(shard_size=1000, suggested=64)
    assert "suggested 64 = the largest power of two within the ~71 that memory allows" in plan._batch_line(r)


def test_cli_plan_prints_text_and_json(digits_shards, digits_models, tmp_path, capsys):
    from pipeline import cli

    cfg = _cfg(digits_shards, digits_models, tmp_path,
               data={"shards": digits_shards["pattern"], "batch_size": 8, "max_samples_per_shard": 8})
    path = tmp_path / "job.yaml"
    path.write_text(config.dump(cfg))
    assert cli.main(["plan", str(path), "--workers", "1", "3"]) == 0
    assert "3 worker(s)" in capsys.readouterr().out
    assert cli.main(["plan", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["samples"] == 32


def test_marker_carries_the_shards_model_evaluations(digits_shards, digits_models, tmp_path):
    cfg = _cfg(digits_shards, digits_models, tmp_path,
               data={"shards": digits_shards["pattern"], "batch_size": 16, "max_samples_per_shard": 16})
    url = shards.expand(cfg.data.shards)[0]
    marker = ShardWorker(cfg.to_dict()).process(url, "shard-000000", "evaluate")
    table = commit.load_records(cfg.job.output).to_pylist()
    assert marker["nfe"] == sum(r["attack_nfe"] + r["purify_nfe"] for r in table) > 0


def test_progress_shows_evaluations_per_second():
    from pipeline.run.scheduler import _Progress

    prog = _Progress(10, "evaluate")
    try:
        assert prog.rate() == ""
        prog.add(5, nfe=500)
        assert prog.rate().endswith("evals/s")
        prog.note("shards 1/2")
        assert "evals/s" in prog.text and "shards 1/2" in prog.text
    finally:
        prog.close()


def test_cascade_estimate_chains_each_threat_model(digits_shards, digits_models, tmp_path):
    """With a cascade, an attack runs on the share of samples the earlier attacks *of its
    (norm, ε)* left unbroken: the first entry at each ε runs on all of them (issue 22)."""
    attacks = [{"name": "fgsm", "params": {"eps": e}, "gradient": "classifier"} for e in (0.05, 0.3)]
    attacks += [{"name": "pgd", "params": {"eps": e, "steps": 2, "step_size": e / 2}, "gradient": "classifier"}
                for e in (0.05, 0.3)]
    cfg = _cfg(digits_shards, digits_models, tmp_path, attacks=attacks, evaluation={"runs": 1, "cascade": True},
               data={"shards": digits_shards["pattern"], "batch_size": 32})
    p = build_protocol(cfg)
    b = next(stages.batches(shards.read_shard(shards.expand(cfg.data.shards)[0])[:32], 32, p.device))
    pieces = {m.name: m.fraction for m in plan.calibrate_evaluate(p, b)[0]}
    rows = stages.evaluate(dataclasses.replace(p, cascade=False), shards.read_shard(
        shards.expand(cfg.data.shards)[0])[:32]).rows
    unbroken = {i: sum(r["robust"] for r in rows if r["attack_index"] == i) / 32 for i in (0, 1)}
    assert pieces["attack0:fgsm"] == pieces["attack1:fgsm"] == 1.0
    assert pieces["attack2:pgd"] == unbroken[0] and pieces["attack3:pgd"] == unbroken[1]
    assert unbroken[1] < unbroken[0] < 1   # the old single chain would give attack 2 the share after attack 1
