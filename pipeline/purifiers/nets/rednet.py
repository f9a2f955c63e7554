"""REDNet (Mao, Shen, Yang, "Image Restoration Using Very Deep Convolutional Encoder-Decoder
Networks with Symmetric Skip Connections", NeurIPS 2016), the 30-layer variant APuDAE uses as
its CIFAR-10 / ImageNet denoiser.

Layout for `num_layers = L` (REDNet-30: L = 15, 64 features, 3×3 kernels):
- encoder: L convolutions, each followed by ReLU; the first has stride 2 (H → H/2);
- decoder: L transposed convolutions; the first L − 1 are followed by ReLU, the last has
  stride 2 (H/2 → H) and maps back to the image channels;
- symmetric skips every two layers: the output of encoder layer j (0-based, j odd, j ≤ L − 2)
  is added to the output of decoder layer L − 2 − j, followed by ReLU;
- global residual: output = ReLU(decoder(x) + x).

`batch_norm=True` adds BatchNorm after every hidden ReLU, as in the APuDAE authors' REDNet30
(their released reformer_model.py); the original REDNet has none. In eval mode BatchNorm uses
running statistics, so rows stay independent. H and W must be even.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.purifiers.nets import SIDE_MULTIPLE, check_multiple

ARCH = "rednet30"


class REDNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_layers: int = 15, num_features: int = 64,
                 batch_norm: bool = False):
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"REDNet needs num_layers ≥ 2, got {num_layers}")
        self.num_layers = int(num_layers)

        def block(layer: nn.Module) -> nn.Sequential:
            parts = [layer, nn.ReLU()]
            if batch_norm:
                parts.append(nn.BatchNorm2d(num_features))
            return nn.Sequential(*parts)

        L, F_ = self.num_layers, num_features
        encoder = [block(nn.Conv2d(in_channels, F_, 3, stride=2, padding=1))]
        encoder += [block(nn.Conv2d(F_, F_, 3, padding=1)) for _ in range(L - 1)]
        decoder = [block(nn.ConvTranspose2d(F_, F_, 3, padding=1)) for _ in range(L - 1)]
        decoder.append(nn.ConvTranspose2d(F_, in_channels, 3, stride=2, padding=1, output_padding=1))
        self.encoder = nn.ModuleList(encoder)
        self.decoder = nn.ModuleList(decoder)
        # encoder index j → decoder index L − 2 − j, for odd j up to L − 2
        self._skip_from = {L - 2 - j: j for j in range(1, L - 1, 2)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_multiple(x, SIDE_MULTIPLE[ARCH], ARCH)   # an odd side comes back one pixel larger
        saved: dict[int, torch.Tensor] = {}
        keep = set(self._skip_from.values())
        h = x
        for j, layer in enumerate(self.encoder):
            h = layer(h)
            if j in keep:
                saved[j] = h
        for i, layer in enumerate(self.decoder):
            h = layer(h)
            if i in self._skip_from:
                h = torch.relu(h + saved[self._skip_from[i]])
        return torch.relu(h + x)


def make(in_channels: int = 3, num_layers: int = 15, num_features: int = 64,
         batch_norm: bool = False) -> REDNet:
    """REDNet-30 by default; small settings (e.g. num_layers=3, num_features=8) for tests."""
    return REDNet(in_channels, num_layers, num_features, batch_norm)
