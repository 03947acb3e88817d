"""Segmenting the images a run plans (:mod:`pointnuc.infer.project`): each one by
:func:`pointnuc.infer.wsi.segment_slide` and kept, one at a time or, for small images on the CPU,
side by side (:func:`images_at_once`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from pointnuc.config import MIN_NUCLEUS_AREA_UM2
from pointnuc.errors import PointnucError, is_user_error, raise_if_stop_requested
from pointnuc.infer.project import ImagePlan, SegmentSummary, keep_result
from pointnuc.io.base import NucleusObject

if TYPE_CHECKING:
    import torch

    from pointnuc.infer.wsi import SlideResult
    from pointnuc.models.bundle import ModelInfo

log = logging.getLogger(__name__)


def images_at_once(todo: Sequence[ImagePlan], info: ModelInfo, dev: torch.device) -> int:
    """How many images to segment side by side: on the CPU, when every image to do fits one window of the
    network (:data:`pointnuc.infer.wsi.DEFAULT_TILE`), two, each with half of torch's threads, so that one
    image's single-threaded steps (colour statistics, reading, instances, outlines) run while the other's
    network uses the cores; otherwise (a GPU, larger slides, one core) one at a time."""
    import torch

    from pointnuc.infer.slide_tiles import working_halo
    from pointnuc.infer.wsi import DEFAULT_TILE

    largest = DEFAULT_TILE["cpu"]
    assert isinstance(largest, tuple)
    if dev.type != "cpu" or len(todo) < 2 or torch.get_num_threads() < 2:
        return 1
    halo = working_halo(info)
    for p in todo:
        assert p.pixel_size_um is not None
        ds = info.pixel_size_um / p.pixel_size_um
        w, h = (p.image.width, p.image.height) if p.region is None else (
            p.region.bounds[2] - p.region.bounds[0], p.region.bounds[3] - p.region.bounds[1])
        if max(w, h) / ds + 2 * halo > largest[1]:  # (the window holds the image and its halo on both sides)
            return 1
    return 2


def segment_images(todo: Sequence[ImagePlan], net: torch.nn.Module, info: ModelInfo, dev: torch.device, *,
                   batch_size: int | None, progress: bool, tta: bool, summary: SegmentSummary,
                   min_area_um2: float) -> Iterator[SlideResult | None]:
    """Each image of ``todo`` segmented and kept (:func:`segment_one`), in order; ``summary.images_at_once`` of
    them side by side (each on its own copy of the network), with one progress bar over the images."""
    import copy
    import queue
    from concurrent.futures import Future, ThreadPoolExecutor
    from itertools import islice

    import torch

    from pointnuc.progress import progress_bar

    n = summary.images_at_once
    if n <= 1:
        for plan in todo:
            yield segment_one(plan, net, info, dev, batch_size=batch_size, progress=progress, tta=tta,
                              summary=summary, min_area_um2=min_area_um2)
        return
    nets: queue.Queue[torch.nn.Module] = queue.Queue()
    for k in range(n):
        nets.put(net if k == 0 else copy.deepcopy(net))

    def one(plan: ImagePlan) -> SlideResult | None:
        own = nets.get()
        try:
            return segment_one(plan, own, info, dev, batch_size=batch_size, progress=False, tta=tta,
                               summary=summary, min_area_um2=min_area_um2)
        finally:
            nets.put(own)

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // n))
    bar = progress_bar(len(todo), "segment", "image", enabled=progress)
    pool = ThreadPoolExecutor(n, thread_name_prefix="pointnuc-image")
    try:
        it = iter(todo)
        pending: list[Future[SlideResult | None]] = [pool.submit(one, plan) for plan in islice(it, n + 1)]
        while pending:
            raise_if_stop_requested()
            res = pending.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(one, nxt))
            bar.update(1)
            yield res
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
        bar.close()


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
