"""Peak RSS of a corpus worker as the corpus grows 10×: memory must stay flat in corpus size.

    python benchmarks/corpus_memory.py [--small 20000 200000] [--large 2000 20000]
                                       [--per-shard 1000] [--workdir /tmp/advpure-corpus-mem]

For each corpus size: a synthetic img2dataset-style corpus is written (smooth images;
"small" = 32×32 JPEG, "large" = 400×300 JPEG, shards of --per-shard samples each, with
.txt / .json / .cls fields), then a fresh Python process builds one CorpusWorker (the actor's
logic, without Ray) with the `none` purifier and PSNR / SSIM on, and processes every shard
in turn, as one actor given the whole corpus would. That process reports its peak RSS
(getrusage ru_maxrss) and its RSS after the first shard and after the last. Corpora and
outputs are deleted after each size. Prints one JSON line per run, then a table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {"small": (32, 32), "large": (300, 400)}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(pattern: str, out: str) -> None:
    """One worker over every shard of the corpus; prints a JSON line."""
    from pipeline.corpus import job
    from pipeline.corpus.worker import STAGE, CorpusWorker
    from pipeline.io import shards

    cfg = job.build_config(pattern, out, purifier="none", overrides=["data.batch_size=128"])
    worker = CorpusWorker(cfg.to_dict(), cpus=2)
    urls = shards.expand(pattern)
    t0 = time.time()
    samples, between = 0, []
    for url, sid in zip(urls, shards.unique_ids(urls)):
        samples += worker.process(url, sid, STAGE)["samples"]
        between.append(_rss_mb())            # RSS between shards: what a long-lived actor keeps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    half = max(1, len(between) // 2)
    print(json.dumps({"samples": samples, "shards": len(urls), "seconds": round(time.time() - t0, 1),
                      "rss_after_first_shard_mb": round(between[0], 1), "rss_at_end_mb": round(between[-1], 1),
                      "max_rss_between_shards_first_half_mb": round(max(between[:half]), 1),
                      "max_rss_between_shards_second_half_mb": round(max(between[half:] or between), 1),
                      "peak_rss_mb": round(peak, 1)}), flush=True)


def one_size(kind: str, n: int, per_shard: int, workdir: Path) -> dict:
    from pipeline.corpus import synth

    h, w = SIZES[kind]
    root = workdir / f"{kind}-{n}"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.time()
    pattern = synth.write_corpus(str(root / "in"), n // per_shard, per_shard, h, w, "JPEG", seed=n)
    gen_s = time.time() - t0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, __file__, "--child", pattern, str(root / "out")], env=env,
                         capture_output=True, text=True, check=True)
    result = {"kind": kind, "image": f"{w}x{h} JPEG", "corpus": n, "generate_s": round(gen_s, 1),
              **json.loads(out.stdout.strip().splitlines()[-1])}
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, nargs="*", default=[20000, 200000])
    p.add_argument("--large", type=int, nargs="*", default=[2000, 20000])
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--workdir", default="/tmp/advpure-corpus-mem")
    p.add_argument("--child", nargs=2, metavar=("PATTERN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return 0
    results = [one_size(kind, n, args.per_shard, Path(args.workdir))
               for kind, ns in (("small", args.small), ("large", args.large)) for n in ns]
    print(f"\n{'corpus':>22} {'samples':>8} {'shards':>6} {'s':>7} {'RSS 1st shard':>14} {'RSS end':>8} "
          f"{'peak RSS':>9}")
    for r in results:
        print(f"{r['kind'] + ' ' + r['image']:>22} {r['samples']:>8} {r['shards']:>6} {r['seconds']:>7} "
              f"{r['rss_after_first_shard_mb']:>12.0f}MB {r['rss_at_end_mb']:>6.0f}MB {r['peak_rss_mb']:>7.0f}MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
