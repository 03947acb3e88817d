"""Reference implementations and tools the tests compare pointnuc against (never used by pointnuc itself).

Each is the slow, obvious way to compute what a product function computes fast: the tests
prove the two agree. The benchmarks use some of them too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry
from skimage.color import lab2rgb, rgb2lab

from pointnuc.geometry import trace_mask, valid_polygon
from pointnuc.infer.instances import _distance, _remove_small, _split, fill_small_holes
from pointnuc.infer.tiling import Box, Tile, TileGrid, make_grid, owned_labels
from pointnuc.measurements import measurements_many

# --------------------------------------------------------------------------- tiling (pointnuc.infer.tiling)


def read_window(image: np.ndarray, window: Box, pad_value: float = 0) -> np.ndarray:
    """The ``window`` of ``image`` (H, W, ...), padded with ``pad_value`` where it sticks out."""
    h, w = image.shape[:2]
    out = np.full((window.height, window.width) + image.shape[2:], pad_value, dtype=image.dtype)
    src = window.intersect(Box(0, 0, h, w))
    if not src.empty:
        dst = src.shift(-window.y0, -window.x0)
        out[dst.slices()] = image[src.slices()]
    return out


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
    pad_value: float = 0,
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
    image: np.ndarray, predict: Callable[[np.ndarray], np.ndarray], *, tile_size: int, halo: int, pad_value: float = 0
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


def label_tiles(labels: np.ndarray, grid: TileGrid) -> Iterator[tuple[Tile, np.ndarray]]:
    """Each tile with the part of ``labels`` in its valid box (the 'cut' half of the round trip)."""
    for t in grid:
        yield t, labels[t.valid.slices()]


# --------------------------------------------------------------------------- instances (pointnuc.infer.instances)


def watershed_tile(mask: np.ndarray, h_px: float) -> np.ndarray:
    """:func:`pointnuc.infer.instances._watershed` computed over the whole tile at once (reference for tests)."""
    return _split(_distance(mask), mask, h_px)


def watershed_reference(prob_fg: np.ndarray, *, threshold: float = 0.5, min_area_px: float = 20.0,
                         max_hole_px: float | None = None, h_px: float = 1.5) -> np.ndarray:
    """The whole-tile watershed as it was before per-component splitting (the distance map not
    zeroed outside the mask: a component's maxima could be weighed against a neighbour's
    through the smoothed background). Kept for tests and ``benchmarks/post_speed.py``."""
    p = np.asarray(prob_fg, dtype=np.float32)
    mask = fill_small_holes(p >= threshold, 4 * min_area_px if max_hole_px is None else max_hole_px)
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(mask), 1.0)
    return _remove_small(_split(dist, mask, h_px).astype(np.int64), min_area_px)


def canonical_labels(lab: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n by each instance's first pixel in raster order (same partition <=> same array)."""
    flat = lab.ravel()
    ids, first = np.unique(flat, return_index=True)
    first, ids = first[ids > 0], ids[ids > 0]
    lut = np.zeros(int(flat.max(initial=0)) + 1, np.int64)
    lut[ids[np.argsort(first)]] = np.arange(1, len(ids) + 1)
    return lut[lab]


# --------------------------------------------------------------------------- geometry (pointnuc.geometry)


def mask_to_polygon(mask: np.ndarray) -> Polygon | None:
    """The pixel-corner outline of a boolean mask's largest piece (holes filled), or None."""
    if not np.any(mask):
        return None
    ring = trace_mask(mask)
    return Polygon(ring) if len(ring) >= 4 else None


def labels_to_polygons_each(
    labels: np.ndarray,
    *,
    offset_xy: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    simplify_px: float = 0.0,
) -> dict[int, Polygon]:
    """:func:`pointnuc.geometry.labels_to_polygons` one instance at a time (the reference for tests)."""
    labels = np.asarray(labels)
    out: dict[int, Polygon] = {}
    ox, oy = float(offset_xy[0]), float(offset_xy[1])
    if labels.dtype.kind not in "iu" or labels.dtype.itemsize > 8:
        labels = labels.astype(np.int64)
    for i, sl in enumerate(ndi.find_objects(labels)):
        if sl is None:
            continue
        lab = i + 1
        ring = trace_mask(labels[sl] == lab)
        if len(ring) < 4:
            continue
        ring[:, 0] += sl[1].start
        ring[:, 1] += sl[0].start
        if simplify_px > 0:
            poly = valid_polygon(Polygon(ring).simplify(simplify_px, preserve_topology=True))
            if poly is None:
                continue
            ring = np.asarray(poly.exterior.coords)
        if scale != 1.0:
            ring = ring * scale
        if ox or oy:
            ring = ring + np.array([ox, oy])
        out[lab] = Polygon(ring)
    return out


def nucleus_measurements(polygon: BaseGeometry, pixel_size_um: float | None) -> dict[str, float]:
    """QuPath's shape measurements of one detection polygon (full-resolution px coordinates).

    With a pixel size: ``Area µm^2``, ``Length µm`` (the perimeter); without: ``Area px^2``,
    ``Length px``. Always ``Circularity`` = 4πA/P² (1 for a circle; unit-free).
    """
    return measurements_many(np.asarray([polygon], dtype=object), pixel_size_um)[0]


# --------------------------------------------------------------------------- colour (pointnuc.stain)


def reinhard_apply_skimage(
    image: np.ndarray, source: tuple[np.ndarray, np.ndarray], ref: Mapping[str, Sequence[float]]
) -> np.ndarray:
    """:func:`pointnuc.stain.reinhard_apply` through scikit-image's ``rgb2lab``/``lab2rgb`` (the reference; slower)."""
    tm, ts = np.asarray(ref["mean"], np.float32), np.asarray(ref["std"], np.float32)
    m, s = source
    lab = rgb2lab(np.asarray(image)[..., :3].astype(np.float32) / 255.0).astype(np.float32)
    lab = (lab - m) / np.maximum(s, 1e-6) * ts + tm
    with warnings.catch_warnings():  # out-of-gamut colours are clipped
        warnings.simplefilter("ignore", UserWarning)
        rgb = lab2rgb(lab)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
