"""End-to-end throughput against a bare compute loop, measured in one run.

    python benchmarks/throughput.py [--samples 720] [--steps 20] [--workers 1]

(a) bare loop: the same models, attack and purifier over the same images in one process,
    no Ray, no shards, no Parquet — the compute floor;
(b) the pipeline: shards → Ray actor(s) → Parquet commits, through `driver.run`;
(c) keyed counter-based noise against torch.randn for the same number of normals.
Prints samples/s and the ratios pipeline/bare (1.0 = no overhead) and keyed/randn time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

from pipeline import config, datasets, driver, models  # noqa: E402
from pipeline.make_shards import make_shards  # noqa: E402
from pipeline.seeding import Noise  # noqa: E402
from pipeline.worker import ShardProcessor  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=720)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="advpure-bench-"))
    doc = make_shards("digits", str(tmp / "shards"), split="all", samples_per_shard=180, limit=args.samples)
    cnn, dae = str(tmp / "cnn.pt"), str(tmp / "dae.pt")
    models.train_small_cnn(cnn, epochs=5)
    models.train_small_dae(dae, epochs=5)
    cfg_dict = {
        "job": {"name": "bench", "output": str(tmp / "out")},
        "data": {"shards": doc["pattern"], "batch_size": 180},
        "classifier": {"name": "small_cnn", "params": {"checkpoint": cnn}},
        "purifier": {"name": "dae", "params": {"checkpoint": dae}},
        "attacks": [{"name": "pgd", "params": {"eps": 0.2, "steps": args.steps}}],
        "cluster": {"num_workers": args.workers, "cpus_per_worker": 1},
    }
    cfg = config.from_dict(cfg_dict)
    n = doc["total_samples"]

    # (a) bare loop: the worker's own math on tensors already in memory
    proc = ShardProcessor(cfg.to_dict(), cpus=1)
    images, labels, idx = datasets.load_split("digits", "all")
    x = datasets.to_float_nchw(images[:n])
    y = torch.from_numpy(labels[:n])
    keys = [f"digits-{i:04d}" for i in idx[:n]]
    from pipeline.evaluate import evaluate_batch

    t0 = time.perf_counter()
    for i in range(0, n, 180):
        evaluate_batch(proc.defense, proc.attacks, x[i:i + 180], y[i:i + 180], keys[i:i + 180], 0, 1)
    bare = time.perf_counter() - t0

    # (b) the pipeline (Ray start-up excluded: a warm cluster, as on a real deployment)
    import ray

    ray.init(address="local", num_cpus=max(2, args.workers), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    t0 = time.perf_counter()
    code, _ = driver.run(cfg)
    pipe = time.perf_counter() - t0
    ray.shutdown()
    assert code == 0

    # (c) keyed noise vs torch.randn
    noise = Noise.for_batch(0, [str(i) for i in range(1000)], "bench", replicas=15)
    t0 = time.perf_counter()
    noise.normal((1, 28, 28), "z")
    keyed = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.randn(15000, 1, 28, 28)
    plain = time.perf_counter() - t0

    print(f"samples {n}, PGD-{args.steps} full gradient through the DAE, torch threads 1 per worker")
    print(f"(a) bare compute loop : {n / bare:8.1f} samples/s")
    print(f"(b) pipeline, {args.workers} worker : {n / pipe:8.1f} samples/s (shards, Ray actor, Parquet commits)")
    print(f"ratio pipeline/bare throughput: {bare / pipe:.2f}")
    print(f"(c) keyed normal / torch.randn time for 11.76M normals: {keyed / plain:.1f}x "
          f"({keyed * 1e3:.0f} ms vs {plain * 1e3:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
