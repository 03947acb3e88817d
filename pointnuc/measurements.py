"""The measurements QuPath 0.6.0's own cell detection makes, under its names, for pointnuc's outlines.

QuPath's *Cell detection* (``qupath.imagej.detect.cells.WatershedCellDetection``) gives each
nucleus ``Nucleus: Area``, ``Perimeter``, ``Circularity``, ``Max caliper``, ``Min caliper``,
``Eccentricity`` and, per stain of the image (``Hematoxylin OD``, ``Eosin OD`` for H&E), the
``mean``, ``sum``, ``std dev``, ``max``, ``min`` and ``range`` of the stain's optical density over
the nucleus' pixels; a cell adds the same shape measurements and ``mean``, ``std dev``, ``max``,
``min`` of each stain as ``Cell: ...`` and ``Cytoplasm: ...`` (cell pixels outside any nucleus),
and ``Nucleus/Cell area ratio``. Names carry no unit: µm with a pixel size, px without, as QuPath.
Users feed these to QuPath's object classifiers; :data:`MEASUREMENT_ORDER` is QuPath's order.

How pointnuc computes them (tests/test_measurements_qupath.py checks them against QuPath itself):

- shape, from the outlines as written: area and perimeter of the polygon, circularity
  ``min(4πA/P², 1)``, calipers = the largest and the smallest width of the convex hull (ImageJ's
  Feret values, which QuPath uses), eccentricity ``sqrt(1 - λ2/λ1)`` of the polygon's second
  moments (ImageJ's ellipse fit of the same shape);
- stains: the pixels whose centres lie inside the outline (QuPath labels the same pixels),
  colour-deconvolved as QuPath does (:class:`Stains`): optical density ``max(0, -log10(max(v, 1)
  / background))`` per channel, times the inverse of the stain matrix, as 32-bit floats; the
  standard deviation is the sample one (n - 1), as QuPath's ``RunningStatistics``. The image's own
  stain vectors where a QuPath project has them set, else QuPath's "H&E default".

Everything is vectorised over objects (moments and hulls as flat coordinate arrays, statistics
with ``bincount``/``reduceat`` over a label image rasterised per block of the image).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from pointnuc.deconvolution import HE_DEFAULT, Stains

NUCLEUS_PREFIX, CELL_PREFIX, CYTOPLASM_PREFIX = "Nucleus: ", "Cell: ", "Cytoplasm: "
AREA_RATIO = "Nucleus/Cell area ratio"
#: QuPath's shape measurements of its cell detection, in its order (``ObjectMeasurements.addShapeStatistics``)
SHAPE_NAMES = ("Area", "Perimeter", "Circularity", "Max caliper", "Min caliper", "Eccentricity")
#: per stain, what QuPath measures of a nucleus, and of a cell and its cytoplasm, in its order
NUCLEUS_STATS = ("mean", "sum", "std dev", "max", "min", "range")
CELL_STATS = ("mean", "std dev", "max", "min")
#: the pixel size QuPath's cell detection works at by default (µm): finer images are measured downsampled to it
QUPATH_MEASURE_UM = 0.5
#: the image is read and labelled in blocks of at most this many px a side (at the measuring scale)
BLOCK_PX = 2048


class RegionReader(Protocol):
    """Pixels by full-resolution box (:class:`pointnuc.io.slide.Slide` is one)."""

    def read_region(self, x: float, y: float, w: float, h: float, downsample: float = 1.0) -> np.ndarray:
        """uint8 RGB (round(h/ds), round(w/ds), 3) of the full-resolution box; white outside the image."""
        ...


def stain_names(stains: Stains, prefix: str, stats: Sequence[str]) -> list[str]:
    """``<prefix><stain> OD <stat>`` for each measured stain and statistic, in QuPath's order."""
    return [f"{prefix}{ch} {s}" for ch in stains.measured for s in stats]


def measurement_names(cells: bool, stains: Stains | None = HE_DEFAULT) -> list[str]:
    """QuPath's measurement names of a nucleus detection (``cells=False``) or a cell, in its order;
    without ``stains`` the shape measurements only."""
    names = [NUCLEUS_PREFIX + n for n in SHAPE_NAMES]
    if stains is not None:
        names += stain_names(stains, NUCLEUS_PREFIX, NUCLEUS_STATS)
    if cells:
        names += [CELL_PREFIX + n for n in SHAPE_NAMES]
        if stains is not None:
            names += stain_names(stains, CELL_PREFIX, CELL_STATS) + stain_names(stains, CYTOPLASM_PREFIX, CELL_STATS)
        names.append(AREA_RATIO)
    return names


_STAIN_MEASUREMENT = re.compile(r"^(Nucleus|Cell|Cytoplasm): .+ OD (mean|sum|std dev|max|min|range)$")
_OLD_SHAPE = re.compile(r"^(Nucleus: |Cell: )?(Area (µm|px)\^2|(Length|Perimeter) (µm|px)|Circularity)$")


def is_computed_measurement(name: str) -> bool:
    """Whether ``name`` is one pointnuc computes itself for what it writes (this version's names,
    and the shape names of earlier versions: ``Area µm^2``, ``Length µm``, ...): such values of an
    object read back are recomputed, never carried over."""
    if name == AREA_RATIO or _OLD_SHAPE.match(name) or _STAIN_MEASUREMENT.match(name):
        return True
    for prefix in (NUCLEUS_PREFIX, CELL_PREFIX):
        if name.startswith(prefix) and name[len(prefix):] in SHAPE_NAMES:
            return True
    return False


# --------------------------------------------------------------------------- shape


def shape_columns(geoms: np.ndarray, pixel_size_um: float | None) -> dict[str, np.ndarray]:
    """:data:`SHAPE_NAMES` (unprefixed) of polygons in full-resolution px: µm with a pixel size, else px."""
    geoms = np.asarray(geoms, dtype=object)
    area = shapely.area(geoms).astype(np.float64)
    perim = shapely.length(geoms).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        circ = np.where(perim > 0, np.minimum(4.0 * math.pi * area / (perim * perim), 1.0), 0.0)
    max_cal, min_cal = calipers(geoms)
    ecc = eccentricity(geoms)
    s = float(pixel_size_um) if pixel_size_um else 1.0
    return {"Area": area * s * s, "Perimeter": perim * s, "Circularity": circ, "Max caliper": max_cal * s,
            "Min caliper": min_cal * s, "Eccentricity": ecc}


def calipers(geoms: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(largest, smallest) caliper width of each geometry's convex hull: the largest distance between
    two hull vertices, and the smallest over hull edges of the largest distance of a vertex from the
    edge's line (rotating calipers); as ImageJ's Feret values. 0 for a hull of fewer than 3 vertices."""
    hulls = shapely.get_exterior_ring(shapely.convex_hull(geoms))
    n = len(geoms)
    out_max, out_min = np.zeros(n), np.zeros(n)
    coords, idx = shapely.get_coordinates(hulls, return_index=True)
    if coords.size == 0:
        return out_max, out_min
    counts = np.bincount(idx, minlength=n)
    last = np.cumsum(counts) - 1
    keep = np.ones(len(idx), bool)
    keep[last[counts > 0]] = False  # the closing vertex repeats the first
    coords, idx = coords[keep], idx[keep]
    counts = np.bincount(idx, minlength=n)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(idx)) - start[idx]
    by_size = np.argsort(counts, kind="stable")  # batches of similar hull sizes: little padding
    rank = np.empty(n, np.int64)
    rank[by_size] = np.arange(n)
    for b0 in range(0, n, batch):
        members = by_size[b0:b0 + batch]
        sel = (rank[idx] >= b0) & (rank[idx] < b0 + batch)
        cnt = counts[members]
        k = int(cnt.max(initial=0))
        if k < 3:
            continue
        pts = np.full((len(members), k, 2), np.nan)
        pts[rank[idx[sel]] - b0, pos[sel]] = coords[sel]
        d = pts[:, :, None, :] - pts[:, None, :, :]
        with np.errstate(invalid="ignore"):
            far = np.sqrt(np.nanmax(np.nan_to_num((d * d).sum(-1), nan=-1.0), axis=(1, 2)).clip(0))
        nxt = (np.arange(k)[None, :] + 1) % np.maximum(cnt, 1)[:, None]  # each edge's end vertex (wraps per hull)
        p1 = np.take_along_axis(pts, nxt[:, :, None], axis=1)
        e = p1 - pts  # (B, k edges, 2)
        elen = np.hypot(e[..., 0], e[..., 1])
        rel = pts[:, None, :, :] - pts[:, :, None, :]  # vertex j relative to edge i's start: (B, i, j, 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            dist = np.abs(e[:, :, None, 0] * rel[..., 1] - e[:, :, None, 1] * rel[..., 0]) / elen[:, :, None]
            width = np.nanmax(np.where(np.isnan(dist), -1.0, dist), axis=2)
            width = np.where((elen > 0) & ~np.isnan(elen), width, np.inf)
        mn = width.min(axis=1)
        out_min[members] = np.where((cnt >= 3) & np.isfinite(mn), mn, 0.0)
        out_max[members] = np.where(cnt >= 2, far, 0.0)
    return out_max, out_min


def eccentricity(geoms: np.ndarray) -> np.ndarray:
    """``sqrt(1 - λ2/λ1)`` of each polygon's central second moments (holes subtracted), as the
    eccentricity of ImageJ's ellipse fit that QuPath reports; 0 for an empty shape."""
    n = len(geoms)
    parts, owner = shapely.get_parts(geoms, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    if len(rings) == 0:
        return np.zeros(n)
    exterior = np.r_[True, ring_part[1:] != ring_part[:-1]]
    ring_owner = owner[ring_part]
    xy, ring_of = shapely.get_coordinates(rings, return_index=True)
    ref = shapely.bounds(geoms)[:, :2]  # moments about a nearby point: no cancellation far out on a slide
    xy = xy - ref[ring_owner[ring_of]]
    same = ring_of[:-1] == ring_of[1:]
    x0, y0, x1, y1 = xy[:-1, 0][same], xy[:-1, 1][same], xy[1:, 0][same], xy[1:, 1][same]
    r = ring_of[:-1][same]
    cross = x0 * y1 - x1 * y0
    nr = len(rings)

    def ring_sum(w: np.ndarray) -> np.ndarray:
        return np.bincount(r, weights=w, minlength=nr)

    a = ring_sum(cross) / 2
    sx = ring_sum((x0 + x1) * cross) / 6
    sy = ring_sum((y0 + y1) * cross) / 6
    sxx = ring_sum((x0 * x0 + x0 * x1 + x1 * x1) * cross) / 12
    syy = ring_sum((y0 * y0 + y0 * y1 + y1 * y1) * cross) / 12
    sxy = ring_sum((x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross) / 24
    sign = np.sign(a) * np.where(exterior, 1.0, -1.0)  # exteriors add, holes subtract, either winding

    def total(v: np.ndarray) -> np.ndarray:
        return np.bincount(ring_owner, weights=v * sign, minlength=n)

    A, SX, SY, SXX, SYY, SXY = (total(v) for v in (a, sx, sy, sxx, syy, sxy))
    with np.errstate(divide="ignore", invalid="ignore"):
        cx, cy = SX / A, SY / A
        mxx, myy, mxy = SXX / A - cx * cx, SYY / A - cy * cy, SXY / A - cx * cy
        half = np.sqrt(((mxx - myy) / 2) ** 2 + mxy * mxy)
        l1, l2 = (mxx + myy) / 2 + half, (mxx + myy) / 2 - half
        ecc = np.sqrt(np.clip(1 - l2 / l1, 0.0, 1.0))
    return np.where((A > 0) & np.isfinite(ecc), ecc, 0.0)


# --------------------------------------------------------------------------- stains


def _label_image(geoms: Sequence[BaseGeometry], shape: tuple[int, int], x0: float, y0: float,
                 scale: float) -> np.ndarray:
    """int32 labels 1..N of the pixels whose centres lie inside each geometry (holes excluded), on the
    grid of pixels of size ``scale`` (full-res px) whose top-left corner is at (x0, y0).

    One even-odd scanline fill of all rings at once: each edge's crossings of the pixel-centre rows
    (half-open in y), sorted by object, row and x, paired into spans ``x_in <= centre < x_out``.
    """
    h, w = shape
    labels = np.zeros(shape, np.int32)
    parts, owner = shapely.get_parts(np.asarray(list(geoms), dtype=object), return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    xy, ring_of = shapely.get_coordinates(rings, return_index=True)
    if len(xy) < 2:
        return labels
    lab = owner[ring_part[ring_of]] + 1
    x, y = (xy[:, 0] - x0) / scale - 0.5, (xy[:, 1] - y0) / scale - 0.5  # pixel centres at integers
    same = ring_of[:-1] == ring_of[1:]
    xa, ya, xb, yb, le = x[:-1][same], y[:-1][same], x[1:][same], y[1:][same], lab[:-1][same]
    lo = np.clip(np.ceil(np.minimum(ya, yb)), 0, h).astype(np.int64)
    hi = np.clip(np.ceil(np.maximum(ya, yb)), 0, h).astype(np.int64)
    n = np.maximum(hi - lo, 0)
    if n.sum() == 0:
        return labels
    e = np.repeat(np.arange(len(n)), n)
    row = lo[e] + np.arange(len(e)) - np.repeat(np.cumsum(n) - n, n)
    xr = xa[e] + (row - ya[e]) * (xb[e] - xa[e]) / (yb[e] - ya[e])  # (horizontal edges cross no row)
    order = np.lexsort((xr, row, le[e]))
    xr, row, obj = xr[order], row[order], le[e][order]
    c0 = np.clip(np.ceil(xr[0::2]), 0, w).astype(np.int64)
    c1 = np.clip(np.ceil(xr[1::2]), 0, w).astype(np.int64)
    cnt = np.maximum(c1 - c0, 0)
    k = np.repeat(np.arange(len(cnt)), cnt)
    cols = c0[k] + np.arange(len(k)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    labels[row[0::2][k], cols] = obj[0::2][k]
    return labels


def _label_stats(values: np.ndarray, labels: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per label 1..n and per column of ``values`` (P, k): mean, sum, sample std dev, max, min, range
    (each (n, k); NaN for a label without pixels, std dev NaN below 2 pixels, as QuPath)."""
    k = values.shape[1]
    out = {s: np.full((n, k), np.nan) for s in NUCLEUS_STATS}
    if labels.size == 0:
        return out
    count = np.bincount(labels, minlength=n + 1)[1:].astype(np.float64)
    small = labels.astype(np.int16) if n < 32767 else labels  # (numpy radix-sorts 16-bit integers)
    order = np.argsort(small, kind="stable")
    lab_sorted = labels[order]
    starts = np.flatnonzero(np.r_[True, lab_sorted[1:] != lab_sorted[:-1]])
    present = lab_sorted[starts] - 1
    v64 = values.astype(np.float64)
    for j in range(k):
        s = np.bincount(labels, weights=v64[:, j], minlength=n + 1)[1:]
        ss = np.bincount(labels, weights=v64[:, j] ** 2, minlength=n + 1)[1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = s / count
            var = np.where(count > 1, (ss - s * mean) / (count - 1), np.nan)
        sorted_v = v64[order, j]
        mx, mn = np.full(n, np.nan), np.full(n, np.nan)
        mx[present] = np.maximum.reduceat(sorted_v, starts)
        mn[present] = np.minimum.reduceat(sorted_v, starts)
        has = count > 0
        out["mean"][:, j] = np.where(has, mean, np.nan)
        out["sum"][:, j] = np.where(has, s, np.nan)
        out["std dev"][:, j] = np.sqrt(np.clip(var, 0.0, None))
        out["max"][:, j], out["min"][:, j], out["range"][:, j] = mx, mn, mx - mn
    return out


def stain_columns(nuclei: Sequence[BaseGeometry], cells: Sequence[BaseGeometry] | None, pixels: RegionReader,
                  stains: Stains = HE_DEFAULT, downsample: float = 1.0) -> dict[str, np.ndarray]:
    """The stain measurements (names as :func:`stain_names`) of each nucleus, and with ``cells`` of
    each cell and its cytoplasm (the cell's pixels outside every nucleus), from ``pixels`` read at
    ``downsample`` in blocks of :data:`BLOCK_PX`. One value per object under each name."""
    n = len(nuclei)
    nuc_names = stain_names(stains, NUCLEUS_PREFIX, NUCLEUS_STATS)
    names = nuc_names + ([] if cells is None else stain_names(stains, CELL_PREFIX, CELL_STATS)
                         + stain_names(stains, CYTOPLASM_PREFIX, CELL_STATS))
    cols = {k: np.full(n, np.nan) for k in names}
    if n == 0:
        return cols
    outer = np.asarray(list(cells if cells is not None else nuclei), dtype=object)
    bounds = shapely.bounds(outer)
    ok = np.isfinite(bounds).all(axis=1)
    block = BLOCK_PX * downsample
    cx, cy = (bounds[:, 0] + bounds[:, 2]) / 2, (bounds[:, 1] + bounds[:, 3]) / 2
    key = np.where(ok, np.floor(np.nan_to_num(cy) / block) * 1e6 + np.floor(np.nan_to_num(cx) / block), -1)
    nstain = len(stains.measured)
    for b in np.unique(key[ok]):
        ids = np.flatnonzero((key == b) & ok)
        gx0, gy0 = (math.floor(bounds[ids, i].min() / downsample) * downsample for i in (0, 1))
        gx1, gy1 = (math.ceil(bounds[ids, i].max() / downsample) * downsample for i in (2, 3))
        w, h = max(1, round((gx1 - gx0) / downsample)), max(1, round((gy1 - gy0) / downsample))
        rgb = pixels.read_region(gx0, gy0, w * downsample, h * downsample, downsample)[..., :3]
        lab_n = _label_image([nuclei[int(i)] for i in ids], (h, w), gx0, gy0, downsample)
        regions: list[tuple[str, tuple[str, ...], np.ndarray]] = [(NUCLEUS_PREFIX, NUCLEUS_STATS, lab_n)]
        if cells is not None:
            lab_c = _label_image([cells[int(i)] for i in ids], (h, w), gx0, gy0, downsample)
            regions += [(CELL_PREFIX, CELL_STATS, lab_c), (CYTOPLASM_PREFIX, CELL_STATS, np.where(lab_n > 0, 0, lab_c))]
        # deconvolve only pixels some object covers
        any_lab = lab_n if cells is None else np.maximum(lab_n, lab_c)
        where = np.flatnonzero(any_lab.ravel())
        od = stains.deconvolve(rgb.reshape(-1, 3)[where])
        for prefix, stats, lab in regions:
            lv = lab.ravel()[where]
            inside = lv > 0
            st = _label_stats(od[inside], lv[inside], len(ids))
            for j, ch in enumerate(stains.measured[:nstain]):
                for s in stats:
                    cols[f"{prefix}{ch} {s}"][ids] = st[s][:, j]
    return cols


def measuring_downsample(pixel_size_um: float | None) -> float:
    """The downsample QuPath's cell detection measures at by default: to :data:`QUPATH_MEASURE_UM`
    when the image is finer, else full resolution (1)."""
    if not pixel_size_um or pixel_size_um >= QUPATH_MEASURE_UM:
        return 1.0
    return QUPATH_MEASURE_UM / float(pixel_size_um)


# --------------------------------------------------------------------------- together


def measure(nuclei: Sequence[BaseGeometry], cells: Sequence[BaseGeometry] | None = None, *,
            pixel_size_um: float | None, pixels: RegionReader | None = None, stains: Stains | None = None,
            downsample: float | None = None) -> list[dict[str, float]]:
    """QuPath's cell-detection measurements of each nucleus (with ``cells``: of each cell, its
    nucleus and cytoplasm), one dict each, names and order as :func:`measurement_names`.

    Shape measurements always; stain measurements when ``pixels`` are given (``stains``: QuPath's
    H&E default unless given; ``downsample``: :func:`measuring_downsample` unless given).
    """
    nuc = np.asarray(list(nuclei), dtype=object)
    cols: dict[str, np.ndarray] = {NUCLEUS_PREFIX + k: v for k, v in shape_columns(nuc, pixel_size_um).items()}
    st = stains if stains is not None else HE_DEFAULT
    if pixels is not None:
        ds = downsample if downsample is not None else measuring_downsample(pixel_size_um)
        cols.update(stain_columns(list(nuc), None if cells is None else list(cells), pixels, st, ds))
    if cells is not None:
        cell = np.asarray(list(cells), dtype=object)
        cols.update({CELL_PREFIX + k: v for k, v in shape_columns(cell, pixel_size_um).items()})
        with np.errstate(divide="ignore", invalid="ignore"):
            a_n, a_c = cols[NUCLEUS_PREFIX + "Area"], cols[CELL_PREFIX + "Area"]
            cols[AREA_RATIO] = np.where(a_c > 0, np.minimum(a_n / a_c, 1.0), 0.0)
    names = [k for k in measurement_names(cells is not None, st if pixels is not None else None) if k in cols]
    table = [cols[k].tolist() for k in names]
    return [dict(zip(names, row)) for row in zip(*table)]


def measurements_many(polygons: np.ndarray, pixel_size_um: float | None) -> list[dict[str, float]]:
    """QuPath's shape measurements of nucleus polygons (full-resolution px coordinates), one dict each
    (``Nucleus: Area``, ``Nucleus: Perimeter``, ...; µm with a pixel size, px without)."""
    return measure(list(np.asarray(polygons, dtype=object)), pixel_size_um=pixel_size_um)
