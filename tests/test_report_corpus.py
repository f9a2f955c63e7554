"""`advpure report` on an `advpure purify` output: the corpus records' own schema version and
a document of their own (samples and drops, quality, predictions, cost)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline import cli, schema
from pipeline.corpus import job, synth
from pipeline.corpus.worker import STAGE, CorpusWorker
from pipeline.report import corpus

RNG = np.random.default_rng(3)


def test_the_report_stage_is_the_corpus_workers():
    assert corpus.STAGE == STAGE


@pytest.mark.timeout(120)
def test_report_reads_a_purify_output(tmp_path, capsys):
    members = [m for i in range(3) for m in synth.sample_members(f"k{i}", synth.encode(synth.smooth_image(RNG, 12, 16),
                                                                                       "PNG"), "png")]
    members += [("broken.png", b"no image"), ("broken.txt", b"c")]
    url = tmp_path / "in" / "in-000000.tar"
    url.parent.mkdir()
    url.write_bytes(synth.tar_bytes(members))
    out = str(tmp_path / "out")
    cfg = job.build_config(str(url), out, purifier="none")
    CorpusWorker(cfg.to_dict()).process(str(url), "in-000000", STAGE)
    assert cli.main(["report", out, "--stage", STAGE, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["kind"], doc["samples"], doc["ok"], doc["purifier"], doc["committed_shards"]) == ("corpus", 4, 3,
                                                                                                 "none", 1)
    assert doc["dropped"]["decode_error"]["keys"] == ["broken"]
    assert doc["quality"]["psnr"]["identical"] + doc["quality"]["psnr"]["n"] == 3   # lossless PNG: mostly inf
    assert cli.main(["report", out, "--stage", STAGE]) == 0
    text = capsys.readouterr().out
    assert f"stage {STAGE}  purifier none" in text and "decode_error | 1       | broken" in text
    assert cli.main(["report", out, "--stage", STAGE, "--format", "robustbench"]) == 1
    assert "has no robust accuracy to export" in capsys.readouterr().err


def test_predictions_and_quality_are_counted_from_the_records():
    rows = {"job": ["j"] * 4, "config_hash": ["h"] * 4, "key": list("abcd"),
            "status": ["ok", "ok", "ok", "purify_error"], "error": [None, None, None, "boom"],
            "purifier": ["dae"] * 4, "classifier": ["c"] * 4, "runs": [1] * 4,
            "purify_nfe": [1, 1, 1, None], "psnr": [30.0, 40.0, float("inf"), None], "ssim": [0.9, 0.8, 1.0, None],
            "label": [1, 2, None, 0], "pred_before": [1, 2, 3, None], "vote_after": [1, 0, 3, None],
            "seconds": [1.0, 1.0, 1.0, 0.5]}
    tally = corpus._Tally()
    tally.add(pa.table(rows))
    assert tally.psnr.doc() == {"n": 2, "mean": 35.0, "min": 30.0, "max": 40.0, "identical": 1}
    assert tally.counts == {"agree": 2, "compared": 3, "right_before": 2, "right_after": 1, "labelled": 2}
    assert tally.examples == {"purify_error": {"keys": ["d"], "error": "boom"}}
    assert set(rows) == set(corpus.COLUMNS) <= set(schema.CORPUS_SCHEMA.names)
