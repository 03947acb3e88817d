"""Nucleus probability map -> instance labels.

``cc`` is the paper's rule: threshold, fill small holes, connected components
(8-connectivity, as skimage's ``label`` in the authors' code), drop small objects.
``watershed`` splits touching nuclei: markers are the h-maxima of the (slightly
smoothed) distance transform of the nucleus mask, so a component splits only where
its width narrows by more than ``h_px`` between two centres; the watershed of the
negated distance inside the mask draws the cut. It is done per connected component, and
only for components with more than one candidate maximum (most nuclei stand alone).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from pointnuc.errors import InputError
from pointnuc.models.calibration import Thresholds

METHODS = ("cc", "watershed")


def _remove_small(labels: np.ndarray, min_area_px: float) -> np.ndarray:
    """Drop objects smaller than ``min_area_px`` and number the rest 1..n (int32)."""
    n = int(labels.max())
    if n == 0:
        return labels.astype(np.int32)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_area_px
    keep[0] = False
    new = np.zeros(n + 1, np.int32)
    new[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new[labels]


def fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    """Fill background components enclosed by the mask and smaller than ``max_hole_px``."""
    # holes = 4-connected background components that do not reach the border (as binary_fill_holes)
    lab, n = ndi.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    small = sizes < max_hole_px
    small[0] = False
    small[lab[0]] = small[lab[-1]] = small[lab[:, 0]] = small[lab[:, -1]] = False
    if not small.any():
        return mask
    return mask | small[lab]


def instances_from_probability(
    prob_fg: np.ndarray,
    *,
    threshold: float = Thresholds.prob,
    min_area_px: float = Thresholds.min_area_px,
    method: str = "cc",
    max_hole_px: float | None = None,
    h_px: float = Thresholds.h_px,
) -> np.ndarray:
    """int32 instance labels (0 = background) from a nucleus probability map (H, W).

    ``min_area_px``: smaller objects are dropped; ``max_hole_px``: holes up to this
    area are filled (default ``4 * min_area_px``); ``h_px`` (watershed only): depth
    of a distance-transform maximum, in pixels, needed to seed its own nucleus.
    """
    p = np.asarray(prob_fg, dtype=np.float32)
    if p.ndim != 2:
        raise InputError(f"probability map must be 2-D, got shape {p.shape}")
    if method not in METHODS:
        raise InputError(f"unknown instance method {method!r}; choose one of {', '.join(METHODS)}")
    mask = p >= threshold
    mask = fill_small_holes(mask, 4 * min_area_px if max_hole_px is None else max_hole_px)
    eight = np.ones((3, 3), bool)
    if method == "cc":
        lab, _ = ndi.label(mask, structure=eight)
        return _remove_small(lab, min_area_px)
    return _remove_small(_watershed(mask, h_px), min_area_px)


def _watershed(mask: np.ndarray, h_px: float) -> np.ndarray:
    """Watershed instances of a (hole-filled) mask, one connected component at a time.

    The distance map is set to 0 outside the mask, so components never see each other
    and each can be split on its own bounding box. Only components that might split
    (more than one plateau of local maxima, or 8- but not 4-connected, which the 4-connected
    watershed would cut) go through ``h_maxima`` + ``watershed``; every other one is its
    own instance, as the watershed would leave it. Same instances as the whole-tile
    computation on the same distance map (``watershed_tile`` in ``tests/helpers.py``), a fraction of the cost.
    """
    eight = np.ones((3, 3), bool)
    lab8, n = ndi.label(mask, structure=eight)
    if n == 0:
        return lab8.astype(np.int32)
    dist = _distance(mask)
    # regional maxima lie in plateaus of pixels not below any neighbour; two such neighbours
    # are equal, so each 8-connected plateau holds at most one regional maximum
    peak = mask & (dist >= ndi.maximum_filter(dist, size=3, mode="constant", cval=0.0))
    plat, n_plat = ndi.label(peak, structure=eight)
    comp_of = np.zeros(n_plat + 1, np.int64)
    comp_of[plat[peak]] = lab8[peak]
    multi = np.bincount(comp_of[1:], minlength=n + 1) > 1
    lab4, n4 = ndi.label(mask)
    comp_of = np.zeros(n4 + 1, np.int64)
    comp_of[lab4[mask]] = lab8[mask]
    multi |= np.bincount(comp_of[1:], minlength=n + 1) > 1
    multi[0] = False
    out = lab8.astype(np.int64)
    if not multi.any():
        return out
    next_id = n + 1
    slices = ndi.find_objects(lab8)
    for i in np.flatnonzero(multi):
        sl = slices[i - 1]
        sub = np.zeros((sl[0].stop - sl[0].start + 2, sl[1].stop - sl[1].start + 2), bool)
        sub[1:-1, 1:-1] = lab8[sl] == i
        d = np.zeros(sub.shape, np.float64)
        d[sub] = dist[sl][sub[1:-1, 1:-1]]
        lab = _split(d, sub, h_px)[1:-1, 1:-1]
        inner = sub[1:-1, 1:-1]
        out[sl][inner] = lab[inner] + (next_id - 1)
        next_id += int(lab.max())
    return out


def _distance(mask: np.ndarray) -> np.ndarray:
    """Slightly smoothed distance to the background, 0 outside the mask (float64)."""
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(mask), 1.0)
    dist[~mask] = 0.0
    return dist


def _split(dist: np.ndarray, mask: np.ndarray, h_px: float) -> np.ndarray:
    """h-maxima markers, watershed of the negated distance, unmarked pieces labelled on their own."""
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    eight = np.ones((3, 3), bool)
    markers, _ = ndi.label(h_maxima(dist, h_px) & mask, structure=eight)
    lab = watershed(-dist, markers, mask=mask, connectivity=1)
    # components the markers missed (too thin for a maximum of depth h) keep their own label
    rest, _ = ndi.label(mask & (lab == 0), structure=eight)
    return np.where(lab == 0, np.where(rest > 0, rest + lab.max(), 0), lab)
