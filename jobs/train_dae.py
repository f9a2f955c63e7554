"""Train a Gaussian denoising autoencoder for the `dae` and `apudae` purifiers.

The APuDAE authors released no training recipe; ours (see docs/apudae_dip.md):
- objective: MSE between D(clip(x + σ·n, 0, 1)) and x (pipeline.train.loops.train_denoiser),
  σ per image half from the listed levels, half uniform in [0, max level];
- levels: 0.1/0.2/0.3 for digits and MNIST (ℓ∞ attacks there use ε up to 0.3), 0.02/0.05/0.1
  for CIFAR-10 (ε = 8/255 ≈ 0.03);
- Adam lr 1e-3, batch 64; 20 epochs by default;
- a held-out subset (first `--holdout` images of a seeded permutation) is never trained on:
  jobs/calibrate_dae.py computes APuDAE's μ, σ on it, and this job reports PSNR there.

Examples (from the repository root):
    python jobs/train_dae.py --data digits --out runs/models/digits_dae.pt --epochs 30
    python jobs/train_dae.py --data mnist --split t10k-fit --arch rednet30 --layers 5 \\
        --features 32 --epochs 5 --holdout 500 --out runs/models/mnist_dae.pt
    python jobs/train_dae.py --data cifar10 --path data/cifar-10-batches-py \\
        --arch rednet30 --out runs/models/cifar_rednet30.pt
"""
from __future__ import annotations

import argparse
import logging
import time

from torch import nn

from pipeline.purifiers.nets import rednet, small_dae
from pipeline.train import common, heldout, recipes
from pipeline.train.loops import train_denoiser

log = logging.getLogger("train_dae")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="checkpoint path or s3:// URL")
    p.add_argument("--arch", choices=[small_dae.ARCH, rednet.ARCH], default=small_dae.ARCH)
    common.add_data_args(p)
    p.add_argument("--holdout", type=int, default=300, help="images kept out for calibration")
    p.add_argument("--sigmas", default=None, help="comma-separated noise levels (default per data set)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=32, help="small_dae width")
    p.add_argument("--layers", type=int, default=15, help="rednet30: conv (= deconv) layers")
    p.add_argument("--features", type=int, default=64, help="rednet30: feature channels")
    p.add_argument("--batch-norm", action="store_true", help="rednet30: BatchNorm (authors' variant)")
    p.add_argument("--eval-sigma", type=float, default=None, help="σ for the held-out PSNR report")
    common.add_run_args(p)
    return p.parse_args(argv)


def build_net(args: argparse.Namespace, in_channels: int) -> tuple[nn.Module, dict]:
    """(network with seeded initial weights, its arch params)."""
    if args.arch == small_dae.ARCH:
        ctor, params = small_dae.SmallDAE, {"in_channels": in_channels, "width": args.width}
    else:
        ctor, params = rednet.make, {"in_channels": in_channels, "num_layers": args.layers,
                                     "num_features": args.features, "batch_norm": args.batch_norm}
    return common.seeded_init(ctor, args.seed, "train_dae_init", **params), params


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    common.setup(args)
    split, _ = common.splits(args)
    images, _ = common.load_or_exit(args.data, split, args.path)
    try:  # the held-out subset comes from the whole split, so --limit does not move it
        train_idx, held_idx = recipes.holdout_split(len(images), args.holdout, args.seed)
    except ValueError as err:
        raise SystemExit(f"--holdout: {err}") from None
    if args.limit:
        train_idx = train_idx[:args.limit]
    sigmas = tuple(float(s) for s in args.sigmas.split(",")) if args.sigmas else recipes.DAE_SIGMAS[args.data]
    net, arch_params = build_net(args, images.shape[1])
    log.info("training %s on %d %s images (%s), σ levels %s", args.arch, len(train_idx), args.data, split, sigmas)
    t0 = time.time()
    history = train_denoiser(net, images[train_idx], sigmas=sigmas, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    report = {"train_seconds": round(time.time() - t0, 1), "final_loss": history[-1] if history else None}
    if len(held_idx):
        sigma = args.eval_sigma if args.eval_sigma is not None else sigmas[len(sigmas) // 2]
        report.update(heldout.dae_report(net, images[held_idx], sigma, args.seed))
    meta = {"job": "train_dae", "data": args.data, "path": args.path, "split": split,
            "holdout": args.holdout, "seed": args.seed, "limit": args.limit, "n_train": len(train_idx),
            "sigmas": list(sigmas), "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "history": history, **report}
    common.save(args.out, args.arch, arch_params, net, meta, input_shape=images.shape[1:])
    log.info("saved %s: %s", args.out, report)
    return meta


if __name__ == "__main__":
    main()
