"""One tile's probability map -> the nuclei it owns, as full-resolution polygons with measurements.

Torch-free (numpy, scipy, shapely), so that whole-slide inference can run it in worker
processes beside the GPU. Ownership is :func:`pointnuc.infer.tiling.owned_labels`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from pointnuc.infer.tiling import Box, Tile, owned_labels
from pointnuc.io.base import NucleusObject
from pointnuc.models.calibration import Thresholds

#: polygon simplification tolerance in working pixels. The traced outline is a pixel
#: staircase whose corners stick out up to 0.71 px from any smooth curve through it; a
#: tolerance just above that removes the stairs (3-5x fewer vertices, a perimeter that is
#: no longer inflated by ~25 %), while no point moves by more than 0.75 px, less than the
#: staircase's own error, so the outline looks the same.
SIMPLIFY_PX = 0.75

#: how outlines are traced: ``subpixel`` (:func:`pointnuc.contours.contour_polygons`: where the
#: probability crosses the threshold, between pixel centres) or ``pixels`` (the label image's pixel
#: staircase, :func:`pointnuc.geometry.labels_to_polygons`, simplified by :data:`SIMPLIFY_PX`).
#: ``auto`` (the default) is ``subpixel`` where the network works coarser than
#: the image (a 0.5 µm/px model on a 0.25 µm/px slide: the working grid's staircase would show) and
#: ``pixels`` where it works at the image's own resolution. On MoNuSeg "MO" test (benchmarks/results/
#: outlines.md) sub-pixel outlines were smoother but no closer to the true ones at either resolution
#: (boundary distance +0.01 µm, AJI -0.0002), and at full resolution they cost 0.2 s more per image.
OUTLINES = ("auto", "subpixel", "pixels")
#: simplification of sub-pixel outlines, working px: only drops vertices that are nearly collinear
#: (about 20 % of them) and moves none visibly (synthetic discs: 0.05 full-res px from the circle either way)
SUBPIXEL_SIMPLIFY_PX = 0.02


@dataclass(frozen=True)
class InstanceParams:
    """How a probability map becomes instances (from the model's tuned :class:`Thresholds`)."""

    threshold: float = Thresholds.prob  #: ``Thresholds.prob``
    min_area_px: float = Thresholds.min_area_px  #: ``Thresholds.min_area_px``, working px²
    h_px: float = Thresholds.h_px  #: ``Thresholds.h_px`` (watershed only)
    method: str = "cc"  #: the config's ``segmentation.instance_method``

    @classmethod
    def from_thresholds(cls, thresholds: Thresholds, method: str) -> InstanceParams:
        return cls(threshold=thresholds.prob, min_area_px=thresholds.min_area_px, h_px=thresholds.h_px, method=method)


@dataclass(frozen=True)
class TileContext:
    """What turning any tile of one slide into nuclei needs besides the tile itself."""

    origin: tuple[int, int]  #: working-res (row, col) of the tile grid's (0, 0)
    downsample: float  #: full-res px per working px
    pixel_size_um: float  #: full-res µm/px (for measurements)
    params: InstanceParams = InstanceParams()
    region: BaseGeometry | None = None  #: full-res; nuclei with their centroid outside are dropped
    simplify_px: float | None = None  #: outline simplification, working px (None: the outline's own default)
    outline: str = "auto"  #: one of :data:`OUTLINES`
    #: full-res sample points per working px when tracing sub-pixel outlines (1: on the working grid,
    #: which traced synthetic discs more closely than 2 or 4, see :func:`pointnuc.contours.contour_polygons`)
    upsample: int = 1
    #: nuclei whose outline is smaller than this (µm²) are dropped (``pointnuc segment --min-area``)
    min_area_um2: float = 0.0
    #: instances are looked for only within this many working px around the core (None: the whole
    #: valid window). Anything the tile owns lies within one nucleus diameter of its core, so a
    #: margin just above the largest diameter gives the same nuclei for less work.
    keep_margin: int | None = None


def tile_nuclei(
    prob_fg: np.ndarray, tile: Tile, ctx: TileContext, labels: np.ndarray | None = None
) -> tuple[list[NucleusObject], int]:
    """The nuclei ``tile`` owns, from its window's foreground probability (T, T).

    ``labels``: the instances of the box searched (:func:`search_box`), already computed (on the device,
    :func:`pointnuc.infer.instances_torch.tile_labels`); None: computed here (``instances_from_probability``).

    Outlines are traced as ``ctx.outline`` says (:data:`OUTLINES`); nuclei whose outline is
    under ``ctx.min_area_um2`` are dropped. Returns the nuclei (full-res polygons, mean probability
    as score, shape measurements) and the number of objects dropped because they are centred in the
    core but cut by the tile's edge (larger than the halo: not nuclei).
    """
    from pointnuc.contours import contour_polygons
    from pointnuc.geometry import labels_to_polygons
    from pointnuc.infer.instances import instances_from_probability
    from pointnuc.measurements import measurements_many

    p = ctx.params
    if ctx.outline not in OUTLINES:
        raise ValueError(f"unknown outline {ctx.outline!r}; one of {OUTLINES}")
    tile, v = searched(tile, ctx.keep_margin)
    # at float16's precision, as worker processes receive it (:func:`worker_job`): sub-pixel outlines
    # follow the probability's values, and threads and processes then give the very same nuclei
    prob = np.ascontiguousarray(prob_fg[v.slices()], dtype=np.float16).astype(np.float32)
    if labels is None:
        labels = instances_from_probability(prob, threshold=p.threshold, min_area_px=p.min_area_px, method=p.method,
                                            h_px=p.h_px)
    elif labels.shape != prob.shape:
        raise ValueError(f"labels {labels.shape} do not cover the box searched {prob.shape}")
    else:
        labels = labels.astype(np.int32, copy=False)
    ids = owned_labels(labels, tile)
    n_big = count_large(labels, tile)
    if ids.size == 0:
        return [], n_big
    keep = np.zeros(int(labels.max()) + 1, bool)
    keep[ids] = True
    lab = np.where(keep[labels], labels, 0)
    ds = ctx.downsample
    oy, ox = tile.valid.y0 + ctx.origin[0], tile.valid.x0 + ctx.origin[1]
    offset = (ox * ds, oy * ds)
    outline = ctx.outline if ctx.outline != "auto" else ("subpixel" if ctx.downsample > 1 else "pixels")
    if outline == "pixels":
        simplify = SIMPLIFY_PX if ctx.simplify_px is None else ctx.simplify_px
        polys = labels_to_polygons(lab, offset_xy=offset, scale=ds, simplify_px=simplify)
    else:
        simplify = SUBPIXEL_SIMPLIFY_PX if ctx.simplify_px is None else ctx.simplify_px
        polys = contour_polygons(lab, prob, p.threshold, origin_px=(ox, oy), scale=ds, upsample=ctx.upsample,
                                 simplify_px=simplify)
    if not polys:
        return [], n_big
    flat = lab.ravel()
    sums = np.bincount(flat, weights=prob.ravel(), minlength=len(keep))
    counts = np.bincount(flat, minlength=len(keep))
    idx = np.fromiter(polys.keys(), np.int64, len(polys))
    geoms = np.fromiter(polys.values(), object, len(polys))
    if ctx.region is not None:
        region = ctx.region
        if not shapely.is_prepared(region):  # (prepared once per slide by the caller / worker)
            shapely.prepare(region)
        xy = shapely.get_coordinates(shapely.centroid(geoms))
        inside = shapely.contains_xy(region, xy[:, 0], xy[:, 1])
        idx, geoms = idx[inside], geoms[inside]
    if ctx.min_area_um2 > 0:
        big = shapely.area(geoms) * ctx.pixel_size_um**2 >= ctx.min_area_um2
        idx, geoms = idx[big], geoms[big]
    scores = sums[idx] / np.maximum(counts[idx], 1)
    meas = measurements_many(geoms, ctx.pixel_size_um)
    return [NucleusObject(g, float(sc), m) for g, sc, m in zip(geoms, scores.tolist(), meas)], n_big


def searched(tile: Tile, margin: int | None) -> tuple[Tile, Box]:
    """The tile cut to the box instances are looked for in (:func:`search_box`), and that box in the tile's
    window coordinates (what :func:`tile_nuclei` and the device path take of a window's probability)."""
    cut = search_box(tile, margin)
    return cut, cut.valid.shift(-cut.window.y0, -cut.window.x0)


def search_box(tile: Tile, margin: int | None) -> Tile:
    """The tile with its ``valid`` box cut down to the core grown by ``margin`` (edges that move inward are no image border)."""
    if margin is None:
        return tile
    box = tile.valid.intersect(Box(tile.core.y0 - margin, tile.core.x0 - margin, tile.core.y1 + margin, tile.core.x1 + margin))
    v = tile.valid
    edges = (
        tile.image_edges[0] and box.y0 == v.y0,
        tile.image_edges[1] and box.x0 == v.x0,
        tile.image_edges[2] and box.y1 == v.y1,
        tile.image_edges[3] and box.x1 == v.x1,
    )
    return dataclasses.replace(tile, valid=box, image_edges=edges)


def count_large(labels: np.ndarray, tile: Tile) -> int:
    """Objects centred in the tile's core but cut by an interior edge of its valid box."""
    top, left, bottom, right = tile.image_edges
    edge = [e for e, border in ((labels[0], top), (labels[-1], bottom), (labels[:, 0], left), (labels[:, -1], right)) if not border]
    if not edge:
        return 0
    cut = np.unique(np.concatenate(edge))
    n = 0
    for i in cut[cut > 0]:
        rr, cc = np.nonzero(labels == i)
        cy, cx = rr.mean() + 0.5 + tile.valid.y0, cc.mean() + 0.5 + tile.valid.x0
        n += int(tile.core.y0 <= cy < tile.core.y1 and tile.core.x0 <= cx < tile.core.x1)
    return n


# --- worker-process side: the context is sent once, then only (tile, probability) per job

_CTX: TileContext | None = None


def init_worker(ctx: TileContext) -> None:
    """Process-pool initializer: keep the slide's context (region prepared) and import what jobs use."""
    global _CTX
    _CTX = ctx
    if ctx.region is not None:
        shapely.prepare(ctx.region)
    preload(ctx.params.method, subpixel=ctx.outline != "pixels")


def preload(method: str, *, subpixel: bool = True) -> None:
    """Import what post-processing uses now, rather than in the first tile's time (skimage's watershed modules
    alone take 0.5-0.7 s on a 2-core VM): ``method`` as :class:`InstanceParams`, ``subpixel`` outlines or not."""
    import pointnuc.contours
    import pointnuc.geometry
    import pointnuc.infer.instances
    import pointnuc.measurements  # noqa: F401

    if subpixel:
        import skimage.measure
    if method == "watershed":
        import skimage.morphology
        import skimage.segmentation  # noqa: F401


def warm_up() -> None:
    """A job that does nothing: submitting a few makes the pool start its workers early."""


def worker_job(job: tuple[Any, ...]) -> tuple[tuple[Any, ...], int, float]:
    """One tile in a worker process: (tile, probability) or (tile, probability, labels) (:func:`tile_nuclei`);
    the probability sent as float16 to halve the copy.

    Returns the nuclei packed as arrays (:func:`pack_nuclei`: cheaper to send and to
    rebuild than pickled objects), the count of dropped large objects, and the busy seconds.
    """
    assert _CTX is not None, "init_worker was not called"
    t0 = time.perf_counter()
    tile, prob, *labels = job
    found, big = tile_nuclei(prob.astype(np.float32), tile, _CTX, *labels)
    packed = pack_nuclei(found)
    return packed, big, time.perf_counter() - t0


def pack_nuclei(nuclei: list[NucleusObject]) -> tuple[Any, ...]:
    """Nuclei (single-ring polygons) as flat arrays: coordinates, ring index per vertex, scores,
    measurement names and values."""
    if not nuclei:
        return ()
    geoms = np.array([n.polygon for n in nuclei], dtype=object)
    coords, ring = shapely.get_coordinates(shapely.get_exterior_ring(geoms), return_index=True)
    keys = tuple(nuclei[0].measurements)
    values = np.array([[n.measurements[k] for k in keys] for n in nuclei], np.float64)
    scores = np.array([n.score for n in nuclei], np.float64)
    return coords, ring, scores, keys, values


def unpack_nuclei(packed: tuple[Any, ...]) -> list[NucleusObject]:
    """The nuclei of :func:`pack_nuclei` again (same coordinates, scores and measurements)."""
    if not packed:
        return []
    coords, ring, scores, keys, values = packed
    polys = shapely.polygons(shapely.linearrings(coords, indices=ring))
    return [NucleusObject(p, sc, dict(zip(keys, v))) for p, sc, v in zip(polys.tolist(), scores.tolist(), values.tolist())]
