"""A small CNN for digit images (8×8 scikit-learn digits, 28×28 MNIST)."""
from __future__ import annotations

from torch import nn

from pipeline.classifiers.base import Classifier
from pipeline.io import checkpoints
from pipeline.registry import CLASSIFIERS

ARCH = "small_cnn"
DIGIT_MEAN, DIGIT_STD = (0.5,), (0.5,)


class SmallCNN(nn.Module):
    """Two conv blocks, pooled to a 4×4 grid, and an MLP head; any input of at least 8×8
    (8×8 digits, 28×28 MNIST, 32×32 CIFAR). Keeping a 4×4 grid, not a global pool, lets it
    learn MNIST in a few CPU epochs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(),
                                  nn.Linear(128, num_classes))

    def forward(self, x):
        return self.head(self.features(x))  # [N, 2w, 4, 4] → [N, K]


def make(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> Classifier:
    net = SmallCNN(in_channels, num_classes, width)
    return Classifier(net, DIGIT_MEAN * in_channels, DIGIT_STD * in_channels, num_classes)


@CLASSIFIERS.register(ARCH)
def build(checkpoint: str) -> Classifier:
    """Small CNN for digits, from a checkpoint written by jobs/train_classifier.py."""
    ckpt = checkpoints.load_ours(checkpoint, expect_arch=ARCH)
    model = make(**ckpt["arch_params"])
    checkpoints.load_state_strict(model, ckpt["state_dict"], checkpoint)
    return model.eval()
