"""Points from a detection probability map (paper §III-A: threshold, connected-component centroids)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def points_from_probability(prob: np.ndarray, threshold: float, min_area_px: float = 0.0) -> np.ndarray:
    """(N, 2) float x/y: centroids of the 8-connected components of ``prob > threshold``.

    Components with fewer than ``min_area_px`` pixels are dropped. Pixel centre
    convention: pixel (r, c) is at (c + 0.5, r + 0.5). Order: by component label (row-major
    order of each component's first pixel).
    """
    p = np.asarray(prob)
    if p.ndim != 2:
        raise ValueError(f"probability map must be 2-D, got shape {p.shape}")
    lab, n = ndi.label(p > threshold, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros((0, 2))
    flat = lab.ravel()
    area = np.bincount(flat, minlength=n + 1)
    rows, cols = np.indices(p.shape)
    sy = np.bincount(flat, weights=rows.ravel(), minlength=n + 1)
    sx = np.bincount(flat, weights=cols.ravel(), minlength=n + 1)
    ok = area >= max(min_area_px, 1)
    ok[0] = False
    return np.stack([sx[ok] / area[ok] + 0.5, sy[ok] / area[ok] + 0.5], axis=1)
