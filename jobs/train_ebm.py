"""Train an EBM for long-run Langevin purification by maximum likelihood with persistent
short-run chains (Hill, Mitchell, Zhu, ICLR 2021; reference: point0bar1/ebm-defense,
train_ebm.py and config_train_ebm/cifar10_ebm.json; the data-initialised bank with
rejuvenation is from the same group's "EBM Life Cycle", point0bar1/ebm-life-cycle).

Per batch (images on the [−1, 1] scale; pipeline.train.recipes.train_ebm):
  positives  X⁺ = data batch + data_epsilon·N(0, I)            (data_epsilon = 0.02)
  negatives  X⁻ = L Langevin steps X ← X − ∇U(X) + ε·Z (ε = 0.01) from a persistent bank
             (`--init`, below); the updated states go back into the bank. With
             `--rejuvenate p` each drawn state is first replaced by a fresh start with probability p.
  loss       d = (mean U(X⁺) − mean U(X⁻)) / (ε²/2)
The ε²/2 factor is absorbed: the network learns U = (ε²/2)·E, so Langevin needs no step
size; Adam is invariant to the scale, and an SGD phase (`--switch-step`) uses lr_sgd·ε²/2.

Recipes (`--recipe`, pipeline.train.recipes.EBM_RECIPES; any flag given overrides it):
  reference  the published CIFAR-10 run: bank of uniform noise (one state per image), L = 100,
             Adam 1e-4 → SGD 5e-5·ε²/2 at half of 250,000 batches, LeakyReLU n_f 32
  digits     ours (CPU): data-initialised bank of 300 clean training images, rejuvenated with
             probability 0.02 per draw (mean chain age L/p = 1,000 steps, many older than the
             1,500 purification steps), L = 20, Adam 1e-3 decayed to 1e-4, SiLU n_f 16, 1,500 batches
  mnist      ours: as digits with a bank of 500 and 3,000 batches
docs/adp_ebm.md explains each choice and what was measured with the others.

Banks (`--init`, pipeline.train.objectives.ChainStarts): persistent (uniform noise, the
reference), data_persistent (training images, EBM Life Cycle; `--start-sigma s` adds
clip(x + σ·n, 0, 1) noise with σ ~ U(0, s) to the starts), uniform / data / gaussian
(non-persistent short-run starts).

After training, the held-out check (pipeline.train.heldout): long-run purification of held-out
images + N(0, σ²) for each --eval-sigmas (PSNR every --eval-every steps), and with
--classifier the class retention of --eval-chains chains started at clean held-out images.

    python jobs/train_ebm.py --recipe digits --data digits --out runs/models/digits_ebm.pt --threads 1 \\
        --classifier runs/models/digits_cnn.pt
    python jobs/train_ebm.py --recipe mnist --data mnist --out runs/models/mnist_ebm.pt --threads 1

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

# recipe keys that are train_ebm arguments (the others, n_f and act, shape the network)
TRAIN_KEYS = ("batch_size", "lr_adam", "lr_final", "lr_sgd", "switch_step", "epsilon", "data_epsilon",
              "shortrun_steps", "init", "rejuvenate", "start_sigma", "bank_size", "ema", "dsm_weight", "dsm_sigmas")
FLAG_TYPES = {"steps": int, "batch_size": int, "lr_adam": float, "lr_final": float, "lr_sgd": float,
              "switch_step": int, "epsilon": float, "data_epsilon": float, "shortrun_steps": int,
              "rejuvenate": float, "start_sigma": float, "bank_size": int, "ema": float, "n_f": int,
              "dsm_weight": float}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # no abbreviations: the retired --start would otherwise silently mean --start-sigma
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", choices=sorted(recipes.EBM_RECIPES), default="reference",
                   help="named settings; flags given below override them")
    common.add_data_args(p, sources=("digits", "mnist"), eval_count=128)
    g = p.add_argument_group("recipe overrides (default: the recipe's value)")
    for key, typ in FLAG_TYPES.items():
        g.add_argument("--" + key.replace("_", "-"), type=typ, default=None)
    g.add_argument("--init", choices=CHAIN_INITS, default=None, help="chain starts (see above)")
    g.add_argument("--act", choices=ebm_nets.ACTIVATIONS, default=None)
    g.add_argument("--dsm-sigmas", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="σ range of the denoising score matching term (with --dsm-weight > 0)")
    p.add_argument("--leak", type=float, default=0.05)
    p.add_argument("--max-chain-grad", type=float, default=None,
                   help="stop as diverged when the chains' mean ‖∇U‖ reaches this (default: only on a non-finite loss)")
    c = p.add_argument_group("held-out check")
    c.add_argument("--eval-sigmas", type=float, nargs="*", default=[0.1, 0.2],
                   help="Gaussian noise added to held-out images (none: skip the PSNR check)")
    c.add_argument("--eval-steps", type=int, default=1500, help="Langevin steps K of the check")
    c.add_argument("--eval-every", type=int, default=100)
    c.add_argument("--classifier", default=None, help="small_cnn checkpoint: also check class retention")
    c.add_argument("--eval-chains", type=int, default=8, help="chains per image for the retention check")
    common.add_run_args(p, log_every=50)
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    """The recipe's settings with every flag the user gave put over them."""
    out = dict(recipes.EBM_RECIPES[args.recipe])
    for key in (*FLAG_TYPES, "init", "act", "dsm_sigmas"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    return out


def report_check(args: argparse.Namespace, net: nn.Module, held_out: torch.Tensor, held_labels: torch.Tensor,
                 eps: float) -> dict:
    """Long-run Langevin purification of noisy held-out images (and, with --classifier, class
    retention of chains from clean ones): print and return the figures."""
    out: dict = {"images": len(held_out)}
    for sigma in args.eval_sigmas:
        curve = heldout.langevin_psnr(net, held_out, sigma, args.eval_steps, eps, args.eval_every, args.seed)
        v = heldout.psnr_verdict(curve)
        print(f"Langevin purification of {len(held_out)} held-out images + N(0, {sigma}²): PSNR {v['start_db']:.2f} dB "
              f"(noisy) → {v['final_db']:.2f} dB after {curve[-1][0]} steps (best {v['best_db']:.2f} dB at "
              f"{v['best_step']}); energy {curve[0][2]:.4g} → {curve[-1][2]:.4g}")
        for k, q, e in curve:
            print(f"  steps {k:5d}  PSNR {q:6.2f}  U {e:.4g}")
        out[f"sigma_{sigma:g}"] = {"curve": curve, **v}
    if args.classifier:
        from pipeline.registry import CLASSIFIERS

        clf = CLASSIFIERS.build("small_cnn", checkpoint=args.classifier)
        r = heldout.langevin_retention(net, clf, held_out, held_labels, args.eval_steps, eps, args.eval_chains,
                                       args.seed)
        print(f"class retention after {args.eval_steps} steps: clean {r['clean_correct']}/{r['images']}, every chain "
              f"{r['chain_correct']}/{r['chain_total']}, EOT ({r['chains']} chains, mean logits) "
              f"{r['eot_correct']}/{r['images']}; energy images {r['energy_data']:.5f} → "
              f"chains {r['energy_chain']:.5f}")
        out["retention"] = r
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup(args)
    cfg = settings(args)
    images, _, held_out = common.load_data(args, held_out=True)
    held_labels = common.load_or_exit(args.data, common.splits(args)[1], args.path)[1][:len(held_out)]
    data = 2.0 * images - 1.0
    arch_params = {"n_c": int(data.shape[1]), "n_f": cfg["n_f"], "leak": args.leak, "image_size": int(data.shape[2]),
                   "act": cfg["act"]}
    # "train_ebm/init": the key these weights were always drawn from, so old seeds still hold
    net = common.seeded_init(ebm_nets.make_ebm, args.seed, "train_ebm/init", **arch_params)
    print(f"training EBM {arch_params} on {len(data)} {args.data} images, recipe {args.recipe}: {cfg}")
    max_chain_grad = math.inf if args.max_chain_grad is None else args.max_chain_grad
    hist = recipes.train_ebm(net, data, n_steps=cfg["steps"], log_every=args.log_every, max_chain_grad=max_chain_grad,
                             seed=args.seed, **{k: cfg[k] for k in TRAIN_KEYS})
    d = hist["d"]
    k, first, last = common.first_last(d)
    per_1000 = 1000 * hist["cpu_seconds"] / max(1, len(d))
    print(f"d_s_t: first {k} steps {first:.4f} → last {k} steps {last:.4f} ({len(d)} steps, "
          f"{hist['seconds']:.0f} s wall, {hist['cpu_seconds']:.0f} s CPU = {per_1000:.0f} CPU s per 1,000 updates)")
    every = max(1, len(d) // 200)
    meta = {"job": "train_ebm", "recipe": args.recipe, "data": args.data, "split": common.splits(args)[0],
            "limit": args.limit, "count": len(data), "seed": args.seed, **cfg,
            "switch_step": cfg["switch_step"] if cfg["switch_step"] is not None else cfg["steps"] // 2,
            "scale": "[-1,1]", "seconds": hist["seconds"], "cpu_seconds": hist["cpu_seconds"],
            "d_curve": d[::every], "r_curve": hist["r"][::every], "energy_pos_curve": hist["energy_pos"][::every]}
    if len(held_out):
        meta["check"] = report_check(args, net, held_out, held_labels, cfg["epsilon"])
    common.save(args.out, ebm_nets.ARCH, arch_params, net, meta, input_shape=data.shape[1:])
    print(f"saved {args.out}: {json.dumps({k2: meta[k2] for k2 in ('data', 'count', 'steps', 'recipe')})}")
    return 1 if hist["diverged"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
