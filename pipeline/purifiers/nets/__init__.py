"""Networks used by purifiers (denoisers, score models, energy models, DIP generators)."""
from __future__ import annotations

import torch

# what each of our down-sampling networks needs of an image's sides (by checkpoint arch): the
# nets check it, and the corpus job checks corpus.resize against it before any work
SIDE_MULTIPLE = {"small_dae": 4, "small_score": 4, "rednet30": 2}


class InputSizeError(ValueError):
    """An image of a height and width the network cannot take: sides not a multiple of its
    down-sampling factor (it would return another size), or not the one size it is built for."""

    def __init__(self, network: str, hw: tuple[int, int], *, multiple: int | None = None, size: int | None = None):
        self.network, self.hw, self.multiple, self.size = network, (int(hw[0]), int(hw[1])), multiple, size
        self.need = (f"height and width divisible by {multiple} (it down-samples by {multiple} and up-samples back)"
                     if size is None else f"{size}×{size} images (its last layer is built for that size)")
        super().__init__(f"{network} needs {self.need}; this image is {self.hw[0]}×{self.hw[1]}")

    def fits(self, side: int) -> bool:
        """Whether an N×N image would meet the constraint."""
        return side == self.size if self.size is not None else side % (self.multiple or 1) == 0


def check_multiple(x: torch.Tensor, multiple: int, network: str) -> None:
    """InputSizeError unless the last two dimensions of x are multiples of `multiple`."""
    if x.shape[-2] % multiple or x.shape[-1] % multiple:
        raise InputSizeError(network, tuple(x.shape[-2:]), multiple=multiple)
