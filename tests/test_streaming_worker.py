"""The evaluation worker streams its shard: the same results as the whole-shard read, a
truncated shard commits nothing, and decoded samples in flight stay within the queue's bound.

Fast on purpose: an untrained small CNN (no training fixture), a Gaussian purifier (stochastic,
so the EOT probe and keyed noise take part), digits shards of 90 samples."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from pipeline import config, stage_table
from pipeline.classifiers import small_cnn
from pipeline.evaluation import stages
from pipeline.io import checkpoints, shards
from pipeline.io.shards import ShardError, ShardStream
from pipeline.run.commit import read_committed
from pipeline.run.worker import ShardWorker

PGD = {"name": "pgd", "params": {"eps": 0.1, "steps": 2, "step_size": 0.05}}
FGSM = {"name": "fgsm", "params": {"eps": 0.05}}


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> str:
    torch.manual_seed(0)
    url = str(tmp_path_factory.mktemp("cnn") / "cnn.pt")
    params = {"in_channels": 1, "num_classes": 10, "width": 4}
    checkpoints.save(url, small_cnn.ARCH, params, small_cnn.make(**params).state_dict())
    return url


def _worker(digits_shards, cnn: str, out, batch: int = 16, **evaluation) -> ShardWorker:
    cfg = {"job": {"name": "stream", "output": str(out), "seed": 3},
           "data": {"shards": digits_shards["pattern"], "batch_size": batch},
           "classifier": {"name": "small_cnn", "params": {"checkpoint": cnn}},
           "purifier": {"name": "gaussian", "params": {"sigma": 0.1}},
           "attacks": [FGSM, PGD], "evaluation": {"runs": 2, "device": "cpu", **evaluation}}
    return ShardWorker(config.from_dict(cfg).to_dict())


def _timeless(obj):
    """Rows and checks without their wall-clock fields (the only ones allowed to differ)."""
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _whole(w: ShardWorker, url: str, stage: str) -> stages.StageOutput:
    """Today's path: the whole shard read and decoded, then the stage on the list."""
    return stage_table.get(stage).function()(w.protocol, [s for s in shards.read_shard(url) if s.error is None])


@pytest.mark.parametrize("evaluation", [{"eot_probe": 8}, {"cascade": True}])
def test_streamed_evaluate_equals_whole_shard(digits_shards, cnn, tmp_path, evaluation):
    url = shards.expand(digits_shards["pattern"])[0]
    w = _worker(digits_shards, cnn, tmp_path / "out", **evaluation)
    whole = _whole(w, url, "evaluate")
    # chunks of 7 against batches of 16: batch boundaries do not follow the decode queue's
    streamed = stages.evaluate(w.protocol, ShardStream(url, 90, chunk=7, depth=2))
    assert len(whole.rows) == 180 and _timeless(streamed.rows) == _timeless(whole.rows)
    assert _timeless(streamed.checks) == _timeless(whole.checks)
    # and through the worker: the committed rows are the stage's rows
    w.process(url, "s0", "evaluate", expected=90)
    table = read_committed(str(tmp_path / "out"), "evaluate", "s0").to_pylist()
    cols = [c for c in whole.rows[0] if "seconds" not in c]
    assert [{c: r[c] for c in cols} for r in table] == [{c: r[c] for c in cols} for r in whole.rows]


def test_streamed_attack_writes_the_same_images_as_whole_shard(digits_shards, cnn, tmp_path):
    url = shards.expand(digits_shards["pattern"])[1]
    w = _worker(digits_shards, cnn, tmp_path / "out")
    whole = _whole(w, url, "attack")
    marker = w.process(url, "s1", "attack", expected=90)
    assert [o["samples"] for o in marker["outputs"]] == [90, 90]
    for name, items in whole.images.items():
        got = shards.read_shard(str(tmp_path / "out" / "adversarial" / f"s1-a{name}.tar"), 90)
        assert [s.key for s in got] == [s.key for s, _, _ in items]
        np.testing.assert_array_equal(np.stack([s.image for s in got]), np.stack([im for _, im, _ in items]))
        assert got[0].meta["source_key"] == items[0][0].key and got[0].meta["shard"] == "s1"


def _cut(digits_shards, tmp_path) -> str:
    """A copy of a digits shard cut in half (a valid prefix of members, no end blocks)."""
    src = shards.expand(digits_shards["pattern"])[2]
    data = open(src, "rb").read()
    dst = tmp_path / "in" / "shard-000002.tar"
    dst.parent.mkdir()
    dst.write_bytes(data[: len(data) // 2 // 512 * 512])
    return str(dst)


@pytest.mark.parametrize("stage", ["evaluate", "attack"])
def test_truncated_shard_raises_naming_it_and_commits_nothing(digits_shards, cnn, tmp_path, stage):
    url = _cut(digits_shards, tmp_path)
    w = _worker(digits_shards, cnn, tmp_path / "out", batch=8)
    with pytest.raises(ShardError, match="shard-000002.tar: truncated tar"):
        w.process(url, "shard-000002", stage, expected=90)
    out = tmp_path / "out"
    assert not out.exists() or not [f for _, _, fs in os.walk(out) for f in fs]  # no marker, Parquet or tar


def test_count_short_of_the_index_commits_nothing(digits_shards, cnn, tmp_path):
    url = shards.expand(digits_shards["pattern"])[3]
    w = _worker(digits_shards, cnn, tmp_path / "out")
    with pytest.raises(ShardError, match="holds 90 samples, the index says 91"):
        w.process(url, "s3", "attack", expected=91)
    assert not (tmp_path / "out").exists() or not [f for _, _, fs in os.walk(tmp_path / "out") for f in fs]


def test_decoded_samples_in_flight_stay_within_the_queue_bound(digits_shards):
    url = shards.expand(digits_shards["pattern"])[0]
    stream = ShardStream(url, 90, chunk=4, depth=2)
    got = []
    for s in stream:       # a slow consumer: the decoder fills the queue and must wait
        got.append(s.key)
        time.sleep(0.002)
        assert stream.produced - len(got) <= (stream.depth + 1) * stream.chunk + stream.chunk
    stream.finish()
    assert len(got) == 90 and stream.samples == 90 and stream.produced == 90
    assert 0 < stream.max_queued <= stream.depth
    assert [s.key for s in shards.read_shard(url)] == got


def test_a_stream_left_early_stops_its_thread_and_refuses_to_finish(digits_shards):
    url = shards.expand(digits_shards["pattern"])[0]
    stream = ShardStream(url, 90, chunk=4, depth=1)
    next(iter(stream))
    with pytest.raises(RuntimeError, match="before the end of the shard"):
        stream.finish()
    stream.close()
    assert not stream._thread.is_alive() and stream.produced < 90


def test_limit_decodes_only_the_first_samples_but_counts_all(digits_shards):
    url = shards.expand(digits_shards["pattern"])[0]
    stream = ShardStream(url, 90, limit=10, chunk=4)
    assert len(list(stream)) == 10 and stream.samples == 10
    stream.finish()
    with pytest.raises(ShardError, match="the index says 89"):
        list(ShardStream(url, 89, limit=10))


def test_prefetched_shard_is_taken_by_the_next_call_with_the_same_results(digits_shards, cnn, tmp_path):
    urls = shards.expand(digits_shards["pattern"])
    plain = _worker(digits_shards, cnn, tmp_path / "plain")
    plain.process(urls[1], "s1", "evaluate", expected=90)
    w = _worker(digits_shards, cnn, tmp_path / "out")
    assert w.process(urls[0], "s0", "evaluate", 90, prefetch=(urls[1], 90))["prefetched"] is False
    stream = w._next[2]
    assert w._next[:2] == (urls[1], 90) and stream.produced > 0   # decoding began during shard 0
    marker = w.process(urls[1], "s1", "evaluate", 90)
    assert marker["prefetched"] is True and w._next is None and stream._done
    rows = [read_committed(str(o), "evaluate", "s1").to_pylist() for o in
            (tmp_path / "plain", tmp_path / "out")]
    assert _timeless(rows[0]) == _timeless(rows[1]) and len(rows[1]) == 180


def test_a_prefetch_for_another_shard_is_closed_and_not_used(digits_shards, cnn, tmp_path):
    urls = shards.expand(digits_shards["pattern"])
    w = _worker(digits_shards, cnn, tmp_path / "out")
    w.process(urls[0], "s0", "evaluate", 90, prefetch=(urls[1], 90))
    stale = w._next[2]
    marker = w.process(urls[2], "s2", "evaluate", 90)   # the driver gave shard 1 to another worker
    assert marker["prefetched"] is False and marker["samples"] == 90
    assert not stale._thread.is_alive() and w._next is None
