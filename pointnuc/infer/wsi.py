"""Every nucleus of a whole slide: tiles at the model's pixel size, batched, overlapped, seam-free.

The flow per slide::

    thumbnail ─> tissue mask ─┐
    region (optional) ────────┴─> tiles to do (plan)   ─> slide colour statistics (sampled tiles)
      ─> [reader threads, one slide handle each] read at the model's pixel size (+ Reinhard on CPU)
      ─> [main thread] network batch by batch (+ Reinhard, fp16 autocast on CUDA; instance labels if asked)
      ─> [post threads; worker processes on CUDA] instances, ownership, polygons, measurements
      ─> nuclei (full-resolution QuPath coordinates), kept or streamed to a sink (collect)

:class:`SlideSegmenter` is that flow as an engine, one method per step (:meth:`~SlideSegmenter.run`
is the template); :func:`segment_slide` runs it on one slide with keyword settings.

Reading, the network and polygon work run at the same time; at most a few batches of
tiles are in flight, so memory is bounded by the batch, not by the slide. Ownership
(:mod:`pointnuc.infer.tiling`) keeps every nucleus exactly once. Nuclei whose
centroid lies outside ``region`` are dropped. Colour normalisation uses one set of
source statistics per slide (sampled tiles at the working resolution), never per tile, so that
neighbouring tiles see the same colours.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import shapely
import torch
from shapely.geometry.base import BaseGeometry

from pointnuc.config import MIN_NUCLEUS_AREA_UM2
from pointnuc.errors import raise_if_stop_requested
from pointnuc.infer.polygons import (
    InstanceParams,
    TileContext,
    init_worker,
    tile_nuclei,
    unpack_nuclei,
    warm_up,
    worker_job,
)
from pointnuc.infer.pools import ThreadSlides, batches, bounded, main_not_reimported
from pointnuc.infer.predict import foreground_batch
from pointnuc.infer.slide_tiles import (
    MAX_NUCLEUS_RADIUS_FACTOR,
    MIN_COLOUR_PIXELS,
    STAIN_STRIDE,
    SlidePlan,
    core_in_window,
    plan_slide,
    read_tile,
    sampled_colour_stats,
)
from pointnuc.infer.tiling import Tile
from pointnuc.io.base import NucleusObject
from pointnuc.io.slide import SlideLike
from pointnuc.models.bundle import ModelInfo
from pointnuc.progress import progress_bar
from pointnuc.stain import ColourStats, colour_apply, colour_stats_and_apply

log = logging.getLogger(__name__)

#: default tile sizes (working px) and batch sizes per device type. On the CPU the tile size is
#: fitted to each slide or image within (smallest, largest) (:func:`pointnuc.infer.tiling.fit_tile_size`:
#: a 1000 x 1000 image at 0.25 µm/px is one tile of 1184, 1.4 Mpx, rather than nine of 512, 2.4 Mpx),
#: and the batch holds as many tiles as :data:`CPU_BATCH_PIXELS` allows (at least one).
DEFAULT_TILE: dict[str, int | tuple[int, int]] = {"cpu": (32, 1536), "cuda": 1024}
DEFAULT_BATCH = {"cpu": 0, "cuda": 16}
#: working pixels per network call on the CPU (two 1024-px tiles, or one larger; one 1536-px tile: +1.3 GB for resnet34)
CPU_BATCH_PIXELS = 2 * 1024 * 1024


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bfloat16 natively (x86 ``avx512_bf16`` or AMX, from Linux's /proc/cpuinfo).

    There bf16 autocast runs the network ~1.2-1.5x faster with the same AJI (MO test, ``cpu`` model: .4902 vs
    .4904, benchmarks/results/network-speed.md); elsewhere bf16 is emulated, so it stays off.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class SlideResult:
    """What :func:`segment_slide` (:meth:`SlideSegmenter.run`) found, and what it cost."""

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


def instance_params(info: ModelInfo) -> InstanceParams:
    """The stage-2 thresholds a model was tuned with (:class:`pointnuc.models.calibration.Thresholds`)."""
    return InstanceParams.from_thresholds(info.thresholds, info.config.segmentation.instance_method)


@dataclass(frozen=True)
class SegmentSettings:
    """How :class:`SlideSegmenter` runs; None: chosen for the device (:meth:`for_device`)."""

    device: torch.device | str = "cpu"
    #: working px a side, or (smallest, largest) to fit it to each slide (:data:`DEFAULT_TILE`)
    tile_size: int | tuple[int, int] | None = None
    batch_size: int | None = None  #: tiles per network call (:data:`DEFAULT_BATCH`; 0: by :data:`CPU_BATCH_PIXELS`)
    halo: int | None = None  #: working px read around each core (:func:`~pointnuc.infer.slide_tiles.working_halo`)
    #: reader threads (each with its own slide handle), and post-processing threads: 2 on the CPU, up to 8 beside a GPU
    num_workers: int | None = None
    #: polygon work in that many worker processes instead of threads: on CUDA, where the GPU outruns
    #: one Python thread, all but two CPU cores; on the CPU none, as the network already uses every core
    post_processes: int | None = None
    amp: bool | None = None  #: mixed precision (default: on CUDA, and on a CPU with native bf16: :func:`cpu_has_native_bf16`)
    #: colour normalisation as part of the network batch rather than in the reader threads (default: on CUDA)
    normalise_on_device: bool | None = None
    #: instance labels computed on the device for the batch (:func:`pointnuc.infer.instances_torch.tile_labels`),
    #: only outlines and measurements left to post-processing. Default off: on the CPU it is ~3x slower than numpy
    #: (benchmarks/results/instances-torch.md), and on a GPU it is not yet measured (benchmarks/gpu_check.sh)
    instances_on_device: bool | None = None
    tta: bool = False  #: average the network's output over the four flips of each tile (4x the network time)
    tissue: bool = True  #: leave out the glass (:func:`plan_slide`)
    #: nuclei whose outline is smaller than this (µm², at the slide's pixel size) are dropped
    min_area_um2: float = MIN_NUCLEUS_AREA_UM2
    outline: str = "auto"  #: how outlines are traced (:data:`pointnuc.infer.polygons.OUTLINES`)
    progress: bool = True  #: a progress bar (or log lines, :mod:`pointnuc.progress`)

    def for_device(self) -> SegmentSettings:
        """These settings with every None replaced by the default for the device."""
        device = torch.device(self.device)
        kind = "cuda" if device.type == "cuda" else "cpu"
        cores = os.cpu_count() or 1
        return replace(
            self,
            device=device,
            tile_size=self.tile_size or DEFAULT_TILE[kind],
            batch_size=self.batch_size if self.batch_size is not None else DEFAULT_BATCH[kind],
            num_workers=self.num_workers if self.num_workers is not None else (
                min(8, max(2, cores // 2)) if kind == "cuda" else 2),
            post_processes=self.post_processes if self.post_processes is not None else (
                max(1, cores - 2) if kind == "cuda" else 0),
            amp=(kind == "cuda" or cpu_has_native_bf16()) if self.amp is None else self.amp,
            normalise_on_device=(kind == "cuda") if self.normalise_on_device is None else self.normalise_on_device,
            instances_on_device=bool(self.instances_on_device),
        )


class SlideSegmenter:
    """Every nucleus of a slide with a stage-2 ``network``: the flow of the module doc as an engine.

    :meth:`run` is the template; each step is a method: :meth:`plan` (tiles to do),
    :meth:`start_workers` (polygon worker processes), :meth:`colour_statistics`, then per tile
    :meth:`read` (reader threads), :meth:`predict` (the network, batch by batch, in the calling
    thread), :meth:`post_process` (threads or worker processes) and :meth:`collect`. One slide
    at a time: the state of the slide being run lives on the engine while it runs.
    """

    def __init__(self, network: torch.nn.Module, info: ModelInfo, settings: SegmentSettings | None = None) -> None:
        self.network, self.info = network, info
        self.settings = (settings or SegmentSettings()).for_device()
        self.device = torch.device(self.settings.device)
        self.timings: dict[str, float] = {}  #: busy seconds of read / network / post, of the slide being run
        self._timings_lock = threading.Lock()
        self._slides: ThreadSlides | None = None
        self._plan: SlidePlan | None = None
        self._norm: tuple[ColourStats, Mapping[str, Sequence[float]]] | None = None
        self._window: tuple[int, np.ndarray] | None = None  #: (tile index, its normalised window) read with the statistics

    @property
    def batch_size(self) -> int:
        """Tiles per network call: the setting, or (0) as many of the slide being run's as :data:`CPU_BATCH_PIXELS` allows."""
        assert self.settings.batch_size is not None  # (for_device sets it)
        if self.settings.batch_size > 0:
            return self.settings.batch_size
        tile = self._plan.grid.tile_size if self._plan is not None else 512
        return max(1, CPU_BATCH_PIXELS // (tile * tile))

    # ------------------------------------------------------------------ the template

    def run(
        self, slide: SlideLike, *, region: BaseGeometry | None = None, name: str | None = None,
        pixel_size_um: float | None = None, sink: Callable[[list[NucleusObject]], None] | None = None,
    ) -> SlideResult:
        """Every nucleus of ``slide`` (see :func:`segment_slide` for the arguments)."""
        t_start = time.perf_counter()
        s = self.settings
        self.timings = {"read": 0.0, "network": 0.0, "post": 0.0}
        self._slides = ThreadSlides(slide)
        readers = ThreadPoolExecutor(max(1, s.num_workers or 1), thread_name_prefix="pointnuc-read")
        workers: Executor | None = None
        try:
            px = pixel_size_um if pixel_size_um is not None else getattr(slide, "pixel_size_um", None)
            plan = self._plan = self.plan(slide, region, px)
            context = self.tile_context(plan, region)
            workers = self.start_workers(plan, context)
            self.prepare_network()
            if region is not None:
                shapely.prepare(region)  # once, before the post-processing threads use it
            self._norm = self.colour_statistics(slide, plan, readers)
        except BaseException:
            readers.shutdown(wait=True, cancel_futures=True)
            if workers is not None:
                workers.shutdown(wait=True, cancel_futures=True)
            self._slides.close()
            raise
        start_s = time.perf_counter() - t_start
        in_processes = workers is not None
        post_fn: Callable[[Any], Any]
        if workers is not None:
            post_fn, ahead = worker_job, max(2 * self.batch_size, 2 * (s.post_processes or 0))
        else:
            workers = ThreadPoolExecutor(max(1, s.num_workers or 1), thread_name_prefix="pointnuc-post")
            post_fn, ahead = (lambda job: self.post_process(job, context)), 2 * self.batch_size
        nuclei: list[NucleusObject] = []
        bar = progress_bar(len(plan.tiles), name or "slide", "tile", enabled=s.progress)
        try:
            loaded = bounded(plan.tiles, self.read, readers, ahead=2 * self.batch_size)
            found = bounded(self.predict(loaded, half=in_processes, context=context), post_fn, workers, ahead=ahead)
            n_found, n_big = self.collect(found, packed=in_processes, sink=sink if sink is not None else nuclei.extend,
                                          bar=bar)
        finally:
            readers.shutdown(wait=True, cancel_futures=True)
            workers.shutdown(wait=True, cancel_futures=True)
            self._slides.close()
            bar.close()
        if n_big:
            log.warning("%s: %d objects larger than the tile halo were dropped (not nuclei?)", name or "slide", n_big)
        return SlideResult(
            nuclei=nuclei, n_nuclei=n_found, n_tiles=len(plan.tiles), n_tiles_total=len(plan.grid),
            seconds=time.perf_counter() - t_start, megapixels=sum(t.core.height * t.core.width for t in plan.tiles) / 1e6,
            pixel_size_um=plan.pixel_size_um, downsample=plan.downsample, tile_size=plan.grid.tile_size,
            halo=plan.grid.halo, timings=self.timings, n_dropped_large=n_big, start_seconds=start_s,
        )

    # ------------------------------------------------------------------ before the first tile

    def plan(self, slide: SlideLike, region: BaseGeometry | None, pixel_size_um: float | None) -> SlidePlan:
        """The tiles to run (:func:`plan_slide`)."""
        s = self.settings
        assert s.tile_size is not None
        return plan_slide(slide, self.info, region=region, tile_size=s.tile_size, halo=s.halo,
                          pixel_size_um=pixel_size_um, tissue=s.tissue)

    def tile_context(self, plan: SlidePlan, region: BaseGeometry | None) -> TileContext:
        """What post-processing needs besides each tile: instances are looked for within a nucleus of the core."""
        r1_px = self.info.config.data.nucleus_radius_um / self.info.pixel_size_um
        margin = min(plan.grid.halo, math.ceil(2 * MAX_NUCLEUS_RADIUS_FACTOR * r1_px) + 4)
        return TileContext(plan.origin, plan.downsample, plan.pixel_size_um, instance_params(self.info), region,
                           keep_margin=margin, outline=self.settings.outline, min_area_um2=self.settings.min_area_um2)

    def start_workers(self, plan: SlidePlan, context: TileContext) -> Executor | None:
        """Polygon worker processes (None: post-processing runs in threads).

        Only where there are settings for them and more tiles than a few batches; spawned
        (no fork of a process holding CUDA and reader threads; workers import no torch), and
        started now, so that they start up while the colour statistics are read.
        """
        n = self.settings.post_processes or 0
        if n <= 0 or len(plan.tiles) <= 2 * self.batch_size:
            return None
        pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
                                   initargs=(context,))
        with main_not_reimported():
            for _ in range(n):
                pool.submit(warm_up)  # (each submit starts a worker)
        return pool

    def prepare_network(self) -> None:
        """The network on the device, in evaluation mode, channels-last (CUDA; on the CPU 1.2-1.9x faster too,
        benchmarks/results/network-speed.md)."""
        self.network.eval().to(self.device)  # (CUDA starts up while the workers do)
        self.network = self.network.to(memory_format=torch.channels_last)

    def colour_statistics(
        self, slide: SlideLike, plan: SlidePlan, readers: Executor
    ) -> tuple[ColourStats, Mapping[str, Sequence[float]]] | None:
        """(the slide's colour statistics, the model's reference), or None when the model normalises no colour."""
        ref = self.info.norm_reference
        self._window = None
        if not ref:
            return None
        slides = self._slides
        assert slides is not None
        if len(plan.tiles) == 1 and not self.settings.normalise_on_device:  # one window: its pixels and colours once
            (tile,) = plan.tiles
            window = read_tile(slides.get(), plan, tile)
            if tile.core.height * tile.core.width >= MIN_COLOUR_PIXELS:
                stats, normalised = colour_stats_and_apply(window, core_in_window(tile), ref, STAIN_STRIDE)
                self._window = (tile.index, normalised)
                return stats, ref
        source = sampled_colour_stats(slide, plan, read=lambda t: read_tile(slides.get(), plan, t), pool=readers, ref=ref)
        return (source, ref) if source is not None else None

    # ------------------------------------------------------------------ per tile

    def read(self, tile: Tile) -> np.ndarray:
        """The tile's window at the working resolution (colour-normalised here unless on the device); reader threads."""
        assert self._slides is not None and self._plan is not None
        t0 = time.perf_counter()
        if self._window is not None and self._window[0] == tile.index:
            img, self._window = self._window[1], None  # (read and normalised with the colour statistics)
        else:
            img = read_tile(self._slides.get(), self._plan, tile)
            if self._norm is not None and not self.settings.normalise_on_device:
                img = colour_apply(img, *self._norm)
        with self._timings_lock:
            self.timings["read"] += time.perf_counter() - t0
        return img

    def predict(
        self, loaded: Iterable[tuple[Tile, np.ndarray]], *, half: bool, context: TileContext | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        """Each tile with its foreground probability, batch by batch (``half``: float16, for worker processes),
        and with its instance labels where they are computed on the device (``context``: the slide's)."""
        s = self.settings
        if s.instances_on_device:
            from pointnuc.infer.instances_torch import tile_labels
        norm = self._norm if s.normalise_on_device else None
        for batch in batches(loaded, self.batch_size):
            raise_if_stop_requested()
            t0 = time.perf_counter()
            tiles = [t for t, _ in batch]
            fg = foreground_batch(self.network, np.stack([img for _, img in batch]), self.device, bool(s.amp), norm, s.tta)
            labels = tile_labels(fg, tiles, context) if s.instances_on_device and context is not None else None
            probs = (fg.half() if half else fg).cpu().numpy()
            self.timings["network"] += time.perf_counter() - t0
            yield from (zip(tiles, probs, labels) if labels is not None else zip(tiles, probs))

    @staticmethod
    def post_process(job: tuple[Any, ...], context: TileContext) -> tuple[list[NucleusObject], int, float]:
        """The nuclei a tile owns, the objects dropped as too large, and the busy seconds (a post thread);
        ``job``: (tile, probability) or (tile, probability, labels)."""
        t0 = time.perf_counter()
        tile, prob, *labels = job
        found, big = tile_nuclei(prob, tile, context, *labels)
        return found, big, time.perf_counter() - t0

    def collect(
        self, results: Iterable[tuple[Any, tuple[Any, int, float]]], *, packed: bool,
        sink: Callable[[list[NucleusObject]], None], bar: Any,
    ) -> tuple[int, int]:
        """Hand each tile's nuclei to ``sink`` in tile order; (nuclei found, objects dropped as too large).

        ``packed``: the nuclei come from worker processes as arrays (:func:`pointnuc.infer.polygons.pack_nuclei`).
        """
        n_found = n_big = 0
        for _, (found, big, secs) in results:
            if packed:
                found = unpack_nuclei(found)
            self.timings["post"] += secs  # busy seconds of the post threads / worker processes, summed
            n_found += len(found)
            n_big += big
            sink(found)
            bar.update(1)
            bar.set_postfix(nuclei=n_found, refresh=False)
        return n_found, n_big


def segment_slide(
    slide: SlideLike,
    network: torch.nn.Module,
    info: ModelInfo,
    *,
    region: BaseGeometry | None = None,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    tile_size: int | tuple[int, int] | None = None,
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
    min_area_um2: float = MIN_NUCLEUS_AREA_UM2,
    instances_on_device: bool | None = None,
) -> SlideResult:
    """Every nucleus of ``slide`` (a :class:`pointnuc.io.slide.Slide`) with the stage-2 ``network``.

    ``region``: full-res area; only nuclei whose centroid lies in it are kept.
    ``sink``: if given, receives the nuclei tile by tile (and the result's list stays
    empty), so memory does not grow with the number of nuclei either.
    ``pixel_size_um`` overrides the slide's; without either, :class:`PixelSizeError`.
    ``min_area_um2``: smaller nuclei are dropped (0: none).
    The other arguments are :class:`SegmentSettings`.
    """
    settings = SegmentSettings(
        device=device, tile_size=tile_size, batch_size=batch_size, halo=halo, num_workers=num_workers,
        post_processes=post_processes, amp=amp, normalise_on_device=normalise_on_device, tta=tta, tissue=tissue,
        min_area_um2=min_area_um2, progress=progress, instances_on_device=instances_on_device,
    )
    return SlideSegmenter(network, info, settings).run(slide, region=region, name=name, pixel_size_um=pixel_size_um,
                                                       sink=sink)
