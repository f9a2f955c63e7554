"""Our training recipes: which objective, optimiser, batch order and EMA each model gets, all
run through `pipeline.train.loops.fit` (used by jobs/train_*, the demo and the tests).

- small CNN classifier: Adam on cross-entropy (`train_small_cnn`, `loops.train_classifier`)
- denoising autoencoder: Adam on the Gaussian denoising MSE (`train_small_dae`,
  `loops.train_denoiser`; jobs/train_dae.py adds REDNet and a held-out subset, `holdout_split`)
- score network for ADP: noise-unconditional DSM, Adam, EMA of the weights (`train_score`)
- EBM for long-run Langevin purification: ML with short-run chains (`train_ebm`)
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import nn

from pipeline.classifiers import small_cnn
from pipeline.purifiers import steps
from pipeline.purifiers.nets import small_dae
from pipeline.seeding import config_seed
from pipeline.train import loops as training
from pipeline.train import objectives
from pipeline.train.common import load_images, save, seeded_init

log = logging.getLogger(__name__)


def train_small_cnn(out: str, source: str = "digits", split: str = "train", path: str | None = None,
                    epochs: int = 30, seed: int = 0, width: int = 32, limit: int = 0) -> dict[str, Any]:
    """A small CNN on a named split (its first `limit` images if > 0), saved to `out`."""
    x, y = load_images(source, split, path)
    if limit:
        x, y = x[:limit], y[:limit]
    model = seeded_init(small_cnn.make, seed, "init", "small_cnn", in_channels=x.shape[1], width=width)
    t0 = time.time()
    losses = training.train_classifier(model, x, y, epochs=epochs, seed=seed)
    meta = {"source": source, "split": split, "epochs": epochs, "seed": seed, "loss": losses,
            "train_accuracy": training.accuracy(model, x, y), "seconds": time.time() - t0}
    if limit:
        meta["limit"] = limit
    save(out, small_cnn.ARCH, {"in_channels": x.shape[1], "width": width}, model, meta, input_shape=x.shape[1:])
    log.info("classifier → %s: train accuracy %.3f in %.1fs", out, meta["train_accuracy"], meta["seconds"])
    return meta


def train_small_dae(out: str, source: str = "digits", split: str = "train", path: str | None = None,
                    epochs: int = 30, seed: int = 0, width: int = 32,
                    sigmas: tuple[float, ...] = (0.1, 0.2, 0.3)) -> dict[str, Any]:
    """A small DAE on a named split (every image), saved to `out` (the demo's purifier)."""
    x, _ = load_images(source, split, path)
    net = seeded_init(small_dae.SmallDAE, seed, "init", "small_dae", in_channels=x.shape[1], width=width)
    t0 = time.time()
    losses = training.train_denoiser(net, x, sigmas=sigmas, epochs=epochs, seed=seed)
    meta = {"source": source, "split": split, "epochs": epochs, "seed": seed, "loss": losses,
            "sigmas": list(sigmas), "seconds": time.time() - t0}
    save(out, small_dae.ARCH, {"in_channels": x.shape[1], "width": width}, net, meta, input_shape=x.shape[1:])
    log.info("denoiser → %s: final loss %.5f in %.1fs", out, losses[-1], meta["seconds"])
    return meta


# ---------------------------------------------------------------------------- DAE (APuDAE)

# noise levels per data set: ℓ∞ attacks use ε up to 0.3 on digits/MNIST, 8/255 on CIFAR-10
DAE_SIGMAS = {"digits": (0.1, 0.2, 0.3), "mnist": (0.1, 0.2, 0.3), "cifar10": (0.02, 0.05, 0.1)}


def holdout_split(n: int, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices of a DAE's split: a seeded permutation, the first `holdout`
    held out (never trained on; jobs/calibrate_dae.py recomputes the same subset)."""
    if not 0 <= holdout < n:
        raise ValueError(f"holdout must be in [0, {n}), got {holdout}")
    gen = torch.Generator().manual_seed(config_seed(seed, "dae_holdout"))
    perm = torch.randperm(n, generator=gen)
    return perm[holdout:], perm[:holdout]


# ---------------------------------------------------------------------------- score network (ADP)

def train_score(net: nn.Module, images: torch.Tensor, *, sigmas: torch.Tensor, epochs: int, batch_size: int,
                lr: float, ema_rate: float, seed: int, max_steps: int | None = None, log_every: int = 50,
                grid: bool = True, ema_warmup: bool = True) -> tuple[nn.Module, list[float]]:
    """Noise-unconditional DSM (`objectives.dsm_loss`) with Adam, data on the ADP score grid
    x·255/256 + 1/512, an EMA of the weights (NCSNv2: rate 0.999; ours: warm-up).
    Returns (the EMA network, or `net` itself when ema_rate == 0; per-step losses)."""
    gen = torch.Generator().manual_seed(config_seed(seed, "train_score"))
    data = steps.to_score_grid(images) if grid else images
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    ema = training.EMA(net, ema_rate, ema_warmup) if ema_rate > 0 else None

    def step(idx: torch.Tensor) -> torch.Tensor:
        return objectives.dsm_loss(net, data[idx], sigmas, gen)

    hist = training.fit(net, step, training.epoch_batches(len(data), batch_size, epochs, gen), optimizer=opt,
                        ema=ema, max_steps=max_steps, log_every=log_every, name="score")
    return (ema.shadow if ema is not None else net), hist.losses


# ---------------------------------------------------------------------------- EBM (long-run Langevin)

# Named settings for jobs/train_ebm.py --recipe (docs/adp_ebm.md says which are the paper's).
# "reference": point0bar1/ebm-defense config_train_ebm/cifar10_ebm.json (250k batches on a GPU);
# "digits" / "mnist": ours for a CPU — the reference's ML loss, ε, data noise and batch size,
# with a data-initialised persistent bank (EBM Life Cycle), a small bank so that chains grow
# older than the 1,500 purification steps within the run, 20 steps per update, a SiLU
# network and an exponentially decayed Adam rate instead of the Adam → SGD switch.
EBM_RECIPES: dict[str, dict[str, Any]] = {
    "reference": {"steps": 250_000, "batch_size": 100, "lr_adam": 1e-4, "lr_final": None, "lr_sgd": 5e-5,
                  "switch_step": None, "epsilon": 1e-2, "data_epsilon": 2e-2, "shortrun_steps": 100,
                  "init": "persistent", "rejuvenate": 0.0, "start_sigma": 0.0, "bank_size": None, "ema": 0.0,
                  "n_f": 32, "act": "leaky_relu", "dsm_weight": 0.0, "dsm_sigmas": (0.05, 0.3)},
    "digits": {"steps": 1500, "batch_size": 100, "lr_adam": 1e-3, "lr_final": 1e-4, "lr_sgd": 5e-5,
               "switch_step": 10**9, "epsilon": 1e-2, "data_epsilon": 2e-2, "shortrun_steps": 20,
               "init": "data_persistent", "rejuvenate": 0.02, "start_sigma": 0.0, "bank_size": 300, "ema": 0.995,
               "n_f": 16, "act": "silu", "dsm_weight": 0.0, "dsm_sigmas": (0.05, 0.3)},
    "mnist": {"steps": 3000, "batch_size": 100, "lr_adam": 1e-3, "lr_final": 1e-4, "lr_sgd": 5e-5,
              "switch_step": 10**9, "epsilon": 1e-2, "data_epsilon": 2e-2, "shortrun_steps": 20,
              "init": "data_persistent", "rejuvenate": 0.02, "start_sigma": 0.0, "bank_size": 500, "ema": 0.995,
              "n_f": 16, "act": "silu", "dsm_weight": 0.0, "dsm_sigmas": (0.05, 0.3)},
}


def adam_schedule(opt: torch.optim.Optimizer, lr0: float, lr1: float | None, n_steps: int):
    """`fit`'s optimizer as a function of the 1-based step, its rate decayed exponentially from
    lr0 (step 1) to lr1 (step n_steps); lr1 None: constant lr0."""
    def at(step: int) -> torch.optim.Optimizer:
        if lr1 is not None:
            frac = min(1.0, (step - 1) / max(1, n_steps - 1))
            for group in opt.param_groups:
                group["lr"] = lr0 * (lr1 / lr0) ** frac
        return opt
    return at


def train_ebm(net: nn.Module, data: torch.Tensor, *, n_steps: int, batch_size: int = 100, lr_adam: float = 1e-4,
              lr_final: float | None = None, lr_sgd: float = 5e-5, switch_step: int | None = None,
              epsilon: float = 1e-2, data_epsilon: float = 2e-2, shortrun_steps: int = 100,
              init: str = "persistent", rejuvenate: float = 0.0, start_sigma: float = 0.0,
              bank_size: int | None = None, ema: float = 0.0, dsm_weight: float = 0.0,
              dsm_sigmas: tuple[float, float] = (0.05, 0.3), max_chain_grad: float = math.inf,
              seed: int = 0, log_every: int = 50) -> dict:
    """Maximum likelihood with short-run Langevin negatives (Hill et al. 2021); data [N, C, H, W]
    on [−1, 1]. Per batch: X⁺ = data + data_epsilon·N(0, I); X⁻ = `shortrun_steps` Langevin
    steps from `objectives.ChainStarts` (init, rejuvenate, start_sigma, bank_size); loss
    `objectives.ml_loss` with scale ε²/2. Adam (its rate decayed exponentially to
    `lr_final` over the Adam phase when given), then SGD at lr_sgd·ε²/2 from batch
    `switch_step` (None: half of n_steps, as the reference; > n_steps: never). With
    dsm_weight > 0 (ours) `objectives.energy_dsm_loss` on the clean batch, σ log-uniform on
    `dsm_sigmas`, is added to the loss with that weight.

    Trains `net` in place; with ema > 0 its weights become the moving average at the end.
    Stops early on a non-finite loss or a mean chain ‖∇U‖ ≥ max_chain_grad (diverged).
    Returns {"d": per-step loss, "r": per-step mean ‖∇U‖, "energy_pos": per-step mean U(X⁺),
    "seconds", "cpu_seconds", "diverged"}."""
    gen = torch.Generator().manual_seed(config_seed(seed, "train_ebm"))
    starts = objectives.ChainStarts(init, data, gen, rejuvenate=rejuvenate, start_sigma=start_sigma,
                                    bank_size=bank_size)
    scale = epsilon ** 2 / 2.0
    switch = n_steps // 2 if switch_step is None else switch_step
    adam = adam_schedule(torch.optim.Adam(net.parameters(), lr=lr_adam), lr_adam, lr_final, min(switch, n_steps))
    sgd = training.OptimizerSwitch(adam(1), switch, lambda: torch.optim.SGD(net.parameters(), lr=lr_sgd * scale))
    shadow = training.EMA(net, ema, warmup=False) if ema > 0 else None

    def optimizer(step: int) -> torch.optim.Optimizer:
        return adam(step) if step < switch else sgd(step)

    def step(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x_q = data[idx] + data_epsilon * torch.randn(data[idx].shape, generator=gen)
        x0, bank_idx = starts.draw(x_q)
        x_s, r = objectives.langevin_chain(net, x0, shortrun_steps, epsilon, gen)
        starts.put_back(bank_idx, x_s)
        u_pos, u_neg = net(x_q), net(x_s)
        loss = objectives.ml_loss(u_pos, u_neg, scale)
        if dsm_weight > 0:
            loss = loss + dsm_weight * objectives.energy_dsm_loss(net, data[idx], tuple(dsm_sigmas), scale, gen)
        return loss, {"r": r, "energy_pos": float(u_pos.detach().mean())}

    def diverged(hist: training.History) -> str | None:
        # a chain this steep has left any sensible region (normal runs: ‖∇U‖ 0.001–0.3)
        r = hist.stats["r"][-1]
        return training.nonfinite_loss(hist) or (f"mean chain ‖∇U‖ {r:.3g}" if r >= max_chain_grad else None)

    cpu0 = time.process_time()
    hist = training.fit(net, step, training.random_batches(len(data), batch_size, n_steps, gen),
                        optimizer=optimizer, ema=shadow, stop=diverged, log_every=log_every, name="ebm")
    if shadow is not None:
        net.load_state_dict(shadow.shadow.state_dict())
    return {"d": hist.losses, "r": hist.stats.get("r", []), "energy_pos": hist.stats.get("energy_pos", []),
            "seconds": hist.seconds, "cpu_seconds": time.process_time() - cpu0, "diverged": hist.stopped is not None}


# ---------------------------------------------------------------------------- diffusion (DiffPure)

def train_diffusion(net: nn.Module, images: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
                    ema_rate: float, seed: int, beta_min: float = 0.1, beta_max: float = 20.0, n_steps: int = 1000,
                    max_steps: int | None = None, log_every: int = 50) -> tuple[nn.Module, list[float]]:
    """The DDPM ε-objective (`objectives.ddpm_loss`) on images mapped to [−1, 1], with the
    VP schedule DiffPure purifies with; Adam and an EMA of the weights (DDPM: 0.9999; ours:
    warm-up, for short CPU runs). Returns (the EMA network, or `net` when ema_rate == 0; losses)."""
    from pipeline.purifiers import vpsde

    gen = torch.Generator().manual_seed(config_seed(seed, "train_diffusion"))
    abar = vpsde.VPSchedule(beta_min, beta_max, n_steps).alphas_cumprod().float()
    data = 2.0 * images - 1.0
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    ema = training.EMA(net, ema_rate) if ema_rate > 0 else None

    def step(idx: torch.Tensor) -> torch.Tensor:
        return objectives.ddpm_loss(net, data[idx], abar, gen)

    hist = training.fit(net, step, training.epoch_batches(len(data), batch_size, epochs, gen), optimizer=opt,
                        ema=ema, max_steps=max_steps, log_every=log_every, name="diffusion")
    return (ema.shadow if ema is not None else net), hist.losses
