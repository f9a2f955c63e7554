"""A small convolutional denoising autoencoder for digit-sized images."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.purifiers.nets import SIDE_MULTIPLE, check_multiple

ARCH = "small_dae"


class SmallDAE(nn.Module):
    """Encoder (two stride-2 convs) → decoder (two transposed convs), sigmoid output in [0,1].

    Works for any H, W divisible by 4 (8×8 digits, 28×28 MNIST, 32×32 CIFAR).
    """

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, in_channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_multiple(x, SIDE_MULTIPLE[ARCH], ARCH)   # other sides come back another size
        return torch.sigmoid(self.decoder(self.encoder(x)))
