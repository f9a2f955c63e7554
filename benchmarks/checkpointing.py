"""Gradient checkpointing through K purification steps: peak memory and time, side by side.

    python benchmarks/checkpointing.py [--purifier ebm adp diffpure] [--ks 10 100 1000] [--images 8]
                                       [--threads 2] [--max-none-k 1000] [--max-legacy-k 100] [--reps 1]
                                       [--allocator worker|glibc|both]

One full gradient d(Σ ŷ²)/dx through K steps (one forward + one backward) of
- ebm: the CIFAR-10 Langevin EBM (Hill et al. layout, random init, 3×32×32), K Langevin steps;
- adp: ADP on a CIFAR-size small score U-Net (random init, width 32 or $BENCH_ADP_WIDTH), K iterations with
  stop_alpha 0 so that no row stops early,
- diffpure: DiffPure at t* = 0.1 with dt = 0.1/K (K reverse-SDE steps) on a CIFAR-size small_unet
  (random init, width 32 or $BENCH_ADP_WIDTH), plus mode `adjoint` (torchsde's stochastic adjoint,
  the same keyed path; its gradient differs from the exact one by its discretisation error),
with `checkpoint_segment` 0 (none: the whole graph is kept), -1 (auto: this project's
checkpointing, memory-optimal segments) and `legacy` (torch.utils.checkpoint, non-reentrant,
√K segments — what the project used before; shows the cost this benchmark was written for).
Every cell runs in its own subprocess, so peak RSS (ru_maxrss) is that cell's alone (after a
K=2 warm-up pass of the same mode); time is the process's CPU time (wall time too, which a
loaded machine inflates); the gradients of every mode are compared with `none` where both ran. --allocator: each cell's
process keeps freed memory as a worker does (`worker`, pipeline.run.host.keep_freed_memory),
or runs on glibc's defaults (`glibc`), or both alternately (`both`: the pair's ratio shows
what kept memory is worth).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


ADP_WIDTH = int(os.environ.get("BENCH_ADP_WIDTH", "32"))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _legacy_run_steps(step, x, n_steps: int, start: int = 0):
    """The previous implementation: torch.utils.checkpoint (non-reentrant), √K segments."""
    from torch.utils.checkpoint import checkpoint

    segment = max(1, math.ceil(math.sqrt(n_steps)))

    def run_segment(x_in, t0, t1):
        for t in range(t0, t1):
            x_in = step(x_in, t)
        return x_in

    t = start
    while t < start + n_steps:
        t1 = min(start + n_steps, t + segment)
        x = checkpoint(run_segment, x, t, t1, use_reentrant=False)
        t = t1
    return x


def _build(purifier: str, k: int, mode: str):
    import torch

    torch.manual_seed(0)
    seg = {"none": 0, "auto": -1, "legacy": -1, "adjoint": 0}[mode]
    if purifier == "diffpure":
        from pipeline.purifiers.diffpure import DiffPurePurifier, DiffPureSettings, EpsilonModel
        from pipeline.purifiers.nets.small_unet import SmallUNet

        settings = DiffPureSettings(dt=0.1 / k, checkpoint_segment=seg, clip_output=False,
                                    gradient_method="adjoint" if mode == "adjoint" else "exact")
        p = DiffPurePurifier(EpsilonModel(SmallUNet(3, width=ADP_WIDTH)), settings)
    elif purifier == "ebm":
        from pipeline.purifiers.langevin_ebm import LangevinEBMPurifier, LangevinEBMSettings
        from pipeline.purifiers.nets.ebm_nets import EBM

        p = LangevinEBMPurifier(EBM(), LangevinEBMSettings(steps=k, checkpoint_segment=seg, clip_output=False))
    else:
        from pipeline.purifiers.adp import ADPPurifier, ADPSettings
        from pipeline.purifiers.nets.score_nets import SmallScoreNet

        settings = ADPSettings(max_iter=k, stop_alpha=0.0, checkpoint_segment=seg)
        p = ADPPurifier(SmallScoreNet(in_channels=3, width=ADP_WIDTH), settings)
    for q in p.parameters():
        q.requires_grad_(False)
    if mode == "legacy":
        if purifier != "ebm":
            raise SystemExit("legacy mode is implemented for the EBM chain only")
        from pipeline.purifiers import steps

        steps.run_steps = lambda step, x, n, segment=0, start=0: _legacy_run_steps(step, x, n, start)
    return p.eval()


def child(purifier: str, k: int, mode: str, images: int, threads: int, allocator: str) -> dict:
    import torch

    from pipeline.run import host
    from pipeline.seeding import Noise

    torch.set_num_threads(threads)
    if allocator == "worker" and not host.keep_freed_memory():
        raise SystemExit("could not set the worker's allocator (not glibc, or MALLOC_* set in the environment)")
    p = _build(purifier, k, mode)
    x = torch.rand(images, 3, 32, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    noise = Noise.for_batch(0, [f"k{i}" for i in range(images)], "bench")
    warm = _build(purifier, 2, mode)  # first-call costs (allocator, kernels) are not the mode's
    torch.autograd.grad(warm(x, noise).sum(), x)
    before = _rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    y = p(x, noise)
    (g,) = torch.autograd.grad((y ** 2).sum(), x)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"purifier": purifier, "k": k, "mode": mode, "allocator": allocator, "seconds": seconds, "cpu_seconds": cpu,
            "peak_rss_mib": _rss_mib(),
            "rss_before_mib": before, "grad": g.flatten()[:4096].tolist()}


def _run_cell(args, purifier: str, k: int, mode: str, allocator: str) -> dict | None:
    cmd = [sys.executable, __file__, "--child", purifier, str(k), mode, "--images", str(args.images),
           "--threads", str(args.threads), "--allocator", allocator]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    if proc.returncode != 0:
        print(f"{purifier} K={k} {mode}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _modes(args, purifier: str, k: int) -> list[str]:
    modes = []
    if k <= args.max_none_k:
        modes.append("none")
    modes.append("auto")
    if purifier == "ebm" and k <= args.max_legacy_k:
        modes.append("legacy")
    if purifier == "diffpure":
        modes.append("adjoint")
    return modes


def _print_row(r: dict, base: dict | None) -> None:
    ratio_t = f"{r['cpu_seconds'] / base['cpu_seconds']:5.2f}x" if base else "   — "
    ratio_m = f"{r['peak_rss_mib'] / base['peak_rss_mib']:5.2f}x" if base else "   — "
    agree = "—"
    if base and r is not base:
        diff = max(abs(a - b) for a, b in zip(r["grad"], base["grad"]))
        scale = max(abs(b) for b in base["grad"]) or 1.0
        agree = f"{diff / scale:.1e}"
    print(f"{r['purifier'][:4]:4s} {r['allocator']:6s} {r['k']:6d} {r['mode']:7s} {r['seconds']:9.2f} "
          f"{r['cpu_seconds']:9.2f} {r['peak_rss_mib']:10.0f} "
          f"{r['rss_before_mib']:10.0f} {ratio_t:>8s} {ratio_m:>8s} {agree:>9s}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--purifier", nargs="+", default=["ebm", "adp"], choices=["ebm", "adp", "diffpure"])
    ap.add_argument("--ks", nargs="+", type=int, default=[10, 100, 1000])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-none-k", type=int, default=1000, help="skip `none` above this K")
    ap.add_argument("--max-legacy-k", type=int, default=100, help="skip `legacy` above this K")
    ap.add_argument("--reps", type=int, default=1, help="run each K's modes this many times, alternately")
    ap.add_argument("--allocator", choices=["worker", "glibc", "both"], default="worker",
                    help="freed memory kept as in a worker, glibc's defaults, or both alternately")
    ap.add_argument("--child", nargs=3, metavar=("PURIFIER", "K", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2], args.images, args.threads,
                               args.allocator)))
        return 0
    print(f"{args.images} images 3x32x32, {args.threads} threads, one forward + backward per cell; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("pur  alloc       K mode      wall s     cpu s   peak MiB  before MiB  cpu/none mem/none grad diff")
    results = []
    pairs: dict[tuple[str, str, int], list[float]] = {}
    allocators = ["worker", "glibc"] if args.allocator == "both" else [args.allocator]
    for purifier in args.purifier:
        for k in args.ks:
            for _ in range(args.reps):  # the modes alternate: drift of a shared machine hits both
                for allocator in allocators:
                    base = None
                    for mode in _modes(args, purifier, k):
                        r = _run_cell(args, purifier, k, mode, allocator)
                        if r is None:
                            continue
                        base = r if mode == "none" else base
                        _print_row(r, base)
                        results.append(r)
                        if mode == "auto" and base is not None:
                            ratio = r["cpu_seconds"] / base["cpu_seconds"]
                            pairs.setdefault((purifier, allocator, k), []).append(ratio)
    for (purifier, allocator, k), ratios in pairs.items():
        ratios.sort()
        print(f"{purifier} K={k} ({allocator} allocator): auto/none CPU over {len(ratios)} pair(s): "
              f"median {statistics.median(ratios):.2f} (range {ratios[0]:.2f}–{ratios[-1]:.2f})")
    for purifier, allocator in ((p, a) for p in args.purifier for a in allocators):
        auto = [r for r in results if r["purifier"] == purifier and r["mode"] == "auto" and r["allocator"] == allocator]
        if len(auto) > 1:
            peaks = [r["peak_rss_mib"] for r in auto]
            print(f"{purifier} ({allocator} allocator): checkpointed peak RSS over K={[r['k'] for r in auto]}: "
                  f"max/min {max(peaks) / min(peaks):.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
