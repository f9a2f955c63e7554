"""Name → constructor registries for classifiers, purifiers and attacks.

Modules register themselves with a decorator; `load_builtins()` imports every module of the
three packages so the registries are complete without a hand-kept import list.

Attacks and classifiers register `build(**params)`. A purifier registers its settings class
too, `@PURIFIERS.register("adp", settings=ADPSettings)` on `build(checkpoint, settings)`:
its params split into the checkpoint (the key named by `checkpoint`, "checkpoint" unless
said otherwise; None for a purifier without one) and the settings (`from_params`).
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Callable, Mapping, NamedTuple


class SettingsEntry(NamedTuple):
    settings: Any            # a PurifierSettings subclass
    checkpoint: str | None   # the params key of the checkpoint; None: takes none


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}
        self._settings: dict[str, SettingsEntry] = {}

    def register(self, name: str, *, settings: Any = None, checkpoint: str | None = "checkpoint"
                 ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator. With `settings`, the builder is `build(checkpoint, settings)`."""
        def decorate(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            if settings is not None:
                self._settings[name] = SettingsEntry(settings, checkpoint)
            return obj

        return decorate

    def settings_entry(self, name: str) -> SettingsEntry | None:
        """The settings class and checkpoint key of `name`, None for a `build(**params)` entry."""
        self.get(name)
        return self._settings.get(name)

    def parse(self, name: str, params: Mapping[str, Any], where: str) -> tuple[str | None, Any]:
        """params → (checkpoint, settings) for a settings entry; errors (SettingsError, a
        ValueError) name `where` and the key, e.g. "purifier.params.sigma"."""
        from pipeline.purifiers.base import SettingsError

        entry = self.settings_entry(name)
        if entry is None:
            raise TypeError(f"{self.kind} {name!r} takes keyword params, not settings")
        rest = dict(params)
        checkpoint = rest.pop(entry.checkpoint, None) if entry.checkpoint else None
        if entry.checkpoint and checkpoint is None:
            raise SettingsError(where, entry.checkpoint, "required (the checkpoint to load)")
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise SettingsError(where, entry.checkpoint, f"expected a path or URL, got {checkpoint!r}")
        return checkpoint, entry.settings.from_params(rest, where)

    def get(self, name: str) -> Callable[..., Any]:
        load_builtins()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {known}")
        return self._entries[name]

    def build(self, name: str, **params: Any) -> Any:
        ctor = self.get(name)
        if name in self._settings:
            return ctor(*self.parse(name, params, f"{self.kind} {name!r} params"))
        try:
            inspect.signature(ctor).bind(**params)
        except TypeError as err:
            raise TypeError(f"{self.kind} {name!r}: bad parameters {sorted(params)}: {err}") from None
        return ctor(**params)

    def names(self) -> list[str]:
        load_builtins()
        return sorted(self._entries)

    def describe(self, name: str) -> str:
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""


CLASSIFIERS = Registry("classifier")
PURIFIERS = Registry("purifier")
ATTACKS = Registry("attack")

_loaded = False


def load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package in ("pipeline.classifiers", "pipeline.purifiers", "pipeline.attacks"):
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")
