"""The README as a new user reads it: every registered method is in its table, and the
commands it shows after `make demo` work from a fresh shell (advpure is in .venv, which
`make demo` does not activate)."""
import re

from pipeline.registry import ATTACKS, CLASSIFIERS, PURIFIERS
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_methods_table_names_every_registered_method():
    table = _section("Methods")
    missing = [n for reg in (CLASSIFIERS, PURIFIERS, ATTACKS) for n in reg.names() if f"`{n}`" not in table]
    assert not missing, f"registered but not in the README's Methods table: {missing}"


def test_advpure_is_on_the_path_before_the_readme_calls_it():
    """Each bare `advpure ...` command comes after the line that activates .venv."""
    activate = README.find(". .venv/bin/activate")
    assert activate >= 0, "the README never activates .venv, where make demo installs advpure"
    first_bare = min(m.start() for m in re.finditer(r"(?m)^advpure |[`(]advpure ", README))
    assert activate < first_bare, README[first_bare - 200:first_bare + 80]


def test_plan_example_on_a_fresh_clone_says_how_to_make_the_model(tmp_path, monkeypatch, capsys):
    from pipeline import cli

    example = re.search(r"advpure plan (configs/\S+\.yaml)", README).group(1)
    monkeypatch.chdir(tmp_path)                                  # no runs/models here: a fresh clone
    assert cli.main(["plan", str(ROOT / example)]) == 2
    err = capsys.readouterr().err
    assert "file not found: runs/models/mnist_cnn.pt" in err
    assert "python jobs/train_classifier.py --data mnist --out runs/models/mnist_cnn.pt" in err


def test_a_missing_file_without_a_recipe_says_where_it_was_looked_for(tmp_path, monkeypatch, capsys):
    from pipeline import cli

    config = tmp_path / "job.yaml"
    config.write_text((ROOT / "configs" / "adp_mnist_cpu.yaml").read_text().replace("--out runs/models/mnist_cnn.pt",
                                                                                     "--out elsewhere.pt"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plan", str(config)]) == 2
    err = capsys.readouterr().err
    assert "file not found: runs/models/mnist_cnn.pt\n" in err
    assert f"  check the path (from {tmp_path}), or make the file first" in err
