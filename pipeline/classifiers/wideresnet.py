"""WideResNet classifiers (Zagoruyko & Komodakis 2016) that load published checkpoints.

Two key layouts are in circulation for the same WRN-d-k network, and they differ in more
than names, so each has its own module here:

- `robustbench`: the TRADES code (yaodongyu/TRADES models/wideresnet.py) as copied into
  RobustBench (model_zoo/architectures/wide_resnet.py) and most adversarial-training repos.
  Keys `conv1.weight`, `block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}`, `bn1`,
  `fc`; convolutions without bias; the stride is on conv1; where the width changes the
  shortcut (a 1×1 `convShortcut`) takes the *pre-activated* input relu(bn1(x)).
  Checkpoints from TRADES and several RobustBench entries also hold an unused
  `sub_block1.*` copy of block1 (never called in forward); it is dropped on load.
- `meliketoy`: meliketoy/wide-resnet.pytorch, used by Hill et al.'s EBM defense
  (point0bar1/ebm-defense nets.py, "with very minor changes") and ADP (jmyoon1/adp,
  classifier `Wide_ResNet`). Keys `conv1.{weight,bias}`, `layer{1,2,3}.{i}.{bn1,conv1,bn2,
  conv2,shortcut.0}`, `bn1`, `linear`; convolutions with bias; the stride is on conv2;
  the shortcut takes the raw block input.

Normalisation lives in the `Classifier` wrapper (inputs always in [0, 1]); `preset` picks
layout + mean/std of a source, explicit `layout`/`mean`/`std` override it:

| preset        | layout      | mean / std                                        | source |
|---------------|-------------|---------------------------------------------------|--------|
| `robustbench` | robustbench | 0 / 1 (inputs [0, 1] as is)                        | RobustBench `Standard`, TRADES, … |
| `hill`        | meliketoy   | 0.5 / 0.5 (the network sees [−1, 1])               | point0bar1/ebm-defense `clf.pth` |
| `adp`         | meliketoy   | (0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010) | jmyoon1/adp, meliketoy CIFAR-10 |

Checkpoint containers (`load_published_state`, shared with resnet.py): a plain state dict
or one under `state_dict`, `model_state_dict`, `net` or `model` (nested up to 3 deep), with
`module.` (DataParallel, per key) and whole-dict `model.` / `_orig_mod.` prefixes removed.
A file that pickles a whole nn.Module (meliketoy/ADP `checkpoint.t7` = {'net': model}) cannot
be read with weights_only=True: the error says how to re-save its state dict once.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Sequence

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
from pipeline.registry import CLASSIFIERS

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)  # the (widespread) kuangliu / meliketoy / ADP values

LAYOUTS = ("robustbench", "meliketoy")
PRESETS: dict[str, dict[str, Any]] = {
    "robustbench": {"layout": "robustbench", "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},
    "hill": {"layout": "meliketoy", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    "adp": {"layout": "meliketoy", "mean": CIFAR10_MEAN, "std": CIFAR10_STD},
}

def _check_depth(depth: int) -> int:
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n + 4 with n ≥ 1 (10, 16, 22, 28, 34, …), got {depth}")
    return (depth - 4) // 6


class _RBBlock(nn.Module):
    """TRADES/RobustBench BasicBlock (pre-activation; stride on conv1; 1×1 convShortcut on
    relu(bn1(x)) where the width changes)."""

    def __init__(self, cin: int, cout: int, stride: int, drop: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = drop
        self.equal_in_out = cin == cout
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(a)))
        if self.drop > 0:
            out = F.dropout(out, p=self.drop, training=self.training)
        out = self.conv2(out)
        return (x if self.equal_in_out else self.convShortcut(a)) + out


class _RBGroup(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, drop: float):
        super().__init__()
        self.layer = nn.Sequential(*[_RBBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k, RobustBench/TRADES key layout. forward(x normalised) → logits."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, drop: float = 0.0):
        super().__init__()
        n = _check_depth(depth)
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = _RBGroup(n, ch[0], ch[1], 1, drop)
        self.block2 = _RBGroup(n, ch[1], ch[2], 2, drop)
        self.block3 = _RBGroup(n, ch[2], ch[3], 2, drop)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))  # = avg_pool2d(·, 8) at 32×32


class _MKBlock(nn.Module):
    """meliketoy `wide_basic` (pre-activation; biased convs; stride on conv2; shortcut on x)."""

    def __init__(self, cin: int, cout: int, stride: int, drop: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=True)
        self.dropout = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNetMeliketoy(nn.Module):
    """WRN-depth-k, meliketoy key layout (Hill et al. EBM defense, ADP)."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, drop: float = 0.0):
        super().__init__()
        n = _check_depth(depth)
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=True)
        self.layer1 = nn.Sequential(*[_MKBlock(ch[0] if i == 0 else ch[1], ch[1], 1, drop) for i in range(n)])
        self.layer2 = nn.Sequential(*[_MKBlock(ch[1] if i == 0 else ch[2], ch[2], 2 if i == 0 else 1, drop)
                                      for i in range(n)])
        self.layer3 = nn.Sequential(*[_MKBlock(ch[2] if i == 0 else ch[3], ch[3], 2 if i == 0 else 1, drop)
                                      for i in range(n)])
        self.bn1 = nn.BatchNorm2d(ch[3], momentum=0.9)  # as published; affects training only
        self.linear = nn.Linear(ch[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def make_net(layout: str, depth: int = 28, widen_factor: int = 10, num_classes: int = 10) -> nn.Module:
    if layout == "robustbench":
        return WideResNet(depth, widen_factor, num_classes)
    if layout == "meliketoy":
        return WideResNetMeliketoy(depth, widen_factor, num_classes)
    raise ValueError(f"unknown WideResNet layout {layout!r}; one of {', '.join(LAYOUTS)}")


# ---------------------------------------------------------------------------------------
# Checkpoint inspection (for error messages)
# ---------------------------------------------------------------------------------------


def describe_state(sd: Mapping[str, torch.Tensor]) -> str:
    """'WRN-34-10, robustbench layout, 10 classes' for a WRN state dict, '' if not one."""
    if "block1.layer.0.conv1.weight" in sd and "fc.weight" in sd:
        layout, group, head = "robustbench", r"block1\.layer\.(\d+)\.", "fc.weight"
    elif "layer1.0.conv1.weight" in sd and "linear.weight" in sd:
        layout, group, head = "meliketoy", r"layer1\.(\d+)\.", "linear.weight"
    else:
        return ""
    n = len({m.group(1) for k in sd if (m := re.match(group, k))})
    classes, width = sd[head].shape
    return f"WRN-{6 * n + 4}-{width // 64}, {layout} layout, {classes} classes"


# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------


def _build(name: str, checkpoint: str | None, depth: int, widen_factor: int, preset: str,
           layout: str | None, mean, std, num_classes: int, random_init: bool) -> Classifier:
    require_checkpoint(name, checkpoint, random_init)
    mean, std = resolve_norm(preset, PRESETS, mean, std)
    layout = PRESETS[preset]["layout"] if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown WideResNet layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if checkpoint is None:
        net = random_init_net(make_net, layout, depth, widen_factor, num_classes)
    else:
        net = make_net(layout, depth, widen_factor, num_classes)
        sd = load_published_state(checkpoint)
        if layout == "robustbench":  # TRADES' unused copy of block1 (RobustBench sub_block1=True)
            sd = {k: v for k, v in sd.items() if not k.startswith("sub_block1.")}
        found = describe_state(sd)
        hint = ""
        if found:
            hint = f"the checkpoint holds a {found}; this builder made WRN-{depth}-{widen_factor}, {layout} layout"
            if "meliketoy" in found and layout != "meliketoy":
                hint += " (use preset hill or adp, or layout: meliketoy, and check mean/std)"
            elif "robustbench" in found and layout != "robustbench":
                hint += " (use preset robustbench, or layout: robustbench, and check mean/std)"
        load_into(net, sd, checkpoint, hint)
    return Classifier(net, mean, std, num_classes).eval()


@CLASSIFIERS.register("wrn28_10")
def build_wrn28_10(checkpoint: str | None = None, preset: str = "robustbench",
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   num_classes: int = 10, layout: str | None = None,
                   random_init: bool = False) -> Classifier:
    """WideResNet-28-10 for CIFAR from a published checkpoint (preset robustbench | hill | adp)."""
    return _build("wrn28_10", checkpoint, 28, 10, preset, layout, mean, std, num_classes, random_init)


@CLASSIFIERS.register("wideresnet")
def build_wideresnet(checkpoint: str | None = None, depth: int = 28, widen_factor: int = 10,
                     preset: str = "robustbench", mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, num_classes: int = 10,
                     layout: str | None = None, random_init: bool = False) -> Classifier:
    """WideResNet-depth-widen_factor (e.g. TRADES WRN-34-10) from a published checkpoint."""
    return _build("wideresnet", checkpoint, int(depth), int(widen_factor), preset, layout, mean, std,
                  num_classes, random_init)
