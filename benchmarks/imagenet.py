"""ImageNet scale on this machine: shards from a validation-style folder, then ResNet-50 at 224 px.

    python benchmarks/imagenet.py [--images 256] [--classes 10] [--attack-images 32] [--batch 32]
                                  [--threads 1] [--memory-limit-gb 0]

1. generates --images JPEGs of random sizes (256–512 px per side, smooth random content) in
   class sub-folders named like WordNet ids, and times `make_shards("imagenet", ...)` (decode,
   resize 256, centre crop 224, PNG, tar) — images/s;
2. runs `configs/imagenet_resnet50.yaml` with a random-weight ResNet-50 on CPU (fp32, in a
   subprocess so its peak RSS is its own; the worker's stage code, no Ray):
   (a) clean: purifier none, no attack — every image, one clean + one defended forward;
   (b) attacked: gaussian purifier σ 0.25, R = 2 runs, PGD-2 ℓ∞ 4/255 through the
       classifier — the first --attack-images images;
   images/s, peak RSS, and the batch size the worker ended with. --memory-limit-gb caps the
   subprocess's address space (RLIMIT_AS) so that large batches fail to allocate and the
   worker's adaptive batch size is exercised with the real allocator.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def generate(folder: Path, images: int, classes: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        wnid = f"n{1440764 + 1000 * (i % classes):08d}"
        (folder / wnid).mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(256, 513, 2))
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        im.save(folder / wnid / f"ILSVRC2012_val_{i + 1:08d}.JPEG", quality=90)


def child(shards: str, mode: str, limit: int, batch: int, threads: int, mem_gb: float) -> dict:
    if mem_gb > 0:
        cap = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch

    from pipeline import config
    from pipeline.evaluation import stages
    from pipeline.evaluation.protocol import build_protocol
    from pipeline.io import shards as shards_mod

    torch.set_num_threads(threads)
    sets = [f"data.shards={shards}", f"data.batch_size={batch}", "classifier.params={random_init: true}",
            "evaluation.device=cpu", "evaluation.precision=fp32", "evaluation.channels_last=false"]
    if mode == "clean":
        sets += ["purifier.name=none", "purifier.params={}", "attacks=[]", "evaluation.runs=1"]
    else:
        sets += ["evaluation.runs=2",
                 "attacks=[{name: pgd, params: {eps: 0.0156863, steps: 2, step_size: 0.0078431}, "
                 "gradient: classifier}]"]
    cfg = config.load(str(ROOT / "configs/imagenet_resnet50.yaml"), sets)
    p = build_protocol(cfg)
    samples = [s for u in shards_mod.expand(cfg.data.shards) for s in shards_mod.read_shard(u)][:limit]
    t0 = time.perf_counter()
    rows = stages.evaluate(p, samples).rows
    seconds = time.perf_counter() - t0
    return {"mode": mode, "images": len(samples), "rows": len(rows), "seconds": seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "batch_start": batch, "batch_end": p.batch_size}


def _run_child(args, shards: str, mode: str, limit: int) -> dict:
    cmd = [sys.executable, __file__, "--child", shards, mode, str(limit), "--batch", str(args.batch),
           "--threads", str(args.threads), "--memory-limit-gb", str(args.memory_limit_gb)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--attack-images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-limit-gb", type=float, default=0.0)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        r = child(args.child[0], args.child[1], int(args.child[2]), args.batch, args.threads, args.memory_limit_gb)
        print(json.dumps(r))
        return 0
    from pipeline.io.make_shards import make_shards

    tmp = Path(tempfile.mkdtemp(prefix="advpure-imagenet-"))
    generate(tmp / "val", args.images, args.classes)
    t0 = time.perf_counter()
    doc = make_shards("imagenet", str(tmp / "shards"), path=str(tmp / "val"), samples_per_shard=128)
    shard_s = time.perf_counter() - t0
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {args.threads} torch thread(s)")
    print(f"make-shards imagenet: {doc['total_samples']} JPEGs (256–512 px) → 224×224 PNG shards in {shard_s:.1f} s, "
          f"{doc['total_samples'] / shard_s:.1f} images/s")
    for mode, limit in (("clean", args.images), ("attacked", args.attack_images)):
        r = _run_child(args, doc["pattern"], mode, limit)
        print(f"ResNet-50 224 px, {mode:8s}: {r['images']} images in {r['seconds']:.1f} s, "
              f"{r['images'] / r['seconds']:.2f} images/s, peak RSS {r['peak_rss_mib']:,.0f} MiB, "
              f"batch {r['batch_start']} → {r['batch_end']}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
