"""Train an EBM for long-run Langevin purification by maximum likelihood with persistent
short-run chains (Hill, Mitchell, Zhu, ICLR 2021; reference: point0bar1/ebm-defense,
train_ebm.py and config_train_ebm/cifar10_ebm.json; the data-initialised bank with
rejuvenation is from the same group's "EBM Life Cycle", point0bar1/ebm-life-cycle).

Per batch (images on the [−1, 1] scale; pipeline.train.recipes.train_ebm):
  positives  X⁺ = data batch + data_epsilon·N(0, I)            (data_epsilon = 0.02)
  negatives  X⁻ = L = 100 Langevin steps X ← X − ∇U(X) + ε·Z   (ε = 0.01) started from a
             persistent bank (`--init`, below); the updated states go back into the bank.
             With `--rejuvenate p` each drawn state is first replaced by a fresh start
             with probability p.
  loss       d = (mean U(X⁺) − mean U(X⁻)) / (ε²/2)
The ε²/2 factor is absorbed: the network learns U = (ε²/2)·E, so Langevin needs no step
size; Adam (lr 1e-4) is invariant to the scale, and the SGD phase after the switch uses
lr_sgd·ε²/2 (lr_sgd = 5e-5), as in the reference. `--ema` keeps an exponential moving
average of the weights (EBM Life Cycle) and saves it.

Banks (`--init`, pipeline.train.objectives.ChainStarts):
  persistent       the reference and the default: uniform noise on [−1, 1], one state per
                   training image (or `--bank-size`); rejuvenation (if any) from uniform noise
  data_persistent  EBM Life Cycle: states start at training images and are rejuvenated from
                   training images. Ours: `--start-sigma s` adds clip(x + σ·n, 0, 1) noise
                   with σ ~ U(0, s) per image to those starts — the states a purifier is
                   handed (noisy or attacked images, always in [0, 1]), so the chains the
                   model learns from begin where purification begins.
  uniform / data / gaussian   non-persistent short-run starts (reference options)
The defaults reproduce the reference recipe at a shorter budget. A uniform-noise bank with a
few hundred batches may never visit the region around (noisy) digits, so long-run chains
started there can drift into states the model never corrected (docs/adp_ebm.md: PSNR falls);
data_persistent with --rejuvenate, --start-sigma and --ema puts the negatives there.

Published CIFAR-10 run: 250,000 batches of 100, switch at 125,000. Ours on CPU:

    python jobs/train_ebm.py --data digits --out runs/models/digits_ebm.pt --steps 2000
    python jobs/train_ebm.py --data mnist --out runs/models/mnist_ebm.pt --steps 2000 --shortrun-steps 60

Splits are pipeline.io.datasets.load_split names: digits train → check on test; MNIST (only
the test files are stored) t10k-fit (images 0–7,999) → check on t10k-holdout.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
from torch import nn

from pipeline.purifiers.nets import ebm_nets
from pipeline.train import common, heldout, recipes
from pipeline.train.objectives import CHAIN_INITS

TRAIN_KEYS = ("steps", "batch_size", "lr_adam", "lr_sgd", "epsilon", "data_epsilon", "shortrun_steps", "init",
              "rejuvenate", "start_sigma", "bank_size", "ema", "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # no abbreviations: the retired --start would otherwise silently mean --start-sigma
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True)
    common.add_data_args(p, sources=("digits", "mnist"), eval_count=128)
    p.add_argument("--eval-sigma", type=float, default=0.1, help="Gaussian noise added to held-out images")
    p.add_argument("--eval-steps", type=int, default=1500, help="Langevin steps K of the check")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--steps", type=int, default=2000, help="training batches (published: 250000)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr-adam", type=float, default=1e-4)
    p.add_argument("--lr-sgd", type=float, default=5e-5, help="multiplied by ε²/2")
    p.add_argument("--switch-step", type=int, default=None,
                   help="Adam → SGD at this batch (default: half of --steps; a value > --steps never switches)")
    p.add_argument("--epsilon", type=float, default=1e-2, help="Langevin noise ε")
    p.add_argument("--data-epsilon", type=float, default=2e-2)
    p.add_argument("--shortrun-steps", type=int, default=100)
    p.add_argument("--init", choices=CHAIN_INITS, default="persistent", help="chain starts (see above)")
    p.add_argument("--rejuvenate", type=float, default=0.0, help="probability a drawn bank state restarts")
    p.add_argument("--start-sigma", type=float, default=0.0,
                   help="data_persistent: bank starts are clip(x + σn, 0, 1), σ ~ U(0, START_SIGMA)")
    p.add_argument("--bank-size", type=int, default=None, help="persistent states (default: one per training image)")
    p.add_argument("--ema", type=float, default=0.0, help="moving-average decay of the saved weights; 0: off")
    p.add_argument("--max-chain-grad", type=float, default=None,
                   help="stop as diverged when the chains' mean ‖∇U‖ reaches this (default: only on a non-finite loss)")
    p.add_argument("--n-f", type=int, default=32)
    p.add_argument("--leak", type=float, default=0.05)
    common.add_run_args(p, log_every=50)
    return p.parse_args(argv)


def report_check(args: argparse.Namespace, net: nn.Module, held_out: torch.Tensor) -> dict:
    """Long-run Langevin purification of noisy held-out images: print and return the curve."""
    curve = heldout.langevin_psnr(net, held_out, args.eval_sigma, args.eval_steps, args.epsilon,
                                  args.eval_every, args.seed)
    best = max(curve, key=lambda c: c[1])
    print(f"Langevin purification of {len(held_out)} held-out images + N(0, {args.eval_sigma}²): PSNR "
          f"{curve[0][1]:.2f} dB (noisy) → {curve[-1][1]:.2f} dB after {curve[-1][0]} steps "
          f"(best {best[1]:.2f} dB at {best[0]}); energy {curve[0][2]:.4g} → {curve[-1][2]:.4g}")
    for k, q, e in curve:
        print(f"  steps {k:5d}  PSNR {q:6.2f}  U {e:.4g}")
    return {"images": len(held_out), "sigma": args.eval_sigma, "curve": curve}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup(args)
    images, _, held_out = common.load_data(args, held_out=True)
    data = 2.0 * images - 1.0
    arch_params = {"n_c": int(data.shape[1]), "n_f": args.n_f, "leak": args.leak, "image_size": int(data.shape[2])}
    # "train_ebm/init": the key these weights were always drawn from, so old seeds still hold
    net = common.seeded_init(ebm_nets.make_ebm, args.seed, "train_ebm/init", **arch_params)
    print(f"training EBM {arch_params} on {len(data)} {args.data} images")
    max_chain_grad = math.inf if args.max_chain_grad is None else args.max_chain_grad
    hist = recipes.train_ebm(net, data, n_steps=args.steps, switch_step=args.switch_step, log_every=args.log_every,
                             max_chain_grad=max_chain_grad,
                             **{k: getattr(args, k) for k in TRAIN_KEYS if k != "steps"})
    d = hist["d"]
    k, first, last = common.first_last(d)
    print(f"d_s_t: first {k} steps {first:.4f} → last {k} steps {last:.4f} ({len(d)} steps)")
    every = max(1, len(d) // 200)
    meta = {"job": "train_ebm", "data": args.data, "split": common.splits(args)[0], "limit": args.limit,
            "count": len(data), **{k2: getattr(args, k2) for k2 in TRAIN_KEYS},
            "switch_step": args.switch_step if args.switch_step is not None else args.steps // 2,
            "scale": "[-1,1]", "d_curve": d[::every], "r_curve": hist["r"][::every]}
    if len(held_out):
        meta["purification_check"] = report_check(args, net, held_out)
    common.save(args.out, ebm_nets.ARCH, arch_params, net, meta)
    print(f"saved {args.out}: {json.dumps({k2: meta[k2] for k2 in ('data', 'count', 'steps')})}")
    return 1 if hist["diverged"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
