"""Calibrate a DAE for APuDAE: μ, σ of r(x) = ‖x − clip(D(x), 0, 1)‖² on clean held-out images.

Writes `<checkpoint>.calib.json` (the `apudae` purifier reads it from there). By default the
images are the held-out subset recorded in the checkpoint by jobs/train_dae.py (same data set,
folder, split, permutation seed and size), so the DAE never trained on them.

Example (from the repository root):
    python jobs/calibrate_dae.py --checkpoint runs/models/mnist_dae.pt
"""
from __future__ import annotations

import argparse
import json
import logging

from pipeline.io import checkpoints, storage
from pipeline.purifiers import apudae
from pipeline.train import common, recipes

log = logging.getLogger("calibrate_dae")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True, help="DAE checkpoint from jobs/train_dae.py")
    p.add_argument("--out", default=None, help="default: <checkpoint>.calib.json")
    # every data flag defaults to what the checkpoint records
    common.add_data_args(p, default=None, limit=False)
    p.add_argument("--holdout", type=int, default=None, help="size of the held-out subset")
    p.add_argument("--seed", type=int, default=None, help="permutation seed of the held-out subset")
    p.add_argument("--all", action="store_true", help="use every image of the split, not the held-out subset")
    p.add_argument("--cap", type=float, default=None, help="treat r > cap as outliers (replaced by the mean)")
    p.add_argument("--no-clip", action="store_true", help="do not clip D(x) to [0, 1]")
    p.add_argument("--batch-size", type=int, default=256)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    common.setup(args)
    dae, record = apudae.load_dae(args.checkpoint)
    meta = record.get("meta", {})
    data = args.data or meta.get("data")
    if data is None:
        raise SystemExit(f"{args.checkpoint} records no training data set; pass --data")
    # "data_dir": the key checkpoints written before the data flags were unified use
    path = args.path if args.path is not None else meta.get("path", meta.get("data_dir"))
    split = args.split or meta.get("split", "train")
    images, _ = common.load_or_exit(data, split, path)
    if args.all:
        held, holdout, seed = images, len(images), None
    else:
        holdout = args.holdout if args.holdout is not None else meta.get("holdout")
        seed = args.seed if args.seed is not None else meta.get("seed", 0)
        if not holdout:
            raise SystemExit("no held-out subset recorded in the checkpoint; pass --holdout or --all")
        try:
            held = images[recipes.holdout_split(len(images), holdout, seed)[1]]
        except ValueError as err:
            raise SystemExit(f"--holdout: {err}") from None
    calib = apudae.calibrate(dae, held, clip=not args.no_clip, batch_size=args.batch_size, cap=args.cap)
    calib.update({"checkpoint": args.checkpoint, "checkpoint_sha256": checkpoints.sha256(args.checkpoint),
                  "arch": record["arch"], "data": data, "path": path, "split": split,
                  "holdout": holdout, "seed": seed, "cap": args.cap})
    out = args.out or apudae.calibration_url(args.checkpoint)
    storage.put_text(out, json.dumps(calib, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s: μ=%.5g σ=%.5g over %d images", out, calib["mu"], calib["sigma"], calib["n"])
    return calib


if __name__ == "__main__":
    main()
