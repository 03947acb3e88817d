"""Progress for long work: a tqdm bar on a terminal, plain log lines otherwise.

A bar redraws itself with ``\\r``; in a log file or a cluster job's output that becomes
one endless line. So when stderr is not a terminal, progress is a log line every
:data:`LOG_EVERY_S` seconds (and at the end) with the count, rate and time left.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Protocol

log = logging.getLogger("pointnuc.progress")

LOG_EVERY_S = 30.0  #: seconds between progress lines when stderr is not a terminal


class Progress(Protocol):
    """The part of tqdm's interface pointnuc uses."""

    def update(self, n: int = 1) -> Any: ...
    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> Any: ...
    def close(self) -> None: ...


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class LogProgress:
    """Progress as log lines: ``desc: 40/100 batch (40 %), 1.2 min, about 1.8 min left, loss=0.31``."""

    def __init__(self, total: int, desc: str, unit: str, every_s: float = LOG_EVERY_S) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = 0
        self.postfix = ""
        self.t0 = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._emit(now)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def _emit(self, now: float) -> None:
        elapsed = now - self.t0
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f} %)"
        parts.append(_minutes(elapsed))
        if 0 < self.n < self.total:
            parts.append(f"about {_minutes(elapsed * (self.total - self.n) / self.n)} left")
        if self.postfix:
            parts.append(self.postfix)
        log.info(", ".join(parts))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n:
                self._emit(time.monotonic())


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str, *, enabled: bool = True, leave: bool = True) -> Progress:
    """A tqdm bar when stderr is a terminal, :class:`LogProgress` lines when it is not, nothing when not ``enabled``."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)
    return LogProgress(total, desc, unit)
