"""Train a small ε-prediction U-Net for DiffPure by the DDPM objective on the VP schedule.

Loss: DDPM's simple objective ‖ε − ε̂(√ᾱᵢx + √(1−ᾱᵢ)ε, i)‖² with i uniform on 0…999 and the
discrete ᾱ of β 0.1 → 20 (the schedule the `diffpure` purifier diffuses and solves with),
images on [−1, 1]; Adam and an EMA of the weights (warm-up, for short CPU runs); the EMA
weights are saved. (pipeline.train.recipes.train_diffusion, objectives.ddpm_loss,
pipeline.purifiers.nets.small_unet.)

    python jobs/train_diffusion.py --data digits --out runs/models/digits_diffusion.pt --threads 1
    python jobs/train_diffusion.py --data mnist --out runs/models/mnist_diffusion.pt --threads 1

The digits default (width 16, 250 epochs = 3,000 steps of 128) takes about 8 minutes on one
core of an idle 2-core machine; MNIST (8,000 images at 28×28, 20 epochs) is for a GPU or a
long CPU run.

After training, on --eval-count held-out images: the denoising PSNR of DiffPure itself
(sde, dt 1e-3) at t* = 0.05, 0.1, 0.2 against the clean images (and the PSNR of the diffused
input it starts from), and sample quality: --samples images drawn by the ancestral sampler
from pure noise (1,000 steps); with --classifier, the fraction a trained classifier labels
with confidence ≥ 0.9 and the number of classes among them; with --samples-png, a grid.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from pipeline.purifiers import diffpure, vpsde
from pipeline.purifiers.nets import small_unet
from pipeline.seeding import Noise
from pipeline.train import common, recipes
from pipeline.train.loops import psnr

DEFAULT_EPOCHS = {"digits": 250, "mnist": 20}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint path or URL")
    common.add_data_args(p, sources=("digits", "mnist"), eval_count=200)
    p.add_argument("--width", type=int, default=16, help="base width of the U-Net")
    p.add_argument("--blocks", type=int, default=1, help="residual blocks per level")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the training images (default {DEFAULT_EPOCHS})")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-rate", type=float, default=0.999, help="0 disables EMA")
    p.add_argument("--samples", type=int, default=64, help="images drawn from noise for the quality check (0: none)")
    p.add_argument("--classifier", default=None, help="small_cnn checkpoint that scores the samples")
    p.add_argument("--samples-png", default=None, help="write the samples as a PNG grid here")
    common.add_run_args(p, log_every=100)
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS[args.data]
    return args


def denoising_psnr(model: diffpure.ScoreModel, held: torch.Tensor, seed: int) -> dict[str, dict[str, float]]:
    """DiffPure (sde) on held-out images: PSNR of the diffused start and of the output."""
    out = {}
    keys = [f"heldout{i}" for i in range(len(held))]
    for t_star in (0.05, 0.1, 0.2):
        pur = diffpure.DiffPurePurifier(model, diffpure.DiffPureSettings(t_star=t_star))
        noise = Noise.for_batch(seed, keys, "train_diffusion/eval")
        with torch.no_grad():  # evaluation only: no attack differentiates through this check
            start = (pur.diffuse(pur._to_model(held), noise) + 1).mul(0.5).clamp(0, 1)
            final = pur.purify(held, noise).images
        out[str(t_star)] = {"diffused": psnr(start, held), "purified": psnr(final, held)}
    return out


def draw_samples(model: diffpure.ScoreModel, n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """n images from pure noise by DDPM's ancestral sampler over all N steps, in [0, 1]."""
    pur = diffpure.DiffPurePurifier(model, diffpure.DiffPureSettings(t_star=1.0, sampler="ddpm"))
    noise = Noise.for_batch(seed, [f"sample{i}" for i in range(n)], "train_diffusion/samples")
    with torch.no_grad():
        X = noise.normal(shape, "diffpure/diffuse")  # x_N ~ N(0, I): ᾱ_{N−1} ≈ 4e-5
        return (pur.solve(X, noise) + 1).mul(0.5).clamp(0, 1)


def sample_quality(samples: torch.Tensor, classifier: str) -> dict[str, float]:
    from pipeline.registry import CLASSIFIERS

    clf = CLASSIFIERS.build("small_cnn", checkpoint=classifier).eval()
    with torch.no_grad():
        prob = torch.softmax(clf(samples), -1)
    conf, label = prob.max(-1)
    sure = conf >= 0.9
    return {"confident_fraction": float(sure.float().mean()), "classes_confident": int(label[sure].unique().numel()),
            "mean_confidence": float(conf.mean())}


def save_grid(images: torch.Tensor, path: str) -> None:
    """[N, C, H, W] in [0, 1] → one PNG, ⌈√N⌉ images per row, 1 px gaps."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img
    pixels = (grid * 255).round().byte().permute(1, 2, 0).squeeze(-1).numpy()
    Image.fromarray(pixels).save(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup(args)
    images, _, held = common.load_data(args, held_out=True)
    C = images.shape[1]
    arch_params = {"channels": C, "width": args.width, "blocks": args.blocks}
    net = common.seeded_init(small_unet.SmallUNet, args.seed, "train_diffusion/init", **arch_params)
    print(f"training {small_unet.ARCH} {arch_params} ({sum(p.numel() for p in net.parameters())} parameters) "
          f"on {len(images)} {args.data} images")
    model, losses = recipes.train_diffusion(net, images, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                            ema_rate=args.ema_rate, seed=args.seed, max_steps=args.max_steps,
                                            log_every=args.log_every)
    k, first, last = common.first_last(losses)
    print(f"DDPM loss: first {k} steps {first:.4f} → last {k} steps {last:.4f} ({len(losses)} steps)")
    meta = {"job": "train_diffusion", "data": args.data, "split": common.splits(args)[0], "limit": args.limit,
            "count": len(images), "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
            "ema_rate": args.ema_rate, "seed": args.seed, "schedule": vars(vpsde.VPSchedule()),
            "scale": "2x-1", "loss_first": first, "loss_last": last,
            "loss_curve": [float(v) for v in losses[:: max(1, len(losses) // 200)]]}
    for q in model.parameters():
        q.requires_grad_(False)
    eps_model = diffpure.EpsilonModel(model.eval())
    if len(held):
        meta["denoising_psnr"] = denoising_psnr(eps_model, held, args.seed)
        table = meta["denoising_psnr"].items()
        print(f"DiffPure on {len(held)} held-out images, PSNR dB (diffused → purified): "
              + ", ".join(f"t*={t}: {v['diffused']:.2f} → {v['purified']:.2f}" for t, v in table))
    if args.samples > 0:
        samples = draw_samples(eps_model, args.samples, tuple(images.shape[1:]), args.seed)
        if args.classifier:
            meta["sample_quality"] = sample_quality(samples, args.classifier)
            print(f"samples ({args.samples}): {meta['sample_quality']}")
        if args.samples_png:
            save_grid(samples, args.samples_png)
    common.save(args.out, small_unet.ARCH, arch_params, model, meta)
    print(f"saved {args.out}: {json.dumps({k: meta[k] for k in ('data', 'count', 'epochs', 'loss_last')})}")
    return 1 if math.isnan(last) else 0


if __name__ == "__main__":
    raise SystemExit(main())
