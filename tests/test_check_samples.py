"""Gradient-masking checks sized per job: `evaluation.check_samples` samples of the whole job,
spread over the shards in the job's order (each from its first batch), stated in the report."""
from __future__ import annotations

import pytest

from pipeline import config
from pipeline.evaluation import stages
from pipeline.evaluation.protocol import build_protocol
from pipeline.io import shards
from pipeline.report import build, tables
from pipeline.run.worker import ShardWorker
from tests.conftest import job_dict


@pytest.mark.parametrize("total, n, shares", [
    (16, 1, [16]), (16, 3, [6, 5, 5]), (6, 4, [2, 2, 1, 1]), (3, 4, [1, 1, 1, 0]),
    (0, 4, [0, 0, 0, 0]), (16, 100, [1] * 16 + [0] * 84)])
def test_the_shares_spread_the_sample_evenly_in_shard_order(total, n, shares):
    got = [stages.check_share(total, i, n) for i in range(n)]
    assert got == shares and sum(got) == total


def test_a_position_outside_the_job_is_an_error():
    with pytest.raises(ValueError, match="position 4 outside a job of 4 shards"):
        stages.check_share(16, 4, 4)


def _job(digits_shards, digits_models, tmp_path, check_samples: int) -> dict:
    return job_dict(digits_shards["pattern"], digits_models, str(tmp_path / "out"),
                    data={"shards": digits_shards["pattern"], "batch_size": 5, "max_samples_per_shard": 10},
                    evaluation={"runs": 1, "check_samples": check_samples})


def test_a_shard_checks_its_share_on_its_first_batch_only(digits_shards, digits_models, tmp_path, monkeypatch):
    p = build_protocol(config.from_dict(_job(digits_shards, digits_models, tmp_path, 16)))
    samples = shards.read_shard(shards.expand(digits_shards["pattern"])[0])[:10]   # two batches of 5
    seen: list[list[str]] = []
    real = stages.gradient_checks
    monkeypatch.setattr(stages, "gradient_checks", lambda p, a, x, y, keys: seen.append(keys) or real(p, a, x, y, keys))
    p.check_samples = 3
    out = stages.evaluate(p, samples)
    assert seen == [[s.key for s in samples[:3]]] and out.check_samples == 3 and out.checks["0"]
    seen.clear()
    p.check_samples = 0   # a shard past the sample: no checks on any batch
    out = stages.evaluate(p, samples)
    assert seen == [] and out.check_samples == 0 and out.checks == {} and len(out.rows) == 10


@pytest.mark.parametrize("total, per_shard, line", [
    (6, [2, 2, 1, 1], "gradient-masking checks on 6 samples over 4 shards"),
    (3, [1, 1, 1, 0], "gradient-masking checks on 3 samples over 3 shards (of 4 committed)"),
    (0, [0, 0, 0, 0], "gradient-masking checks: none ran (evaluation.check_samples 0, or no attack)")])
def test_the_job_sample_is_spread_over_the_shards_and_stated_in_the_report(
        total, per_shard, line, digits_shards, digits_models, tmp_path):
    job = _job(digits_shards, digits_models, tmp_path, total)
    worker = ShardWorker(job)
    urls = shards.expand(digits_shards["pattern"])
    assert len(urls) == 4
    markers = [worker.process(u, sid) for u, sid in zip(reversed(urls), reversed(shards.unique_ids(urls)))]
    assert [m["check_samples"] for m in reversed(markers)] == per_shard   # by position, not processing order
    doc, _ = build.run_report(job["job"]["output"])
    assert doc["checks"]["sample"] == {"samples": total, "shards": sum(1 for n in per_shard if n), "of_shards": 4}
    assert line in tables.format_text(doc) and line in tables.format_markdown(doc)
    assert bool(doc["checks"]["shard"]) == bool(total)


def test_check_samples_must_not_be_negative(digits_shards, digits_models, tmp_path):
    with pytest.raises(config.ConfigError, match="evaluation.check_samples"):
        config.from_dict(_job(digits_shards, digits_models, tmp_path, -1))
