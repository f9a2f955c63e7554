"""The docstring template of attacks and purifiers (ARCHITECTURE.md, "Where an extension goes"):
every registered attack and purifier names its paper with a link, its shapes and nfe, and
lists each argument or setting with its default and whose value it is (the paper's or ours),
so a new one cannot skip it. Textual checks only: nothing is built."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import typing

import pytest

from pipeline.registry import ATTACKS, PURIFIERS

LINK = re.compile(r"arXiv:\d{4}\.\d{4,5}|https?://\S+")
# whose value a setting is: the paper's, ours, or a named source's ("Adam's", "Hill et al.'s")
PROVENANCE = re.compile(r"\b(Paper|Ours|Official code|Reference code)\b|\b[A-Z][\w\-]*(?: et al\.)?'s\b")
ENTRY = re.compile(r"^(\*{0,2}\w+) \(([^)]*)\): ")


def arguments(doc: str) -> dict[str, str]:
    """{name: entry text (its continuation lines joined)} of the docstring's Arguments section."""
    lines = doc.splitlines()
    assert "Arguments:" in lines, "no 'Arguments:' section"
    entries: dict[str, str] = {}
    name, indent = None, None
    for line in lines[lines.index("Arguments:") + 1:]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        m = ENTRY.match(line.strip())
        if depth == indent and m:
            name = m.group(1)
            entries[name] = line.strip()
        elif depth > indent and name is not None:
            entries[name] += " " + line.strip()
        else:
            break
    return entries


def documented_default(entry: str) -> str:
    m = re.search(r"\(Default: (.*)\)\s*$", entry)
    assert m, f"no '(Default: v)' at the end of {entry!r}"
    return m.group(1)


def init_parameters(cls: type) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]


def purifier_class(name: str) -> type:
    return typing.get_type_hints(PURIFIERS.get(name))["return"]


# ---------------------------------------------------------------------------- attacks

@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_docstring_names_paper_threat_model_shapes_and_nfe(name):
    doc = inspect.getdoc(ATTACKS.get(name)) or ""
    paper = next((ln for ln in doc.split("\n\n")[1].splitlines() if ln.startswith("Paper: ")), None)
    assert paper is not None, f"attack {name!r}: the paragraph after the summary starts no 'Paper:' line"
    assert LINK.search(doc.split("Threat model:")[0]), f"attack {name!r}: the paper has no arXiv id or link"
    for section in ("Threat model:", "Shapes: x [B, C, H, W]", "nfe"):
        assert section in doc, f"attack {name!r}: no {section!r} in its docstring"


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_docstring_lists_every_argument_with_its_default_and_provenance(name):
    cls = ATTACKS.get(name)
    entries = arguments(inspect.getdoc(cls) or "")
    params = init_parameters(cls)
    assert set(entries) == {p.name for p in params}, f"attack {name!r}: Arguments {list(entries)} ≠ __init__'s"
    for p in params:
        entry = entries[p.name]
        written = documented_default(entry)
        if p.default is inspect.Parameter.empty:
            assert written == "required", f"{name}.{p.name}: no default in __init__, documented {written!r}"
        else:
            assert ast.literal_eval(written) == p.default, \
                f"{name}.{p.name}: documented {written}, __init__ {p.default!r}"
        assert PROVENANCE.search(entry), f"{name}.{p.name}: say whose value it is (Paper. / Ours. / X's.): {entry!r}"


# ---------------------------------------------------------------------------- purifiers

@pytest.mark.parametrize("name", PURIFIERS.names())
def test_purifier_docstring_names_paper_flags_shapes_nfe_and_stats(name):
    cls = purifier_class(name)
    doc = inspect.getdoc(cls) or ""
    assert LINK.search(doc) or "Paper: none" in doc, f"purifier {name!r}: no arXiv id or link (or 'Paper: none')"
    for flag in (r"stochastic|deterministic", r"differentiable", r"test-time\s+optimisation"):
        assert re.search(flag, doc, re.IGNORECASE), f"purifier {name!r}: its docstring does not say {flag!r}"
    for section in ("Shapes: x [N, C, H, W]", "nfe", "stats"):
        assert section in doc, f"purifier {name!r}: no {section!r} in its docstring"
    entries = arguments(doc)
    missing = [p.name for p in init_parameters(cls) if p.name not in entries]
    assert not missing, f"purifier {name!r}: __init__ arguments {missing} are not in its Arguments"


@pytest.mark.parametrize("name", PURIFIERS.names())
def test_purifier_settings_say_whose_value_each_is(name):
    settings = PURIFIERS.settings_entry(name).settings
    entries = arguments(inspect.getdoc(settings) or "") if dataclasses.fields(settings) else {}
    for f in dataclasses.fields(settings):
        assert f.name in entries, f"{settings.__name__}.{f.name} is not in its Arguments"
        documented_default(entries[f.name])
        assert PROVENANCE.search(entries[f.name]), \
            f"{settings.__name__}.{f.name}: say whose value it is (Paper. / Ours. / X's.): {entries[f.name]!r}"


def test_the_checks_fail_on_a_docstring_that_skips_the_template():
    class Bare:
        """An attack. Arguments: eps."""

        def __init__(self, eps: float, steps: int = 10):
            pass

    with pytest.raises(AssertionError, match="Arguments"):
        arguments(inspect.getdoc(Bare))
    doc = "X.\n\nArguments:\n    eps (float): radius. (Default: required)\n    steps (int): n.\n"
    entries = arguments(doc)
    assert list(entries) == ["eps", "steps"] and not PROVENANCE.search(entries["eps"])
    with pytest.raises(AssertionError, match="Default"):
        documented_default(entries["steps"])
