"""Workers: the same job on 2 actors against 1 actor, on one warm local Ray, side by side.

    python benchmarks/scaling.py [--samples 1440] [--steps 40] [--models DIR]

The digits PGD-through-DAE job of benchmarks/throughput.py (shards of 180, one torch thread
per actor) runs with cluster.num_workers 1, then 2, then 1 again (a drift check: a machine
shared with other work changes speed between runs). Ratio = time(1 actor) / time(2 actors),
with the mean of the two 1-actor runs; wall time of driver.run (actor start-up included,
Ray's start excluded). The load average before and after each run is printed: on a 2-core
machine anything else running takes from the second actor first. The machine's own ceiling
is measured last: a 1-thread matmul loop in two processes at once against one alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402


def _with(cfg, workers: int, output: Path):
    return dataclasses.replace(cfg, job=dataclasses.replace(cfg.job, output=str(output)),
                               cluster=dataclasses.replace(cfg.cluster, num_workers=workers))


_MATMUL = ("import time, torch; torch.set_num_threads(1); a = torch.randn(512, 512); a @ a; "
           "t = time.perf_counter(); [a @ a for _ in range(600)]; print(time.perf_counter() - t)")


def machine_ceiling() -> float:
    """What two 1-thread processes get from this machine: the same matmul loop run twice one
    after the other against twice at once (2.0 = two full cores; a VM's vCPUs may give less)."""
    def run(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", _MATMUL], stdout=subprocess.PIPE, text=True)
                 for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    alone = run(1)
    return 2 * alone / run(2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1440)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--models", default=None, help="folder with cnn.pt and dae.pt to reuse")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="advpure-scaling-"))
    cfg, n = throughput.prepare(args.samples, args.steps, 1, tmp, args.models)
    throughput.start_ray(2)
    import ray

    times = []
    print(f"samples {n} in {len(list((tmp / 'shards').glob('*.tar')))} shards, PGD-{args.steps} through the DAE, "
          f"{os.cpu_count()} CPUs")
    for i, workers in enumerate((1, 2, 1)):
        load = os.getloadavg()[0]
        wall, inside = throughput.pipeline_run(_with(cfg, workers, tmp / f"out{i}"))
        times.append(wall)
        print(f"{workers} actor(s): {wall:7.1f} s, {n / wall:6.1f} samples/s (Σ per-shard {inside:.1f} s); "
              f"load average {load:.1f} → {os.getloadavg()[0]:.1f}", flush=True)
    ray.shutdown()
    ceiling = machine_ceiling()
    one = (times[0] + times[2]) / 2
    print(f"ratio 2 actors / 1 actor throughput: {one / times[1]:.2f} "
          f"(1-actor runs {times[0]:.1f} s and {times[2]:.1f} s: drift {abs(times[0] - times[2]) / one:.0%})")
    print(f"machine ceiling: two 1-thread matmul processes at once do {ceiling:.2f}× the work of one "
          f"(load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
