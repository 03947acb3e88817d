"""Every nucleus of a whole slide: tiles at the model's pixel size, batched, overlapped, seam-free.

The flow per slide::

    thumbnail ─> tissue mask, slide colour statistics ─┐
    region (optional) ─────────────────────────────────┼─> tiles to do
      ─> [reader threads, one slide handle each] read at the model's pixel size (+ Reinhard on CPU)
      ─> [main thread] network batch by batch (+ Reinhard, fp16 autocast on CUDA)
      ─> [post threads; worker processes on CUDA] instances, ownership, polygons, measurements
      ─> nuclei (full-resolution QuPath coordinates), kept or streamed to a sink

Reading, the network and polygon work run at the same time; at most a few batches of
tiles are in flight, so memory is bounded by the batch, not by the slide. Ownership
(:mod:`pointnuc.infer.tiling`) keeps every nucleus exactly once. Nuclei whose
centroid lies outside ``region`` are dropped. Colour normalisation uses one set of
source statistics per slide (sampled tiles at the working resolution), never per tile, so that
neighbouring tiles see the same colours.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import shapely
import torch
from shapely.prepared import prep
from shapely.geometry.base import BaseGeometry

from pointnuc.errors import InputError, PixelSizeError
from pointnuc.infer.polygons import (
    InstanceParams, TileContext, init_worker, tile_nuclei, unpack_nuclei, warm_up, worker_job,
)
from pointnuc.infer.tiling import Box, Tile, TileGrid, make_grid, round_halo, tiles_intersecting
from pointnuc.io.base import NucleusObject
from pointnuc.models.bundle import ModelInfo
from pointnuc.stain import D65, XYZ_FROM_RGB, ColourStats, colour_stats, stain_affine
from pointnuc.stain import colour_apply as normalise_tile  # the name the CPU path and tests use

log = logging.getLogger(__name__)

#: the largest nucleus, as a multiple of the mean nucleus radius r1 (diameter = 2 * this * r1)
MAX_NUCLEUS_RADIUS_FACTOR = 2.0
#: network context kept beyond the largest nucleus, in working pixels (tiled == untiled to < 1e-5 at 32)
CONTEXT_PX = 32
#: default tile sizes (working px) and batch sizes per device type
DEFAULT_TILE = {"cpu": 512, "cuda": 1024}
DEFAULT_BATCH = {"cpu": 2, "cuda": 16}
#: longest side of the thumbnail used for the tissue mask and the slide's colour statistics...
THUMBNAIL_SIZE = 2048
#: ...which need no finer pixels than this (µm/px): a 20x/40x slide is looked at with 4 µm pixels
THUMBNAIL_UM = 4.0
#: an area of at most this many tiles is run whole: the tissue mask would save seconds, and could lose nuclei
ALL_TILES_UP_TO = 16


@dataclass
class SlideResult:
    """What :func:`segment_slide` found, and what it cost."""

    nuclei: list[NucleusObject]  #: empty when a ``sink`` received them instead
    n_nuclei: int  #: nuclei found (also when streamed to a sink)
    n_tiles: int  #: tiles sent to the network
    n_tiles_total: int  #: tiles of the grid over the area (the rest was glass or outside the region)
    seconds: float
    megapixels: float  #: working-resolution megapixels of the cores processed
    pixel_size_um: float  #: of the slide's full resolution
    downsample: float  #: full-res pixels per working pixel
    tile_size: int
    halo: int
    timings: dict[str, float] = field(default_factory=dict)  #: busy seconds of read / network / post
    n_dropped_large: int = 0  #: objects larger than the halo (cut by every tile; dropped)
    start_seconds: float = 0.0  #: of ``seconds``, before the first tile was read (plan, colour statistics, workers)


@dataclass(frozen=True)
class SlidePlan:
    """The tiles of one slide at the working resolution (no pixels read yet)."""

    grid: TileGrid
    origin: tuple[int, int]  #: working-res (row, col) of the grid's (0, 0)
    tiles: tuple[Tile, ...]  #: the tiles to run (tissue and region)
    downsample: float
    pixel_size_um: float


def working_halo(info: ModelInfo, context_px: int = CONTEXT_PX) -> int:
    """Halo (working px) larger than the largest nucleus plus the network's context."""
    r1_px = info.config.data.nucleus_radius_um / info.pixel_size_um
    return round_halo(2 * MAX_NUCLEUS_RADIUS_FACTOR * r1_px + context_px)


def plan_slide(
    slide: Any,
    info: ModelInfo,
    *,
    region: BaseGeometry | None = None,
    tile_size: int = 512,
    halo: int | None = None,
    pixel_size_um: float | None = None,
    tissue: bool = True,
    thumbnail: tuple[np.ndarray, float] | None = None,
) -> SlidePlan:
    """Which tiles of ``slide`` to run: the grid over the region (or slide), minus glass.

    Glass is left out only where it pays: an area of at most :data:`ALL_TILES_UP_TO` tiles is
    run whole (a small image, sparse tissue such as fat, a crop at the tissue's edge), and a
    larger one loses only the tiles whose core holds no pixel of the tissue mask
    (:func:`pointnuc.infer.tissue.tissue_mask`, grown by a nucleus and more). The network's
    context needs no wider mask: every tile kept is read with its halo.
    """
    from pointnuc.infer.tissue import tissue_mask

    px = pixel_size_um if pixel_size_um is not None else getattr(slide, "pixel_size_um", None)
    if px is None:
        name = getattr(getattr(slide, "path", None), "name", "the slide")
        raise PixelSizeError(f"{name} carries no pixel size; pass --pixel-size (µm per pixel, e.g. 0.25 for 40x)")
    ds = info.pixel_size_um / float(px)
    halo = working_halo(info) if halo is None else halo
    wh, ww = math.ceil(slide.height / ds), math.ceil(slide.width / ds)
    area = Box(0, 0, wh, ww)
    if region is not None:
        if region.is_empty:
            raise InputError("the region to segment is empty")
        x0, y0, x1, y1 = region.bounds
        margin = halo  # nuclei at the region's edge are seen whole; they are filtered by centroid later
        area = area.intersect(
            Box(math.floor(y0 / ds) - margin, math.floor(x0 / ds) - margin, math.ceil(y1 / ds) + margin, math.ceil(x1 / ds) + margin)
        )
        if area.empty:
            raise InputError("the region to segment lies outside the image")
    grid = make_grid(area.height, area.width, tile_size=tile_size, halo=halo)
    tiles = list(grid)
    if tissue and len(tiles) > ALL_TILES_UP_TO:
        thumb, tds = thumbnail if thumbnail is not None else read_thumbnail(slide, pixel_size_um=px)
        mask = tissue_mask(thumb, downsample=tds, pixel_size_um=px)
        tiles = tiles_intersecting(tiles, mask, tds / ds, origin=(area.y0, area.x0))
    if region is not None and tiles:
        prepared = prep(region.buffer(halo * ds))
        boxes = [
            shapely.box((t.core.x0 + area.x0) * ds, (t.core.y0 + area.y0) * ds, (t.core.x1 + area.x0) * ds, (t.core.y1 + area.y0) * ds)
            for t in tiles
        ]
        tiles = [t for t, b in zip(tiles, boxes) if prepared.intersects(b)]
    return SlidePlan(grid, (area.y0, area.x0), tuple(tiles), ds, float(px))


def read_thumbnail(
    slide: Any, max_size: int = THUMBNAIL_SIZE, *, pixel_size_um: float | None = None, chunk_px: int = 1024
) -> tuple[np.ndarray, float]:
    """The slide at an integer downsample, longer side <= ``max_size``, pixels >= :data:`THUMBNAIL_UM`, read chunk by chunk.

    Memory stays bounded whatever the slide's pyramid: each chunk reads at most about
    ``chunk_px``² pixels of the level it comes from.
    """
    ds = max(1, math.ceil(max(slide.width, slide.height) / max_size))
    if pixel_size_um:
        ds = max(ds, int(THUMBNAIL_UM // pixel_size_um))
    level_ds = slide.level_downsamples[slide.best_level(ds)] if hasattr(slide, "best_level") else 1.0
    step = ds * max(1, int(chunk_px * level_ds) // ds)  # full-res chunk side, a multiple of ds
    tw, th = math.ceil(slide.width / ds), math.ceil(slide.height / ds)
    out = np.empty((th, tw, 3), np.uint8)
    for y in range(0, slide.height, step):
        for x in range(0, slide.width, step):
            w, h = min(step, slide.width - x), min(step, slide.height - y)
            w, h = math.ceil(w / ds) * ds, math.ceil(h / ds) * ds
            part = np.asarray(slide.read_region(x, y, w, h, downsample=ds))[..., :3]
            out[y // ds : y // ds + part.shape[0], x // ds : x // ds + part.shape[1]] = part[: th - y // ds, : tw - x // ds]
    return out, float(ds)


#: Tiles read to estimate a slide's colour statistics (spread evenly over the tissue tiles).
COLOUR_SAMPLE_TILES = 8
#: Of those pixels, every this many give the stain statistics (two percentiles; ~400k pixels of 8 tiles of 448² cores)
STAIN_STRIDE = 4


def sampled_colour_stats(
    slide: Any, plan: SlidePlan, n_tiles: int = COLOUR_SAMPLE_TILES, *, read: Callable[[Tile], np.ndarray] | None = None,
    pool: Executor | None = None, ref: dict[str, Sequence[float]] | None = None,
) -> ColourStats | None:
    """Colour statistics of the slide at the working resolution, from the cores of up to ``n_tiles`` tiles.

    LAB mean/std, and the stain statistics after Reinhard when ``ref`` (the model's colour
    reference) has a stain step (:func:`pointnuc.stain.colour_stats`).

    Training computes its statistics from full working-resolution pixels
    (:func:`pointnuc.stain.colour_normalize`); a thumbnail would blur away contrast and
    make inference stretch it (x1.5 on the example tile). One set for the whole slide, so
    neighbouring tiles agree at the seams; for an image of up to ``n_tiles`` tiles it is
    exactly the statistics training used. ``read`` (a tile -> pixels) and ``pool`` (to read
    the tiles in parallel) are what :func:`segment_slide` passes.
    """
    tiles = plan.tiles
    if not tiles:
        return None
    picks = sorted({int(i) for i in np.linspace(0, len(tiles) - 1, min(n_tiles, len(tiles))).round()})
    pixels = []
    reader = read if read is not None else (lambda t: read_tile(slide, plan, t))
    chosen = [tiles[i] for i in picks]
    images = pool.map(reader, chosen) if pool is not None else map(reader, chosen)
    for t, img in zip(chosen, images):
        y0, x0 = t.core.y0 - t.window.y0, t.core.x0 - t.window.x0
        pixels.append(img[y0 : y0 + t.core.height, x0 : x0 + t.core.width].reshape(-1, 3))
    flat = np.concatenate(pixels)
    return colour_stats(flat[:, None, :], ref or {}, stain_stride=STAIN_STRIDE) if len(flat) >= 16 else None


def normalise_tiles_torch(images: torch.Tensor, source: Sequence, ref: dict[str, Sequence[float]]) -> torch.Tensor:
    """:func:`normalise_tile` for a uint8 batch (B, H, W, 3) on any device (the GPU path).

    The same sRGB -> CIE LAB (D65) -> Reinhard -> sRGB formulas as scikit-image, then the
    same stain step as :func:`pointnuc.stain.stain_apply`, so both paths give the same pixels
    to within rounding.
    """
    dev = images.device
    m = torch.as_tensor(XYZ_FROM_RGB, dtype=torch.float32, device=dev)
    white = torch.as_tensor(D65, dtype=torch.float32, device=dev)
    rgb = images.float() / 255.0
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = (lin @ m.T) / white
    f = torch.where(xyz > 0.008856, torch.pow(xyz.clamp(min=0), 1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    lab = torch.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], dim=-1)
    sm = torch.as_tensor(np.asarray(source[0], np.float32), device=dev)
    ss = torch.as_tensor(np.maximum(np.asarray(source[1], np.float32), 1e-6), device=dev)
    tm = torch.as_tensor(np.asarray(ref["mean"], np.float32), device=dev)
    ts = torch.as_tensor(np.asarray(ref["std"], np.float32), device=dev)
    lab = (lab - sm) / ss * ts + tm
    fy = (lab[..., 0] + 16.0) / 116.0
    f = torch.stack([lab[..., 1] / 500.0 + fy, fy, (fy - lab[..., 2] / 200.0).clamp(min=0)], dim=-1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787) * white
    lin = xyz @ torch.linalg.inv(m).T
    rgb = torch.where(lin > 0.0031308, 1.055 * torch.pow(lin.clamp(min=0.0031308), 1 / 2.4) - 0.055, lin * 12.92)
    out = torch.round(rgb.clamp(0, 1) * 255.0)
    stain = source[2] if len(source) > 2 else None
    if ref.get("stain") and stain is not None:
        ms, ts_ = stain_affine(stain, ref["stain"])
        od = -torch.log(out.clamp(min=1.0) / 255.0)
        od = od @ torch.as_tensor(ms, device=dev) + torch.as_tensor(ts_, device=dev)
        out = torch.round(255.0 * torch.exp(-od.clamp(min=0.0)))
    return out.to(torch.uint8)


def read_tile(slide: Any, plan: SlidePlan, tile: Tile) -> np.ndarray:
    """The tile's window at the working resolution, uint8 RGB (T, T, 3); white outside the slide."""
    ds = plan.downsample
    t = plan.grid.tile_size
    wy, wx = tile.window.y0 + plan.origin[0], tile.window.x0 + plan.origin[1]
    if float(ds).is_integer():
        x, y, side = int(wx * ds), int(wy * ds), int(t * ds)
    else:
        # a fractional box (Slide.read_region resamples with sub-pixel boxes): every tile then
        # samples the slide on the same global working-resolution grid, so neighbours agree
        x, y, side = wx * ds, wy * ds, t * ds
    img = np.asarray(slide.read_region(x, y, side, side, downsample=ds))[..., :3]
    if img.shape[:2] != (t, t):  # a reader that rounds differently: fit to the window
        out = np.full((t, t, 3), 255, np.uint8)
        h, w = min(t, img.shape[0]), min(t, img.shape[1])
        out[:h, :w] = img[:h, :w]
        img = out
    return img


def _bounded(items: Iterable[Any], fn: Callable[[Any], Any], pool: Executor, ahead: int) -> Iterator[tuple[Any, Any]]:
    """``(item, fn(item))`` in order, with at most ``ahead`` calls running or waiting in ``pool``."""
    pending: collections.deque[tuple[Any, Future]] = collections.deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= ahead:
            it, fut = pending.popleft()
            yield it, fut.result()
    while pending:
        it, fut = pending.popleft()
        yield it, fut.result()


def _batches(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """Worker processes started inside this block do not re-run the main script's imports.

    A spawned process imports the parent's ``__main__`` (a script: by its path) before it
    unpickles anything; a script that imports torch would cost every polygon worker
    seconds and hundreds of MiB. The jobs only need :mod:`pointnuc.infer.polygons`.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


class _ThreadSlides:
    """One slide handle per reader thread (tiffslide handles are not shared across threads)."""

    def __init__(self, slide: Any) -> None:
        self.slide = slide
        self.local = threading.local()
        self.opened: list[Any] = []
        self.lock = threading.Lock()
        from pointnuc.io.slide import TIFF_SUFFIXES, Slide

        # a tiffslide-backed Slide gets one handle per thread; anything else (a plain image
        # held in memory, a test double) is shared behind a lock
        self.reopen = isinstance(slide, Slide) and slide.path.suffix.lower() in TIFF_SUFFIXES

    def get(self) -> Any:
        s = getattr(self.local, "slide", None)
        if s is None:
            if self.reopen:
                from pointnuc.io.slide import open_slide

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
    def __init__(self, slide: Any, lock: threading.Lock) -> None:
        self.slide, self.lock = slide, lock

    def read_region(self, *args: Any, **kwargs: Any) -> np.ndarray:
        with self.lock:
            return self.slide.read_region(*args, **kwargs)


def instance_params(info: ModelInfo) -> InstanceParams:
    """The stage-2 thresholds a model was tuned with (:class:`pointnuc.models.calibration.Thresholds`)."""
    return InstanceParams.from_thresholds(info.thresholds, info.config.segmentation.instance_method)


def segment_slide(
    slide: Any,
    network: torch.nn.Module,
    info: ModelInfo,
    *,
    region: BaseGeometry | None = None,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    tile_size: int | None = None,
    halo: int | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    name: str | None = None,
    pixel_size_um: float | None = None,
    tissue: bool = True,
    sink: Callable[[list[NucleusObject]], None] | None = None,
    amp: bool | None = None,
    post_processes: int | None = None,
    normalise_on_device: bool | None = None,
    tta: bool = False,
) -> SlideResult:
    """Every nucleus of ``slide`` (a :class:`pointnuc.io.slide.Slide`) with the stage-2 ``network``.

    ``region``: full-res area; only nuclei whose centroid lies in it are kept.
    ``sink``: if given, receives the nuclei tile by tile (and the result's list stays
    empty), so memory does not grow with the number of nuclei either.
    ``pixel_size_um`` overrides the slide's; without either, :class:`PixelSizeError`.
    ``num_workers``: reader threads (each with its own slide handle) and post-processing
    threads (default 2 on the CPU; up to 8 beside a GPU); ``post_processes``: polygon work in that many worker processes instead
    (default: on CUDA, where the GPU outruns one Python thread, all but two CPU cores; on
    the CPU none, as the network already uses every core). ``normalise_on_device``: colour
    normalisation as part of the network batch rather than in the reader threads (default:
    on CUDA). ``tta``: average the network's output over the four flips of each tile (4x the
    network time).
    """
    t_start = time.perf_counter()
    device = torch.device(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    tile_size = tile_size or DEFAULT_TILE[kind]
    batch_size = batch_size or DEFAULT_BATCH[kind]
    use_amp = (device.type == "cuda") if amp is None else amp
    px = pixel_size_um if pixel_size_um is not None else getattr(slide, "pixel_size_um", None)
    if num_workers is None:
        num_workers = min(8, max(2, (os.cpu_count() or 1) // 2)) if kind == "cuda" else 2
    if post_processes is None:
        post_processes = max(1, (os.cpu_count() or 1) - 2) if kind == "cuda" else 0
    on_device = (kind == "cuda") if normalise_on_device is None else normalise_on_device
    timings = {"read": 0.0, "network": 0.0, "post": 0.0}
    tlock = threading.Lock()
    slides = _ThreadSlides(slide)
    readers = ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="pointnuc-read")
    posters: Executor | None = None
    try:
        thumb = read_thumbnail(slide, pixel_size_um=px) if (tissue or info.norm_reference) and px is not None else None
        plan = plan_slide(slide, info, region=region, tile_size=tile_size, halo=halo, pixel_size_um=px, tissue=tissue,
                          thumbnail=thumb)
        r1_px = info.config.data.nucleus_radius_um / info.pixel_size_um
        margin = min(plan.grid.halo, int(math.ceil(2 * MAX_NUCLEUS_RADIUS_FACTOR * r1_px)) + 4)
        ctx = TileContext(plan.origin, plan.downsample, plan.pixel_size_um, instance_params(info), region, keep_margin=margin)
        if post_processes > 0 and len(plan.tiles) > 2 * batch_size:
            # spawn: no fork of a process holding CUDA and reader threads; workers import no torch.
            # Started now, so that they start up while the colour statistics are read.
            posters = ProcessPoolExecutor(post_processes, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=init_worker, initargs=(ctx,))
            with _main_not_reimported():
                for _ in range(post_processes):
                    posters.submit(warm_up)  # (each submit starts a worker)
        else:
            post_processes = 0
        network.eval().to(device)  # (CUDA starts up while the workers do)
        if device.type == "cuda":
            network = network.to(memory_format=torch.channels_last)
        if region is not None:
            shapely.prepare(region)  # once, before the post-processing threads use it
        source = (sampled_colour_stats(slide, plan, read=lambda t: read_tile(slides.get(), plan, t), pool=readers,
                                       ref=info.norm_reference)
                  if info.norm_reference else None)
    except BaseException:
        readers.shutdown(wait=True, cancel_futures=True)
        if posters is not None:
            posters.shutdown(wait=True, cancel_futures=True)
        slides.close()
        raise
    norm = (source, info.norm_reference) if (source is not None and info.norm_reference) else None
    start_s = time.perf_counter() - t_start

    def load(tile: Tile) -> np.ndarray:
        t0 = time.perf_counter()
        img = read_tile(slides.get(), plan, tile)
        if norm is not None and not on_device:
            img = normalise_tile(img, *norm)
        with tlock:
            timings["read"] += time.perf_counter() - t0
        return img

    def post(job: tuple[Tile, np.ndarray]) -> tuple[list[NucleusObject], int, float]:
        t0 = time.perf_counter()
        tile, prob = job
        found, big = tile_nuclei(prob, tile, ctx)
        return found, big, time.perf_counter() - t0

    nuclei: list[NucleusObject] = []
    n_found = n_big = 0
    from pointnuc.progress import progress_bar

    bar = progress_bar(len(plan.tiles), name or "slide", "tile", enabled=progress)
    post_fn: Callable[[Any], Any]
    if posters is not None:
        post_fn, post_ahead = worker_job, max(2 * batch_size, 2 * post_processes)
    else:
        posters = ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="pointnuc-post")
        post_fn, post_ahead = post, 2 * batch_size
    try:
        loaded = _bounded(plan.tiles, load, readers, ahead=2 * batch_size)

        def forward() -> Iterator[tuple[Tile, np.ndarray]]:
            for batch in _batches(loaded, batch_size):
                t0 = time.perf_counter()
                # float16 for the worker processes (half the copy), converted on the device
                probs = _predict_batch(network, np.stack([img for _, img in batch]), device, use_amp,
                                       norm if on_device else None, half=post_fn is worker_job, tta=tta)
                timings["network"] += time.perf_counter() - t0
                yield from zip([t for t, _ in batch], probs)

        for _, (found, big, secs) in _bounded(forward(), post_fn, posters, ahead=post_ahead):
            if post_fn is worker_job:
                found = unpack_nuclei(found)
            timings["post"] += secs  # busy seconds of the post threads / worker processes, summed
            n_found += len(found)
            n_big += big
            if sink is not None:
                sink(found)
            else:
                nuclei.extend(found)
            bar.update(1)
            bar.set_postfix(nuclei=n_found, refresh=False)
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        posters.shutdown(wait=True, cancel_futures=True)
        slides.close()
        bar.close()
    if n_big:
        log.warning("%s: %d objects larger than the tile halo were dropped (not nuclei?)", name or "slide", n_big)
    core_px = sum(t.core.height * t.core.width for t in plan.tiles)
    return SlideResult(
        nuclei=nuclei,
        n_nuclei=n_found,
        n_tiles=len(plan.tiles),
        n_tiles_total=len(plan.grid),
        seconds=time.perf_counter() - t_start,
        megapixels=core_px / 1e6,
        pixel_size_um=plan.pixel_size_um,
        downsample=plan.downsample,
        tile_size=plan.grid.tile_size,
        halo=plan.grid.halo,
        timings=timings,
        n_dropped_large=n_big,
        start_seconds=start_s,
    )


@torch.no_grad()
def _predict_batch(
    network: torch.nn.Module, batch: np.ndarray, device: torch.device, amp: bool, norm: tuple[Any, Any] | None = None,
    half: bool = False, tta: bool = False,
) -> np.ndarray:
    """Foreground probability (B, T, T) float32 of a batch of uint8 RGB windows (B, T, T, 3).

    ``norm`` = (source stats, reference): Reinhard-normalise the batch on the device first.
    ``half``: float16 instead, rounded on the device (half the copy back).
    ``tta``: the mean over the four flips (none, left-right, up-down, both).
    """
    from pointnuc.infer.predict import FLIPS
    from pointnuc.models.net import preprocess

    x = torch.from_numpy(batch)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    if norm is not None:
        x = normalise_tiles_torch(x, *norm)
    t = preprocess(x)

    def foreground(inp: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda":
            inp = inp.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                            enabled=amp):
            logits = network(inp)
        logits = logits.float()
        return torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)[:, 1]

    fg = foreground(t)
    if tta:  # the flips of predict_channel; image dims 2, 3 of (B, C, H, W) are dims 1, 2 of the (B, H, W) output
        for fy, fx in FLIPS[1:]:
            dims = [d for d, flip in ((2, fy), (3, fx)) if flip]
            fg += foreground(t.flip(dims)).flip([d - 1 for d in dims])
        fg /= len(FLIPS)
    if half:
        fg = fg.half()
    return fg.cpu().numpy()
