"""How a command stops on SIGINT (Ctrl-C) or SIGTERM: one line that says how to continue.

Kept apart from :mod:`pointnuc.cli` so that subcommands can note what to say (``train``: the
exact resume command) without importing the group that registers them.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from pointnuc.errors import Interrupted, request_stop

_RESUME = "pointnuc.resume"  #: ctx.meta key: the command that continues the training `train` started


def note_model_dir(out: Path, resume_command: str) -> None:
    """Tell the interrupt message the command that continues ``train`` in ``out`` (it works
    from the moment the folder is chosen: ``--resume`` starts a missing or empty folder afresh)."""
    click.get_current_context().meta[_RESUME] = resume_command


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, once: later ones are
    ignored while the command cleans up (a restore must not be cut short)."""
    if sys.platform == "win32" or not hasattr(signal, "SIGTERM"):
        yield
        return
    stopping = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            request_stop(signum)  # (loops raise it again where this exception is swallowed)
            raise Interrupted(signum)

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (an embedding application): leave its signals alone
        yield
        return
    try:
        yield
    finally:
        request_stop(None)
        for s, h in previous.items():
            signal.signal(s, h)


def interrupt_message(ctx: click.Context, signum: int) -> str:
    """The one line printed when SIGINT/SIGTERM stopped a command: what to run to continue."""
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    sub = ctx.invoked_subcommand
    if sub == "train":
        resume = ctx.meta.get(_RESUME)
        if resume:
            return f"{what}; to continue where training stopped, run: {resume}"
        return f"{what} before training started; nothing was written: run the same command again"
    if sub == "segment":
        return f"{what}; the images finished so far are kept: run the same command again to continue"
    return what
