"""Peak memory of the evaluation worker against shard size: whole-shard read vs streamed.

    python benchmarks/worker_memory.py [--small-mb 100] [--large-mb 1000] [--batch 32]
                                       [--threads 1] [--dir DIR]

1. builds two synthetic shards of 224 px RGB JPEGs (noise, quality 100: ~100 KB each; 64 distinct images
   reused under different keys, so building is quick but decoding is not) of about
   --small-mb and --large-mb megabytes, with an index.json, under --dir (default: a
   temporary folder, removed afterwards);
2. for each shard and each read path, runs in a fresh subprocess (so ru_maxrss is its own)
   the evaluate stage with cheap compute — an untrained small CNN (width 1), purifier none,
   no attack, R = 1, CPU:
   - whole: `ShardWorker.process` as it was: the tar's bytes in memory and every sample
     decoded into a list (`shards.read_shard`), then the stage on the list, then the commit;
   - stream: `ShardWorker.process` (decode thread → bounded queue → stage → commit);
3. prints a table: samples, shard MB, seconds, peak RSS and the peak above the process's
   RSS once its models were built (the part the shard costs).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DISTINCT = 64


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def build_shard(path: Path, megabytes: int, seed: int = 0) -> int:
    """A shard of about `megabytes` MB of 224 px JPEGs, written as a stream; its sample count."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(DISTINCT):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=100)
        jpegs.append(buf.getvalue())
    n, size = 0, 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        while size < megabytes * 1e6:
            data = jpegs[n % DISTINCT]
            _member(tar, f"s{n:07d}.jpg", data)
            _member(tar, f"s{n:07d}.cls", str(n % 10).encode())
            n, size = n + 1, size + len(data) + 1536
    return n


def write_index(folder: Path, counts: dict[str, int]) -> None:
    from pipeline.io.shards import INDEX_FORMAT, INDEX_NAME

    entries = []
    for name, n in counts.items():
        h = hashlib.sha256()
        with open(folder / name, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        entries.append({"name": name, "samples": n, "bytes": (folder / name).stat().st_size, "sha256": h.hexdigest()})
    doc = {"format": INDEX_FORMAT, "total_samples": sum(counts.values()), "shards": entries}
    (folder / INDEX_NAME).write_text(json.dumps(doc, indent=1))


class WholeShard:
    """The former read path behind ShardStream's interface: the whole tar in memory (held
    here as the former reader held it), every sample decoded (`read_shard`), then handed out."""

    def __init__(self, url: str, expected_samples: int | None = None, limit: int | None = None, **_):
        from pipeline.io import shards, storage

        self._tar_bytes = storage.read_bytes(url)
        self.all = shards.read_shard(url, expected_samples)[:limit]
        self.samples = len(self.all)
        self.errors = [s for s in self.all if s.error is not None]

    def __iter__(self):
        return iter([s for s in self.all if s.error is None])

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, url: str, expected: int, folder: str, batch: int, threads: int) -> dict:
    import torch

    from pipeline import config
    from pipeline.classifiers import small_cnn
    from pipeline.io import checkpoints, shards
    from pipeline.run.worker import ShardWorker

    torch.manual_seed(0)
    params = {"in_channels": 3, "num_classes": 10, "width": 1}  # compute stays small beside decoding
    ckpt = str(Path(folder) / "cnn.pt")
    checkpoints.save(ckpt, small_cnn.ARCH, params, small_cnn.make(**params).state_dict())
    cfg = {"job": {"name": "worker-memory", "output": str(Path(folder) / f"out-{mode}"), "seed": 0},
           "data": {"shards": url, "batch_size": batch},
           "classifier": {"name": "small_cnn", "params": {"checkpoint": ckpt}},
           "purifier": {"name": "none", "params": {}}, "attacks": [],
           "evaluation": {"runs": 1, "device": "cpu"}}
    if mode == "whole":
        shards.ShardStream = WholeShard  # the worker as it was: read_shard, then the stage on the list
    w = ShardWorker(config.from_dict(cfg).to_dict(), cpus=threads)
    import pipeline.run.commit  # noqa: F401  (pyarrow and pandas imported before the baseline)
    base = _rss_mib()
    t0 = time.perf_counter()
    rows = w.process(url, "bench", "evaluate", expected)["rows"]
    return {"mode": mode, "rows": rows, "seconds": time.perf_counter() - t0, "base_mib": base,
            "peak_mib": _rss_mib()}


def _run_child(mode: str, url: str, expected: int, folder: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, url, str(expected), str(folder),
           "--batch", str(args.batch), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{mode} run on {url} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(folder: Path, args) -> list[dict]:
    counts, results = {}, []
    for name, mb in (("small.tar", args.small_mb), ("large.tar", args.large_mb)):
        t0 = time.perf_counter()
        counts[name] = build_shard(folder / name, mb)
        print(f"built {name}: {counts[name]} samples, {(folder / name).stat().st_size / 1e6:.0f} MB "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    write_index(folder, counts)
    for name, n in counts.items():
        for mode in ("whole", "stream"):
            r = _run_child(mode, str(folder / name), n, folder, args)
            r.update(shard=name, samples=n, shard_mb=(folder / name).stat().st_size / 1e6)
            results.append(r)
            print(json.dumps(r), file=sys.stderr)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-mb", type=int, default=100)
    ap.add_argument("--large-mb", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dir", help="where to build the shards (kept); default a temporary folder")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, url, expected, folder = args.child[0], args.child[1], int(args.child[2]), args.child[3]
        print(json.dumps(child(mode, url, expected, folder, args.batch, args.threads)))
        return 0
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        results = run(Path(args.dir), args)
    else:
        with tempfile.TemporaryDirectory(prefix="worker-memory-") as d:
            results = run(Path(d), args)
    print(f"batch {args.batch}, {args.threads} torch thread(s); evaluate stage, untrained small CNN (width 1), "
          "no purifier, no attack")
    print("| shard | samples | MB | read | seconds | peak RSS MiB | above models MiB |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['shard']} | {r['samples']} | {r['shard_mb']:.0f} | {r['mode']} | {r['seconds']:.1f} | "
              f"{r['peak_mib']:.0f} | {r['peak_mib'] - r['base_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
