"""The purifier interface, its settings, its capability flags, and the one recipe for
loading frozen networks.

A purifier maps a batch x [N, C, H, W] in [0, 1] to x̂ of the same shape and range. Its
flags say what it is, and so which attack is honest against it:
- stochastic: x̂ depends on random draws (evaluate over R runs, attack with EOT);
- differentiable: autograd through forward() gives the true gradient (full-gradient attack);
- test_time_optimization: forward() runs an inner optimisation (BPDA+EOT, and a check flag).

One pattern for every purifier (ARCHITECTURE.md, "A new purifier"):
- its settings are one frozen dataclass, `XSettings(PurifierSettings)`: typed fields with
  defaults, documented once in its docstring, checked in `__post_init__`; `from_params`
  builds it from a YAML mapping and `record()` is what every result records about it;
- the constructor takes the network(s) and the settings, `XPurifier(net, settings)`, and
  reads `self.settings.x`; facts about loaded networks (format, arch) go in `info`;
- flags are class attributes; a flag that depends on a setting (APuDAE: `unrolled` →
  differentiable, `variant` → stochastic) is a read-only property of the subclass;
- the registered builder is `build(checkpoint, settings)`:
  `@PURIFIERS.register("x", settings=XSettings)`; `checkpoint` is its only other argument
  (`checkpoint=None` in `register` for a purifier without one);
- subclasses implement `purify(x, noise) -> Purified`, which returns the images together
  with the network evaluations per row and per-row statistics (no state on the module);
  `forward` is `purify(...).images`;
- randomness only from the `noise` argument (rows keyed by sample and replica), never from
  torch's global generator, so a row's output does not depend on its batch;
- no torch.no_grad()/inference_mode() inside: the caller decides whether gradients flow;
- weights come from `load_frozen` (ours or a published format → strict load → frozen).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import types
import typing
from collections import abc
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Literal, Mapping, NamedTuple, Sequence, TypeVar, Union

import torch
from torch import nn

from pipeline.io import checkpoints
from pipeline.seeding import Noise

log = logging.getLogger(__name__)

S = TypeVar("S", bound="PurifierSettings")
NO_STATS: Mapping[str, torch.Tensor] = MappingProxyType({})


class Purified(NamedTuple):
    """What a purifier returns: the purified batch, its cost, and per-row statistics."""

    images: torch.Tensor  # [N, C, H, W] in [0, 1]
    nfe: int  # network evaluations per row
    stats: Mapping[str, torch.Tensor] = NO_STATS  # name → [N] per-row diagnostic (detached)


# ---------------------------------------------------------------------------------------
# Settings: one frozen, validated dataclass per purifier
# ---------------------------------------------------------------------------------------


class SettingsError(ValueError):
    """A purifier setting that is unknown, of the wrong type or out of range.

    `where` is the dotted key of the settings (e.g. "purifier.params", or the class name
    for settings built in code) and `field` the setting, so the message names
    "purifier.params.sigma".
    """

    def __init__(self, where: str, field: str, problem: str):
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}.{field}: {problem}" if field else f"{where}: {problem}")

    def at(self, where: str) -> "SettingsError":
        return SettingsError(where, self.field, self.problem)


@dataclasses.dataclass(frozen=True)
class PurifierSettings:
    """Base of every purifier's settings: frozen, typed, checked when built.

    Subclasses are `@dataclass(frozen=True)` with a typed default for every field (a field
    without one is required and says so in the docstring). Types are checked (and YAML
    lists made tuples, ints made floats where a float is wanted) before the subclass's
    `__post_init__` checks ranges with `require`; a subclass that defines `__post_init__`
    calls `super().__post_init__()` first.
    """

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(getattr(self, f.name), hints[f.name], type(self).__name__, f.name)
            object.__setattr__(self, f.name, value)

    def require(self, name: str, ok: bool, allowed: str) -> None:
        """Raise a SettingsError naming the field unless ok: "must be {allowed}, got {value}"."""
        if not ok:
            raise SettingsError(type(self).__name__, name, f"must be {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def from_params(cls: type[S], params: Mapping[str, Any], where: str | None = None) -> S:
        """Settings from a YAML mapping; errors name `where` and the key (unknown key with a
        did-you-mean, wrong type, out of range, missing required)."""
        where = where or cls.__name__
        _check_keys(cls, params, where)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in params
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise SettingsError(where, missing[0], "required")
        return _built(lambda: cls(**params), where)

    def replace(self: S, overrides: Mapping[str, Any], where: str | None = None) -> S:
        """A copy with some fields changed (dataclasses.replace), checked as from_params."""
        where = where or type(self).__name__
        _check_keys(type(self), overrides, where)
        return _built(lambda: dataclasses.replace(self, **overrides), where)

    def record(self) -> dict[str, Any]:
        """Every field as plain JSON/YAML values: what results record (and from_params reads back)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _check_keys(cls: type, params: Any, where: str) -> None:
    if not isinstance(params, Mapping):
        raise SettingsError(where, "", f"expected a mapping of settings, got {type(params).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in params:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            allowed = ", ".join(names) or "none"
            raise SettingsError(where, str(key), f"unknown setting{hint} (allowed: {allowed})")


def _built(make: Callable[[], S], where: str) -> S:
    try:
        return make()
    except SettingsError as err:
        raise err.at(where) from None
    except (ValueError, TypeError) as err:  # a subclass check that does not name its field
        raise SettingsError(where, "", str(err)) from None


class FrozenMapping(abc.Mapping):
    """A read-only, hashable copy of a YAML mapping (a settings field such as a network's
    arch params), so settings stay frozen all the way down. `dict(m)` gives a plain copy."""

    def __init__(self, data: Mapping[str, Any]):
        self._data = {str(k): v for k, v in data.items()}

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(json.dumps(self._data, sort_keys=True, default=str))

    def __repr__(self) -> str:
        return repr(self._data)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (dict, abc.Mapping) or tp in (dict, abc.Mapping, Mapping):
        return "a mapping"
    if origin is tuple:
        return "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, name: str) -> Any:
    """value checked against the annotation tp: bool is not an int, an int is a float, a
    list is a tuple, a mapping is copied; anything else raises SettingsError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, where, name)
            except SettingsError:
                pass
        raise SettingsError(where, name, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
            raise SettingsError(where, name, f"must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise SettingsError(where, name, f"expected a list, got {value!r}")
        fixed = [a for a in args if a is not Ellipsis]
        if Ellipsis not in args and len(value) != len(fixed):
            raise SettingsError(where, name, f"expected a list of {len(fixed)}, got {value!r}")
        items = [fixed[0] if Ellipsis in args else fixed[i] for i in range(len(value))]
        return tuple(_coerce(v, t, where, f"{name}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if origin in (dict, abc.Mapping) or tp in (dict, abc.Mapping, Mapping):
        if not isinstance(value, Mapping):
            raise SettingsError(where, name, f"expected a mapping, got {value!r}")
        return value if isinstance(value, FrozenMapping) else FrozenMapping(value)
    if tp is type(None):
        if value is not None:
            raise SettingsError(where, name, f"expected null, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(where, name, f"expected a number, got {value!r}")
        return float(value)
    if tp in (bool, int, str):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise SettingsError(where, name, f"expected {_type_name(tp)}, got {value!r}")
        return value
    raise TypeError(f"{where}.{name}: unsupported settings type {tp}")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------
# The purifier
# ---------------------------------------------------------------------------------------


class Purifier(nn.Module):
    """Base class: flags, settings, the noise check. Subclasses implement `purify`.

    Arguments:
        settings (PurifierSettings | None): the subclass's settings; None = no settings. (Default: None)
        info (Mapping | None): facts about the loaded networks (format, arch, …), recorded
            with the settings. (Default: None)
    """

    stochastic: ClassVar[bool] = False
    differentiable: ClassVar[bool] = True
    test_time_optimization: ClassVar[bool] = False

    def __init__(self, settings: PurifierSettings | None = None, info: Mapping[str, Any] | None = None):
        super().__init__()
        self.settings = settings if settings is not None else PurifierSettings()
        self.info = dict(info or {})

    def purify(self, x: torch.Tensor, noise: Noise | None = None) -> Purified:
        """x [N, C, H, W] in [0, 1] with noise rows N → Purified(x̂ [N, C, H, W], nfe per row, stats)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, noise: Noise | None = None) -> torch.Tensor:
        return self.purify(x, noise).images

    def record(self) -> dict[str, Any]:
        """What every result records about this purifier: its settings and network facts."""
        return {**self.settings.record(), **self.info}

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
    info: dict              # extra facts for Purifier.info, e.g. {"ema": True}; {} if none


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
