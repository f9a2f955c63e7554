"""SIGTERM's one line names what was stopped: a job (run, demo) resumes; other commands
just did not finish (no claim of a lease or workers they never had). The real signal on a
real driver is in tests/test_driver_signals.py."""
import argparse

import pytest

from pipeline import cli
from pipeline.run.signals import Terminated


def _stopped(command: str) -> argparse.Namespace:
    def fn(args):
        raise Terminated("signal 15 (SIGTERM)")
    return argparse.Namespace(command=command, fn=fn)


@pytest.mark.parametrize("command, says", [("run", "committed shards are kept and the same command resumes"),
                                           ("report", "stopped (SIGTERM): report did not finish")])
def test_sigterm_line_fits_the_command(command, says, capsys):
    assert cli._call(_stopped(command)) == 143
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    if command != "run":
        assert "lease" not in err


def test_a_sigterm_wrapped_by_ray_is_still_ours(capsys):
    def fn(args):
        try:
            raise Terminated("signal 15")
        except Terminated as err:   # Ray's Cython layer re-raises it as SystemError
            raise SystemError("returned a result with an exception set") from err
    assert cli._call(argparse.Namespace(command="run", fn=fn)) == 143
    with pytest.raises(SystemError):
        cli._call(argparse.Namespace(command="run", fn=lambda a: (_ for _ in ()).throw(SystemError("other"))))
