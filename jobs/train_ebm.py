#!/usr/bin/env python
"""Train an EBM for long-run Langevin purification by maximum likelihood with persistent
short-run chains (Hill, Mitchell, Zhu, ICLR 2021; reference: point0bar1/ebm-defense,
train_ebm.py and config_train_ebm/cifar10_ebm.json).

Per batch (images on the [−1, 1] scale):
  positives  X⁺ = data batch + data_epsilon·N(0, I)            (data_epsilon = 0.02)
  negatives  X⁻ = L = 100 Langevin steps X ← X − ∇U(X) + ε·Z   (ε = 0.01) started from a
             persistent bank (one state per training image, initialised uniform on [−1, 1];
             the updated states go back into the bank)
  loss       d = (mean U(X⁺) − mean U(X⁻)) / (ε²/2)
The ε²/2 factor is absorbed: the network learns U = (ε²/2)·E, so Langevin needs no step
size; Adam (lr 1e-4) is invariant to the scale, and the SGD phase after the switch uses
lr_sgd·ε²/2 (lr_sgd = 5e-5), as in the reference.

Published CIFAR-10 run: 250,000 batches of 100, switch at 125,000. Ours on CPU:

    python jobs/train_ebm.py --data digits --out runs/models/digits_ebm.pt --steps 2000
    python jobs/train_ebm.py --data mnist --out runs/models/mnist_ebm.pt --steps 2000 --shortrun-steps 60

Only the MNIST *test* split is stored here; --start/--count pick the training images
(default: the first 8,000), so evaluate purification on the rest.
"""
from __future__ import annotations

import argparse
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
from pipeline.purifiers.nets import ebm_nets  # noqa: E402
from pipeline.seeding import config_seed  # noqa: E402

log = logging.getLogger("train_ebm")

INITS = ("persistent", "uniform", "data", "gaussian")


def langevin(net: nn.Module, x: torch.Tensor, n_steps: int, eps: float, gen: torch.Generator
             ) -> tuple[torch.Tensor, float]:
    """Short-run chain without a graph; returns (samples, mean ‖∇U‖ along the path)."""
    grad_norm = 0.0
    for _ in range(n_steps):
        g = steps.energy_grad(net, x)  # x carries no graph: plain ∇U
        z = torch.randn(x.shape, generator=gen)
        x = steps.langevin_step(x, g, eps, z).detach()
        grad_norm += g.flatten(1).norm(dim=1).mean().item()
    return x, grad_norm / max(1, n_steps)


def train(net: nn.Module, data: torch.Tensor, *, n_steps: int, batch_size: int = 100, lr_adam: float = 1e-4,
          lr_sgd: float = 5e-5, switch_step: int | None = None, epsilon: float = 1e-2,
          data_epsilon: float = 2e-2, shortrun_steps: int = 100, init: str = "persistent", seed: int = 0,
          log_every: int = 50) -> dict:
    """data: [N, C, H, W] on [−1, 1]. Returns the diagnostics {"d": [...], "r": [...]}."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}")
    gen = torch.Generator().manual_seed(config_seed(seed, "train_ebm"))
    bank = 2.0 * torch.rand(data.shape, generator=gen) - 1.0 if init == "persistent" else None
    opt: torch.optim.Optimizer = torch.optim.Adam(net.parameters(), lr=lr_adam)
    switch = n_steps // 2 if switch_step is None else switch_step
    scale = epsilon ** 2 / 2.0
    d_hist, r_hist = [], []
    net.train()
    t0 = time.time()
    for i in range(n_steps):
        if i + 1 == switch:
            log.info("step %d: switching from Adam to SGD (lr %.3g · ε²/2)", i + 1, lr_sgd)
            opt = torch.optim.SGD(net.parameters(), lr=lr_sgd * scale)
        idx_q = torch.randperm(len(data), generator=gen)[:batch_size]
        x_q = data[idx_q] + data_epsilon * torch.randn(data[idx_q].shape, generator=gen)
        idx_s = None
        if init == "persistent":
            idx_s = torch.randperm(len(bank), generator=gen)[:batch_size]
            x0 = bank[idx_s]
        elif init == "uniform":
            x0 = 2.0 * torch.rand(x_q.shape, generator=gen) - 1.0
        elif init == "gaussian":
            x0 = torch.randn(x_q.shape, generator=gen)
        else:
            x0 = x_q.clone()
        x_s, r = langevin(net, x0, shortrun_steps, epsilon, gen)
        if idx_s is not None:
            bank[idx_s] = x_s
        d = (net(x_q).mean() - net(x_s).mean()) / scale
        opt.zero_grad(set_to_none=True)
        d.backward()
        opt.step()
        d_hist.append(d.item())
        r_hist.append(r)
        if (i + 1) % log_every == 0 or i == 0:
            log.info("step %6d  d_s_t=%12.4f  r_s_t=%10.5f  (%.1fs)", i + 1, d_hist[-1], r, time.time() - t0)
        if not math.isfinite(d_hist[-1]):
            log.error("loss diverged at step %d", i + 1)
            break
    net.eval()
    return {"d": d_hist, "r": r_hist}


DEFAULT_COUNT = {"mnist": 8000, "digits": 1500}


def load_data(args) -> tuple[torch.Tensor, torch.Tensor]:
    """(training images on [−1, 1], held-out images in [0, 1] right after them)."""
    if args.data == "digits":
        images, _ = datasets.load_digits()
    else:
        if not datasets.mnist_available(args.mnist_dir):
            raise SystemExit(f"MNIST not found in {args.mnist_dir or datasets.DEFAULT_MNIST_DIR}")
        images, _ = datasets.load_mnist(args.mnist_dir)
    count = args.count if args.count is not None else DEFAULT_COUNT[args.data]
    end = args.start + count
    held_out = images[end:end + args.eval_count] if args.eval_count > 0 else images[:0]
    train = 2.0 * datasets.to_float_nchw(images[args.start:end].copy()) - 1.0
    return train, datasets.to_float_nchw(held_out.copy())


def evaluate_purification(net: nn.Module, images: torch.Tensor, sigma: float, n_steps: int, eps: float,
                          every: int, seed: int = 0) -> list[tuple[int, float, float]]:
    """Long-run Langevin purification of held-out images with Gaussian noise σ added:
    [(steps, PSNR dB against the clean images, mean energy)] every `every` steps."""
    from pipeline.purifiers.langevin_ebm import LangevinEBMPurifier
    from pipeline.seeding import Noise
    from pipeline.training import psnr

    for q in net.parameters():
        q.requires_grad_(False)
    gen = torch.Generator().manual_seed(config_seed(seed, "train_ebm/eval"))
    noisy = (images + sigma * torch.randn(images.shape, generator=gen)).clamp(0, 1)
    purifier = LangevinEBMPurifier(net, steps=n_steps, eps=eps)
    noise = Noise.for_batch(seed, [f"heldout{i}" for i in range(len(images))], "train_ebm/eval")
    traj = purifier.trajectory(noisy, noise, every=every)
    out = []
    for i, x in enumerate(traj):
        with torch.no_grad():
            out.append((min(i * every, n_steps), psnr(x, images), float(purifier.energy(x).mean())))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=["digits", "mnist"], default="digits")
    p.add_argument("--mnist-dir", default=None)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--count", type=int, default=None, help="training images (mnist: 8000, digits: 1500)")
    p.add_argument("--eval-count", type=int, default=128, help="held-out images for the denoising check; 0: none")
    p.add_argument("--eval-sigma", type=float, default=0.1, help="Gaussian noise added to held-out images")
    p.add_argument("--eval-steps", type=int, default=1500, help="Langevin steps K of the check")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2000, help="training batches (published: 250000)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr-adam", type=float, default=1e-4)
    p.add_argument("--lr-sgd", type=float, default=5e-5, help="multiplied by ε²/2")
    p.add_argument("--switch-step", type=int, default=None,
                   help="Adam → SGD at this batch (default: half of --steps; a value > --steps never switches)")
    p.add_argument("--epsilon", type=float, default=1e-2, help="Langevin noise ε")
    p.add_argument("--data-epsilon", type=float, default=2e-2)
    p.add_argument("--shortrun-steps", type=int, default=100)
    p.add_argument("--init", choices=INITS, default="persistent")
    p.add_argument("--n-f", type=int, default=32)
    p.add_argument("--leak", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(config_seed(args.seed, "train_ebm/init"))

    data, held_out = load_data(args)
    arch_params = {"n_c": int(data.shape[1]), "n_f": args.n_f, "leak": args.leak, "image_size": int(data.shape[2])}
    net = ebm_nets.make_ebm(**arch_params)
    log.info("training EBM %s on %d %s images", arch_params, len(data), args.data)
    hist = train(net, data, n_steps=args.steps, batch_size=args.batch_size, lr_adam=args.lr_adam,
                 lr_sgd=args.lr_sgd, switch_step=args.switch_step, epsilon=args.epsilon,
                 data_epsilon=args.data_epsilon, shortrun_steps=args.shortrun_steps, init=args.init,
                 seed=args.seed, log_every=args.log_every)
    d = hist["d"]
    k = max(1, min(50, len(d) // 10))
    print(f"d_s_t: first {k} steps {sum(d[:k]) / k:.4f} → last {k} steps {sum(d[-k:]) / k:.4f} ({len(d)} steps)")
    meta = {"job": "train_ebm", "data": args.data, "start": args.start, "count": len(data),
            **{k2: getattr(args, k2) for k2 in ("steps", "batch_size", "lr_adam", "lr_sgd", "epsilon",
                                                 "data_epsilon", "shortrun_steps", "init", "seed")},
            "switch_step": args.switch_step if args.switch_step is not None else args.steps // 2,
            "scale": "[-1,1]", "d_curve": d[:: max(1, len(d) // 200)], "r_curve": hist["r"][:: max(1, len(d) // 200)]}
    if len(held_out):
        curve = evaluate_purification(net, held_out, args.eval_sigma, args.eval_steps, args.epsilon,
                                      args.eval_every, args.seed)
        meta["purification_check"] = {"images": len(held_out), "sigma": args.eval_sigma, "curve": curve}
        best = max(curve, key=lambda c: c[1])
        print(f"Langevin purification of {len(held_out)} held-out images + N(0, {args.eval_sigma}²): PSNR "
              f"{curve[0][1]:.2f} dB (noisy) → {curve[-1][1]:.2f} dB after {curve[-1][0]} steps "
              f"(best {best[1]:.2f} dB at {best[0]}); energy {curve[0][2]:.4g} → {curve[-1][2]:.4g}")
        for k, q, e in curve:
            print(f"  steps {k:5d}  PSNR {q:6.2f}  U {e:.4g}")
    checkpoints.save(args.out, ebm_nets.ARCH, arch_params, net.state_dict(), meta)
    print(f"saved {args.out}: {json.dumps({k2: meta[k2] for k2 in ('data', 'count', 'steps')})}")
    return 0 if all(math.isfinite(v) for v in d) else 1


if __name__ == "__main__":
    raise SystemExit(main())
