"""Parity: the figures of `advpure report --format json` equal the same figures computed by
pandas and by pyarrow directly over the committed Parquet files (exact counts and ratios)."""
import json

import numpy as np
import pyarrow.compute as pc
import pytest

from pipeline import report, schema
from pipeline.run import commit

pd = pytest.importorskip("pandas")

ATTACKS = [(0, "pgd", "full", 0.1), (1, "apgd", "bpda", 0.1), (2, "pgd", "full", 0.2)]
R, STEPS = 3, 10


def _records(rng, shard: str, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        key, label = f"{shard}-{i}", int(rng.integers(0, 5))
        base = {"schema_version": schema.SCHEMA_VERSION, "job": "parity", "config_hash": "h", "stage": "evaluate",
                "shard": shard, "key": key, "label": label, "status": "ok", "runs": R, "eot": 1, "norm": "linf",
                "clean_pred": label if rng.random() < .95 else 9, "clean_mean_logit_pred": label if rng.random() < .9
                else 9, "seconds": float(rng.random()), "attack_nfe": 20, "purify_nfe": 2, "attack_steps": STEPS}
        if rng.random() < .03:
            rows.append({k: base[k] for k in ("schema_version", "shard", "key", "label")} | {"status": "decode_error"})
            continue
        for idx, name, grad, eps in [(-1, "none", "none", 0.0)] + ATTACKS:
            runs = [label if rng.random() < .6 else int(rng.integers(0, 5)) for _ in range(R)]
            pred = max(set(runs), key=runs.count)
            broken = int(rng.integers(0, STEPS)) if rng.random() < .4 and idx >= 0 else -1
            robust = None if rng.random() < .5 else bool(pred == label and broken < 0 and rng.random() < .9)
            rows.append({**base, "attack_index": idx, "attack_name": name, "gradient_mode": grad, "eps": eps,
                         "eps_255": eps * 255, "norm": None if idx < 0 else "linf",
                         "attack_params": json.dumps({"eps": eps, "steps": STEPS}), "purified_preds": runs,
                         "mean_logit_pred": pred, "vote_pred": pred, "mean_softmax_pred": pred,
                         "adv_pred": pred if rng.random() < .5 else label, "robust": robust, "broken_step": broken,
                         "worst_of_runs_correct": all(r == label for r in runs), "linf": eps, "l2": eps * 3})
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("parity"))
    rng = np.random.default_rng(7)
    for s in range(4):
        commit.commit_records(out, "evaluate", f"shard-{s}", _records(rng, f"shard-{s}", 150),
                              {"source": f"shard-{s}.tar", "config_hash": "h", "checks": {}})
    return out


def _pandas(out: str) -> dict:
    df = commit.load_records(out).to_pandas()
    ok = df[df.status == "ok"].copy()
    fallback = (ok.mean_logit_pred == ok.label) & (ok.broken_step.isna() | (ok.broken_step < 0))
    ok["r"] = [bool(f) if r is None else bool(r) for r, f in zip(ok.robust, fallback)]
    ok["unbroken"] = ok.broken_step.isna() | (ok.broken_step < 0)   # a confirmed break is broken under every rule
    per = {}
    for idx, g in ok.groupby("attack_index"):
        per[int(idx)] = {"robust": (int(g.r.sum()), len(g)),
                         "mean_logit": (int(((g.mean_logit_pred == g.label) & g.unbroken).sum()), len(g)),
                         "worst_of_runs": (int((g.worst_of_runs_correct & g.unbroken).sum()), len(g)),
                         "clean_defended": (int((g.clean_mean_logit_pred == g.label).sum()), len(g)),
                         "late": int((g.broken_step >= 0.9 * STEPS).sum())}
    att = ok[ok.attack_name != "none"]
    worst = {}
    for eps, g in att.groupby("eps"):
        per_key = g.groupby("key").agg(r=("r", "all"), c=("r", "size"))
        full = per_key[per_key.c == g.attack_index.nunique()]
        worst[eps] = (int(full.r.sum()), len(full))
    return {"per": per, "worst": worst, "failed": int((df.status != "ok").sum()),
            "samples": df.key.nunique()}


def _arrow(out: str) -> dict:
    t = commit.load_records(out)
    ok = t.filter(pc.equal(t["status"], "ok"))
    fallback = pc.and_kleene(pc.equal(ok["mean_logit_pred"], ok["label"]), pc.less(ok["broken_step"], 0))
    ok = ok.append_column("r", pc.coalesce(ok["robust"], fallback))
    per = {r["attack_index"]: (r["r_sum"], r["count_all"])
           for r in ok.group_by("attack_index").aggregate([("r", "sum"), ([], "count_all")]).to_pylist()}
    att = ok.filter(pc.not_equal(ok["attack_name"], "none"))
    keyed = att.group_by(["key", "eps"]).aggregate([("r", "all"), ([], "count_all")])
    worst = {}
    for eps in pc.unique(keyed["eps"]).to_pylist():
        entries = len(pc.unique(att.filter(pc.equal(att["eps"], eps))["attack_index"]))
        full = keyed.filter(pc.and_(pc.equal(keyed["eps"], eps), pc.equal(keyed["count_all"], entries)))
        worst[eps] = (pc.sum(full["r_all"]).as_py(), full.num_rows)
    return {"per": per, "worst": worst}


def test_json_pandas_and_pyarrow_agree(run):
    doc = json.loads(report.render([run], "json"))
    pandas, arrow = _pandas(run), _arrow(run)
    assert doc["failed_rows"] == pandas["failed"] > 0 and doc["samples"] == pandas["samples"]
    for a in doc["attacks"]:
        p = pandas["per"][a["attack_index"]]
        assert (a["robust"]["k"], a["robust"]["n"]) == p["robust"] == arrow["per"][a["attack_index"]]
        assert a["robust"]["acc"] == p["robust"][0] / p["robust"][1]
        assert (a["robust_mean_logit"]["k"], a["robust_mean_logit"]["n"]) == p["mean_logit"]
        assert (a["robust_worst_of_runs"]["k"], a["robust_worst_of_runs"]["n"]) == p["worst_of_runs"]
        assert (a["clean_defended"]["k"], a["clean_defended"]["n"]) == p["clean_defended"]
        if a["attack"] != "none":
            assert a["late_breaks"] == p["late"]
    assert {w["eps"]: (w["k"], w["n"]) for w in doc["worst_case"]} == pandas["worst"] == arrow["worst"]
    for w in doc["worst_case"]:
        assert w["acc"] == pandas["worst"][w["eps"]][0] / pandas["worst"][w["eps"]][1]
