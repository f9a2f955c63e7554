"""EOT gradient steps run forward and backward per chunk of samples (`pipeline.attacks.base.eot_step`):
the objectives, directions and logits are the whole batch's, and a job's records do not depend on
the chunk."""
from __future__ import annotations

import pytest
import torch

from pipeline.attacks import base
from pipeline.attacks.base import Goal, eot_step
from pipeline.classifiers.small_cnn import SmallCNN
from pipeline.evaluation import row_chunks, stages
from pipeline.evaluation.defense import Defense
from pipeline.evaluation.protocol import build_protocol
from pipeline.io import shards
from pipeline.purifiers.dae import DAEPurifier
from pipeline.purifiers.gaussian import GaussianPurifier, GaussianSettings
from pipeline.purifiers.nets.small_dae import SmallDAE
from pipeline.run import commit
from pipeline.run.worker import ShardWorker
from tests.test_row_chunks import _noise_job


class _Counting(SmallCNN):
    """SmallCNN that records the rows of every forward call."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(in_channels=1, num_classes=10, width=8)
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return super().forward(x)


def _defense(purifier: str) -> Defense:
    torch.manual_seed(1)
    p = (GaussianPurifier(GaussianSettings(sigma=0.1)) if purifier == "gaussian"
         else DAEPurifier(SmallDAE(in_channels=1, width=8).eval()))
    return Defense(_Counting().eval(), p).double()


def _batch(n: int = 10):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y, [f"s{i}" for i in range(n)]


@pytest.mark.parametrize("purifier,mode,eot", [("gaussian", "full", 4), ("gaussian", "bpda", 4), ("dae", "full", 1)])
@pytest.mark.parametrize("reduction", ["mean_loss", "mean_logits", "sign_sum"])
@pytest.mark.parametrize("targeted", [False, True])
def test_chunks_of_samples_give_the_whole_batch_step(purifier, mode, eot, reduction, targeted):
    defense = _defense(purifier)
    x, y, keys = _batch()
    goal = Goal(y, (y + 3) % 10, True) if targeted else Goal(y, None, False)
    loss = "dlr" if targeted else "ce"
    out = {}
    # one call; chunks of 3 samples (10 = 3 + 3 + 3 + 1), not of max_rows rows (3.5 samples)
    for rows in (4096, 3 * eot + eot // 2):
        defense.max_rows = rows
        defense.classifier.calls.clear()
        target = defense.attack_target(mode, 7, keys, "ctx", eot)
        out[rows] = eot_step(target, x, goal, 5, loss, reduction)
        expected = [10 * eot] if rows == 4096 else [3 * eot] * 3 + [eot]
        assert defense.classifier.calls == expected
    for whole, chunked in zip(out[4096], out[3 * eot + eot // 2]):
        assert whole.shape == chunked.shape
        assert torch.allclose(whole, chunked, rtol=1e-9, atol=1e-12)
    assert out[4096][1].abs().sum() > 0


def test_a_target_without_sample_chunk_gets_one_call():
    """Attacks' fakes (and `restrict`'s fallback) offer no `sample_chunk`: one call, as before;
    SAMPLE_CHUNKS off gives one call for the Defense's views too."""
    defense = _defense("gaussian")
    x, y, keys = _batch()
    defense.max_rows = 8
    calls: list[int] = []
    view = defense.attack_target("full", 0, keys, "ctx", 4)

    def plain(x_, step):
        calls.append(x_.shape[0])
        return view(x_, step)
    eot_step(plain, x, Goal(y, None, False), 0)
    assert calls == [10]
    defense.classifier.calls.clear()
    try:
        base.SAMPLE_CHUNKS = False
        eot_step(view, x, Goal(y, None, False), 0)
    finally:
        base.SAMPLE_CHUNKS = True
    assert defense.classifier.calls == [8] * 5     # the row chunks of one 40-row call


def test_pgd_eot_records_do_not_depend_on_the_sample_chunk(digits_shards, digits_models, tmp_path):
    """PGD-EOT on a keyed Gaussian defense: one call per step (max_rows 4096) and chunks of
    2 samples (max_rows 16, EOT 8) write the same verdicts, break steps and predictions."""
    tables = []
    for rows in (16, 4096):
        cfg = _noise_job(digits_shards, digits_models, tmp_path, rows, name=f"pgd{rows}")
        d = cfg.to_dict()
        d["attacks"] = [{"name": "pgd", "params": {"eps": 0.1, "steps": 4, "step_size": 0.03}, "gradient": "full",
                         "eot": 8}]
        w = ShardWorker(d)
        url = shards.expand(cfg.data.shards)[0]
        w.process(url, shards.shard_id(url))
        tables.append(commit.load_records(cfg.job.output).sort_by("key"))
    a, b = tables
    assert a.num_rows == b.num_rows == 24
    for col in ("key", "clean_purified_preds", "purified_preds", "mean_logit_pred", "candidate_step", "broken_step",
                "attack_steps", "robust", "attack_nfe"):
        assert a[col].to_pylist() == b[col].to_pylist(), col
    robust = a["robust"].to_pylist()
    assert 0 < sum(robust) < len(robust)            # some broken, some not


def test_calibration_times_the_chunked_step(digits_shards, digits_models, tmp_path):
    """`max_rows: auto` times the path attacks take: at chunk c, forward and backward per
    c // EOT samples (not one forward in chunks of c rows, then one backward)."""
    cfg = _noise_job(digits_shards, digits_models, tmp_path, 100)
    p = build_protocol(cfg)
    b = next(stages.batches(shards.read_shard(shards.expand(cfg.data.shards)[0])[:24], 24, p.device))
    seen: list[int] = []
    real = p.defense.classifier.forward
    p.defense.classifier.forward = lambda x: seen.append(x.shape[0]) or real(x)
    row_chunks.time_eot_step(p, p.attacks[0], b.x, b.y, b.keys, 60)
    assert seen == [56] * 3 + [24]                     # 24 images × EOT 8 in chunks of 7 images
    assert p.defense.max_rows == 100                   # restored
