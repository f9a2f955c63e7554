"""ResNets with torchvision's state-dict keys, so published weights load unchanged.

Keys: `conv1`, `bn1`, `layer{1..4}.{i}.{conv1,bn1,conv2,bn2[,conv3,bn3]}`,
`layer{L}.0.downsample.{0,1}` (1×1 conv + BN), `fc` — a torchvision `resnet50` state dict
(IMAGENET1K_V1 / V2) loads as is. Bottleneck blocks put the stride on the 3×3 conv
(torchvision's "ResNet v1.5").

Two stems:
- `imagenet`: 7×7/2 conv + 3×3/2 max-pool (torchvision; 224×224 inputs).
- `cifar`: 3×3/1 conv, no max-pool (kuangliu/pytorch-cifar, RobustBench `ResNet18`;
  32×32 inputs). Those repos name the shortcut `shortcut.{0,1}` and the head `linear`;
  such keys are renamed to `downsample.*` / `fc.*` on load (same tensors, same forward).

Normalisation is in the `Classifier` wrapper (inputs in [0, 1]):
- `resnet50` default: ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
- CIFAR builders, `preset`: `robustbench` = 0 / 1 (RobustBench ResNet18 entries take [0, 1]);
  `pytorch_cifar` = (0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010) (kuangliu/pytorch-cifar).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.classifiers.base import Classifier
from pipeline.classifiers.loading import (
    load_into,
    load_published_state,
    random_init_net,
    require_checkpoint,
    resolve_norm,
)
from pipeline.classifiers.wideresnet import CIFAR10_MEAN, CIFAR10_STD
from pipeline.registry import CLASSIFIERS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR_PRESETS = {
    "robustbench": {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},
    "pytorch_cifar": {"mean": CIFAR10_MEAN, "std": CIFAR10_STD},
}
IMAGENET_PRESETS = {"torchvision": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}}

STEMS = ("imagenet", "cifar")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = _downsample(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


SPECS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3)),
         101: (Bottleneck, (3, 4, 23, 3)), 152: (Bottleneck, (3, 8, 36, 3))}


class ResNet(nn.Module):
    """torchvision-keyed ResNet; forward(x normalised) → logits."""

    def __init__(self, depth: int = 50, num_classes: int = 1000, stem: str = "imagenet"):
        super().__init__()
        if depth not in SPECS:
            raise ValueError(f"ResNet depth must be one of {sorted(SPECS)}, got {depth}")
        if stem not in STEMS:
            raise ValueError(f"unknown ResNet stem {stem!r}; one of {', '.join(STEMS)}")
        block, counts = SPECS[depth]
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), counts)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            out = F.max_pool2d(out, 3, 2, 1)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def rename_cifar_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kuangliu / RobustBench names → torchvision names: `.shortcut.` → `.downsample.`,
    `linear.` → `fc.`."""
    out = {}
    for k, v in sd.items():
        k = k.replace(".shortcut.", ".downsample.")
        if k.startswith("linear."):
            k = "fc." + k[len("linear."):]
        out[k] = v
    return out


def _build(name: str, checkpoint: str | None, depth: int, stem: str, presets: dict, preset: str,
           mean, std, num_classes: int, random_init: bool) -> Classifier:
    require_checkpoint(name, checkpoint, random_init)
    mean, std = resolve_norm(preset, presets, mean, std)
    if checkpoint is None:
        net = random_init_net(ResNet, depth, num_classes, stem)
    else:
        net = ResNet(depth, num_classes, stem)
        sd = rename_cifar_keys(load_published_state(checkpoint))
        hint = ""
        if "conv1.weight" in sd and tuple(sd["conv1.weight"].shape[-2:]) != tuple(net.conv1.weight.shape[-2:]):
            k = sd["conv1.weight"].shape[-1]
            hint = f"the checkpoint's stem is a {k}×{k} conv ({'imagenet' if k == 7 else 'cifar'} stem); built: {stem}"
        load_into(net, sd, checkpoint, hint)
    return Classifier(net, mean, std, num_classes).eval()


@CLASSIFIERS.register("resnet18_cifar")
def build_resnet18_cifar(checkpoint: str | None = None, preset: str = "robustbench",
                         mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                         num_classes: int = 10, random_init: bool = False) -> Classifier:
    """ResNet-18, CIFAR stem (3×3, no max-pool), torchvision or kuangliu keys."""
    return _build("resnet18_cifar", checkpoint, 18, "cifar", CIFAR_PRESETS, preset, mean, std,
                  num_classes, random_init)


@CLASSIFIERS.register("resnet34_cifar")
def build_resnet34_cifar(checkpoint: str | None = None, preset: str = "robustbench",
                         mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                         num_classes: int = 10, random_init: bool = False) -> Classifier:
    """ResNet-34, CIFAR stem (3×3, no max-pool), torchvision or kuangliu keys."""
    return _build("resnet34_cifar", checkpoint, 34, "cifar", CIFAR_PRESETS, preset, mean, std,
                  num_classes, random_init)


@CLASSIFIERS.register("resnet50")
def build_resnet50(checkpoint: str | None = None, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, num_classes: int = 1000,
                   random_init: bool = False) -> Classifier:
    """ResNet-50 for ImageNet (224 px); a torchvision resnet50 state dict loads unchanged."""
    return _build("resnet50", checkpoint, 50, "imagenet", IMAGENET_PRESETS, "torchvision", mean, std,
                  num_classes, random_init)


@CLASSIFIERS.register("resnet")
def build_resnet(checkpoint: str | None = None, depth: int = 50, stem: str = "imagenet",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 num_classes: int = 1000, random_init: bool = False) -> Classifier:
    """ResNet-18/34/50/101/152, imagenet or cifar stem; mean/std default to ImageNet's."""
    return _build("resnet", checkpoint, int(depth), stem, IMAGENET_PRESETS, "torchvision", mean, std,
                  num_classes, random_init)
