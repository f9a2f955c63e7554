"""Energy networks U_θ(x): [N, C, H, W] on the [−1, 1] scale → energies [N].

`EBM` with its defaults is the lightweight CIFAR-10 EBM of Hill, Mitchell, Zhu (ICLR 2021,
code: point0bar1/ebm-defense, nets.py): Conv 3→32 k3 s1 p1, LeakyReLU(0.05), then three
Conv k4 s2 p1 (32→64→128→256) with LeakyReLU, and Conv 256→1 k4 s1 p0, held in an
nn.Sequential named `f`, so a published `ebm.pth` (a plain state dict with keys
f.0.weight … f.8.bias) loads unchanged.

The same class scales down for digits: the last kernel is whatever spatial size is left
after the stride-2 convolutions (28 → 14 → 7 → 3: k3; 8 → 4 → 2 → 1: k1), so the layer
list — and the key pattern — stays that of the published network.

The network output is the energy already multiplied by ε²/2 (the reference trains it so),
which is why the Langevin update is X − ∇U + ε·Z with no step-size factor.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from pipeline import checkpoints

log = logging.getLogger(__name__)

ARCH = "ebm"


def _out_size(size: int) -> int:
    return (size + 2 - 4) // 2 + 1  # Conv k4 s2 p1


class EBM(nn.Module):
    def __init__(self, n_c: int = 3, n_f: int = 32, leak: float = 0.05, image_size: int = 32,
                 n_down: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(n_c, n_f, 3, 1, 1), nn.LeakyReLU(leak)]
        size, ch = image_size, n_f
        for _ in range(n_down):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.LeakyReLU(leak)]
            ch, size = ch * 2, _out_size(size)
        if size < 1:
            raise ValueError(f"image_size {image_size} too small for {n_down} stride-2 convolutions")
        layers.append(nn.Conv2d(ch, 1, size, 1, 0))
        self.f = nn.Sequential(*layers)
        self.n_c, self.image_size = n_c, image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the reference squeezes [N, 1, 1, 1] → [N]; view keeps [1] for a batch of one
        return self.f(x).view(x.shape[0])


def make_ebm(**params: Any) -> EBM:
    return EBM(**params)


def load_ebm(checkpoint: str, arch_params: dict | None = None) -> tuple[EBM, dict]:
    """Load an energy network, frozen and in eval mode, from our checkpoint
    (jobs/train_ebm.py; arch params in the file) or a published plain state dict
    (`ebm.pth`; arch_params default to the CIFAR-10 network)."""
    raw = checkpoints.load_raw(checkpoint)
    if isinstance(raw, dict) and "arch" in raw and "state_dict" in raw:
        if raw["arch"] != ARCH:
            raise checkpoints.CheckpointError(f"{checkpoint}: holds a {raw['arch']!r} network, expected {ARCH!r}")
        params = dict(raw.get("arch_params", {}))
        state = raw["state_dict"]
        fmt = "advpure"
    elif isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        params = dict(arch_params or {})
        state = checkpoints.strip_prefix(raw, "module.")
        fmt = "state_dict"
    else:
        raise checkpoints.CheckpointError(f"{checkpoint}: neither an advpure checkpoint nor an EBM state dict")
    net = EBM(**params)
    checkpoints.load_state_strict(net, state, checkpoint)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    log.info("loaded EBM from %s (%s)", checkpoint, fmt)
    return net, {"format": fmt, "arch": ARCH, "arch_params": params}
