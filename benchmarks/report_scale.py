"""Report aggregation at scale: a generated records set summarised by `advpure report`.

    python benchmarks/report_scale.py [--rows 10000000] [--shards 100] [--out /tmp/advpure-report-scale]

(a) writes a committed records set (once; reused when it is already there): `--shards`
    Parquet files with commit markers, an ImageNet-like job — 1000 classes, 8 attack entries
    (PGD full gradient and APGD BPDA at ε = 2, 4, 8, 16 /255), R = 4 runs, 100 steps with
    per-step breaks, ~3 % decode failures; per-run predictions filled, mean logits null (the
    report never decodes them);
(b) runs `advpure report OUT --format json` in a fresh process and prints its wall time,
    CPU time and peak resident memory (ru_maxrss of the child), then the headline it computed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import schema  # noqa: E402
from pipeline.io import storage  # noqa: E402
from pipeline.run import commit  # noqa: E402

ATTACKS = [(i, name, grad, eps) for i, (eps, (name, grad)) in
           enumerate((e, a) for e in (2, 4, 8, 16) for a in (("pgd", "full"), ("apgd", "bpda")))]
CLASSES, RUNS, STEPS = 1000, 4, 100


def _const(value, n: int, type_: pa.DataType) -> pa.Array:
    return pa.array([value], type_).take(pa.array(np.zeros(n, dtype=np.int64)))


def shard_table(rng: np.random.Generator, sid: str, samples: int) -> pa.Table:
    """Records of one shard: `samples` samples × the attack entries, vectorised."""
    e = len(ATTACKS)
    n = samples * e
    label = np.repeat(rng.integers(0, CLASSES, samples), e)
    key = np.repeat(np.array([f"{sid}-{i:07d}" for i in range(samples)], dtype=object), e)
    idx = np.tile(np.arange(e), samples)
    eps = np.array([a[3] / 255 for a in ATTACKS])[idx]
    strength = 1 - np.array([a[3] for a in ATTACKS])[idx] / 20          # larger ε: fewer survive
    runs = np.where(rng.random((n, RUNS)) < strength[:, None], label[:, None], rng.integers(0, CLASSES, (n, RUNS)))
    robust = (runs == label[:, None]).sum(1) > RUNS // 2
    broken = np.where(robust, -1, rng.integers(0, STEPS, n)).astype(np.int32)
    ok = rng.random(samples) > 0.03
    status = np.where(np.repeat(ok, e), "ok", "decode_error")
    pred = np.where(robust, label, (label + 1) % CLASSES)
    cols = {
        "schema_version": _const(schema.SCHEMA_VERSION, n, pa.int16()), "job": _const("scale", n, pa.string()),
        "config_hash": _const("0" * 16, n, pa.string()), "stage": _const("evaluate", n, pa.string()),
        "shard": _const(sid, n, pa.string()), "key": pa.array(key, pa.string()), "label": pa.array(label),
        "seed": _const(0, n, pa.int64()), "classifier": _const("resnet50", n, pa.string()),
        "purifier": _const("adp", n, pa.string()), "attack_index": pa.array(idx, pa.int16()),
        "attack_name": pa.array(np.array([a[1] for a in ATTACKS], dtype=object)[idx], pa.string()),
        "attack_params": pa.array(np.array([json.dumps({"eps": a[3] / 255, "steps": STEPS}) for a in ATTACKS],
                                           dtype=object)[idx], pa.string()),
        "gradient_mode": pa.array(np.array([a[2] for a in ATTACKS], dtype=object)[idx], pa.string()),
        "eot": _const(8, n, pa.int32()), "norm": _const("linf", n, pa.string()), "eps": pa.array(eps),
        "eps_255": pa.array(eps * 255), "runs": _const(RUNS, n, pa.int32()), "clean_pred": pa.array(label),
        "clean_mean_logit_pred": pa.array(label), "adv_pred": pa.array(pred), "mean_logit_pred": pa.array(pred),
        "vote_pred": pa.array(pred), "mean_softmax_pred": pa.array(pred),
        "purified_preds": pa.FixedSizeListArray.from_arrays(pa.array(runs.ravel()), RUNS).cast(pa.list_(pa.int64())),
        "worst_of_runs_correct": pa.array((runs == label[:, None]).all(1)), "broken_step": pa.array(broken),
        "attack_steps": _const(STEPS, n, pa.int32()), "decision": _const("vote", n, pa.string()),
        "robust": pa.array(robust), "linf": pa.array(eps), "l2": pa.array(eps * 50),
        "attack_nfe": _const(STEPS * 8, n, pa.int64()), "purify_nfe": _const(2 * RUNS * 30, n, pa.int64()),
        "seconds": pa.array(rng.random(n)), "status": pa.array(status),
    }
    return pa.table({c: cols.get(c, pa.nulls(n, schema.SCHEMA.field(c).type)) for c in schema.COLUMNS},
                    schema=schema.SCHEMA)


def write_records(out: str, rows: int, shards: int) -> None:
    """The records set, committed as the workers commit (commit.commit_records, from a table)."""
    rng = np.random.default_rng(0)
    samples = rows // (shards * len(ATTACKS))
    for s in range(shards):
        sid = f"shard-{s:06d}"
        table = shard_table(rng, sid, samples)
        data = schema.to_parquet_bytes(table)
        name = f"{sid}.bench.parquet"
        storage.put_bytes(storage.join(out, "evaluate", name), data)
        storage.put_text(commit.marker_url(out, "evaluate", sid), json.dumps({
            "shard": sid, "source": f"{sid}.tar", "samples": samples, "config_hash": "0" * 16, "checks": {},
            "parquet": name, "rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest(),
            "schema_version": schema.SCHEMA_VERSION}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--out", default="/tmp/advpure-report-scale")
    args = p.parse_args()
    out = f"{args.out}-{args.rows}-{args.shards}"
    if len(commit.committed(out, "evaluate")) != args.shards:
        t0 = time.perf_counter()
        write_records(out, args.rows, args.shards)
        print(f"wrote {args.rows} rows in {args.shards} shards to {out} in {time.perf_counter() - t0:.1f} s")
    size = sum(f.stat().st_size for f in Path(out, "evaluate").glob("*.parquet"))
    load = os.getloadavg()[0]   # other work on the machine stretches the wall time
    cmd = [sys.executable, "-m", "pipeline.cli", "report", out, "--format", "json"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    seconds = time.perf_counter() - t0
    if res.returncode:
        print(res.stderr, file=sys.stderr)
        return res.returncode
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss_mib = usage.ru_maxrss / 1024   # Linux: KiB
    doc = json.loads(res.stdout)
    print(f"report of {doc['rows']} rows ({doc['samples']} samples, {size / 2**20:.0f} MiB Parquet): "
          f"{seconds:.1f} s wall, {usage.ru_utime + usage.ru_stime:.1f} s CPU, peak RSS {rss_mib:.0f} MiB "
          f"(load average before: {load:.1f})")
    for w in doc["worst_case"]:
        print(f"  worst case ε={w['eps_255']:.0f}/255: {100 * w['acc']:.2f} % [{100 * w['lo']:.2f}, "
              f"{100 * w['hi']:.2f}] of {w['n']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
