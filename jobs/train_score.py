#!/usr/bin/env python
"""Train a noise-unconditional score network for ADP by denoising score matching.

Loss: NCSNv2's anneal_dsm_score_estimation (anneal_power 2) for a network whose σ-scaled
output f_θ is used directly, as ADP does (the ADP fork of NCSNv2 sets used_sigmas to 1 at
purification time). NCSNv2 trains s_θ(x̃, σ) = f_θ(x̃)/σ against −(x̃ − x)/σ² with weight
σ², which is the same as
    ℓ = ½ ‖f_θ(x + σn) + n‖²   (summed over pixels, mean over the batch),
with σ drawn per image from `--sigma-levels` geometric levels from --sigma-max down to
--sigma-min and n ~ N(0, I). So f_θ(x̃) ≈ σ·∇log p_σ(x̃) = −E[n | x̃]: a score field that
never sees σ. Data are on the ADP score grid x·255/256 + 1/512. Adam and an EMA of the
weights (rate 0.999, as NCSNv2); the EMA weights are saved.

    python jobs/train_score.py --data digits --out runs/models/digits_score.pt --epochs 40
    python jobs/train_score.py --data mnist --out runs/models/mnist_score.pt --epochs 20 --threads 1

Defaults (ours, for CPU): SmallScoreNet width 16, Adam lr 2e-3, batch 128, 10 geometric σ
from 1.0 to 0.01, EMA 0.999 with warm-up. The published ADP/NCSNv2 CIFAR-10 network is
`--arch ncsnv2 --ngf 128 --lr 1e-4 --sigma-max 50 --sigma-min 0.01 --sigma-levels 232`.

Only the MNIST *test* split is stored here; --start/--count pick the training images
(default: the first 8,000), so evaluate purification on the rest (8,000–9,999).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipeline import checkpoints, datasets  # noqa: E402
from pipeline.purifiers import steps  # noqa: E402
from pipeline.purifiers.nets import score_nets  # noqa: E402
from pipeline.seeding import config_seed  # noqa: E402

log = logging.getLogger("train_score")


def sigma_levels(sigma_max: float, sigma_min: float, levels: int) -> torch.Tensor:
    return score_nets.geometric_sigmas(sigma_max, sigma_min, levels)


def dsm_loss(net: nn.Module, x: torch.Tensor, sigmas: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise-unconditional DSM loss, mean over the batch (see module doc)."""
    idx = torch.randint(len(sigmas), (x.shape[0],), generator=gen)
    sigma = sigmas[idx].view(-1, *([1] * (x.dim() - 1)))
    n = torch.randn(x.shape, generator=gen)
    f = net(x + sigma * n)  # ≈ −E[n | x̃] = σ·score
    return 0.5 * ((f + n) ** 2).flatten(1).sum(1).mean()


class EMA:
    """Exponential moving average of parameters (NCSNv2 EMAHelper semantics), with an
    optional warm-up (ours): rate_t = min(rate, (1 + t)/(10 + t)), so that short CPU runs
    do not save weights dominated by the random initialisation."""

    def __init__(self, net: nn.Module, rate: float, warmup: bool = True):
        self.rate, self.warmup, self.updates = rate, warmup, 0
        self.shadow = copy.deepcopy(net).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()  # training bookkeeping, not purifier math
    def update(self, net: nn.Module) -> None:
        self.updates += 1
        rate = min(self.rate, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.rate
        for s, p in zip(self.shadow.parameters(), net.parameters()):
            s.mul_(rate).add_(p.detach(), alpha=1.0 - rate)
        for s, b in zip(self.shadow.buffers(), net.buffers()):
            s.copy_(b)


DEFAULT_COUNT = {"mnist": 8000, "digits": 1500}


def load_images(args) -> tuple[torch.Tensor, torch.Tensor]:
    """(training images, held-out images after them) as float NCHW in [0, 1]."""
    if args.data == "digits":
        images, _ = datasets.load_digits()
    else:
        if not datasets.mnist_available(args.mnist_dir):
            raise SystemExit(f"MNIST not found in {args.mnist_dir or datasets.DEFAULT_MNIST_DIR}")
        images, _ = datasets.load_mnist(args.mnist_dir)
    count = args.count if args.count is not None else DEFAULT_COUNT[args.data]
    end = args.start + count
    held_out = images[end:end + args.eval_count] if args.eval_count > 0 else images[:0]
    return datasets.to_float_nchw(images[args.start:end].copy()), datasets.to_float_nchw(held_out.copy())


def evaluate_adp(model: nn.Module, images: torch.Tensor, seed: int = 0) -> list[float]:
    """PSNR (dB) against the clean images after each ADP step with the paper's settings:
    [smoothed input x₀, step 1, …, final]."""
    from pipeline.purifiers.adp import ADPPurifier
    from pipeline.seeding import Noise
    from pipeline.training import psnr

    for q in model.parameters():
        q.requires_grad_(False)
    purifier = ADPPurifier(model)
    noise = Noise.for_batch(seed, [f"heldout{i}" for i in range(len(images))], "train_score/eval")
    with torch.no_grad():  # evaluation only: no attack gradients needed here
        traj = purifier.trajectory(images, noise)
    return [psnr(t, images) for t in traj]


def train(net: nn.Module, images: torch.Tensor, *, sigmas: torch.Tensor, epochs: int, batch_size: int,
          lr: float, ema_rate: float, seed: int, max_steps: int | None = None, log_every: int = 50,
          grid: bool = True, ema_warmup: bool = True) -> tuple[nn.Module, list[float]]:
    """Returns (EMA network or the network itself when ema_rate == 0, per-step losses)."""
    gen = torch.Generator().manual_seed(config_seed(seed, "train_score"))
    data = steps.to_score_grid(images) if grid else images
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    ema = EMA(net, ema_rate, ema_warmup) if ema_rate > 0 else None
    net.train()
    losses: list[float] = []
    step, t0 = 0, time.time()
    for epoch in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), batch_size):
            loss = dsm_loss(net, data[perm[i:i + batch_size]], sigmas, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update(net)
            losses.append(loss.item())
            step += 1
            if step % log_every == 0 or step == 1:
                recent = losses[-log_every:]
                log.info("epoch %d step %d loss %.4f (mean of last %d: %.4f) %.1fs", epoch + 1, step,
                         losses[-1], len(recent), sum(recent) / len(recent), time.time() - t0)
            if max_steps is not None and step >= max_steps:
                break
        if max_steps is not None and step >= max_steps:
            break
    net.eval()
    return (ema.shadow if ema is not None else net), losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=["digits", "mnist"], default="digits")
    p.add_argument("--mnist-dir", default=None, help="MNIST idx files (default: the shared copy)")
    p.add_argument("--start", type=int, default=0, help="first training image")
    p.add_argument("--count", type=int, default=None, help="training images (mnist: 8000, digits: 1500)")
    p.add_argument("--eval-count", type=int, default=256,
                   help="held-out images (those right after the training range) for the ADP PSNR check; 0: none")
    p.add_argument("--out", required=True, help="checkpoint path or URL")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(config_seed(args.seed, "train_score/init"))

    images, held_out = load_images(args)
    C, H = images.shape[1], images.shape[2]
    if args.arch == score_nets.SMALL_ARCH:
        arch_params = {"in_channels": C, "width": args.width}
    else:
        arch_params = {"channels": C, "ngf": args.ngf, "image_size": H, "num_classes": args.sigma_levels,
                       "sigma_begin": args.sigma_max, "sigma_end": args.sigma_min}
    net = score_nets.make_score_net(args.arch, **arch_params)
    sigmas = sigma_levels(args.sigma_max, args.sigma_min, args.sigma_levels)
    log.info("training %s %s on %d %s images %s, sigmas %s", args.arch, arch_params, len(images), args.data,
             tuple(images.shape[1:]), [round(float(s), 4) for s in sigmas])
    model, losses = train(net, images, sigmas=sigmas, epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, ema_rate=args.ema_rate, seed=args.seed, max_steps=args.max_steps,
                          log_every=args.log_every, ema_warmup=not args.no_ema_warmup)
    k = max(1, min(50, len(losses) // 10))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"DSM loss: first {k} steps {first:.4f} → last {k} steps {last:.4f} ({len(losses)} steps)")
    meta = {"job": "train_score", "data": args.data, "start": args.start, "count": len(images),
            "sigmas": [float(s) for s in sigmas], "epochs": args.epochs, "lr": args.lr,
            "batch_size": args.batch_size, "ema_rate": args.ema_rate,
            "ema_warmup": not args.no_ema_warmup, "seed": args.seed,
            "grid": "x*255/256+1/512", "loss_first": first, "loss_last": last,
            "loss_curve": [float(v) for v in losses[:: max(1, len(losses) // 200)]]}
    if len(held_out):
        curve = evaluate_adp(model, held_out, args.seed)
        meta["adp_psnr"] = {"images": len(held_out), "per_step": curve}
        print(f"ADP (σ 0.25, ≤10 steps, λ 0.05) on {len(held_out)} held-out images: PSNR {curve[0]:.2f} dB "
              f"(smoothed input) → {curve[-1]:.2f} dB (purified) after {len(curve) - 1} steps")
    checkpoints.save(args.out, args.arch, arch_params, model.state_dict(), meta)
    print(f"saved {args.out}: {json.dumps({k: meta[k] for k in ('data', 'count', 'epochs', 'loss_last')})}")
    if math.isnan(last):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
