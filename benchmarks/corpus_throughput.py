"""Images/s of `advpure purify` (the Ray job) against a bare in-process loop over the same
decoded tensors, for the `dae` and `adp` purifiers, on local disk and on a local S3 server.

    python benchmarks/corpus_throughput.py [--dae-images 2000] [--adp-images 400] [--size 32]
                                           [--per-shard 200] [--cpus 2] [--no-s3]

Corpus: synthetic 32×32 RGB JPEGs written img2dataset-style (.jpg .txt .json .cls). Purifiers
(random, seeded weights: the cost of a forward does not depend on the weights): `dae` =
small_dae (3 channels, width 16), `adp` = small_score (3 channels, width 8) with max_iter 5
and stop_alpha 0, so every row runs all 5 steps (10 score evaluations).

(a) bare: every image decoded into memory first (not timed), then only
    Defense.purify over batches with keyed noise, under no_grad — the compute floor (the
    best of 1 and --cpus torch threads, each tried twice);
(b) job, local: `pipeline.corpus.job.run` — one Ray actor with --cpus CPUs reading the tar
    shards, decoding, batching, purifying, encoding, PSNR / SSIM, writing, committing;
(c) job, S3: the same with input shards, output and records on SeaweedFS (tests/s3server.py)
    on 127.0.0.1.
The job's rate is given two ways: over the whole run (actor start-up and scheduling
included) and over the worker's own time per shard (sum of the commit markers' seconds).
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

from pipeline.corpus import images, job, synth  # noqa: E402
from pipeline.corpus.engine import NOISE_CONTEXT, Engine  # noqa: E402
from pipeline.corpus.reader import ShardReader  # noqa: E402
from pipeline.corpus.worker import STAGE  # noqa: E402
from pipeline.io import checkpoints, shards, storage  # noqa: E402
from pipeline.io.shards import ShardError  # noqa: E402
from pipeline.purifiers.nets.score_nets import SmallScoreNet  # noqa: E402
from pipeline.purifiers.nets.small_dae import SmallDAE  # noqa: E402
from pipeline.run import commit  # noqa: E402
from pipeline.seeding import Noise  # noqa: E402


def purifiers(tmp: Path) -> dict[str, tuple[str, dict]]:
    torch.manual_seed(0)
    dae, score = str(tmp / "dae.pt"), str(tmp / "score.pt")
    checkpoints.save(dae, "small_dae", {"in_channels": 3, "width": 16}, SmallDAE(3, 16).state_dict())
    checkpoints.save(score, "small_score", {"in_channels": 3, "width": 8}, SmallScoreNet(3, 8).state_dict())
    return {"dae": ("dae", {"checkpoint": dae}),
            "adp": ("adp", {"checkpoint": score, "max_iter": 5, "stop_alpha": 0.0})}


def bare(cfg, pattern: str) -> float:
    """images/s of the purifier alone over tensors already decoded in memory: the best of
    1 and `cpus` torch threads, twice each (on a loaded 2-core machine fewer threads can win)."""
    engine = Engine(cfg)
    xs, keys = [], []
    for url in shards.expand(pattern):
        for raw in ShardReader(url):
            ext = images.pick_image([e for e, _ in raw.members])
            d = images.decode(raw.members[ext][1], 1 << 30)
            xs.append(torch.from_numpy(d.unit()).permute(2, 0, 1).contiguous())
            keys.append(raw.key)
    bs, best = cfg.data.batch_size, 0.0
    for threads in sorted({1, int(cfg.cluster.cpus_per_worker)}) * 2:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(xs), bs):
                x = torch.stack(xs[i:i + bs])
                engine.defense.purify(x, Noise.for_batch(cfg.job.seed, keys[i:i + bs], NOISE_CONTEXT, 1))
        best = max(best, len(xs) / (time.perf_counter() - t0))
    return best


def run_job(cfg) -> dict:
    t0 = time.perf_counter()
    code, manifest = job.run(cfg)
    wall = time.perf_counter() - t0
    if code != 0:
        raise ShardError(f"job failed with exit code {code}: {job.format_outcome(manifest)}")
    markers = commit.committed(cfg.job.output, STAGE)
    n = sum(m["samples"] for m in markers.values())
    worker_s = sum(m["seconds"] for m in markers.values())
    return {"images": n, "wall_s": wall, "job_ips": n / wall, "worker_ips": n / worker_s}


def config(pattern: str, out: str, name: str, params: dict, cpus: float, metrics: bool = True):
    return job.build_config(pattern, out, purifier=name, params=params, corpus={"metrics": metrics},
                            overrides=["data.batch_size=128", "cluster.num_workers=1",
                                       f"cluster.cpus_per_worker={cpus}", "cluster.gpus_per_worker=0"])


def measure(where: str, root: str, tmp: Path, counts: dict[str, int], args) -> list[dict]:
    rows = []
    for key, (name, params) in purifiers(tmp).items():
        n = counts[key]
        pattern = synth.write_corpus(storage.join(root, f"in-{key}"), n // args.per_shard, args.per_shard,
                                     args.size, args.size, "JPEG", seed=1)
        variants = [True, False] if where == "local" and key == "dae" else [True]
        for metrics in variants:
            cfg = config(pattern, storage.join(root, f"out-{key}-{metrics}"), name, params, args.cpus, metrics)
            base = bare(cfg, pattern)
            r = run_job(cfg)
            rows.append({"purifier": key, "storage": where, "metrics": metrics, "bare_ips": base, **r})
            print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(r: dict) -> str:
    return (f"{r['purifier']:>4} {r['storage']:>6} metrics={'on ' if r['metrics'] else 'off'} "
            f"{r['images']:>6} images  bare {r['bare_ips']:8.1f}/s  job {r['job_ips']:8.1f}/s "
            f"(worker {r['worker_ips']:8.1f}/s)  job/bare {r['job_ips'] / r['bare_ips']:.2f} "
            f"worker/bare {r['worker_ips'] / r['bare_ips']:.2f}  wall {r['wall_s']:.0f}s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dae-images", type=int, default=2000)
    p.add_argument("--adp-images", type=int, default=400)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--per-shard", type=int, default=200)
    p.add_argument("--cpus", type=float, default=2.0)
    p.add_argument("--no-s3", action="store_true")
    args = p.parse_args()
    import ray

    counts = {"dae": args.dae_images, "adp": args.adp_images}
    tmp = Path(tempfile.mkdtemp(prefix="advpure-corpus-tp-"))
    ray.init(address="local", num_cpus=int(args.cpus), include_dashboard=False, logging_level="ERROR")
    rows = measure("local", str(tmp / "local"), tmp, counts, args)
    ray.shutdown()
    if not args.no_s3:
        from tests import s3server

        with s3server.running(tmp / "s3") as srv:   # Ray started after: its workers inherit AWS_*
            ray.init(address="local", num_cpus=int(args.cpus), include_dashboard=False, logging_level="ERROR")
            rows += measure("s3", srv.url("bench"), tmp, counts, args)
            ray.shutdown()
    print("\n" + "\n".join(_fmt(r) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
