"""Small training loops shared by the demo and jobs/train_*: classifier and denoiser.

Deterministic for a seed (own torch.Generator for shuffling and noise), CPU-friendly.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.seeding import config_seed

log = logging.getLogger(__name__)


def _batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size]


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                     epochs: int = 20, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                     augment_noise: float = 0.0) -> list[float]:
    """Adam on cross-entropy; images float [N, C, H, W] in [0, 1]. Returns per-epoch mean loss."""
    gen = torch.Generator().manual_seed(config_seed(seed, "train_classifier"))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    history = []
    for epoch in range(epochs):
        t0, total, count = time.time(), 0.0, 0
        for idx in _batches(len(images), batch_size, gen):
            x, y = images[idx], labels[idx]
            if augment_noise > 0:
                x = (x + augment_noise * torch.randn(x.shape, generator=gen)).clamp(0, 1)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        history.append(total / count)
        log.debug("classifier epoch %d/%d loss %.4f (%.1fs)", epoch + 1, epochs, history[-1], time.time() - t0)
    model.eval()
    return history


def train_denoiser(net: nn.Module, images: torch.Tensor, *, sigmas: Sequence[float] = (0.1, 0.2, 0.3),
                   epochs: int = 20, batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Gaussian denoising: minimise ‖D(clip(x + σ·n, 0, 1)) − x‖² with σ drawn per image from
    U[0, max σ] mixed with the listed levels. Returns per-epoch mean loss."""
    gen = torch.Generator().manual_seed(config_seed(seed, "train_denoiser"))
    levels = torch.tensor(list(sigmas), dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    history = []
    for epoch in range(epochs):
        t0, total, count = time.time(), 0.0, 0
        for idx in _batches(len(images), batch_size, gen):
            x = images[idx]
            # half the batch at the listed levels, half uniform in [0, max]: robust to any level
            pick = levels[torch.randint(len(levels), (len(idx),), generator=gen)]
            unif = torch.rand(len(idx), generator=gen) * levels.max()
            sigma = torch.where(torch.rand(len(idx), generator=gen) < 0.5, pick, unif).view(-1, 1, 1, 1)
            noisy = (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)
            loss = F.mse_loss(net(noisy), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        history.append(total / count)
        log.debug("denoiser epoch %d/%d loss %.5f (%.1fs)", epoch + 1, epochs, history[-1], time.time() - t0)
    net.eval()
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
