"""A slide as tiles at the model's pixel size: which tiles to run, their pixels, the slide's colour statistics.

The plan is the grid (:mod:`pointnuc.infer.tiling`) over the slide or region at the working
resolution, minus the glass (:mod:`pointnuc.infer.tissue`); no pixel is read to make it but a
thumbnail. :mod:`pointnuc.infer.wsi` runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry
from shapely.prepared import prep

from pointnuc.errors import InputError, PixelSizeError
from pointnuc.infer.tiling import (
    NET_STRIDE,
    Box,
    Tile,
    TileGrid,
    fit_tile_size,
    make_grid,
    round_halo,
    tiles_intersecting,
)
from pointnuc.io.slide import RegionReader, SlideLike, read_thumbnail
from pointnuc.models.bundle import ModelInfo
from pointnuc.stain import ColourStats, colour_stats

#: the largest nucleus, as a multiple of the mean nucleus radius r1 (diameter = 2 * this * r1)
MAX_NUCLEUS_RADIUS_FACTOR = 2.0
#: network context kept beyond the largest nucleus, in working pixels (tiled == untiled to < 1e-5 at 32)
CONTEXT_PX = 32
#: an area of at most this many tiles is run whole: the tissue mask would save seconds, and could lose nuclei
#: (tiles of the size given; with a fitted size, of :data:`SMALL_AREA_TILE` px)
ALL_TILES_UP_TO = 16
SMALL_AREA_TILE = 512
#: white px a single window shows beyond the image's edge (:func:`one_window`): none, and the network's own zero
#: padding made 1-px slivers of "nucleus" along an edge of synthetic images; the tiles' whole halo is 80 px for MO
EDGE_PX = 16
#: fewer pixels than this give no colour statistics (the colour is then left as it is)
MIN_COLOUR_PIXELS = 16
#: Tiles read to estimate a slide's colour statistics (spread evenly over the tissue tiles).
COLOUR_SAMPLE_TILES = 8
#: Of those pixels, every this many give the stain statistics (two percentiles; ~400k pixels of 8 tiles of 448² cores)
STAIN_STRIDE = 4


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
    slide: SlideLike,
    info: ModelInfo,
    *,
    region: BaseGeometry | None = None,
    tile_size: int | tuple[int, int] = 512,
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

    ``tile_size``: px a side, or (smallest, largest): the size in that range that shows the
    network the fewest pixels of this area (:func:`pointnuc.infer.tiling.fit_tile_size`).
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
    small_tile = tile_size if isinstance(tile_size, int) else SMALL_AREA_TILE  # what "small" is counted in
    grid = one_window(area, halo, Box(0, 0, wh, ww), tile_size[1]) if isinstance(tile_size, tuple) else None
    if grid is None:
        if isinstance(tile_size, tuple):
            tile_size = fit_tile_size(area.height, area.width, halo=halo, smallest=tile_size[0], largest=tile_size[1])
        grid = make_grid(area.height, area.width, tile_size=tile_size, halo=halo)
    tiles = list(grid)
    core = max(small_tile - 2 * halo, 32)
    if tissue and math.ceil(area.height / core) * math.ceil(area.width / core) > ALL_TILES_UP_TO:
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


def one_window(area: Box, halo: int, image: Box, largest: int, edge: int = EDGE_PX) -> TileGrid | None:
    """The grid of one tile over ``area`` (image working px) when the area with its ``halo``, cut to the ``image``
    grown by ``edge`` px, fits one window of at most ``largest`` px; None otherwise (tiles with their halos).

    The tile's core is the area; its window holds the area's context where the image goes on and only ``edge``
    px of white beyond the image's edge (the grid's tiles show ``halo``: 1.12 instead of 1.40 Mpx for a 1000 x
    1000 image with a halo of 80). A ``--within`` region at the image's edge is seen as the whole image is there.
    """
    grown = Box(area.y0 - halo, area.x0 - halo, area.y1 + halo, area.x1 + halo).intersect(
        Box(image.y0 - edge, image.x0 - edge, image.y1 + edge, image.x1 + edge))
    side = math.ceil(max(grown.height, grown.width) / NET_STRIDE) * NET_STRIDE
    if side > largest:
        return None
    core = Box(0, 0, area.height, area.width)  # (grid coordinates: the area's origin is the grid's)
    y0, x0 = grown.y0 - area.y0, grown.x0 - area.x0
    tile = Tile(0, 0, 0, core, Box(y0, x0, y0 + side, x0 + side), core, (True, True, True, True))
    return TileGrid(area.height, area.width, side, 0, (tile,))


def sampled_colour_stats(
    slide: RegionReader, plan: SlidePlan, n_tiles: int = COLOUR_SAMPLE_TILES, *, read: Callable[[Tile], np.ndarray] | None = None,
    pool: Executor | None = None, ref: Mapping[str, Sequence[float]] | None = None,
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
        pixels.append(img[core_in_window(t)].reshape(-1, 3))
    flat = np.concatenate(pixels)
    return colour_stats(flat[:, None, :], ref or {}, stain_stride=STAIN_STRIDE) if len(flat) >= MIN_COLOUR_PIXELS else None


def core_in_window(tile: Tile) -> tuple[slice, slice]:
    """Where the tile's core lies in its window's pixels."""
    return tile.core.shift(-tile.window.y0, -tile.window.x0).slices()


def read_tile(slide: RegionReader, plan: SlidePlan, tile: Tile) -> np.ndarray:
    """The tile's window at the working resolution, uint8 RGB (T, T, 3); white outside the slide."""
    ds = plan.downsample
    t = plan.grid.tile_size
    wy, wx = tile.window.y0 + plan.origin[0], tile.window.x0 + plan.origin[1]
    x: float
    y: float
    side: float
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
