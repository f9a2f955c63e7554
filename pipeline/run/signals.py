"""SIGTERM in the driver's process (`advpure stop`, `ray job stop`, a batch scheduler)."""
from __future__ import annotations

import signal
import threading


class Terminated(BaseException):
    """SIGTERM reached the driver: it unwinds the job like Ctrl-C — workers killed, lease
    released, committed shards kept (a BaseException, so no `except Exception` swallows it)."""


# SIGTERMs received and not yet handled: a signal that lands in code which swallows exceptions
# (a Cython module's import patching collections.abc, a __del__) loses its Terminated there,
# so the scheduler's loop asks again (`raise_if_terminated`)
_pending: list[int] = []


def _raise_terminated(signum, frame):
    _pending.append(signum)
    raise Terminated(f"signal {signum} (SIGTERM)")


def raise_if_terminated() -> None:
    """Raise Terminated if a SIGTERM arrived whose exception was swallowed where it landed."""
    if _pending:
        raise Terminated(f"signal {_pending[0]} (SIGTERM)")


def handled() -> None:
    """The Terminated was handled (the command ends): nothing is pending any more."""
    _pending.clear()


def handle_sigterm() -> None:
    """Make SIGTERM raise Terminated. The driver calls it again after ray.init, which installs
    its own handler (sys.exit) behind a C++ one that prints a stack dump into the job's log."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
