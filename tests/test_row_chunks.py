"""evaluation.max_rows: auto — the chunk chosen by measurement (pipeline/evaluation/row_chunks.py),
recorded in the commit markers, and records that do not depend on it."""
from __future__ import annotations

import pyarrow.compute as pc
import pytest
import torch

from pipeline import config
from pipeline.evaluation import row_chunks, stages
from pipeline.evaluation.protocol import build_protocol
from pipeline.io import shards
from pipeline.run import commit
from pipeline.run.worker import ShardWorker
from tests.conftest import job_dict

CPU = torch.device("cpu")


def _fake_timer(per_row: dict[int, float], calls: list[tuple[int, bool]]) -> row_chunks.Timer:
    """A timer whose chunk c costs per_row[c] seconds per row on c rows (no clock); the
    one-sample probe (c = 1) costs the smallest chunk's per-row time."""
    def timer(c: int, whole: bool) -> tuple[float, int]:
        calls.append((c, whole))
        return per_row[c] * c if c in per_row else per_row[min(per_row)] * c, c
    return timer


def test_candidates_are_powers_of_two_below_the_rows_and_one_call():
    assert row_chunks.candidates(2000) == [64, 128, 256, 512, 1024, 2000]
    assert row_chunks.candidates(256) == [64, 128, 256]
    assert row_chunks.candidates(10_000) == list(row_chunks.ROW_CHUNKS)


def test_cpu_picks_the_fastest_per_row_ties_to_the_larger():
    calls: list = []
    per_row = {64: 1e-4, 128: 0.8e-4, 256: 0.6e-4, 512: 0.62e-4, 1024: 2e-4, 2000: 3e-4}
    choice = row_chunks.choose(CPU, 2000, _fake_timer(per_row, calls), "fake")
    assert choice.rows == 512 and choice.how == "timed"   # 512 within 5 % of 256: the larger
    assert choice.needed == 2000 and set(choice.seconds_per_row) <= set(per_row)
    assert calls[:3] == [(1, False), (1, False), (64, False)]   # probe twice, warm-up, then the sweep
    assert all(not whole for _, whole in calls)
    assert "fastest per row" in choice.detail
    per_row = {64: 1e-4, 128: 0.5e-4, 256: 0.8e-4, 512: 0.9e-4, 1024: 0.1e-4, 2000: 0.1e-4}
    choice = row_chunks.choose(CPU, 2000, _fake_timer(per_row, []), "fake")
    assert choice.rows == 128 and list(choice.seconds_per_row) == [64, 128, 256, 512]  # two worse: stop
    assert "not timed: [1024, 2000]" in choice.detail


def test_cpu_sweep_stays_within_its_budget():
    per_row = {c: 1e-3 for c in (64, 128, 256, 512, 1024, 2000)}   # 1 ms a row: 2000 rows = 2 s
    calls: list = []
    choice = row_chunks.choose(CPU, 2000, _fake_timer(per_row, calls), "fake")
    spent = sum(c * per_row.get(c, 1e-3) for c, _ in calls)
    assert spent <= row_chunks.CPU_BUDGET_S and 2000 not in choice.seconds_per_row
    assert choice.rows == max(choice.seconds_per_row)   # all tie: the largest timed
    heavy = {c: 1.0 for c in per_row}                    # 1 s a row: the probe says do not time
    calls = []
    choice = row_chunks.choose(CPU, 2000, _fake_timer(heavy, calls), "fake")
    assert choice.how == "budget" and choice.rows == 64 and calls == [(1, False), (1, False)]


def test_rows_too_heavy_to_time_cost_two_probe_rows_not_two_chunks():
    """A Langevin chain of K = 20 steps per row (28 ms a row, the Hill benchmark's small budget):
    timing 64 and 128 rows would take 5.4 s of a 40 s job; the probe's 2 rows decide that."""
    per_row = {c: 0.028 for c in (64, 128, 256, 320)}
    calls: list = []
    choice = row_chunks.choose(CPU, 320, _fake_timer(per_row, calls), "fake")
    assert (choice.rows, choice.how, calls) == (64, "budget", [(1, False), (1, False)])
    light = {c: 0.005 for c in per_row}                  # 5 ms a row: 64 + 128 rows fit the budget
    calls = []
    assert row_chunks.choose(CPU, 320, _fake_timer(light, calls), "fake").how == "timed" and (64, False) in calls


def test_few_rows_are_one_call_and_nothing_is_timed():
    calls: list = []
    choice = row_chunks.choose(CPU, 48, _fake_timer({}, calls), "fake")
    assert (choice.rows, choice.how, calls) == (48, "one_call", [])


def test_cuda_takes_the_largest_chunk_that_fits():
    calls: list = []

    def timer(c: int, whole: bool) -> tuple[float, int]:
        calls.append((c, whole))
        if c > 512:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return 0.01, 2000
    choice = row_chunks.choose(torch.device("cuda"), 2000, timer, "fake")
    assert choice.rows == 512 and choice.how == "largest_fit"
    assert calls == [(2000, True), (1024, True), (512, True)]   # largest first, on the whole batch


def _noise_job(digits_shards, digits_models, tmp_path, max_rows, name="out"):
    d = job_dict(digits_shards["pattern"], digits_models, str(tmp_path / name),
                 purifier={"name": "gaussian", "params": {"sigma": 0.1}},
                 attacks=[{"name": "apgd", "params": {"eps": 0.05, "steps": 3}, "gradient": "full", "eot": 8}],
                 data={"shards": digits_shards["pattern"], "batch_size": 24, "max_samples_per_shard": 24},
                 evaluation={"runs": 3, **({} if max_rows is None else {"max_rows": max_rows})})
    return config.from_dict(d)


def test_auto_is_the_default_and_an_int_pins_it(digits_shards, digits_models, tmp_path):
    assert config.EvaluationConfig().max_rows == "auto"
    with pytest.raises(config.ConfigError, match="evaluation.max_rows"):
        _noise_job(digits_shards, digits_models, tmp_path, 0)
    cfg = _noise_job(digits_shards, digits_models, tmp_path, 100)
    p = build_protocol(cfg)
    b = next(stages.batches(shards.read_shard(shards.expand(cfg.data.shards)[0])[:24], 24, p.device))
    choice = row_chunks.settle(p, b.x, b.y, b.keys)
    assert (choice.rows, choice.how, choice.needed) == (100, "configured", 24 * 8)
    assert p.defense.max_rows == 100


def test_worker_settles_once_and_records_the_choice(digits_shards, digits_models, tmp_path, monkeypatch):
    cfg = _noise_job(digits_shards, digits_models, tmp_path, None)
    w = ShardWorker(cfg.to_dict())
    settled: list = []
    real = row_chunks.choose
    monkeypatch.setattr(row_chunks, "choose", lambda *a, **k: settled.append(a[1]) or real(*a, **k))
    urls = shards.expand(cfg.data.shards)[:2]
    markers = [w.process(u, shards.shard_id(u)) for u in urls]
    assert settled == [24 * 8]                               # once per worker, for batch × EOT rows
    rec = markers[0]["max_rows"]
    assert rec["how"] == "timed" and rec["needed"] == 192 and rec["rows"] in row_chunks.candidates(192)
    assert "gradient step of attack0:apgd" in rec["workload"] and rec["seconds_per_row"]
    assert markers[1]["max_rows"] == rec
    assert w.protocol.defense.max_rows == rec["rows"]
    on_disk = commit.committed(cfg.job.output, "evaluate")
    assert on_disk[shards.shard_id(urls[0])]["max_rows"] == rec


def test_records_do_not_depend_on_the_chunk(digits_shards, digits_models, tmp_path):
    """A stochastic defense (keyed Gaussian noise, EOT 8, R 3) under APGD: chunks of 7 rows
    and one call of the whole batch give the same verdicts, predictions and break steps. The
    float32 logits agree to rounding only: a CPU convolution's last bits depend on how many
    rows it runs (1 ulp in the logits), so the per-run values are compared within 1e-4."""
    tables = []
    for rows in (7, 4096):
        cfg = _noise_job(digits_shards, digits_models, tmp_path, rows, name=f"out{rows}")
        w = ShardWorker(cfg.to_dict())
        url = shards.expand(cfg.data.shards)[0]
        w.process(url, shards.shard_id(url))
        tables.append(commit.load_records(cfg.job.output).sort_by("key"))
    a, b = tables
    assert a.num_rows == b.num_rows == 24          # one row per (sample, attack)
    for col in ("key", "attack_index", "clean_purified_preds", "purified_preds", "mean_logit_pred", "vote_pred",
                "candidate_step", "broken_step", "attack_steps", "robust", "attack_nfe", "purify_nfe"):
        assert a[col].to_pylist() == b[col].to_pylist(), col
    for col in ("purified_mean_logits", "linf", "l2"):
        for u, v in zip(a[col].to_pylist(), b[col].to_pylist()):   # None: not evaluated (a confirmed break)
            assert (u is None) == (v is None), col
            if u is not None:
                assert torch.allclose(torch.tensor(u), torch.tensor(v), rtol=0, atol=1e-4), col
    assert 0 < pc.sum(pc.cast(a["robust"], "int64")).as_py() < a.num_rows   # some broken, some not
