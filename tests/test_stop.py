"""Stopping on SIGINT/SIGTERM: an interrupt whose exception Python swallows still stops the command."""

from __future__ import annotations

import os
import signal
import sys

import pytest

POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@POSIX
def test_an_interrupt_swallowed_in_a_destructor_is_raised_by_the_next_check(monkeypatch) -> None:
    from pointnuc.cli.stop import stop_on_signals
    from pointnuc.errors import Interrupted, raise_if_stop_requested

    swallowed: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_value))

    class Dying:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, in __del__: its exception is ignored
            for _ in range(1000):
                pass

    with pytest.raises(Interrupted) as info, stop_on_signals():
        Dying()
        assert any(isinstance(e, Interrupted) for e in swallowed)  # lost, as in a garbage-collected iterator
        raise_if_stop_requested()  # what the training and segment loops call between steps
    assert info.value.signum == signal.SIGINT
    raise_if_stop_requested()  # the command has ended: nothing pending
