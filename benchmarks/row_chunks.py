"""evaluation.max_rows by measurement: one attack step at several row chunks.

    python benchmarks/row_chunks.py CONFIG [--rows 64 128 256 512 1024 2048 4096] [--repeats 3]
        [--batch N] [--threads 1]

Builds the job's protocol as a worker does (in this process, no Ray), reads the first shard's
first batch (--batch, default the job's batch size) and times one step of the attack with the
most rows per step (batch × EOT) — the draws through the defense the attack differentiates,
cross-entropy of the mean logits, backward — with evaluation.max_rows set to each --rows value
(`pipeline.evaluation.row_chunks.time_eot_step`, what `max_rows: auto` and `advpure plan` time).
Sizes at or above the step's rows are one call; the sizes run interleaved, --repeats rounds,
after one warm-up step. Prints each size's median seconds and its ratio to one call.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline import config  # noqa: E402
from pipeline.evaluation import row_chunks, stages  # noqa: E402
from pipeline.evaluation.protocol import build_protocol  # noqa: E402
from pipeline.io import shards  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--rows", type=int, nargs="+", default=list(row_chunks.ROW_CHUNKS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = config.load(a.config)
    p = build_protocol(cfg)
    attacks = [x for x in p.attacks if x.gradient != "classifier"]
    if not attacks:
        print(f"{a.config}: no attack through the purifier (every attack has gradient: classifier)", file=sys.stderr)
        return 2
    attack = max(attacks, key=lambda x: x.eot)
    n = a.batch or cfg.data.batch_size
    samples = [s for s in shards.read_shard(shards.expand(cfg.data.shards)[0]) if s.error is None][:n]
    b = next(stages.batches(samples, n, p.device))
    rows = len(b.keys) * attack.eot
    sizes = sorted({min(r, rows) for r in a.rows})
    print(f"{a.config}: attack{attack.index}:{attack.name}, {len(b.keys)} images × EOT {attack.eot} = {rows} rows "
          f"per step, {a.threads} thread(s), {p.device}; load {os.getloadavg()[0]:.1f}", flush=True)
    row_chunks.time_eot_step(p, attack, b.x, b.y, b.keys, rows)  # warm-up
    times: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(a.repeats):
        for s in sizes:
            times[s].append(row_chunks.time_eot_step(p, attack, b.x, b.y, b.keys, s))
    whole = statistics.median(times[rows]) if rows in times else None
    for s in sizes:
        med = statistics.median(times[s])
        ratio = f"{med / whole:.2f} of one call" if whole else ""
        print(f"max_rows {s:5d}: median {med:6.2f} s  ({', '.join(f'{t:.2f}' for t in times[s])})  {ratio}")
    print(f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
