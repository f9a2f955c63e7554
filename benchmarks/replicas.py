"""Replica batching: R draws as one [B·R, ...] tensor against a Python loop over the draws.

    python benchmarks/replicas.py [--samples 16] [--draws 16] [--threads 1] [--repeats 3] [--adp-rows 256 64 32 16]
        [--only eot adp langevin diffpure]

Same networks, same keyed noise rows (draw r of sample b is row b·R + r either way), so the
outputs agree; what differs is one call on B·R rows against R calls on B rows:
- eot:      a full-gradient attack step through Gaussian noise (σ 0.25) + small_cnn on 8×8
            digits: logits of R EOT draws and ∇ₓ of their mean loss (`Defense.logits`);
- adp:      ADP purification (10 score-ascent iterations, small score U-Net, width 16) of R
            ensemble draws per image on 28×28;
- langevin: R Langevin chains per image, 50 steps of the digits-size EBM (8×8, n_f 32);
- diffpure: a full-gradient EOT attack step through DiffPure (t* 0.1, dt 0.01: 10 reverse-SDE
            steps, exact checkpointed gradient; small_unet width 16) + small_cnn on 8×8 digits.
Random-init networks (speed does not depend on the weights). Times are process CPU seconds
(best of --repeats), and wall seconds beside them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.seeding import Noise  # noqa: E402


def _rows(noise: Noise, r: int, draws: int) -> Noise:
    return noise.select(slice(r, None, draws))  # draw r of every sample (rows are sample-major)


def case_eot(b: int, draws: int):
    from pipeline.classifiers.base import Classifier
    from pipeline.classifiers.small_cnn import SmallCNN
    from pipeline.evaluation.defense import Defense
    from pipeline.purifiers.gaussian import GaussianPurifier, GaussianSettings

    torch.manual_seed(0)
    clf = Classifier(SmallCNN(in_channels=1, num_classes=10, width=32), (0.5,), (0.5,), 10).eval()
    for q in clf.parameters():
        q.requires_grad_(False)
    d = Defense(clf, GaussianPurifier(GaussianSettings(sigma=0.25)))
    x = torch.rand(b, 1, 8, 8)
    y = torch.arange(b) % 10
    noise = Noise.for_batch(0, [f"k{i}" for i in range(b)], "eot", draws)

    def grad(xx, nz):
        xx = xx.clone().requires_grad_(True)
        z = d.logits(xx, nz, "full")                       # [B, R', K]
        loss = torch.nn.functional.cross_entropy(z.flatten(0, 1), y.repeat_interleave(z.shape[1]))
        return torch.autograd.grad(loss * z.shape[1], xx)[0]

    batched = lambda: grad(x, noise)  # noqa: E731
    loop = lambda: sum(grad(x, _rows(noise, r, draws)) for r in range(draws))  # noqa: E731
    return batched, loop


def case_diffpure(b: int, draws: int):
    from pipeline.classifiers.base import Classifier
    from pipeline.classifiers.small_cnn import SmallCNN
    from pipeline.evaluation.defense import Defense
    from pipeline.purifiers.diffpure import DiffPurePurifier, DiffPureSettings, EpsilonModel
    from pipeline.purifiers.nets.small_unet import SmallUNet

    torch.manual_seed(0)
    clf = Classifier(SmallCNN(in_channels=1, num_classes=10, width=32), (0.5,), (0.5,), 10).eval()
    unet = SmallUNet(1, width=16).eval()
    for q in [*clf.parameters(), *unet.parameters()]:
        q.requires_grad_(False)
    d = Defense(clf, DiffPurePurifier(EpsilonModel(unet), DiffPureSettings(dt=0.01)))
    x = torch.rand(b, 1, 8, 8)
    y = torch.arange(b) % 10
    noise = Noise.for_batch(0, [f"k{i}" for i in range(b)], "eot", draws)

    def grad(xx, nz):
        xx = xx.clone().requires_grad_(True)
        z = d.logits(xx, nz, "full")                       # [B, R', K]
        loss = torch.nn.functional.cross_entropy(z.flatten(0, 1), y.repeat_interleave(z.shape[1]))
        return torch.autograd.grad(loss * z.shape[1], xx)[0]

    batched = lambda: grad(x, noise)  # noqa: E731
    loop = lambda: sum(grad(x, _rows(noise, r, draws)) for r in range(draws))  # noqa: E731
    return batched, loop


def _adp_parts(b: int, draws: int):
    from pipeline.purifiers.adp import ADPPurifier, ADPSettings
    from pipeline.purifiers.nets.score_nets import SmallScoreNet

    torch.manual_seed(0)
    p = ADPPurifier(SmallScoreNet(in_channels=1, width=16), ADPSettings(max_iter=10, stop_alpha=0.0)).eval()
    noise = Noise.for_batch(0, [f"k{i}" for i in range(b)], "adp", draws)
    return p, torch.rand(b, 1, 28, 28, generator=torch.Generator().manual_seed(0)).repeat_interleave(draws, 0), noise


def case_adp(b: int, draws: int):
    p, xr, noise = _adp_parts(b, draws)
    x = xr[::draws]
    batched = lambda: p(xr, noise)  # noqa: E731
    loop = lambda: torch.stack([p(x, _rows(noise, r, draws)) for r in range(draws)], 1).flatten(0, 1)  # noqa: E731
    return batched, loop


def case_langevin(b: int, draws: int):
    from pipeline.purifiers.langevin_ebm import LangevinEBMPurifier, LangevinEBMSettings
    from pipeline.purifiers.nets.ebm_nets import EBM

    torch.manual_seed(0)
    p = LangevinEBMPurifier(EBM(n_c=1, n_f=32, image_size=8), LangevinEBMSettings(steps=50)).eval()
    x = torch.rand(b, 1, 8, 8)
    noise = Noise.for_batch(0, [f"k{i}" for i in range(b)], "chains", draws)
    xr = x.repeat_interleave(draws, 0)
    batched = lambda: p(xr, noise)  # noqa: E731
    loop = lambda: torch.stack([p(x, _rows(noise, r, draws)) for r in range(draws)], 1).flatten(0, 1)  # noqa: E731
    return batched, loop


def _time(fn, repeats: int) -> tuple[float, float, torch.Tensor]:
    out = fn()  # warm-up
    best_cpu, best_wall = float("inf"), float("inf")
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        out = fn()
        best_cpu, best_wall = min(best_cpu, time.process_time() - c), min(best_wall, time.perf_counter() - w)
    return best_cpu, best_wall, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--draws", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="+", default=["eot", "adp", "langevin"])
    ap.add_argument("--adp-rows", nargs="*", type=int, default=[], metavar="N",
                    help="also time batched ADP cut into chunks of N rows (evaluation.max_rows)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = {"eot": case_eot, "adp": case_adp, "langevin": case_langevin, "diffpure": case_diffpure}
    print(f"{args.samples} samples × {args.draws} draws, {args.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'case':9s} {'batched cpu s':>14s} {'loop cpu s':>11s} {'loop/batched':>13s} {'wall ratio':>11s} "
          f"{'max |diff|':>11s}")
    for name in args.only:
        batched, loop = cases[name](args.samples, args.draws)
        grad_ctx = torch.enable_grad() if name in ("eot", "diffpure") else torch.no_grad()
        with grad_ctx:
            cb, wb, ob = _time(batched, args.repeats)
            cl, wl, ol = _time(loop, args.repeats)
        diff = float((ob - ol).abs().max())
        print(f"{name:9s} {cb:14.3f} {cl:11.3f} {cl / cb:12.1f}x {wl / wb:10.1f}x {diff:11.1e}", flush=True)
    if args.adp_rows:  # the batched ADP case cut into chunks of at most N rows (evaluation.max_rows)
        from pipeline.purifiers import steps

        p, xr, noise = _adp_parts(args.samples, args.draws)
        with torch.no_grad():
            for rows in args.adp_rows:
                cpu, _, _ = _time(lambda: steps.purify_in_chunks(p.purify, xr, noise, rows), args.repeats)  # noqa: B023
                print(f"adp in chunks of {rows:4d} rows: {cpu:.3f} cpu s", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
