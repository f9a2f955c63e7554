"""Train a noise-unconditional score network for ADP by denoising score matching.

Loss: NCSNv2's anneal_dsm_score_estimation (anneal_power 2) for a network whose σ-scaled
output f_θ is used directly, as ADP does (the ADP fork of NCSNv2 sets used_sigmas to 1 at
purification time). NCSNv2 trains s_θ(x̃, σ) = f_θ(x̃)/σ against −(x̃ − x)/σ² with weight
σ², which is the same as
    ℓ = ½ ‖f_θ(x + σn) + n‖²   (summed over pixels, mean over the batch),
with σ drawn per image from `--sigma-levels` geometric levels from --sigma-max down to
--sigma-min and n ~ N(0, I). So f_θ(x̃) ≈ σ·∇log p_σ(x̃) = −E[n | x̃]: a score field that
never sees σ. Data are on the ADP score grid x·255/256 + 1/512. Adam and an EMA of the
weights (rate 0.999, as NCSNv2); the EMA weights are saved. (pipeline.train.recipes.train_score,
pipeline.train.objectives.dsm_loss.)

    python jobs/train_score.py --data digits --out runs/models/digits_score.pt --epochs 40
    python jobs/train_score.py --data mnist --out runs/models/mnist_score.pt --epochs 20 --threads 1

Defaults (ours, for CPU): SmallScoreNet width 16, Adam lr 2e-3, batch 128, 10 geometric σ
from 1.0 to 0.01, EMA 0.999 with warm-up. The published ADP/NCSNv2 CIFAR-10 network is
`--arch ncsnv2 --ngf 128 --lr 1e-4 --sigma-max 50 --sigma-min 0.01 --sigma-levels 232`.

Splits are pipeline.io.datasets.load_split names: digits train → ADP check on test; MNIST
(only the test files are stored) t10k-fit (images 0–7,999) → check on t10k-holdout, so
evaluate purification on shards of t10k-holdout.
"""
from __future__ import annotations

import argparse
import json
import math

from pipeline.purifiers.nets import score_nets
from pipeline.train import common, heldout, recipes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint path or URL")
    common.add_data_args(p, sources=("digits", "mnist"), eval_count=256)
    p.add_argument("--arch", choices=sorted(score_nets.ARCHS), default=score_nets.SMALL_ARCH)
    p.add_argument("--width", type=int, default=16, help="small_score width")
    p.add_argument("--ngf", type=int, default=128, help="ncsnv2 ngf")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam (NCSNv2 uses 1e-4 at ngf 128)")
    p.add_argument("--sigma-max", type=float, default=1.0)
    p.add_argument("--sigma-min", type=float, default=0.01)
    p.add_argument("--sigma-levels", type=int, default=10)
    p.add_argument("--ema-rate", type=float, default=0.999, help="0 disables EMA")
    p.add_argument("--no-ema-warmup", action="store_true", help="plain NCSNv2 EMA from step 1")
    common.add_run_args(p, log_every=50)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup(args)
    images, _, held_out = common.load_data(args, held_out=True)
    C, H = images.shape[1], images.shape[2]
    if args.arch == score_nets.SMALL_ARCH:
        arch_params = {"in_channels": C, "width": args.width}
    else:
        arch_params = {"channels": C, "ngf": args.ngf, "image_size": H, "num_classes": args.sigma_levels,
                       "sigma_begin": args.sigma_max, "sigma_end": args.sigma_min}
    # "train_score/init": the key these weights were always drawn from, so old seeds still hold
    net = common.seeded_init(score_nets.make_score_net, args.seed, "train_score/init", arch=args.arch, **arch_params)
    sigmas = score_nets.geometric_sigmas(args.sigma_max, args.sigma_min, args.sigma_levels)
    print(f"training {args.arch} {arch_params} on {len(images)} {args.data} images, "
          f"sigmas {[round(float(s), 4) for s in sigmas]}")
    model, losses = recipes.train_score(net, images, sigmas=sigmas, epochs=args.epochs, batch_size=args.batch_size,
                                        lr=args.lr, ema_rate=args.ema_rate, seed=args.seed, max_steps=args.max_steps,
                                        log_every=args.log_every, ema_warmup=not args.no_ema_warmup)
    k, first, last = common.first_last(losses)
    print(f"DSM loss: first {k} steps {first:.4f} → last {k} steps {last:.4f} ({len(losses)} steps)")
    meta = {"job": "train_score", "data": args.data, "split": common.splits(args)[0], "limit": args.limit,
            "count": len(images),
            "sigmas": [float(s) for s in sigmas], "epochs": args.epochs, "lr": args.lr,
            "batch_size": args.batch_size, "ema_rate": args.ema_rate,
            "ema_warmup": not args.no_ema_warmup, "seed": args.seed,
            "grid": "x*255/256+1/512", "loss_first": first, "loss_last": last,
            "loss_curve": [float(v) for v in losses[:: max(1, len(losses) // 200)]]}
    if len(held_out):
        curve = heldout.adp_psnr(model, held_out, args.seed)
        meta["adp_psnr"] = {"images": len(held_out), "per_step": curve}
        print(f"ADP (σ 0.25, ≤10 steps, λ 0.05) on {len(held_out)} held-out images: PSNR {curve[0]:.2f} dB "
              f"(smoothed input) → {curve[-1]:.2f} dB (purified) after {len(curve) - 1} steps")
    common.save(args.out, args.arch, arch_params, model, meta, input_shape=images.shape[1:])
    print(f"saved {args.out}: {json.dumps({k: meta[k] for k in ('data', 'count', 'epochs', 'loss_last')})}")
    return 1 if math.isnan(last) else 0


if __name__ == "__main__":
    raise SystemExit(main())
