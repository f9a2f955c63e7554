#!/usr/bin/env python
"""Train a Gaussian denoising autoencoder for the `dae` and `apudae` purifiers.

The APuDAE authors released no training recipe; ours (see docs/apudae_dip.md):
- objective: MSE between D(clip(x + σ·n, 0, 1)) and x (pipeline.training.train_denoiser),
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
    python jobs/train_dae.py --data cifar10 --data-dir data/cifar-10-batches-py \\
        --arch rednet30 --out runs/models/cifar_rednet30.pt
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline import checkpoints, datasets  # noqa: E402
from pipeline.purifiers.nets import rednet, small_dae  # noqa: E402
from pipeline.seeding import config_seed  # noqa: E402
from pipeline.training import psnr, train_denoiser  # noqa: E402

log = logging.getLogger("train_dae")

DEFAULT_SIGMAS = {"digits": (0.1, 0.2, 0.3), "mnist": (0.1, 0.2, 0.3), "cifar10": (0.02, 0.05, 0.1)}


def load_images(data: str, data_dir: str | None = None, split: str = "train") -> torch.Tensor:
    """Float images [N, C, H, W] in [0, 1] of a named split (pipeline.datasets.load_split:
    digits train/test/all; mnist train, t10k, t10k-fit, t10k-holdout; cifar10 train/test)."""
    try:
        images, _, _ = datasets.load_split(data, split, data_dir)
    except datasets.DatasetError as err:
        raise SystemExit(f"cannot load {data} split {split!r}: {err}") from None
    return datasets.to_float_nchw(images)


def split_indices(n: int, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices: a seeded permutation, the first `holdout` held out."""
    if not 0 <= holdout < n:
        raise SystemExit(f"--holdout must be in [0, {n}), got {holdout}")
    gen = torch.Generator().manual_seed(config_seed(seed, "dae_holdout"))
    perm = torch.randperm(n, generator=gen)
    return perm[holdout:], perm[:holdout]


def build_net(arch: str, in_channels: int, args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    if arch == small_dae.ARCH:
        params = {"in_channels": in_channels, "width": args.width}
        return small_dae.SmallDAE(**params), params
    if arch == rednet.ARCH:
        params = {"in_channels": in_channels, "num_layers": args.layers,
                  "num_features": args.features, "batch_norm": args.batch_norm}
        return rednet.make(**params), params
    raise SystemExit(f"unknown --arch {arch!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="checkpoint path or s3:// URL")
    p.add_argument("--arch", choices=[small_dae.ARCH, rednet.ARCH], default=small_dae.ARCH)
    p.add_argument("--data", choices=["digits", "mnist", "cifar10"], default="digits")
    p.add_argument("--data-dir", default=None, help="MNIST idx folder / CIFAR-10 python batches")
    p.add_argument("--split", default="train",
                   help="named split (digits: train/test/all; mnist: train, t10k-fit, ...; cifar10: train)")
    p.add_argument("--holdout", type=int, default=300, help="images kept out for calibration")
    p.add_argument("--limit", type=int, default=0, help="train on at most this many images (0: all)")
    p.add_argument("--sigmas", default=None, help="comma-separated noise levels (default per data set)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=32, help="small_dae width")
    p.add_argument("--layers", type=int, default=15, help="rednet30: conv (= deconv) layers")
    p.add_argument("--features", type=int, default=64, help="rednet30: feature channels")
    p.add_argument("--batch-norm", action="store_true", help="rednet30: BatchNorm (authors' variant)")
    p.add_argument("--eval-sigma", type=float, default=None, help="σ for the held-out PSNR report")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    split = args.split
    images = load_images(args.data, args.data_dir, split)
    train_idx, held_idx = split_indices(len(images), args.holdout, args.seed)
    if args.limit:
        train_idx = train_idx[:args.limit]
    sigmas = tuple(float(s) for s in args.sigmas.split(",")) if args.sigmas else DEFAULT_SIGMAS[args.data]
    torch.manual_seed(config_seed(args.seed, "train_dae_init"))
    net, arch_params = build_net(args.arch, images.shape[1], args)
    log.info("training %s on %d %s images (%s), σ levels %s", args.arch, len(train_idx), args.data,
             split, sigmas)
    t0 = time.time()
    history = train_denoiser(net, images[train_idx], sigmas=sigmas, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    report = {"train_seconds": round(time.time() - t0, 1), "final_loss": history[-1] if history else None}
    if len(held_idx):
        sigma = args.eval_sigma if args.eval_sigma is not None else sigmas[len(sigmas) // 2]
        held = images[held_idx]
        gen = torch.Generator().manual_seed(config_seed(args.seed, "dae_eval_noise"))
        noisy = (held + sigma * torch.randn(held.shape, generator=gen)).clamp(0, 1)
        with torch.no_grad():
            den = torch.cat([net(noisy[i:i + 256]) for i in range(0, len(noisy), 256)]).clamp(0, 1)
        report.update({"eval_sigma": sigma, "heldout_mse_noisy": float((noisy - held).pow(2).mean()),
                       "heldout_mse_denoised": float((den - held).pow(2).mean()),
                       "heldout_psnr_noisy": psnr(noisy, held), "heldout_psnr_denoised": psnr(den, held)})
    meta = {"job": "train_dae", "data": args.data, "data_dir": args.data_dir, "split": split,
            "holdout": args.holdout, "seed": args.seed, "limit": args.limit, "n_train": len(train_idx),
            "sigmas": list(sigmas), "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "history": history, **report}
    checkpoints.save(args.out, args.arch, arch_params, net.state_dict(), meta)
    log.info("saved %s: %s", args.out, {k: v for k, v in report.items()})
    return meta


if __name__ == "__main__":
    main()
