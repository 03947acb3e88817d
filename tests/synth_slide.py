"""A synthetic pyramidal whole-slide TIFF (dark discs on pink tissue, white glass), written tile by tile.

Used by tests/test_wsi.py and benchmarks/segment_speed.py; the writer never holds
more than one tile of any level, so a 20,000 x 20,000 px slide costs no memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PINK = (228, 180, 210)
NUCLEUS = (80, 40, 120)
GLASS = (245, 245, 245)
TILE = 256


@dataclass
class SynthSlide:
    """Ground truth of a synthetic slide (full-resolution px)."""

    width: int
    height: int
    centres: np.ndarray  #: (N, 2) x/y of the disc centres
    radii: np.ndarray  #: (N,)
    tissue_x1: int  #: tissue covers x < tissue_x1; glass beyond
    _index: dict[tuple[int, int], np.ndarray] | None = None

    def near(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Indices of discs that may touch the box (bucketed, so big slides render fast)."""
        if self._index is None:
            b = np.floor(self.centres / BUCKET).astype(np.int64)
            order = np.lexsort((b[:, 1], b[:, 0]))
            keys, start = np.unique(b[order], axis=0, return_index=True)
            ends = np.append(start[1:], len(order))
            self._index = {(int(k[0]), int(k[1])): order[s:e] for k, s, e in zip(keys, start, ends)}
        rmax = float(self.radii.max(initial=0)) + 2
        bx = range(int(np.floor((x0 - rmax) / BUCKET)), int(np.floor((x1 + rmax) / BUCKET)) + 1)
        by = range(int(np.floor((y0 - rmax) / BUCKET)), int(np.floor((y1 + rmax) / BUCKET)) + 1)
        parts = [self._index[(i, j)] for i in bx for j in by if (i, j) in self._index]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


BUCKET = 256


def lattice_discs(width: int, height: int, tissue_x1: int, spacing: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Many non-overlapping discs fast: a jittered lattice (radius 8-14 px, jitter keeps 3 px gaps)."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(spacing, tissue_x1 - spacing, spacing), np.arange(spacing, height - spacing, spacing))
    jitter = max(0.0, (spacing - 2 * 14 - 3) / 2)
    xy = np.column_stack([xs.ravel(), ys.ravel()]) + rng.uniform(-jitter, jitter, (xs.size, 2))
    return xy, rng.uniform(8, 14, len(xy))


def random_discs(width: int, height: int, tissue_x1: int, n: int, rmin: float, rmax: float, seed: int,
                 forced: list[tuple[float, float]] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping discs inside the tissue; ``forced`` centres first (e.g. on tile seams)."""
    rng = np.random.default_rng(seed)
    cand = [np.asarray(forced, float).reshape(-1, 2), np.column_stack([rng.uniform(0, tissue_x1, n), rng.uniform(0, height, n)])]
    xy = np.concatenate(cand)
    r = rng.uniform(rmin, rmax, len(xy))
    keep: list[int] = []
    cell = 2 * rmax + 2
    grid: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(xy):
        if not (r[i] + 1 <= x <= tissue_x1 - r[i] - 1 and r[i] + 1 <= y <= height - r[i] - 1):
            continue
        gx, gy = int(x // cell), int(y // cell)
        near = [j for dx in (-1, 0, 1) for dy in (-1, 0, 1) for j in grid.get((gx + dx, gy + dy), [])]
        if any(np.hypot(x - xy[j, 0], y - xy[j, 1]) < r[i] + r[j] + 3 for j in near):
            continue
        keep.append(i)
        grid.setdefault((gx, gy), []).append(i)
    return xy[keep], r[keep]


def render(truth: SynthSlide, x0: float, y0: float, w: int, h: int, ds: float = 1.0) -> np.ndarray:
    """Pixels (h, w, 3) of the box starting at full-res (x0, y0), sampled every ``ds`` full-res px."""
    xs = x0 + (np.arange(w) + 0.5) * ds
    ys = y0 + (np.arange(h) + 0.5) * ds
    img = np.empty((h, w, 3), np.uint8)
    img[:] = PINK
    img[:, xs >= truth.tissue_x1] = GLASS
    img[:, xs >= truth.width] = 255
    img[ys >= truth.height] = 255
    c, r = truth.centres, truth.radii
    sel = truth.near(xs[0], ys[0], xs[-1], ys[-1])
    for i in sel:
        cx, cy, rr = c[i, 0], c[i, 1], r[i]
        jx = np.flatnonzero(np.abs(xs - cx) <= rr)
        jy = np.flatnonzero(np.abs(ys - cy) <= rr)
        if jx.size and jy.size:
            sub = (xs[jx][None, :] - cx) ** 2 + (ys[jy][:, None] - cy) ** 2 <= rr * rr
            block = img[jy[0] : jy[-1] + 1, jx[0] : jx[-1] + 1]
            block[sub] = NUCLEUS
    return img


def _tiles(truth: SynthSlide, lw: int, lh: int, ds: float) -> Iterator[np.ndarray]:
    for ty in range(0, lh, TILE):
        for tx in range(0, lw, TILE):
            yield render(truth, tx * ds, ty * ds, TILE, TILE, ds)


def write_slide(path: Path, truth: SynthSlide, pixel_size_um: float, *, levels: int = 3, compression: str | None = None) -> None:
    """A tiled pyramidal TIFF (levels at downsample 1, 4, 16, ...) with its pixel size, QuPath/tiffslide readable."""
    import tifffile

    ppcm = 1e4 / pixel_size_um
    dims = []
    for level in range(levels):
        ds = 4.0**level
        lw, lh = int(np.ceil(truth.width / ds)), int(np.ceil(truth.height / ds))
        if level and min(lw, lh) < TILE:
            break
        dims.append((ds, lw, lh))
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, (ds, lw, lh) in enumerate(dims):
            tif.write(
                _tiles(truth, lw, lh, ds),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression=compression,
                resolution=(ppcm / ds, ppcm / ds),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                subifds=len(dims) - 1 if level == 0 else None,
            )


def direct_and_zarr_reads(slide, boxes):
    """``slide.read_region`` of each (x, y, w, h, downsample) box, read directly and through zarr."""
    backend = slide._backend
    direct = [slide.read_region(*b[:4], downsample=b[4]) for b in boxes]
    fd, backend._fd = backend._fd, None  # the zarr path
    try:
        via_zarr = [slide.read_region(*b[:4], downsample=b[4]) for b in boxes]
    finally:
        backend._fd = fd
    return direct, via_zarr
