"""Shared pieces for classifiers: input normalisation inside the network."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, so every classifier takes inputs in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """A network wrapped with its normalisation: forward(x in [0,1], NCHW) → logits [N, K]."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], num_classes: int):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
