"""Optional dependencies (pyproject.toml's `[project.optional-dependencies]`): a command
that needs one checks for it before any work and, when it is missing, says in one line
what to install instead of ending in an import traceback."""
from __future__ import annotations

import importlib

# module → the extra that installs it; every runtime extra of pyproject.toml is listed here
# (tests/test_extras.py checks both ways). The `test` extra is for the test suite only.
OPTIONAL = {"matplotlib": "report", "torchsde": "diffpure"}
# what each extra enables, for the message
USES = {"report": "advpure report --format html", "diffpure": "the diffpure purifier's gradient_method 'adjoint'"}


class MissingExtra(RuntimeError):
    """An optional dependency is not installed (the message says which extra installs it)."""


def require(module: str) -> None:
    """Raise MissingExtra naming the pip command when `module` cannot be imported."""
    extra = OPTIONAL[module]
    try:
        importlib.import_module(module)   # not find_spec: a broken install fails here too
    except ImportError:
        raise MissingExtra(f"{USES[extra]} needs {module}, which is not installed: "
                           f"pip install 'advpure[{extra}]' (or pip install {module})") from None
