"""Loading published classifier checkpoints: containers, wrapper prefixes, strict loading
with messages that say what a file holds; normalisation presets; seeded random init."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Sequence

import torch
from torch import nn

from pipeline.io import checkpoints
from pipeline.io.checkpoints import CheckpointError

CONTAINER_KEYS = ("state_dict", "model_state_dict", "net", "model")
_WHOLE_PREFIXES = ("model.", "_orig_mod.", "module.")
_RANDOM_INIT_SEED = 0


# ---------------------------------------------------------------------------------------
# Published checkpoint containers (also used by resnet.py)
# ---------------------------------------------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a published checkpoint object (see the module docstring)."""
    path: list[str] = []
    while not _is_state_dict(obj):
        where = f" under {'/'.join(path)}" if path else ""
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{source}: holds a {type(obj).__name__}{where}, not a state dict")
        key = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None or len(path) >= 3:
            keys = sorted(map(str, obj))
            raise CheckpointError(
                f"{source}: no state dict found{where}: keys {keys[:10]}{' …' if len(keys) > 10 else ''}; "
                f"expected a plain state dict or one under {', '.join(repr(k) for k in CONTAINER_KEYS)}")
        path.append(key)
        obj = obj[key]
    return dict(obj)


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `module.` wherever a key starts with it (DataParallel), then `model.`,
    `_orig_mod.` (torch.compile) or `module.` while every key starts with the same one."""
    sd = checkpoints.strip_prefix(state_dict, "module.")
    changed = True
    while changed:
        changed = False
        for p in _WHOLE_PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def load_published_state(url: str) -> dict[str, torch.Tensor]:
    """Read a published checkpoint (weights_only=True) and return its bare state dict."""
    try:
        raw = checkpoints.load_raw(url)
    except CheckpointError as err:
        text = str(err)
        if "weights_only" in text.lower() or "Unsupported global" in text:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            why = f" (it pickles {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{url}: cannot be read with weights_only=True{why}. The file holds Python objects "
                "besides tensors, e.g. a whole nn.Module (meliketoy/ADP `checkpoint.t7` = "
                "{'net': model}) or numpy scalars next to the weights. Re-save the weights once, "
                "in an environment you trust with the original code importable: "
                "torch.save(torch.load(path, weights_only=False)['net'].state_dict(), 'clf.pt') "
                "(or the state dict alone, for other layouts).") from None
        raise
    return strip_wrapper_prefixes(unwrap_state_dict(raw, url))


def load_into(net: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
              hint: str = "") -> None:
    """Strict load naming the file and the mismatched keys; BatchNorm `num_batches_tracked`
    (absent from pre-1.0 checkpoints, unused at eval) is filled in when missing."""
    expected = net.state_dict()
    sd = dict(state_dict)
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros_like(v)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: state dict does not match {type(net).__name__}: "
            f"{len(missing)} missing {missing[:6]}, {len(unexpected)} unexpected {unexpected[:6]}"
            + (f"; {hint}" if hint else ""))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if tuple(sd[k].shape) != tuple(v.shape)]
    if shapes:
        raise CheckpointError(
            f"{source}: state dict does not fit {type(net).__name__}: {len(shapes)} shape mismatches "
            f"(checkpoint vs network) {shapes[:4]}" + (f"; {hint}" if hint else ""))
    checkpoints.load_state_strict(net, sd, source)


# ---------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------


def resolve_norm(preset: str, presets: Mapping[str, Mapping[str, Any]],
                 mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[tuple, tuple]:
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; one of {', '.join(presets)}")
    mean = tuple(float(m) for m in (presets[preset]["mean"] if mean is None else mean))
    std = tuple(float(s) for s in (presets[preset]["std"] if std is None else std))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {list(std)}")
    return mean, std


def random_init_net(ctor, *args, **kwargs) -> nn.Module:
    """Build with PyTorch's default init from a fixed seed, so every worker of a job gets the
    same weights; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_INIT_SEED)
        return ctor(*args, **kwargs)


def require_checkpoint(name: str, checkpoint: str | None, random_init: bool) -> None:
    if checkpoint is None and not random_init:
        raise ValueError(f"classifier {name!r}: give `checkpoint` (a published state dict); "
                         "`random_init: true` builds untrained weights for smoke tests and benchmarks")
    if checkpoint is not None and random_init:
        raise ValueError(f"classifier {name!r}: `checkpoint` and `random_init: true` exclude each other")


