"""SIGTERM in the driver's process (pipeline/run/signals.py): a Terminated that code swallowed
where the signal landed is raised again at the scheduler's next poll."""
import os
import signal

import pytest

from pipeline.run import signals


@pytest.fixture
def sigterm_handler():
    old = signal.getsignal(signal.SIGTERM)
    signals.handle_sigterm()
    yield
    signals.handled()
    signal.signal(signal.SIGTERM, old)


def test_a_swallowed_sigterm_is_raised_again(sigterm_handler):
    signals.raise_if_terminated()   # nothing pending
    try:   # as a Cython module's import patching collections.abc: the exception is printed and dropped
        os.kill(os.getpid(), signal.SIGTERM)
    except BaseException:  # noqa: BLE001
        pass
    with pytest.raises(signals.Terminated, match="SIGTERM"):
        signals.raise_if_terminated()
    signals.handled()               # the command ended on it: the next run starts clean
    signals.raise_if_terminated()
