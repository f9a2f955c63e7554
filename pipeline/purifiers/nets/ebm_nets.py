"""Energy networks U_θ(x): [N, C, H, W] on the [−1, 1] scale → energies [N].

`EBM` with its defaults is the lightweight CIFAR-10 EBM of Hill, Mitchell, Zhu (ICLR 2021,
code: point0bar1/ebm-defense, nets.py): Conv 3→32 k3 s1 p1, LeakyReLU(0.05), then three
Conv k4 s2 p1 (32→64→128→256) with LeakyReLU, and Conv 256→1 k4 s1 p0, held in an
nn.Sequential named `f`, so a published `ebm.pth` (a plain state dict with keys
f.0.weight … f.8.bias) loads unchanged.

The same class scales down for digits: the last kernel is whatever spatial size is left
after the stride-2 convolutions (28 → 14 → 7 → 3: k3; 8 → 4 → 2 → 1: k1), so the layer
list — and the key pattern — stays that of the published network.

`act="silu"` (ours, for the digits / MNIST recipes) swaps every LeakyReLU for SiLU: the
activations hold no weights, so the key names stay f.0 … f.8. A smooth energy has a smooth
gradient, which the long-run chains and the recipe's denoising term (a gradient of ∇U)
need; a LeakyReLU energy is piecewise linear, its ∇U piecewise constant.

The network output is the energy already multiplied by ε²/2 (the reference trains it so),
which is why the Langevin update is X − ∇U + ε·Z with no step-size factor.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.io import checkpoints
from pipeline.purifiers.base import PublishedWeights, load_frozen
from pipeline.purifiers.nets import InputSizeError

ARCH = "ebm"
ACTIVATIONS = ("leaky_relu", "silu")


def _out_size(size: int) -> int:
    return (size + 2 - 4) // 2 + 1  # Conv k4 s2 p1


def _activation(act: str, leak: float) -> nn.Module:
    if act == "leaky_relu":
        return nn.LeakyReLU(leak)
    if act == "silu":
        return nn.SiLU()
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


class EBM(nn.Module):
    def __init__(self, n_c: int = 3, n_f: int = 32, leak: float = 0.05, image_size: int = 32,
                 n_down: int = 3, act: str = "leaky_relu"):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(n_c, n_f, 3, 1, 1), _activation(act, leak)]
        size, ch = image_size, n_f
        for _ in range(n_down):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1), _activation(act, leak)]
            ch, size = ch * 2, _out_size(size)
        if size < 1:
            raise ValueError(f"image_size {image_size} too small for {n_down} stride-2 convolutions")
        layers.append(nn.Conv2d(ch, 1, size, 1, 0))
        self.f = nn.Sequential(*layers)
        self.n_c, self.image_size = n_c, image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):   # the last kernel spans exactly that
            raise InputSizeError(ARCH, tuple(x.shape[-2:]), size=self.image_size)
        # the reference squeezes [N, 1, 1, 1] → [N]; view keeps [1] for a batch of one
        return self.f(x).view(x.shape[0])


def make_ebm(**params: Any) -> EBM:
    return EBM(**params)


def load_ebm(checkpoint: str, arch_params: dict | None = None) -> tuple[EBM, dict]:
    """Load an energy network, frozen and in eval mode (`pipeline.purifiers.base.load_frozen`),
    from our checkpoint (jobs/train_ebm.py; arch params in the file) or a published plain
    state dict (`ebm.pth`; arch_params default to the CIFAR-10 network)."""
    def published(raw: Any) -> PublishedWeights:
        if not (isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values())):
            raise checkpoints.CheckpointError(f"{checkpoint}: neither an advpure checkpoint nor an EBM state dict")
        state = checkpoints.strip_prefix(raw, "module.")
        return PublishedWeights("state_dict", ARCH, dict(arch_params or {}), state, {})

    return load_frozen(checkpoint, lambda arch, params: EBM(**params), archs=[ARCH], published=published,
                       kind="energy network")
