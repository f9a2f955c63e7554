"""Optional dependencies: every runtime extra of pyproject.toml is known to pipeline.extras,
and a command run without its extra's package ends in one line naming what to install
(exit 2), not an import traceback. The package's absence is simulated in a subprocess by
blocking its import (sys.modules[name] = None)."""
import ast
import re
import subprocess
import sys

import pytest

from pipeline import extras
from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib")


def _adjoint_config(tmp) -> list[str]:
    """A DiffPure job attacked with the adjoint gradient (files exist; their contents are not read
    before the settings are checked)."""
    cfg = tmp / "diffpure.yaml"
    ckpt = str(ROOT / "pyproject.toml")
    cfg.write_text(f"""job: {{name: x, output: {tmp / 'out'}}}
data: {{shards: "{tmp / 'shard-000000.tar'}"}}
classifier: {{name: small_cnn, params: {{checkpoint: {ckpt}}}}}
purifier: {{name: diffpure, params: {{checkpoint: {ckpt}, gradient_method: adjoint}}}}
attacks: [{{name: pgd, params: {{eps: 0.1}}, gradient: full}}]
""")
    return ["run", str(cfg)]


# the command each runtime extra enables, as a user would run it without the extra
COMMANDS = {"report": lambda tmp: ["report", "runs/no-such-run", "--format", "html"],
            "diffpure": _adjoint_config}
TEST_ONLY = "test"   # the test suite's extra: nothing under pipeline/ may need it


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _module(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].replace("-", "_").lower()


def test_every_runtime_extra_is_known():
    declared = {(_module(r), name) for name, reqs in _project()["optional-dependencies"].items()
                if name != TEST_ONLY for r in reqs}
    assert declared == set(extras.OPTIONAL.items())
    assert set(extras.USES) == set(COMMANDS) == {extra for _, extra in declared}


@pytest.mark.parametrize("module", sorted(extras.OPTIONAL))
def test_missing_extra_is_one_line_exit_2(module, tmp_path):
    extra = extras.OPTIONAL[module]
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from pipeline.cli import main\n"
            f"sys.exit(main({COMMANDS[extra](tmp_path)!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"pip install 'advpure[{extra}]'" in lines[0] and module in lines[0]


def _imported_modules() -> set[str]:
    found = set()
    for path in (ROOT / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found


def test_library_needs_nothing_from_the_test_extra():
    project = _project()
    runtime = {_module(r) for r in project["dependencies"]} | set(extras.OPTIONAL)
    test_only = {_module(r) for r in project["optional-dependencies"][TEST_ONLY]} - runtime
    assert not test_only & _imported_modules()
