"""SIGTERM in the driver's process (`advpure stop`, `ray job stop`, a batch scheduler)."""
from __future__ import annotations

import signal
import threading


class Terminated(BaseException):
    """SIGTERM reached the driver: it unwinds the job like Ctrl-C — workers killed, lease
    released, committed shards kept (a BaseException, so no `except Exception` swallows it)."""


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum} (SIGTERM)")


def handle_sigterm() -> None:
    """Make SIGTERM raise Terminated. The driver calls it again after ray.init, which installs
    its own handler (sys.exit) behind a C++ one that prints a stack dump into the job's log."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
