"""The user's marks as training targets: one raster per training sample, and how each stage uses it.

:func:`rasterise_marks` draws an image's marks (:class:`~pointnuc.io.base.ImageAnnotations`) on
a sample's pixel grid as codes:

- :data:`BACKGROUND`: inside a background area, within :data:`BACKGROUND_POINT_RADIUS` r1 of a
  background point, inside a pointnuc detection the user deleted since the last ``segment``;
- :data:`OUTLINE`: inside a nucleus outline the user drew;
- :data:`RING`: a thin ring (:data:`RING_UM`) around an outline, outside every outline;
- :data:`NONE`: no mark.

Nucleus marks win: outlines are drawn over background, and background within r1 of a
nucleus point (the user's, training or held back) is cleared, so that contradicting marks
never teach a clicked nucleus as background.

Stage 1 (:func:`detection_marks`): background marks are background (0, a normal weight), except
where a point's Gaussian already teaches a nucleus; inside an outline, pixels the target calls
background (farther than r1 from its centre, which is a point) are ignored. Stage 2
(:func:`segmentation_marks`): an outline is nucleus inside and background on its ring,
background marks are background; they override the Voronoi and cluster labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from shapely.geometry.base import BaseGeometry

NONE, BACKGROUND, OUTLINE, RING = 0, 1, 2, 3
RING_UM = 1.0  #: width of the background ring drawn around a user's outline (stage 2)
#: a background point marks a disc of this many r1 as background: the spot clicked, not the nucleus-sized
#: disc around it, as "no nucleus here" answers often lie at a nucleus' edge (on MO's loop a disc of r1 cost
#: AJI: .457 with Background points against .477 without them, benchmarks/results/correction-loop-cpu.md)
BACKGROUND_POINT_RADIUS = 0.5


def _disc_pixels(points_xy: np.ndarray, shape: tuple[int, int], radius: float) -> np.ndarray:
    from pointnuc.labels.detection import distance_to_points

    return distance_to_points(points_xy, shape, radius) < radius


def rasterise_marks(
    shape: tuple[int, int],
    *,
    origin_xy: tuple[float, float],
    scale: float,
    r1_px: float,
    ring_px: float,
    background_areas: Sequence[BaseGeometry] = (),
    background_points_xy: np.ndarray | None = None,
    deleted: Sequence[BaseGeometry] = (),
    outlines: Sequence[BaseGeometry] = (),
    nucleus_points_xy: np.ndarray | None = None,
) -> np.ndarray | None:
    """uint8 (H, W) mark codes of one sample, None when it has no mark.

    Geometries and points are full-resolution QuPath x/y; the array's pixel (r, c) has its
    centre at ``origin + ((c + 0.5) * scale, (r + 0.5) * scale)``. ``r1_px`` (nucleus radius)
    and ``ring_px`` are in the array's pixels. ``nucleus_points_xy``: the user's nucleus points,
    around which background is cleared.
    """
    from scipy import ndimage as ndi

    from pointnuc.geometry import polygon_pixels
    from pointnuc.labels.cluster import disk

    def local(xy: np.ndarray | None) -> np.ndarray:
        pts = np.zeros((0, 2)) if xy is None else np.asarray(xy, float).reshape(-1, 2)
        return (pts - np.asarray(origin_xy, float)) / scale

    h, w = shape
    x0, y0 = origin_xy
    x1, y1 = x0 + w * scale, y0 + h * scale

    def near(g: BaseGeometry, pad: float = 0.0) -> bool:
        bx0, by0, bx1, by1 = g.bounds
        return bx1 >= x0 - pad and bx0 <= x1 + pad and by1 >= y0 - pad and by0 <= y1 + pad

    codes = np.zeros(shape, np.uint8)
    for g in [*background_areas, *deleted]:
        if near(g):
            codes[polygon_pixels(g, shape, origin_xy=origin_xy, scale=scale)] = BACKGROUND
    bg_pts = local(background_points_xy)
    if len(bg_pts):
        codes[_disc_pixels(bg_pts, shape, BACKGROUND_POINT_RADIUS * r1_px)] = BACKGROUND
    nuc_pts = local(nucleus_points_xy)
    if len(nuc_pts) and codes.any():
        codes[_disc_pixels(nuc_pts, shape, r1_px) & (codes == BACKGROUND)] = NONE
    inside = np.zeros(shape, bool)
    for g in outlines:
        if not near(g, ring_px * scale):
            continue
        one = np.zeros(shape, bool)
        one[polygon_pixels(g, shape, origin_xy=origin_xy, scale=scale)] = True
        if not one.any():  # an outline smaller than a pixel: its centre pixel
            c = local(np.array([[g.centroid.x, g.centroid.y]]))[0]
            r, col = int(np.floor(c[1])), int(np.floor(c[0]))
            if not (0 <= r < h and 0 <= col < w):
                continue
            one[r, col] = True
        inside |= one
        if ring_px > 0:
            ring = ndi.binary_dilation(one, disk(ring_px)) & ~one
            codes[ring & (codes == NONE)] = RING
    codes[inside] = OUTLINE
    return codes if codes.any() else None


def detection_marks(target: np.ndarray, marks: np.ndarray | None, valid: np.ndarray | None = None) -> np.ndarray:
    """A stage-1 target (float32, -1 ignored, 0 background, > 0 nucleus) with the marks applied (see the module doc)."""
    from pointnuc.labels.detection import IGNORE

    if marks is None:
        return target
    out = np.array(target, np.float32, copy=True)
    bg = (marks == BACKGROUND) & (out <= 0)
    if valid is not None:
        bg &= valid
    out[bg] = 0.0
    out[(marks == OUTLINE) & (out == 0)] = IGNORE
    return out


def segmentation_marks(label: np.ndarray, marks: np.ndarray | None, *, background: float = 0, nucleus: float = 1) -> np.ndarray:
    """A stage-2 label (Voronoi, cluster, or their float target channel) with the marks applied: outlines
    ``nucleus``, their rings and background marks ``background`` (see the module doc)."""
    if marks is None:
        return label
    out = np.array(label, copy=True)
    out[(marks == BACKGROUND) | (marks == RING)] = background
    out[marks == OUTLINE] = nucleus
    return out
