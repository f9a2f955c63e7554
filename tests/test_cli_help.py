"""The command's help: every option and argument of every sub-command says what it is, the
top-level description names every command, --version answers, and `list` keeps whole
descriptions."""
import argparse

from pipeline import cli


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_option_and_argument_has_help():
    missing = []
    for name, sub in _subparsers(cli.build_parser()).items():
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help: {missing}"


def test_top_level_description_lists_every_command():
    parser = cli.build_parser()
    described = parser.description
    for name in _subparsers(parser):
        if name in ("status", "logs", "stop"):   # described with submit: "then status, logs and stop"
            assert name in described
        else:
            assert f"\n  {name} " in described, name
    help_text = parser.format_help()
    assert "commands:\n  demo" in help_text   # the layout survives argparse (raw description)


def test_version(capsys):
    try:
        cli.main(["--version"])
    except SystemExit as stop:
        assert stop.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("advpure ") and out.split()[1][0].isdigit()


def test_report_stage_and_format_choices():
    rep = _subparsers(cli.build_parser())["report"]
    actions = {a.dest: a for a in rep._actions}
    assert "table" not in actions["format"].choices
    for fmt in actions["format"].choices:   # each offered format is documented in the help
        assert fmt in actions["format"].help
    assert actions["stage"].default is None and "purify" in actions["stage"].choices


def test_list_prints_whole_descriptions(capsys, monkeypatch):
    from pipeline.registry import PURIFIERS

    monkeypatch.setenv("COLUMNS", "100")
    assert cli.main(["list"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    # langevin_ebm's docstring wraps after "checkpoint from": the rest of the sentence is printed
    first_para = " ".join(PURIFIERS.get("langevin_ebm").__doc__.split("\n\n")[0].split())
    assert first_para in out and not first_para.endswith("from")
