"""The worker's logic in-process (no Ray): evaluation rows, commit files, batch independence."""
import json

import pytest

from pipeline import config, report, schema
from pipeline.io import shards
from pipeline.run import commit
from pipeline.run.commit import marker_url, read_committed
from pipeline.run.worker import ShardWorker
from tests.conftest import job_dict


def _processor(digits_shards, digits_models, tmp_path, **over):
    cfg = job_dict(digits_shards["pattern"], digits_models, str(tmp_path / "out"), **over)
    return ShardWorker(config.from_dict(cfg).to_dict())


def test_one_shard_commits_parquet_then_marker(digits_shards, digits_models, tmp_path):
    proc = _processor(digits_shards, digits_models, tmp_path)
    url = shards.expand(digits_shards["pattern"])[0]
    marker = proc.process(url, "shard-000000", "evaluate", expected=90)
    marker_file = marker_url(str(tmp_path / "out"), "evaluate", "shard-000000")
    table = read_committed(str(tmp_path / "out"), "evaluate", "shard-000000")
    assert table.schema.equals(schema.SCHEMA)
    assert marker["rows"] == table.num_rows == 90 and marker["samples"] == 90
    assert json.loads(open(marker_file).read())["sha256"] == marker["sha256"]
    rows = table.to_pylist()
    assert len({r["key"] for r in rows}) == 90
    assert all(r["status"] == "ok" and r["linf"] <= 0.2 + 1e-6 for r in rows)
    assert rows[0]["gradient_mode"] == "full"           # dae is differentiable → auto = full
    assert rows[0]["eps_255"] == pytest.approx(51.0)
    assert rows[0]["classifier_sha256"] and rows[0]["purifier_sha256"]
    acc = sum(r["clean_pred"] == r["label"] for r in rows) / 90
    assert acc > 0.8


def test_rows_do_not_depend_on_batch_size(digits_shards, digits_models, tmp_path):
    url = shards.expand(digits_shards["pattern"])[1]
    outs = []
    for bs in (90, 7):
        proc = _processor(digits_shards, digits_models, tmp_path / str(bs),
                          data={"shards": digits_shards["pattern"], "batch_size": bs})
        proc.process(url, "s", "evaluate")
        t = read_committed(str(tmp_path / str(bs) / "out"), "evaluate", "s").to_pylist()
        outs.append({r["key"]: (r["adv_pred"], r["purified_preds"], round(r["linf"], 6)) for r in t})
    assert outs[0] == outs[1]


def test_decode_errors_become_status_rows(digits_models, tmp_path):
    import numpy as np

    w = shards.ShardWriter(str(tmp_path / "sh"), samples_per_shard=10)
    w.write("a", np.zeros((8, 8, 1), np.uint8), 0)
    w.write("b", image_bytes=b"junk", label=1)
    w.close()
    pattern = str(tmp_path / "sh" / "shard-000000.tar")
    proc = _processor({"pattern": pattern}, digits_models, tmp_path)
    proc.process(pattern, "shard-000000")
    t = read_committed(str(tmp_path / "out"), "evaluate", "shard-000000").to_pylist()
    by_key = {r["key"]: r for r in t}
    assert by_key["a"]["status"] == "ok"
    assert by_key["b"]["status"] == "decode_error"
    assert "cannot identify image" in by_key["b"]["error"]
    summary = report.summarize(commit.load_records(str(tmp_path / "out")))
    assert summary["failed_rows"] == 1 and summary["samples"] == 2


def test_no_attack_job_writes_one_row_per_sample(digits_shards, digits_models, tmp_path):
    proc = _processor(digits_shards, digits_models, tmp_path, attacks=[])
    url = shards.expand(digits_shards["pattern"])[0]
    assert proc.process(url, "x")["rows"] == 90


def test_cascade_equals_per_sample_worst_case(digits_shards, digits_models, tmp_path):
    """Keyed randomness makes an attack's result per sample independent of its batch, so the
    cascade's final robust set is exactly the intersection of the attacks' robust sets (both
    at one ε: the cascade chains entries of one threat model only, issue 22)."""
    attacks = [{"name": "fgsm", "params": {"eps": 0.1}},
               {"name": "pgd", "params": {"eps": 0.1, "steps": 5, "step_size": 0.03}}]
    url = shards.expand(digits_shards["pattern"])[0]
    tables = {}
    for cascade in (False, True):
        proc = _processor(digits_shards, digits_models, tmp_path / str(cascade), attacks=attacks,
                          evaluation={"runs": 1, "cascade": cascade},
                          data={"shards": digits_shards["pattern"], "batch_size": 32})
        proc.process(url, "s")
        tables[cascade] = read_committed(str(tmp_path / str(cascade) / "out"), "evaluate", "s").to_pylist()
    robust = {(r["attack_index"], r["key"]): r["mean_logit_pred"] == r["label"] for r in tables[False]}
    cas = {(r["attack_index"], r["key"]): r for r in tables[True]}
    assert len(cas) == 180
    keys = {k for _, k in robust}
    for k in keys:
        assert (cas[(1, k)]["mean_logit_pred"] == cas[(1, k)]["label"]) == (robust[(0, k)] and robust[(1, k)])
        if not robust[(0, k)]:
            assert cas[(1, k)]["cascade_from"] == 0 and cas[(1, k)]["attack_name"] == "pgd"
    carried = sum(1 for k in keys if cas[(1, k)]["cascade_from"] is not None)
    assert 0 < carried < 90


def test_cascade_never_carries_a_larger_eps_break_to_a_smaller_eps(digits_shards, digits_models, tmp_path):
    """Issue 22: FGSM at ε = 0.3 listed before FGSM at ε = 0.05. A sample broken only at
    0.3 must stay robust in the ε = 0.05 rows; the old single chain carried those breaks down
    (cascade_from = 0) and the small-ε accuracy fell to the large-ε one."""
    attacks = [{"name": "fgsm", "params": {"eps": 0.3}}, {"name": "fgsm", "params": {"eps": 0.05}}]
    url = shards.expand(digits_shards["pattern"])[0]
    rows = {}
    for cascade in (False, True):
        proc = _processor(digits_shards, digits_models, tmp_path / str(cascade), attacks=attacks,
                          evaluation={"runs": 1, "cascade": cascade},
                          data={"shards": digits_shards["pattern"], "batch_size": 32, "max_samples_per_shard": 48})
        proc.process(url, "s")
        rows[cascade] = {(r["attack_index"], r["key"]): r for r in read_committed(
            str(tmp_path / str(cascade) / "out"), "evaluate", "s").to_pylist()}
    off, on = rows[False], rows[True]
    only_large = [k for i, k in off if i == 0 and not off[(0, k)]["robust"] and off[(1, k)]["robust"]]
    assert only_large, "the test needs samples broken at ε = 0.3 but not at 0.05"
    small = {k: r for (i, k), r in on.items() if i == 1}
    # attacked, not carried (a sample misclassified clean is gated at every ε: not attacked)
    assert all(r["cascade_from"] is None and (r["attack_nfe"] > 0) == r["attacked"] for r in small.values())
    assert any(r["attacked"] for r in small.values())
    assert all(small[k]["robust"] for k in only_large)
    assert {k: r["robust"] for k, r in small.items()} == {k: off[(1, k)]["robust"] for k in small}
