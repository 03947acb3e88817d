"""Tiles with a halo, the rule that gives every instance to exactly one tile, and stitching.

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
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

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

    def intersect(self, other: "Box") -> "Box":
        """The common part of two boxes (possibly empty)."""
        return Box(max(self.y0, other.y0), max(self.x0, other.x0), min(self.y1, other.y1), min(self.x1, other.x1))

    def shift(self, dy: int, dx: int) -> "Box":
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
    return max(0, int(math.ceil(halo_px / (NET_STRIDE // 2))) * (NET_STRIDE // 2))


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
    tiles = []
    for r in range(math.ceil(height / core)):
        for c in range(math.ceil(width / core)):
            cb = Box(r * core, c * core, min((r + 1) * core, height), min((c + 1) * core, width))
            win = Box(cb.y0 - halo, cb.x0 - halo, cb.y0 - halo + tile_size, cb.x0 - halo + tile_size)
            val = win.intersect(image)
            edges = (val.y0 == 0, val.x0 == 0, val.y1 == height, val.x1 == width)
            tiles.append(Tile(len(tiles), r, c, cb, win, val, edges))
    return TileGrid(height, width, tile_size, halo, tuple(tiles))


def read_window(image: np.ndarray, window: Box, pad_value: float | int = 0) -> np.ndarray:
    """The ``window`` of ``image`` (H, W, ...), padded with ``pad_value`` where it sticks out."""
    h, w = image.shape[:2]
    out = np.full((window.height, window.width) + image.shape[2:], pad_value, dtype=image.dtype)
    src = window.intersect(Box(0, 0, h, w))
    if not src.empty:
        dst = src.shift(-window.y0, -window.x0)
        out[dst.slices()] = image[src.slices()]
    return out


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


def keep_owned(labels: np.ndarray, tile: Tile) -> np.ndarray:
    """``labels`` with every instance the tile does not own set to 0."""
    ids = owned_labels(labels, tile)
    keep = np.zeros(int(labels.max(initial=0)) + 1, bool)
    keep[ids] = True
    return np.where(keep[labels], labels, 0)


def stitch_labels(grid: TileGrid, tile_labels: Iterable[tuple[Tile, np.ndarray]]) -> np.ndarray:
    """One int32 label image from per-tile labels (each over its tile's ``valid`` box).

    Each tile contributes only the instances it owns, relabelled consecutively.
    """
    out = np.zeros((grid.height, grid.width), np.int32)
    next_id = 1
    for tile, lab in tile_labels:
        ids = owned_labels(lab, tile)
        if ids.size == 0:
            continue
        lut = np.zeros(int(lab.max()) + 1, np.int32)
        lut[ids] = np.arange(next_id, next_id + ids.size, dtype=np.int32)
        next_id += ids.size
        new = lut[lab]
        sl = out[tile.valid.slices()]
        np.copyto(sl, new, where=new > 0)
    return out


def tiled_predict(
    image: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    *,
    tile_size: int,
    halo: int,
    pad_value: float | int = 0,
    batch_size: int = 4,
) -> np.ndarray:
    """Per-pixel prediction (C, H, W) of an image (H, W, ...) tile by tile, keeping each core.

    ``predict`` maps a batch of windows (B, tile_size, tile_size, ...) to (B, C, tile_size, tile_size).
    """
    grid = make_grid(image.shape[0], image.shape[1], tile_size=tile_size, halo=halo)
    out: np.ndarray | None = None
    tiles = list(grid)
    for i in range(0, len(tiles), batch_size):
        chunk = tiles[i : i + batch_size]
        pred = np.asarray(predict(np.stack([read_window(image, t.window, pad_value) for t in chunk])))
        if out is None:
            out = np.zeros((pred.shape[1], grid.height, grid.width), pred.dtype)
        for t, p in zip(chunk, pred):
            src = t.core.shift(-t.window.y0, -t.window.x0)
            out[(slice(None),) + t.core.slices()] = p[(slice(None),) + src.slices()]
    assert out is not None
    return out


def untiled_reference(
    image: np.ndarray, predict: Callable[[np.ndarray], np.ndarray], *, tile_size: int, halo: int, pad_value: float | int = 0
) -> np.ndarray:
    """What :func:`tiled_predict` approximates: one prediction over the image padded like the grid.

    The image is padded by ``halo`` on the top/left and up to the grid's extent on the
    bottom/right (so the window phases agree), predicted once, and cropped back.
    """
    grid = make_grid(image.shape[0], image.shape[1], tile_size=tile_size, halo=halo)
    rows, cols = grid.shape
    big = Box(-halo, -halo, rows * grid.core_size + halo, cols * grid.core_size + halo)
    pred = np.asarray(predict(read_window(image, big, pad_value)[None]))[0]
    return pred[:, halo : halo + grid.height, halo : halo + grid.width]


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
        y0 = min(max(int(math.floor((t.core.y0 + origin[0]) / scale)), 0), mh - 1)
        x0 = min(max(int(math.floor((t.core.x0 + origin[1]) / scale)), 0), mw - 1)
        y1 = max(int(math.ceil((t.core.y1 + origin[0]) / scale)), y0 + 1)
        x1 = max(int(math.ceil((t.core.x1 + origin[1]) / scale)), x0 + 1)
        if mask[y0:y1, x0:x1].any():
            keep.append(t)
    return keep


def label_tiles(labels: np.ndarray, grid: TileGrid) -> Iterator[tuple[Tile, np.ndarray]]:
    """Each tile with the part of ``labels`` in its valid box (the 'cut' half of the round trip)."""
    for t in grid:
        yield t, labels[t.valid.slices()]


__all__: Sequence[str] = (
    "Box",
    "Tile",
    "TileGrid",
    "NET_STRIDE",
    "round_halo",
    "make_grid",
    "read_window",
    "owned_labels",
    "keep_owned",
    "stitch_labels",
    "tiled_predict",
    "untiled_reference",
    "tiles_intersecting",
    "label_tiles",
)
