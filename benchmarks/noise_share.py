"""Keyed counter-based noise as a share of a purification step, measured side by side.

    python benchmarks/noise_share.py [--rows 64] [--threads 1] [--repeats 20]

For each purifier step, as the evaluation runs it (no graph): the time of the whole step
(network + keyed noise + update) and of the keyed draw alone (`Noise.normal`, the same
shape, purpose and step), best of --repeats; share = draw / step. Also torch.randn for the
same number of normals (what unkeyed noise would cost). Random-init networks:
- langevin-cifar: one Langevin step of the CIFAR-10 EBM (3×32×32, Hill et al. layout);
- langevin-digits: one Langevin step of the digits EBM (1×8×8, n_f 32);
- adp-mnist: one ADP purification (smoothing draw + 10 iterations, score U-Net width 16, 1×28×28);
  its only draw is the smoothing noise.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.purifiers import steps  # noqa: E402
from pipeline.seeding import Noise  # noqa: E402


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        c = time.process_time()
        fn()
        best = min(best, time.process_time() - c)
    return best


def _langevin(n_c: int, size: int, n_f: int, rows: int):
    from pipeline.purifiers.langevin_ebm import LangevinEBMPurifier, LangevinEBMSettings
    from pipeline.purifiers.nets.ebm_nets import EBM

    torch.manual_seed(0)
    p = LangevinEBMPurifier(EBM(n_c=n_c, n_f=n_f, image_size=size), LangevinEBMSettings(steps=1)).eval()
    x = torch.rand(rows, n_c, size, size) * 2 - 1
    noise = Noise.for_batch(0, [f"k{i}" for i in range(rows)], "share")
    shape = (n_c, size, size)

    def step():
        g = steps.energy_grad(p.energy_net, x)
        z = noise.normal(shape, purpose="langevin_ebm/z", step=7)
        return steps.langevin_step(x, g, p.eps, z)

    return step, lambda: noise.normal(shape, purpose="langevin_ebm/z", step=7), rows * n_c * size * size


def _adp(rows: int):
    from pipeline.purifiers.adp import ADPPurifier, ADPSettings
    from pipeline.purifiers.nets.score_nets import SmallScoreNet

    torch.manual_seed(0)
    p = ADPPurifier(SmallScoreNet(in_channels=1, width=16), ADPSettings(max_iter=10, stop_alpha=0.0)).eval()
    x = torch.rand(rows, 1, 28, 28)
    noise = Noise.for_batch(0, [f"k{i}" for i in range(rows)], "share")
    return lambda: p(x, noise), lambda: noise.normal((1, 28, 28), purpose="adp/init"), rows * 784


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = {"langevin-cifar": lambda: _langevin(3, 32, 32, args.rows),
             "langevin-digits": lambda: _langevin(1, 8, 32, args.rows),
             "adp-mnist": lambda: _adp(args.rows)}
    print(f"{args.rows} rows, {args.threads} thread(s), CPU time best of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'step':16s} {'step ms':>9s} {'keyed ms':>9s} {'share':>7s} {'randn ms':>9s} {'keyed/randn':>12s}")
    with torch.no_grad():
        for name, make in cases.items():
            step, draw, n = make()
            t_step, t_draw = _best(step, args.repeats), _best(draw, args.repeats)
            t_randn = _best(lambda n=n: torch.randn(n), args.repeats)
            print(f"{name:16s} {t_step * 1e3:9.2f} {t_draw * 1e3:9.3f} {100 * t_draw / t_step:6.1f}% "
                  f"{t_randn * 1e3:9.3f} {t_draw / max(t_randn, 1e-9):11.1f}x", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
