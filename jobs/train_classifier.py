"""Train a small CNN classifier on digits or MNIST and save an advpure checkpoint.

Recipe (pipeline.train.recipes.train_small_cnn): Adam lr 1e-3, batch 64, cross-entropy;
epochs 40 on digits, 3 on MNIST by default.

    python jobs/train_classifier.py --data digits --out runs/models/digits_cnn.pt
    python jobs/train_classifier.py --data mnist --split t10k-fit --epochs 3 --out runs/models/mnist_cnn.pt
"""
from __future__ import annotations

import argparse

from pipeline.train import common, recipes

DEFAULT_EPOCHS = {"digits": 40, "mnist": 3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint path (local or s3://)")
    common.add_data_args(p, sources=("digits", "mnist"))
    p.add_argument("--epochs", type=int, default=None, help="default: 40 on digits, 3 on MNIST")
    p.add_argument("--width", type=int, default=32)
    common.add_run_args(p)
    args = p.parse_args(argv)
    common.setup(args)
    split, _ = common.splits(args)
    meta = recipes.train_small_cnn(args.out, args.data, split, args.path, seed=args.seed, width=args.width,
                                   epochs=args.epochs or DEFAULT_EPOCHS[args.data], limit=args.limit)
    print(f"saved {args.out}: train accuracy {meta['train_accuracy']:.4f}, {meta['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
