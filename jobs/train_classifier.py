"""Train a small CNN classifier on digits or MNIST and save an advpure checkpoint.

    python jobs/train_classifier.py --data digits --out runs/models/digits_cnn.pt
    python jobs/train_classifier.py --data mnist --split t10k-fit --epochs 3 --out runs/models/mnist_cnn.pt
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import models  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["digits", "mnist"], default="digits")
    p.add_argument("--split", default=None, help="digits: train (default); mnist: t10k-fit (default) or train")
    p.add_argument("--path", default=None, help="MNIST folder (default ../shared/data/mnist or ADVPURE_MNIST_DIR)")
    p.add_argument("--out", required=True, help="checkpoint path (local or s3://)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    split = args.split or ("train" if args.data == "digits" else "t10k-fit")
    epochs = args.epochs or (40 if args.data == "digits" else 3)
    meta = models.train_small_cnn(args.out, args.data, split, args.path, epochs=epochs, seed=args.seed,
                                  width=args.width)
    print(f"saved {args.out}: train accuracy {meta['train_accuracy']:.4f}, {meta['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
