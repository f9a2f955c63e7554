"""The purifier interface, its capability flags, and the one recipe for loading frozen networks.

A purifier maps a batch x [N, C, H, W] in [0, 1] to x̂ of the same shape and range. Its
flags say what it is, and so which attack is honest against it:
- stochastic: x̂ depends on random draws (evaluate over R runs, attack with EOT);
- differentiable: autograd through forward() gives the true gradient (full-gradient attack);
- test_time_optimization: forward() runs an inner optimisation (BPDA+EOT, and a check flag).

One pattern for every purifier:
- flags are class attributes; a flag that depends on a constructor argument (APuDAE:
  `unrolled` → differentiable, `variant` → stochastic) is a read-only property of the
  subclass, never an attribute set in __init__;
- constructors take the network(s) positionally and everything else keyword-only
  (`def __init__(self, net, *, sigma=0.25, ...)`); the registered `build` passes keywords;
- subclasses implement `purify(x, noise) -> Purified`, which returns the images together
  with the network evaluations per row (no counter on the module); `forward` is
  `purify(...).images`;
- randomness only from the `noise` argument (rows keyed by sample and replica), never from
  torch's global generator, so a row's output does not depend on its batch;
- no torch.no_grad()/inference_mode() inside: the caller decides whether gradients flow;
- weights come from `load_frozen` (ours or a published format → strict load → frozen).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import torch
from torch import nn

from pipeline.io import checkpoints
from pipeline.seeding import Noise

log = logging.getLogger(__name__)


class Purified(NamedTuple):
    """What a purifier returns: the purified batch and its cost."""

    images: torch.Tensor  # [N, C, H, W] in [0, 1]
    nfe: int  # network evaluations per row


class Purifier(nn.Module):
    stochastic: ClassVar[bool] = False
    differentiable: ClassVar[bool] = True
    test_time_optimization: ClassVar[bool] = False

    def purify(self, x: torch.Tensor, noise: Noise | None = None) -> Purified:
        """x [N, C, H, W] in [0, 1] with noise rows N → Purified(x̂ [N, C, H, W], nfe per row)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, noise: Noise | None = None) -> torch.Tensor:
        return self.purify(x, noise).images

    def params(self) -> dict[str, Any]:
        """The settings that define this purification, recorded with every result."""
        return {}

    def flags(self) -> dict[str, bool]:
        return {"stochastic": bool(self.stochastic), "differentiable": bool(self.differentiable),
                "test_time_optimization": bool(self.test_time_optimization)}

    def _noise(self, noise: Noise | None, x: torch.Tensor) -> Noise:
        if noise is None:
            return Noise.unkeyed(x.shape[0], x.device)
        if noise.rows != x.shape[0]:
            raise ValueError(f"noise has {noise.rows} rows for a batch of {x.shape[0]}")
        return noise.to(x.device)


# ---------------------------------------------------------------------------------------
# Loading frozen networks
# ---------------------------------------------------------------------------------------


class PublishedWeights(NamedTuple):
    """A published checkpoint, recognised and unpacked by its format's reader."""

    format: str             # e.g. "ncsnv2", "state_dict"
    arch: str
    arch_params: dict
    state_dict: dict
    info: dict              # extra facts for params(), e.g. {"ema": True}; {} if none


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: purifier networks are fixed, inputs are not."""
    return net.eval().requires_grad_(False)


def is_ours(raw: Any) -> bool:
    """Whether a loaded object is our checkpoint layout (pipeline.io.checkpoints.save)."""
    return isinstance(raw, dict) and "arch" in raw and "state_dict" in raw


def load_frozen(checkpoint: str, make: Callable[[str, dict], nn.Module], *,
                archs: Sequence[str] | None = None,
                published: Callable[[Any], PublishedWeights] | None = None,
                kind: str = "network") -> tuple[nn.Module, dict]:
    """Load → ours or published → strict load → frozen, the one recipe for purifier networks.

    Arguments:
        checkpoint (str): local path or URL (s3://, https://).
        make (Callable[[str, dict], nn.Module]): builds the network from (arch, arch_params).
        archs (Sequence[str] | None): the archs our checkpoint may hold; None accepts any. (Default: None)
        published (Callable | None): reader of the published format, raw object →
            PublishedWeights, raising CheckpointError when it is not one; None accepts only
            our checkpoints. (Default: None)
        kind (str): what is loaded, for messages. (Default: "network")

    Returns (net, info): info = {"format", "arch", "arch_params"} plus "meta" for ours and
    the reader's extra facts for a published checkpoint.
    """
    raw = checkpoints.load_raw(checkpoint)
    if is_ours(raw):
        arch, params = raw["arch"], dict(raw.get("arch_params", {}))
        if archs is not None and arch not in archs:
            raise checkpoints.CheckpointError(
                f"{checkpoint}: holds a {arch!r} network, expected {' or '.join(map(repr, archs))}")
        state = raw["state_dict"]
        info = {"format": "advpure", "arch": arch, "arch_params": params, "meta": dict(raw.get("meta", {}))}
    elif published is not None:
        pub = published(raw)
        arch, params, state = pub.arch, dict(pub.arch_params), pub.state_dict
        info = {"format": pub.format, "arch": arch, "arch_params": params, **pub.info}
    else:
        raise checkpoints.CheckpointError(f"{checkpoint}: not an advpure checkpoint (expected keys arch, state_dict)")
    net = make(arch, params)
    checkpoints.load_state_strict(net, state, checkpoint)
    freeze(net)
    log.info("loaded %s %s from %s (%s)", kind, arch, checkpoint, info["format"])
    return net, info
