"""Name → constructor registries for classifiers, purifiers and attacks.

Modules register themselves with a decorator; `load_builtins()` imports every module of the
three packages so the registries are complete without a hand-kept import list.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Callable


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorate(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> Callable[..., Any]:
        load_builtins()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {known}")
        return self._entries[name]

    def build(self, name: str, **params: Any) -> Any:
        ctor = self.get(name)
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
