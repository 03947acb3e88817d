"""Tiles with a halo, and the rule that gives every instance to exactly one tile.

Pure numpy, model-free. Coordinates are (row, col) pixel indices of the image being
tiled (the working resolution), boxes half-open ``[y0, y1) x [x0, x1)``.

The grid: *cores* of ``core = tile_size - 2*halo`` pixels partition the image; each
tile's *window* (what the network sees) is its core grown by ``halo`` on every side,
so every window has exactly ``tile_size`` pixels a side and starts at
``i*core - halo``. Windows that stick out of the image are padded by the caller
(white for a slide, like glass). Because ``core`` and ``tile_size`` are multiples of
32, every window has the same phase with respect to the U-Net's five stride-2 stages
as the whole image padded by ``halo`` — which is what makes tiled and untiled
predictions agree.

Ownership: an instance found in a tile's *valid* part (window ∩ image) is kept by that
tile when (1) it does not touch an edge of the valid part that lies inside the image
(there it is cut; the neighbour sees it whole) and (2) its centroid lies in the tile's
core. Cores partition the image, and the centroid test is done in exact integer
arithmetic, so a nucleus seen identically by two tiles is kept by exactly one of them.
With a halo larger than the largest nucleus plus the network's context, both tiles
do see it identically.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from pointnuc.errors import InputError

#: The U-Net's total stride; tile sizes and cores are multiples of it.
NET_STRIDE = 32


@dataclass(frozen=True)
class Box:
    """A half-open pixel box ``[y0, y1) x [x0, x1)``."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def empty(self) -> bool:
        return self.y1 <= self.y0 or self.x1 <= self.x0

    def intersect(self, other: Box) -> Box:
        """The common part of two boxes (possibly empty)."""
        return Box(max(self.y0, other.y0), max(self.x0, other.x0), min(self.y1, other.y1), min(self.x1, other.x1))

    def shift(self, dy: int, dx: int) -> Box:
        return Box(self.y0 + dy, self.x0 + dx, self.y1 + dy, self.x1 + dx)

    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


@dataclass(frozen=True)
class Tile:
    """One tile of a grid, in image coordinates."""

    index: int
    row: int
    col: int
    core: Box  #: the pixels this tile owns (cores partition the image)
    window: Box  #: core + halo: what the network sees (may stick out of the image)
    valid: Box  #: window ∩ image: where this tile's prediction is used
    image_edges: tuple[bool, bool, bool, bool]  #: top, left, bottom, right side of ``valid`` is an image border


@dataclass(frozen=True)
class TileGrid:
    """Tiles covering an ``height x width`` image."""

    height: int
    width: int
    tile_size: int
    halo: int
    tiles: tuple[Tile, ...]

    @property
    def core_size(self) -> int:
        return self.tile_size - 2 * self.halo

    @property
    def shape(self) -> tuple[int, int]:
        """Rows and columns of tiles."""
        return (math.ceil(self.height / self.core_size), math.ceil(self.width / self.core_size))

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)


def round_halo(halo_px: float) -> int:
    """Smallest valid halo (a multiple of 16, so that ``tile_size - 2*halo`` stays a multiple of 32) >= ``halo_px``."""
    return max(0, math.ceil(halo_px / (NET_STRIDE // 2)) * (NET_STRIDE // 2))


def fit_tile_size(height: int, width: int, *, halo: int, smallest: int, largest: int) -> int:
    """The tile size in ``[smallest, largest]`` whose grid over a ``height x width`` area shows the network the fewest pixels.

    Each tile costs its whole window (core and halo, also where the halo lies outside the
    area); ties go to the larger tile (fewer tiles). A 1000 x 1000 image with a halo of 80:
    one tile of 1184 (1.4 Mpx) instead of nine of 512 (2.4 Mpx). A large area gets ``largest``
    or a size just below it. Sizes are multiples of 32 with a core of at least 32.
    """
    lo = max(smallest, 2 * halo + NET_STRIDE)
    lo = math.ceil(lo / NET_STRIDE) * NET_STRIDE
    hi = max(largest // NET_STRIDE * NET_STRIDE, lo)
    best, best_cost = lo, math.inf
    for t in range(lo, hi + 1, NET_STRIDE):
        core = t - 2 * halo
        cost = math.ceil(height / core) * math.ceil(width / core) * t * t
        if cost <= best_cost:
            best, best_cost = t, cost
    return best


def make_grid(height: int, width: int, *, tile_size: int, halo: int) -> TileGrid:
    """The tile grid over an image; ``tile_size`` a multiple of 32, ``halo`` a multiple of 16."""
    if height <= 0 or width <= 0:
        raise InputError(f"cannot tile an empty image ({height} x {width} px)")
    if tile_size <= 0 or tile_size % NET_STRIDE:
        raise InputError(f"tile size must be a positive multiple of {NET_STRIDE} (got {tile_size})")
    if halo < 0 or halo % (NET_STRIDE // 2):
        raise InputError(f"tile halo must be a non-negative multiple of {NET_STRIDE // 2} (got {halo})")
    core = tile_size - 2 * halo
    if core < NET_STRIDE:
        raise InputError(f"tile size {tile_size} leaves no core with a halo of {halo} px; use larger tiles")
    image = Box(0, 0, height, width)
    tiles: list[Tile] = []
    for r in range(math.ceil(height / core)):
        for c in range(math.ceil(width / core)):
            cb = Box(r * core, c * core, min((r + 1) * core, height), min((c + 1) * core, width))
            win = Box(cb.y0 - halo, cb.x0 - halo, cb.y0 - halo + tile_size, cb.x0 - halo + tile_size)
            val = win.intersect(image)
            edges = (val.y0 == 0, val.x0 == 0, val.y1 == height, val.x1 == width)
            tiles.append(Tile(len(tiles), r, c, cb, win, val, edges))
    return TileGrid(height, width, tile_size, halo, tuple(tiles))


def owned_labels(labels: np.ndarray, tile: Tile) -> np.ndarray:
    """Ids of the instances in ``labels`` (the tile's ``valid`` part) that this tile owns.

    Dropped: instances touching an edge of ``valid`` inside the image (cut there), and
    instances whose centroid lies outside the tile's core.
    """
    if labels.shape[:2] != (tile.valid.height, tile.valid.width):
        raise ValueError(f"labels {labels.shape} do not match the tile's valid box {tile.valid}")
    lab = np.ascontiguousarray(labels).astype(np.int64, copy=False)
    n_lab = int(lab.max(initial=0)) + 1
    if n_lab == 1:
        return np.zeros(0, np.int64)
    flat = lab.ravel()
    count = np.bincount(flat, minlength=n_lab)
    h, w = lab.shape
    sum_r = np.bincount(flat, weights=np.repeat(np.arange(h, dtype=np.float64), w), minlength=n_lab)
    sum_c = np.bincount(flat, weights=np.tile(np.arange(w, dtype=np.float64), h), minlength=n_lab)
    # integer sums (exact: float64 holds integers below 2**53)
    sum_r = sum_r.astype(np.int64) + count * tile.valid.y0
    sum_c = sum_c.astype(np.int64) + count * tile.valid.x0
    # centroid (continuous coords) = mean index + 0.5; inside [y0, y1) <=> 2*y0*n <= 2*sum + n < 2*y1*n
    cy2, cx2 = 2 * sum_r + count, 2 * sum_c + count
    core = tile.core
    inside = (
        (cy2 >= 2 * core.y0 * count)
        & (cy2 < 2 * core.y1 * count)
        & (cx2 >= 2 * core.x0 * count)
        & (cx2 < 2 * core.x1 * count)
        & (count > 0)
    )
    inside[0] = False
    top, left, bottom, right = tile.image_edges
    cut: list[np.ndarray] = []
    if not top:
        cut.append(lab[0])
    if not bottom:
        cut.append(lab[-1])
    if not left:
        cut.append(lab[:, 0])
    if not right:
        cut.append(lab[:, -1])
    if cut:
        inside[np.concatenate(cut)] = False
    return np.flatnonzero(inside)


def tiles_intersecting(
    tiles: Iterable[Tile], mask: np.ndarray, scale: float, origin: tuple[int, int] = (0, 0)
) -> list[Tile]:
    """Tiles whose core touches a True pixel of a coarse ``mask``.

    ``scale``: image pixels per mask pixel; ``origin``: the (row, col) in mask-aligned
    image coordinates of the grid's (0, 0) (a grid over a region of a larger image).
    """
    mh, mw = mask.shape
    keep = []
    for t in tiles:
        y0 = min(max(math.floor((t.core.y0 + origin[0]) / scale), 0), mh - 1)
        x0 = min(max(math.floor((t.core.x0 + origin[1]) / scale), 0), mw - 1)
        y1 = max(math.ceil((t.core.y1 + origin[0]) / scale), y0 + 1)
        x1 = max(math.ceil((t.core.x1 + origin[1]) / scale), x0 + 1)
        if mask[y0:y1, x0:x1].any():
            keep.append(t)
    return keep


