"""The training skeleton: batch orders, an EMA of the weights and one `fit` loop that every
recipe (classifier CE, denoiser MSE, score DSM, EBM contrastive) runs through; plus the two
supervised loops the demo, the jobs and the tests call directly.

Deterministic for a seed: batch orders and noise come from the recipe's own torch.Generator
(keyed by pipeline.seeding.config_seed), never from the global RNG. CPU-friendly.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.seeding import config_seed
from pipeline.train import objectives

log = logging.getLogger(__name__)

# A step function maps a batch of indices to the loss to minimise, optionally with
# per-step diagnostics (floats) that `fit` records next to the loss.
StepFn = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]
# What `fit` stops on: called with the history after each step; a string is the reason.
StopFn = Callable[["History"], "str | None"]


def epoch_batches(n: int, batch_size: int, epochs: int, gen: torch.Generator) -> Iterator[tuple[int, torch.Tensor]]:
    """(epoch, indices): each epoch a fresh permutation of range(n) cut into batches (the
    last one short). Lazy, so the next permutation is drawn after the previous epoch's noise."""
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            yield epoch, perm[i:i + batch_size]


def random_batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[tuple[int, torch.Tensor]]:
    """(0, indices) `steps` times, each batch the head of a fresh permutation (the EBM
    reference's order: no epochs, distinct images within a batch)."""
    for _ in range(steps):
        yield 0, torch.randperm(n, generator=gen)[:batch_size]


class EMA:
    """Exponential moving average of parameters (NCSNv2 EMAHelper semantics; buffers are
    copied), with an optional warm-up (ours): rate_t = min(rate, (1 + t)/(10 + t)), so that
    short CPU runs do not save weights dominated by the random initialisation."""

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


class OptimizerSwitch:
    """`fit`'s optimizer as a function of the 1-based step: `first` until step `at`, then
    `make_next()` (the EBM reference's Adam → SGD). An `at` below 1 never switches."""

    def __init__(self, first: torch.optim.Optimizer, at: int, make_next: Callable[[], torch.optim.Optimizer]):
        self.current, self.at, self.make_next = first, at, make_next

    def __call__(self, step: int) -> torch.optim.Optimizer:
        if step == self.at:
            self.current = self.make_next()
            log.info("step %d: switching to %s", step, type(self.current).__name__)
        return self.current


@dataclass
class History:
    """Per-step record of a fit: loss, batch size, epoch and the step function's diagnostics."""

    losses: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    stats: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    stopped: str | None = None  # why the fit ended early (a StopFn's reason), None if it ran out

    def epoch_means(self) -> list[float]:
        """Batch-size-weighted mean loss per epoch (summed in step order, as a running total)."""
        means: list[float] = []
        total, count = 0.0, 0
        for i, (loss, n) in enumerate(zip(self.losses, self.sizes)):
            total += loss * n
            count += n
            if i + 1 == len(self.losses) or self.epochs[i + 1] != self.epochs[i]:
                means.append(total / count)
                total, count = 0.0, 0
        return means


def nonfinite_loss(hist: History) -> str | None:
    """StopFn: the last loss is NaN or infinite."""
    loss = hist.losses[-1]
    return None if math.isfinite(loss) else f"non-finite loss {loss}"


def fit(net: nn.Module, step_fn: StepFn, batches: Iterable[tuple[int, torch.Tensor]], *,
        optimizer: torch.optim.Optimizer | Callable[[int], torch.optim.Optimizer], ema: EMA | None = None,
        max_steps: int | None = None, stop: StopFn | None = None, log_every: int = 0,
        name: str = "fit") -> History:
    """Minimise `step_fn(indices)` over `batches` ((epoch, indices) pairs): zero grads,
    backward, optimizer step, EMA update, record. `optimizer` may be a function of the
    1-based step (a schedule that swaps optimizers). Ends when the batches run out, after
    `max_steps`, or when `stop(history)` returns a reason. Leaves `net` in eval mode."""
    hist = History()
    net.train()
    t0 = time.time()
    for step, (epoch, idx) in enumerate(batches, start=1):
        opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer(step)
        out = step_fn(idx)
        loss, stats = out if isinstance(out, tuple) else (out, {})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update(net)
        hist.losses.append(loss.item())
        hist.sizes.append(len(idx))
        hist.epochs.append(epoch)
        for key, value in stats.items():
            hist.stats.setdefault(key, []).append(value)
        if log_every and (step % log_every == 0 or step == 1):
            _log_step(name, hist, step, log_every, time.time() - t0)
        hist.stopped = stop(hist) if stop is not None else None
        if hist.stopped:
            log.error("%s stopped at step %d: %s", name, step, hist.stopped)
            break
        if max_steps is not None and step >= max_steps:
            break
    net.eval()
    hist.seconds = time.time() - t0
    return hist


def _log_step(name: str, hist: History, step: int, window: int, seconds: float) -> None:
    recent = hist.losses[-window:]
    extra = "".join(f"  {k} {v[-1]:.5g}" for k, v in hist.stats.items())
    log.info("%s epoch %d step %d loss %.4f (mean of last %d: %.4f)%s %.1fs", name, hist.epochs[-1] + 1, step,
             hist.losses[-1], len(recent), sum(recent) / len(recent), extra, seconds)


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                     epochs: int = 20, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                     augment_noise: float = 0.0) -> list[float]:
    """Adam on cross-entropy; images float [N, C, H, W] in [0, 1]. Returns per-epoch mean loss."""
    gen = torch.Generator().manual_seed(config_seed(seed, "train_classifier"))
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(idx: torch.Tensor) -> torch.Tensor:
        return objectives.classification_loss(model, images[idx], labels[idx], gen, augment_noise)

    hist = fit(model, step, epoch_batches(len(images), batch_size, epochs, gen), optimizer=opt,
               name="classifier")
    history = hist.epoch_means()
    log.debug("classifier per-epoch loss %s (%.1fs)", [round(v, 4) for v in history], hist.seconds)
    return history


def train_denoiser(net: nn.Module, images: torch.Tensor, *, sigmas: Sequence[float] = (0.1, 0.2, 0.3),
                   epochs: int = 20, batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Gaussian denoising (`objectives.denoising_loss`): minimise ‖D(clip(x + σ·n, 0, 1)) − x‖²
    with σ per image from the listed levels or U[0, max σ]. Returns per-epoch mean loss."""
    gen = torch.Generator().manual_seed(config_seed(seed, "train_denoiser"))
    levels = torch.tensor(list(sigmas), dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def step(idx: torch.Tensor) -> torch.Tensor:
        return objectives.denoising_loss(net, images[idx], levels, gen)

    hist = fit(net, step, epoch_batches(len(images), batch_size, epochs, gen), optimizer=opt, name="denoiser")
    history = hist.epoch_means()
    log.debug("denoiser per-epoch loss %s (%.1fs)", [round(v, 5) for v in history], hist.seconds)
    return history


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    with torch.no_grad():
        correct = sum((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
                      for i in range(0, len(images), batch_size))
    return correct / max(1, len(images))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) for images in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())
