"""Label images <-> shapely polygons, in QuPath's pixel-corner convention.

An instance's outline runs along pixel *corners* (like QuPath's ``ContourTracing``): pixel
(r, c) covers x in [c, c+1), y in [r, r+1), so an untouched traced polygon's area in px²
equals the instance's pixel count. Holes are filled, and of several disconnected pieces only
the largest (4-connected) is kept, so every polygon is a single valid shell.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

_CROSS = ndi.generate_binary_structure(2, 1)


def _largest_piece(mask: np.ndarray) -> np.ndarray:
    """Hole-filled largest 4-connected component of a boolean mask."""
    lab, n = ndi.label(mask, structure=_CROSS)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        mask = lab == int(np.argmax(sizes))
    # background that reaches the border only diagonally counts as a hole (4-connected flood),
    # which also removes every diagonal pinch: the outline is then one simple ring
    return ndi.binary_fill_holes(mask, structure=_CROSS)


def _single_ring(mask: np.ndarray) -> np.ndarray | None:
    """Corner outline of ``mask`` if it is one 4-connected piece without holes, else None."""
    h, w = mask.shape
    m = np.zeros((h + 2, w + 2), bool)
    m[1:-1, 1:-1] = mask
    V = w + 3  # vertices per row of the padded grid
    # directed unit edges along pixel sides, object on the same side throughout (QuPath's direction)
    r, c = np.nonzero(m[1:, :] & ~m[:-1, :])  # top side of object pixel (r+1, c): (c+1, r+1) -> (c, r+1)
    s1, e1 = (r + 1) * V + c + 1, (r + 1) * V + c
    r, c = np.nonzero(m[:-1, :] & ~m[1:, :])  # bottom side of (r, c): (c, r+1) -> (c+1, r+1)
    s2, e2 = (r + 1) * V + c, (r + 1) * V + c + 1
    r, c = np.nonzero(m[:, 1:] & ~m[:, :-1])  # left side of (r, c+1): (c+1, r) -> (c+1, r+1)
    s3, e3 = r * V + c + 1, (r + 1) * V + c + 1
    r, c = np.nonzero(m[:, :-1] & ~m[:, 1:])  # right side of (r, c): (c+1, r+1) -> (c+1, r)
    s4, e4 = (r + 1) * V + c + 1, r * V + c + 1
    start = np.concatenate((s1, s2, s3, s4))
    end = np.concatenate((e1, e2, e3, e4))
    n = len(start)
    if n == 0:
        return np.zeros((0, 2), float)
    idx = np.arange(n)
    edge_at = np.full((h + 3) * V, -1, np.int64)
    edge_at[start] = idx
    if not np.array_equal(edge_at[start], idx):  # a vertex with two outgoing edges: a diagonal pinch
        return None
    succ = edge_at[end].tolist()
    xs, ys = start % V, start // V
    first = int(np.argmin(xs * (h + 3) + ys))  # leftmost, then topmost corner (where QuPath starts)
    order = [first]
    k = succ[first]
    for _ in range(n):
        if k == first:
            break
        order.append(k)
        k = succ[k]
    if len(order) != n:  # more than one ring: holes or several pieces
        return None
    pts = np.stack((xs[order], ys[order]), axis=1)
    d_in = pts - np.roll(pts, 1, axis=0)
    d_out = np.roll(pts, -1, axis=0) - pts
    turn = (d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]) != 0  # keep corners only
    pts = pts[turn].astype(float) - 1.0  # undo the padding
    return np.vstack((pts, pts[:1]))


def trace_mask(mask: np.ndarray) -> np.ndarray:
    """Corner vertices (K, 2) as x/y of the outline of a boolean mask's largest piece, holes filled.

    The ring is closed (first vertex repeated), has no collinear vertices and runs in the
    same direction as QuPath's (clockwise in shapely's y-up sense), starting at its
    leftmost-then-topmost corner, as QuPath's ContourTracing does.
    """
    mask = np.asarray(mask, bool)
    ring = _single_ring(mask)
    if ring is None:
        ring = _single_ring(_largest_piece(mask))
        assert ring is not None  # one hole-free 4-connected piece always has a single simple ring
    return ring


def labels_to_polygons(
    labels: np.ndarray,
    *,
    offset_xy: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    simplify_px: float = 0.0,
) -> dict[int, Polygon]:
    """One valid polygon per instance id of ``labels`` (0 = background), in QuPath x/y.

    Vertex (x, y) in label-pixel corners becomes ``(x * scale + offset_x, y * scale + offset_y)``.
    ``simplify_px`` > 0 simplifies (Douglas-Peucker, topology preserving) with that tolerance in
    label pixels; 0 keeps the exact staircase, whose area in px² equals the pixel count.

    All outlines are traced at once (:func:`_trace_all`) and turned into polygons by
    shapely's array functions; instances with holes, several pieces or a diagonal pinch go
    through :func:`trace_mask` one by one. The result is that of ``labels_to_polygons_each`` (``tests/helpers.py``)
    (vertex for vertex without simplification; with it, the same outline, which may start at
    another of its vertices).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError("labels must be a 2-D array")
    if labels.dtype.kind not in "iu" or labels.dtype.itemsize > 8:
        labels = labels.astype(np.int64)
    ids, coords, ring_of, odd = _trace_all(labels)
    rings: list[np.ndarray] = []
    ring_ids: list[int] = []
    if len(odd):
        slices = ndi.find_objects(labels, max_label=int(odd.max()))
        for lab in odd.tolist():
            sl = slices[lab - 1]
            ring = trace_mask(labels[sl] == lab)
            if len(ring) < 4:
                continue
            ring[:, 0] += sl[1].start
            ring[:, 1] += sl[0].start
            rings.append(ring)
            ring_ids.append(lab)
    if rings:
        coords = np.concatenate([coords] + rings)
        ring_of = np.concatenate([ring_of] + [np.full(len(r), len(ids) + k, np.int64) for k, r in enumerate(rings)])
        ids = np.concatenate([ids, np.asarray(ring_ids, np.int64)])
    if len(ids) == 0:
        return {}
    polys = shapely.polygons(shapely.linearrings(coords, indices=ring_of))
    keep = np.ones(len(ids), bool)
    if simplify_px > 0:
        # plain Douglas-Peucker (7x faster than the topology-preserving variant, the same
        # outlines up to where the ring starts); where it breaks a ring, the careful one
        simple = shapely.simplify(polys, simplify_px, preserve_topology=False)
        ok = (shapely.get_type_id(simple) == 3) & shapely.is_valid(simple) & ~shapely.is_empty(simple)
        ok &= shapely.area(simple) > 0
        if not ok.all():
            simple[~ok] = shapely.simplify(polys[~ok], simplify_px, preserve_topology=True)
        polys = simple
        ok = (shapely.get_type_id(polys) == 3) & shapely.is_valid(polys) & ~shapely.is_empty(polys)
        ok &= shapely.area(polys) > 0
        for k in np.flatnonzero(~ok):
            poly = valid_polygon(polys[k])
            keep[k] = poly is not None
            polys[k] = poly
        polys = shapely.polygons(shapely.get_exterior_ring(polys[keep]))
        ids = ids[keep]
    ox, oy = float(offset_xy[0]), float(offset_xy[1])
    if scale != 1.0 or ox or oy:
        shift = np.array([ox, oy])
        polys = shapely.transform(polys, lambda xy: xy * scale + shift if (ox or oy) else xy * scale)
    order = np.argsort(ids, kind="stable")
    return {int(ids[k]): polys[k] for k in order}


def _trace_all(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Corner outlines of every instance of ``labels`` that is one 4-connected piece without holes.

    Returns ``ids`` (K,), ``coords`` (M, 2) x/y of the closed rings one after the other,
    ``ring_of`` (M,) which ring (0..K-1) each vertex belongs to, and ``odd``: the ids that
    are not one simple ring (several pieces, holes, diagonal pinches), left to :func:`trace_mask`.
    Each ring is the one :func:`trace_mask` gives: same direction, same first vertex, corners only.
    """
    h, w = labels.shape
    m = np.zeros((h + 2, w + 2), np.int64)
    m[1:-1, 1:-1] = labels
    V = w + 3
    NV = (h + 3) * V
    parts = []
    # directed unit edges along pixel sides (see _single_ring), one set per label; (start, end, direction)
    a, b = m[1:, :], m[:-1, :]
    r, c = np.nonzero((a != 0) & (a != b))  # top side of (r+1, c)
    parts.append((a[r, c], (r + 1) * V + c + 1, (r + 1) * V + c, 0))
    a, b = m[:-1, :], m[1:, :]
    r, c = np.nonzero((a != 0) & (a != b))  # bottom side of (r, c)
    parts.append((a[r, c], (r + 1) * V + c, (r + 1) * V + c + 1, 1))
    a, b = m[:, 1:], m[:, :-1]
    r, c = np.nonzero((a != 0) & (a != b))  # left side of (r, c+1)
    parts.append((a[r, c], r * V + c + 1, (r + 1) * V + c + 1, 2))
    a, b = m[:, :-1], m[:, 1:]
    r, c = np.nonzero((a != 0) & (a != b))  # right side of (r, c)
    parts.append((a[r, c], (r + 1) * V + c + 1, r * V + c + 1, 3))
    lab = np.concatenate([p[0] for p in parts])
    start = np.concatenate([p[1] for p in parts])
    end = np.concatenate([p[2] for p in parts])
    dirn = np.concatenate([np.full(len(p[0]), p[3], np.int8) for p in parts])
    empty = (np.zeros(0, np.int64), np.zeros((0, 2), float), np.zeros(0, np.int64))
    if len(lab) == 0:
        return (*empty, np.zeros(0, np.int64))
    key = lab * NV + start
    order = np.argsort(key, kind="stable")
    skey = key[order]
    pinch = np.unique(lab[order[1:][skey[1:] == skey[:-1]]])  # a vertex with two outgoing edges
    if len(pinch):
        ok = ~np.isin(lab, pinch)
        lab, start, end, dirn = lab[ok], start[ok], end[ok], dirn[ok]
        key = key[ok]
        order = np.argsort(key, kind="stable")
        skey = key[order]
    n = len(lab)
    if n == 0:
        return (*empty, pinch)
    succ = order[np.searchsorted(skey, lab * NV + end)]
    # the first edge of each label's ring: leftmost, then topmost start vertex (as trace_mask)
    xs, ys = start % V, start // V
    by = np.lexsort((xs * (h + 3) + ys, lab))
    firsts = by[np.r_[True, lab[by][1:] != lab[by][:-1]]]
    # list ranking by pointer jumping: steps from each edge to the last edge of its label's ring
    is_first = np.zeros(n, bool)
    is_first[firsts] = True
    last = is_first[succ]
    nxt = np.where(last, np.arange(n), succ)
    dist = (~last).astype(np.int64)
    counts = np.bincount(lab)
    for _ in range(int(np.ceil(np.log2(max(2, int(counts.max()))))) + 1):
        dist = dist + dist[nxt]
        nxt = nxt[nxt]
    multi = np.unique(lab[~last[nxt]])  # edges that never reach their ring's end: a second ring
    odd = np.union1d(pinch, multi)
    keep = ~np.isin(lab, multi) if len(multi) else np.ones(n, bool)
    pred = np.empty(n, np.int64)
    pred[succ] = np.arange(n)
    turn = keep & (dirn != dirn[pred])  # corners only
    idx = np.flatnonzero(turn)
    idx = idx[np.lexsort((-dist[idx], lab[idx]))]
    vlab = lab[idx]
    ids, first_at = np.unique(vlab, return_index=True)
    ring_of = np.repeat(np.arange(len(ids)), np.diff(np.r_[first_at, len(vlab)]) + 1)
    # each ring closed: its first vertex repeated after its last
    src = np.insert(idx, np.r_[first_at[1:], len(idx)], idx[first_at]) if len(ids) else idx
    coords = np.stack((xs[src] - 1.0, ys[src] - 1.0), axis=1)
    return ids.astype(np.int64), coords, ring_of.astype(np.int64), odd.astype(np.int64)


def polygon_pixels(
    geom: BaseGeometry, shape: tuple[int, int], *, origin_xy: tuple[float, float] = (0.0, 0.0), scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the pixels of an array of ``shape`` whose centres lie in ``geom``.

    ``geom`` is in full-resolution QuPath x/y; array pixel (r, c) has its centre at
    ``origin + ((c + 0.5) * scale, (r + 0.5) * scale)``. Holes are left out, so a polygon
    traced on pixel corners gives back exactly its pixels.
    """
    from skimage.draw import polygon as draw_polygon

    ox, oy = float(origin_xy[0]), float(origin_xy[1])

    def ring_pixels(ring: object) -> tuple[np.ndarray, np.ndarray]:
        xy = np.asarray(ring.coords)  # type: ignore[attr-defined]
        return draw_polygon((xy[:, 1] - oy) / scale - 0.5, (xy[:, 0] - ox) / scale - 0.5, shape=shape)

    rows, cols = [np.zeros(0, np.intp)], [np.zeros(0, np.intp)]
    for part in shapely.get_parts(geom):
        if not isinstance(part, Polygon) or part.is_empty:
            continue
        rr, cc = ring_pixels(part.exterior)
        if len(rr) and part.interiors:
            r0, c0 = int(rr.min()), int(cc.min())
            keep = np.zeros((int(rr.max()) - r0 + 1, int(cc.max()) - c0 + 1), bool)
            keep[rr - r0, cc - c0] = True
            for hole in part.interiors:
                hr, hc = ring_pixels(hole)
                ok = (hr >= r0) & (hc >= c0) & (hr - r0 < keep.shape[0]) & (hc - c0 < keep.shape[1])
                keep[hr[ok] - r0, hc[ok] - c0] = False
            rr, cc = np.nonzero(keep)
            rr, cc = rr + r0, cc + c0
        rows.append(rr)
        cols.append(cc)
    return np.concatenate(rows), np.concatenate(cols)


def valid_polygon(geom: BaseGeometry | None) -> Polygon | None:
    """A single valid Polygon from any area geometry: made valid, largest piece kept; None if empty."""
    if geom is None or geom.is_empty:
        return None
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
        if not geom.is_valid:  # pragma: no cover - make_valid is meant to succeed
            geom = geom.buffer(0)
    if isinstance(geom, Polygon):
        polys = [geom]
    elif hasattr(geom, "geoms"):
        polys = [g for g in shapely.get_parts(geom) if isinstance(g, Polygon)]
        polys += [p for g in shapely.get_parts(geom) if isinstance(g, MultiPolygon) for p in g.geoms]
    else:
        polys = []
    polys = [p for p in polys if not p.is_empty and p.area > 0]
    if not polys:
        return None
    return max(polys, key=lambda p: p.area)


def object_area(width: float, height: float, within: BaseGeometry | None = None) -> BaseGeometry:
    """Where objects on an image may lie: the image (full-resolution px), and inside ``within`` when given."""
    image = shapely.box(0, 0, width, height)
    if within is None:
        return image
    return shapely.intersection(image, within if within.is_valid else shapely.make_valid(within))


def clip_polygons(polygons: Sequence[BaseGeometry], area: BaseGeometry) -> list[Polygon | None]:
    """Each polygon's part inside ``area`` as one valid polygon (its largest piece), or None when
    nothing of it is inside. Polygons already inside are returned as they are."""
    polys = np.asarray(list(polygons), dtype=object)
    if len(polys) == 0:
        return []
    shapely.prepare(area)
    inside = shapely.covers(area, polys)
    out: list[Polygon | None] = list(polys)
    for k in np.flatnonzero(~inside):
        out[k] = valid_polygon(shapely.intersection(polys[k], area))
    return out


def expand_cells(nuclei: list[Polygon], distance_px: float, within: BaseGeometry | None = None) -> list[Polygon]:
    """Cell outlines like QuPath's cell expansion: each nucleus grown by ``distance_px``,
    limited to the part of the plane closer to its own nucleus centroid than to any other's,
    and to ``within`` (the image, a region) when given.

    Each cell contains its nucleus (nuclei are expected inside ``within``). Returns one valid
    polygon per input, in order.
    """
    if not nuclei:
        return []
    nuc_arr = np.asarray(nuclei, dtype=object)
    grown = shapely.buffer(nuc_arr, distance_px, quad_segs=4) if distance_px > 0 else nuc_arr
    if len(nuclei) == 1 or distance_px <= 0:
        merged = grown
    else:
        pts = shapely.centroid(nuc_arr)
        xy = shapely.get_coordinates(pts)
        # jitter-free de-duplication: identical centroids share a Voronoi cell; nudge them apart
        _, first = np.unique(np.round(xy, 6), axis=0, return_index=True)
        if len(first) < len(xy):
            dup = np.setdiff1d(np.arange(len(xy)), first)
            xy = xy.copy()
            xy[dup] += 1e-3 * (np.arange(len(dup))[:, None] + 1)
            pts = shapely.points(xy)
        extent = shapely.box(*shapely.total_bounds(grown)).buffer(distance_px + 1)
        parts = shapely.get_parts(shapely.voronoi_polygons(shapely.multipoints(pts), extend_to=extent, ordered=True))
        merged = shapely.union(shapely.intersection(grown, parts), nuc_arr)
    if within is not None:
        # the cell ends at the image border / the region's edge; its nucleus (inside) stays whole
        merged = shapely.union(shapely.intersection(merged, within), nuc_arr)
    simple = (shapely.get_type_id(merged) == 3) & shapely.is_valid(merged)  # 3 = Polygon
    out = []
    for nucleus, c, ok in zip(nuclei, merged, simple):
        if not ok:
            c = valid_polygon(c)
        out.append(c if c is not None else nucleus)
    return out
