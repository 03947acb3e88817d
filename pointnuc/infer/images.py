"""Segmenting the images a run plans (:mod:`pointnuc.infer.project`): each one by
:func:`pointnuc.infer.wsi.segment_slide` and kept, one at a time or, for small images on the CPU,
side by side (:func:`images_at_once`): in threads, or from :data:`PROCESS_MIN_IMAGES` images on in
worker processes (:class:`ImageWorkers`), whose Python work does not wait for one lock."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pointnuc.config import MIN_NUCLEUS_AREA_UM2
from pointnuc.errors import PointnucError, is_user_error, raise_if_stop_requested
from pointnuc.infer.project import ImagePlan, SegmentSummary, keep_result
from pointnuc.io.base import NucleusObject

if TYPE_CHECKING:
    import torch

    from pointnuc.infer.wsi import SlideResult
    from pointnuc.models.bundle import ModelInfo

log = logging.getLogger(__name__)

#: side by side images go to worker processes from this many images on: two processes are 1.3x two threads
#: on 14 MO images (0.49 vs 0.65 s an image, 2 cores: the threads' Python steps wait for one another), and their
#: start (~2 s: each imports torch and loads the model) is paid back after about six images
PROCESS_MIN_IMAGES = 6
#: images handed out ahead per side-by-side worker: results are taken in order, and with one ahead a worker that
#: finished two small images waited for a slower one's turn before it got a third (on 14 MO images of one size it
#: made no measurable difference: 0.49-0.52 s an image either way)
QUEUED_PER_WORKER = 4
#: the thread counts of OpenMP and the math libraries, set for each worker before it starts
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def images_at_once(todo: Sequence[ImagePlan], info: ModelInfo, dev: torch.device) -> int:
    """How many images to segment side by side: on the CPU, when every image to do fits one window of the
    network (:data:`pointnuc.infer.wsi.DEFAULT_TILE`), two, each with half of torch's threads, so that one
    image's single-threaded steps (colour statistics, reading, instances, outlines) run while the other's
    network uses the cores; otherwise (a GPU, larger slides, one core) one at a time."""
    import torch

    from pointnuc.infer.slide_tiles import EDGE_PX, working_halo
    from pointnuc.infer.wsi import DEFAULT_TILE

    largest = DEFAULT_TILE["cpu"]
    assert isinstance(largest, tuple)
    if dev.type != "cpu" or len(todo) < 2 or torch.get_num_threads() < 2:
        return 1
    halo = working_halo(info)
    for p in todo:
        assert p.pixel_size_um is not None
        ds = info.pixel_size_um / p.pixel_size_um
        if p.region is None:  # (the window holds the image and a white edge: slide_tiles.one_window)
            side = max(p.image.width, p.image.height) / ds + 2 * EDGE_PX
        else:  # (at most: the region's box, its margin and its context, each a halo on both sides)
            x0, y0, x1, y1 = p.region.bounds
            side = max(x1 - x0, y1 - y0) / ds + 4 * halo
        if side > largest[1]:
            return 1
    return 2


def segment_images(todo: Sequence[ImagePlan], net: torch.nn.Module | None, info: ModelInfo, dev: torch.device, *,
                   batch_size: int | None, progress: bool, tta: bool, summary: SegmentSummary,
                   min_area_um2: float, workers: ImageWorkers | None = None) -> Iterator[SlideResult | None]:
    """Each image of ``todo`` segmented and kept (:func:`segment_one`), in order; ``summary.images_at_once`` of
    them side by side, each on its own copy of the network: in ``workers`` when given, else in threads; one
    progress bar over the images. ``net`` may be None only with ``workers``."""
    from itertools import islice

    from pointnuc.progress import progress_bar

    n = summary.images_at_once
    if n <= 1 and workers is None:
        assert net is not None
        for plan in todo:
            yield segment_one(plan, net, info, dev, batch_size=batch_size, progress=progress, tta=tta,
                              summary=summary, min_area_um2=min_area_um2)
        return
    side: ImageWorkers | _ImageThreads
    if workers is not None:
        side = workers
    else:
        assert net is not None
        side = _ImageThreads(net, n, info, dev, summary=summary)
    job = {"batch_size": batch_size, "tta": tta, "min_area_um2": min_area_um2}
    bar = progress_bar(len(todo), "segment", "image", enabled=progress)
    pending: list[Future[Any]] = []
    try:
        it = iter(todo)
        # several images queued per worker: one slow image does not leave the other workers waiting for its turn
        pending = [side.submit(plan, **job) for plan in islice(it, QUEUED_PER_WORKER * n)]
        while pending:
            raise_if_stop_requested()
            res = side.result(pending.pop(0), summary)
            nxt = next(it, None)
            if nxt is not None:
                pending.append(side.submit(nxt, **job))
            bar.update(1)
            yield res
    finally:
        for f in pending:
            f.cancel()
        if workers is None:
            side.close()  # (the caller closes the workers it started)
        bar.close()


class _ImageThreads:
    """``n`` images side by side in threads, each with its own copy of the network and ``1/n`` of torch's
    threads (given back by :meth:`close`)."""

    def __init__(self, net: torch.nn.Module, n: int, info: ModelInfo, dev: torch.device, *,
                 summary: SegmentSummary) -> None:
        import copy
        import queue
        from concurrent.futures import ThreadPoolExecutor

        import torch

        self.nets: queue.Queue[torch.nn.Module] = queue.Queue()
        for k in range(n):
            self.nets.put(net if k == 0 else copy.deepcopy(net))
        self.info, self.dev, self.summary = info, dev, summary
        self.threads = torch.get_num_threads()
        torch.set_num_threads(max(1, self.threads // n))
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="pointnuc-image")

    def _one(self, plan: ImagePlan, **kw: Any) -> SlideResult | None:
        own = self.nets.get()
        try:
            return segment_one(plan, own, self.info, self.dev, progress=False, summary=self.summary, **kw)
        finally:
            self.nets.put(own)

    def submit(self, plan: ImagePlan, **kw: Any) -> Future[SlideResult | None]:
        return self.pool.submit(self._one, plan, **kw)

    @staticmethod
    def result(fut: Future[SlideResult | None], summary: SegmentSummary) -> SlideResult | None:
        return fut.result()  # (segment_one filled ``summary`` itself)

    def close(self) -> None:
        import torch

        self.pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self.threads)


class ImageWorkers:
    """``n`` worker processes that each segment and keep whole images with their own copy of the model
    (:func:`segment_one`), on ``threads`` torch threads each. Spawned (no fork of a process that may hold a
    JVM or OpenMP threads); what they log is logged again here, in order, with each image's result."""

    def __init__(self, model_dir: Path, n: int, threads: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, wait

        from pointnuc.infer.pools import main_not_reimported

        t0 = time.perf_counter()
        context = multiprocessing.get_context("spawn")
        started = context.Barrier(n)  # (each ready job waits at it: one per worker, so every worker has started)
        self.pool = ProcessPoolExecutor(n, mp_context=context, initializer=_init_worker,
                                        initargs=(str(model_dir), threads, logging.getLogger("pointnuc").getEffectiveLevel(),
                                                  started))
        saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
        try:
            try:
                os.environ.update({k: str(threads) for k in THREAD_VARIABLES})  # (read as a worker starts)
                with main_not_reimported():
                    ready = [self.pool.submit(_worker_ready) for _ in range(n)]
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            wait(ready)
            for f in ready:
                f.result()  # (a worker that cannot start says why here)
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.perf_counter() - t0

    def submit(self, plan: ImagePlan, **kw: Any) -> Future[Any]:
        """Segment and keep ``plan``'s image in a worker (:func:`segment_one`'s keywords)."""
        return self.pool.submit(_worker_segment, plan, **kw)

    @staticmethod
    def result(fut: Future[Any], summary: SegmentSummary) -> SlideResult | None:
        """A submitted image's result, its log lines logged here and its figures added to ``summary``."""
        res, part, records = fut.result()
        for rec in records:
            logging.getLogger(rec.name).handle(rec)
        summary.seconds.update(part.seconds)
        summary.tiles.update(part.tiles)
        summary.failed.update(part.failed)
        return res

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


_WORKER: dict[str, Any] = {}


class _Kept(logging.Handler):
    """A worker's log records, kept to be sent with the image's result."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None  # (the arguments need not pickle)
        record.exc_info = record.exc_text = None
        self.records.append(record)


def _init_worker(model_dir: str, threads: int, level: int, started: Any) -> None:
    """Worker process start: its threads, its log kept for the parent, the model loaded as ``segment`` loads it.
    Ctrl-C is the parent's to handle: it stops handing out images and lets the running ones end."""
    import signal

    import torch

    from pointnuc.infer.polygons import preload
    from pointnuc.models.bundle import load_info, load_network
    from pointnuc.models.net import fuse_batchnorm

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    kept = _Kept()
    root = logging.getLogger("pointnuc")
    root.handlers[:] = [kept]
    root.setLevel(level)
    root.propagate = False
    info = load_info(Path(model_dir))
    net = fuse_batchnorm(load_network(Path(model_dir), "segmenter", info))
    _WORKER.update(info=info, net=net.eval(), kept=kept, started=started)
    preload(info.config.segmentation.instance_method)


def _worker_ready() -> None:
    """One per worker before the images are handed out: it returns once every worker has started and loaded the
    model (a worker that took two would have left the other's start in the images' time: a core idle for 1-2 s)."""
    _WORKER["started"].wait(timeout=600)


def _worker_segment(plan: ImagePlan, *, batch_size: int | None, tta: bool,
                    min_area_um2: float) -> tuple[SlideResult | None, SegmentSummary, list[logging.LogRecord]]:
    """One image in a worker: (its result, a summary with its seconds/tiles/failure, its log records)."""
    import torch

    kept: _Kept = _WORKER["kept"]
    kept.records = []
    part = SegmentSummary(model_dir=Path(), results_dir=Path())
    res = segment_one(plan, _WORKER["net"], _WORKER["info"], torch.device("cpu"), batch_size=batch_size,
                      progress=False, tta=tta, summary=part, min_area_um2=min_area_um2)
    return res, part, kept.records


def segment_one(plan: ImagePlan, net: torch.nn.Module, info: ModelInfo, dev: torch.device, *,
                batch_size: int | None, progress: bool, tta: bool, summary: SegmentSummary,
                min_area_um2: float = MIN_NUCLEUS_AREA_UM2) -> SlideResult | None:
    """Segment one planned image and keep its result; None (and ``summary.failed``) when it fails."""
    from pointnuc.infer.wsi import segment_slide
    from pointnuc.io.slide import open_slide

    name, px = plan.image.name, plan.pixel_size_um
    assert px is not None
    log.info("%s: %d x %d px at %g µm/px, segmented at the model's %g µm/px", name, plan.image.width,
             plan.image.height, px, info.pixel_size_um)
    t0 = time.time()
    try:
        with open_slide(plan.image.path, pixel_size_um=px) as slide:
            res = segment_slide(slide, net, info, region=plan.region, device=dev, batch_size=batch_size,
                                progress=progress, name=name, tta=tta, min_area_um2=min_area_um2)
    except (PointnucError, OSError) as err:  # the user's to fix: this image fails, the others go on
        if not is_user_error(err):
            raise  # a bug: it stops the run with its traceback (pointnuc.errors)
        summary.failed[name] = f"{err.__class__.__name__}: {err}"
        log.error("%s failed: %s", name, err)
        return None
    seconds = time.time() - t0
    summary.seconds[name] = seconds
    summary.tiles[name] = (res.n_tiles, res.n_tiles_total)
    if res.n_tiles == 0:
        log.warning("%s: no tissue found: nothing was looked at", name)
    res.nuclei = drop_small(res.nuclei, plan, min_area_um2)
    res.n_nuclei = len(res.nuclei)
    keep_result(plan, res.nuclei, seconds=seconds, tiles=(res.n_tiles, res.n_tiles_total), device=str(dev))
    return res


def drop_small(nuclei: list[NucleusObject], plan: ImagePlan, min_area_um2: float) -> list[NucleusObject]:
    """The nuclei whose part inside the image (and area) is at least ``min_area_um2``: segmentation dropped the
    smaller ones already; this catches the few an image's edge cuts below it when they are written."""
    import shapely

    from pointnuc.geometry import clip_polygons, object_area

    if not nuclei or min_area_um2 <= 0:
        return nuclei
    assert plan.pixel_size_um is not None
    clipped = clip_polygons([n.polygon for n in nuclei], object_area(plan.image.width, plan.image.height, plan.region))
    area = [0.0 if c is None else float(shapely.area(c)) * plan.pixel_size_um**2 for c in clipped]
    return [n for n, a in zip(nuclei, area) if a >= min_area_um2]
