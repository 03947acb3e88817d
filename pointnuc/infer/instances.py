"""Nucleus probability map -> instance labels.

``cc`` is the paper's rule: threshold, fill small holes, connected components
(8-connectivity, as skimage's ``label`` in the authors' code), drop small objects.
``watershed`` splits touching nuclei: markers are the h-maxima of the (slightly
smoothed) distance transform of the nucleus mask, so a component splits only where
its width narrows by more than ``h_px`` between two centres; the watershed of the
negated distance inside the mask draws the cut.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from typing import TYPE_CHECKING

from pointnuc.errors import InputError

if TYPE_CHECKING:
    import torch

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
    holes = ndi.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask
    lab, n = ndi.label(holes)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    small = sizes < max_hole_px
    small[0] = False
    return mask | small[lab]


def instances_from_probability(
    prob_fg: np.ndarray,
    *,
    threshold: float = 0.5,
    min_area_px: float = 20.0,
    method: str = "cc",
    max_hole_px: float | None = None,
    h_px: float = 1.5,
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
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    dist = ndi.gaussian_filter(ndi.distance_transform_edt(mask), 1.0)
    markers, _ = ndi.label(h_maxima(dist, h_px) & mask, structure=eight)
    lab = watershed(-dist, markers, mask=mask, connectivity=1)
    # components the markers missed (too thin for a maximum of depth h) keep their own label
    rest, _ = ndi.label(mask & (lab == 0), structure=eight)
    lab = np.where(lab == 0, np.where(rest > 0, rest + lab.max(), 0), lab)
    return _remove_small(lab.astype(np.int64), min_area_px)


def nucleus_probability(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    device: str | torch.device = "cpu",
    tta: bool = False,
    window: int = 512,
    margin: int = 32,
) -> np.ndarray:
    """Nucleus probability (H, W) of a segmenter on a colour-normalised uint8 RGB image.

    ``tta``: average over the four flips (horizontal, vertical, both, none).
    """
    from pointnuc.infer.predict import predict_image

    img = np.asarray(image)
    flips = [(False, False), (True, False), (False, True), (True, True)] if tta else [(False, False)]
    acc = np.zeros(img.shape[:2], np.float32)
    for fy, fx in flips:
        v = img[::-1] if fy else img
        v = v[:, ::-1] if fx else v
        p = predict_image(model, np.ascontiguousarray(v), activation="softmax", window=window, margin=margin, device=device)[1]
        p = p[::-1] if fy else p
        p = p[:, ::-1] if fx else p
        acc += p
    return acc / len(flips)
