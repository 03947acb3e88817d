"""The concurrency whole-slide inference runs on: bounded pipelines, one slide handle per reader thread,
worker processes that start quickly."""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

import numpy as np

from pointnuc.io.slide import TIFF_SUFFIXES, RegionReader, Slide, SlideLike, open_slide

T = TypeVar("T")
R = TypeVar("R")


def bounded(items: Iterable[T], fn: Callable[[T], R], pool: Executor, ahead: int) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in order, with at most ``ahead`` calls running or waiting in ``pool``."""
    pending: collections.deque[tuple[T, Future[R]]] = collections.deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= ahead:
            it, fut = pending.popleft()
            yield it, fut.result()
    while pending:
        it, fut = pending.popleft()
        yield it, fut.result()


def batches(it: Iterable[T], n: int) -> Iterator[list[T]]:
    """Lists of ``n`` items (the last one shorter)."""
    batch: list[T] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


@contextlib.contextmanager
def main_not_reimported() -> Iterator[None]:
    """Worker processes started inside this block do not re-run the main script's imports.

    A spawned process imports the parent's ``__main__`` (a script: by its path) before it
    unpickles anything; a script that imports torch would cost every polygon worker
    seconds and hundreds of MiB. The jobs only need :mod:`pointnuc.infer.polygons`.
    """
    main = sys.modules.get("__main__")
    saved: dict[str, Any] = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


class ThreadSlides:
    """One slide handle per reader thread (tiffslide handles are not shared across threads)."""

    def __init__(self, slide: SlideLike) -> None:
        self.slide = slide
        self.local = threading.local()
        self.opened: list[Slide] = []
        self.lock = threading.Lock()
        # a tiffslide-backed Slide gets one handle per thread; anything else (a plain image
        # held in memory, a test double) is shared behind a lock
        self.reopen = isinstance(slide, Slide) and slide.path.suffix.lower() in TIFF_SUFFIXES

    def get(self) -> RegionReader:
        """This thread's handle on the slide."""
        s = getattr(self.local, "slide", None)
        if s is None:
            if self.reopen:
                assert isinstance(self.slide, Slide)
                s = open_slide(self.slide.path, self.slide.pixel_size_um)
                with self.lock:
                    self.opened.append(s)
            else:
                s = _Locked(self.slide, self.lock)
            self.local.slide = s
        return s

    def close(self) -> None:
        for s in self.opened:
            s.close()


class _Locked:
    """A slide whose regions are read by one thread at a time."""

    def __init__(self, slide: RegionReader, lock: threading.Lock) -> None:
        self.slide, self.lock = slide, lock

    def read_region(self, x: float, y: float, w: float, h: float, downsample: float = 1.0) -> np.ndarray:
        with self.lock:
            return self.slide.read_region(x, y, w, h, downsample=downsample)
