"""Progress for long work: a tqdm bar on a terminal, plain log lines otherwise.

A bar redraws itself with ``\\r``; in a log file or a cluster job's output that becomes
one endless line. So when stderr is not a terminal, progress is a log line every
:data:`LOG_EVERY_S` seconds (and at the end) with the count, rate and time left.

A run of several stages (training) shows one bar for all of them (:func:`overall_progress`): while it
is open, each stage's :func:`progress_bar` advances that bar instead of opening its own.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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

    def emit(self) -> None:
        """A line now (e.g. when a stage of an overall run ends)."""
        self.last = time.monotonic()
        self._emit(self.last)

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
    """A tqdm bar when stderr is a terminal, :class:`LogProgress` lines when it is not, nothing when not ``enabled``.

    Inside :func:`overall_progress` (same ``unit``): the stage ``desc`` of the one overall bar instead.
    """
    if not enabled:
        return _Off()
    if _overall is not None and unit == _overall.unit:
        return _overall.stage(desc, total)
    return _new_bar(total, desc, unit, leave)


def _new_bar(total: int, desc: str, unit: str, leave: bool = True) -> Progress:
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)
    return LogProgress(total, desc, unit)


class OverallProgress:
    """One bar for a run of named stages, each a number of ``unit`` (e.g. batches).

    The total starts as the plan's estimates; when a stage starts, its estimate is replaced by the work
    it reports, planned stages before it that never started (done before a resume) are dropped, and a
    stage that ends early gives its unused work back, so the total and the time left follow the run.
    The bar's postfix names the stage (and what the stage adds, e.g. its loss); without a terminal, a
    log line also marks the end of each stage.
    """

    def __init__(self, plan: Sequence[tuple[str, int]], desc: str, unit: str) -> None:
        self.plan = {name: max(0, int(n)) for name, n in plan}
        self.desc, self.unit = desc, unit
        self.done = 0
        self.bar = _new_bar(sum(self.plan.values()), desc, unit)

    @property
    def total(self) -> int:
        return self.done + sum(self.plan.values())

    def _set_total(self) -> None:
        self.bar.total = self.total  # type: ignore[attr-defined]
        refresh = getattr(self.bar, "refresh", None)
        if refresh is not None:
            refresh()

    def stage(self, name: str, total: int) -> Progress:
        """The bar as stage ``name`` with ``total`` units of work left sees it."""
        names = list(self.plan)
        if name in self.plan:
            for skipped in names[: names.index(name)]:
                del self.plan[skipped]
        self.plan[name] = max(0, int(total))
        self._set_total()
        self.bar.set_postfix(stage=name)
        return _Stage(self, name)

    def close(self) -> None:
        self.plan.clear()
        self._set_total()
        self.bar.close()


class _Stage:
    """One stage's view of an :class:`OverallProgress`."""

    def __init__(self, overall: OverallProgress, name: str) -> None:
        self.overall, self.name = overall, name

    def update(self, n: int = 1) -> None:
        o = self.overall
        n = min(n, o.plan.get(self.name, 0))
        o.plan[self.name] = o.plan.get(self.name, 0) - n
        o.done += n
        o.bar.update(n)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        self.overall.bar.set_postfix({"stage": self.name, **(ordered_dict or {}), **kwargs}, refresh=refresh)

    def close(self) -> None:
        o = self.overall
        if self.name in o.plan:
            del o.plan[self.name]  # a stage that stopped early: what it did not do is no longer expected
            o._set_total()
            if isinstance(o.bar, LogProgress):
                o.bar.set_postfix(stage=f"{self.name} done")
                o.bar.emit()


_overall: OverallProgress | None = None


@contextmanager
def overall_progress(plan: Sequence[tuple[str, int]], desc: str, unit: str, *, enabled: bool = True
                     ) -> Iterator[OverallProgress | None]:
    """While open, every :func:`progress_bar` of ``unit`` is a stage of one bar over ``plan``
    ((stage name, estimated units) in order; stages not in it are added when they start)."""
    global _overall
    if not enabled or _overall is not None:
        yield None
        return
    _overall = OverallProgress(plan, desc, unit)
    try:
        yield _overall
    finally:
        _overall.close()
        _overall = None
