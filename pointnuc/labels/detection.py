"""Stage-1 targets: the Gaussian masks of paper Eq. 1 and the self-training updates (Eq. 3).

Conventions: points are x/y in pixels, pixel (r, c) centred at (c + 0.5, r + 0.5);
``D`` is the Euclidean distance from a pixel centre to the nearest labeled point.
Target values: in [0, 1] = regression target (0 = background), -1 = ignored
(:data:`pointnuc.train.data.IGNORE`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

IGNORE = -1.0


def distance_to_points(points_xy: np.ndarray, shape: tuple[int, int], max_dist: float) -> np.ndarray:
    """float32 (H, W): distance of each pixel centre to the nearest point; ``inf`` beyond ``max_dist``.

    Only a window of ``max_dist`` around each point is visited, so the cost is
    O(N · max_dist²) whatever the image size.
    """
    h, w = shape
    d2 = np.full((h, w), np.inf, np.float64)
    pts = np.asarray(points_xy, float).reshape(-1, 2)
    rad = math.ceil(max_dist) + 1
    for x, y in pts:
        c0, r0 = math.floor(x), math.floor(y)
        ra, rb = max(r0 - rad, 0), min(r0 + rad + 1, h)
        ca, cb = max(c0 - rad, 0), min(c0 + rad + 1, w)
        if ra >= rb or ca >= cb:
            continue
        dy = (np.arange(ra, rb) + 0.5 - y)[:, None]
        dx = (np.arange(ca, cb) + 0.5 - x)[None, :]
        np.minimum(d2[ra:rb, ca:cb], dy * dy + dx * dx, out=d2[ra:rb, ca:cb])
    d = np.sqrt(d2)
    d[d > max_dist] = np.inf
    return d.astype(np.float32)


def gaussian_mask(
    points_xy: np.ndarray, shape: tuple[int, int], r1: float, sigma: float, valid: np.ndarray | None = None
) -> np.ndarray:
    """The "GM" baseline: exp(-D²/2σ²) where D < r1, 0 (background) everywhere else.

    Nothing is ignored except pixels outside ``valid``.
    """
    d = distance_to_points(points_xy, shape, r1)
    m = np.where(d < r1, np.exp(-(d.astype(np.float64) ** 2) / (2 * sigma**2)), 0.0).astype(np.float32)
    if valid is not None:
        m[~valid] = IGNORE
    return m


def extended_gaussian_mask(
    points_xy: np.ndarray, shape: tuple[int, int], r1: float, r2: float, sigma: float, valid: np.ndarray | None = None
) -> np.ndarray:
    """Paper Eq. 1: exp(-D²/2σ²) for D < r1; 0 for r1 <= D < r2; -1 (ignored) for D >= r2.

    Pixels outside ``valid`` are ignored too.
    """
    if not r2 > r1 > 0:
        raise ValueError("need 0 < r1 < r2")
    d = distance_to_points(points_xy, shape, r2)
    dd = d.astype(np.float64)
    m = np.full(shape, IGNORE, np.float32)
    inner = d < r1
    m[inner] = np.exp(-(dd[inner] ** 2) / (2 * sigma**2))
    m[(d >= r1) & (d < r2)] = 0.0
    if valid is not None:
        m[~valid] = IGNORE
    return m


def ignore_near(mask: np.ndarray, points_xy: np.ndarray, radius: float) -> np.ndarray:
    """A copy of ``mask`` with every pixel closer than ``radius`` to one of ``points_xy`` ignored (-1).

    Used for the held-back points: their nuclei must not be taught as background (by the ring
    of a neighbouring labeled point, or by background propagation), or recall measured on them
    would be lower than on images the network has not seen.
    """
    out = np.array(mask, np.float32, copy=True)
    if len(np.asarray(points_xy).reshape(-1, 2)):
        out[distance_to_points(points_xy, out.shape, radius) < radius] = IGNORE
    return out


def background_propagation(
    mask: np.ndarray,
    points_xy: np.ndarray,
    prob: np.ndarray,
    r1: float,
    r2: float,
    low: float = 0.1,
    high: float = 0.7,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Paper Eq. 3 (ST-bg): the self-training mask from Eq. 1's ``mask`` and the model's ``prob``.

    Where D < r2 (D: distance to the labeled ``points_xy``) the mask is kept. Elsewhere a
    pixel becomes background (0) when p < ``low``, or when p > ``high`` inside a connected
    component of {p > high} (8-connected) whose area exceeds π·r1² (a region too large to
    be one nucleus — the paper keeps smaller ones out so that true nuclei are not turned
    into background); every other pixel is ignored (-1).
    """
    d = distance_to_points(points_xy, mask.shape, r2)
    keep = d < r2
    hi = prob > high
    lab, n = ndi.label(hi, structure=np.ones((3, 3), bool))
    if n:
        area = np.bincount(lab.ravel())
        big = area > math.pi * r1 * r1
        big[0] = False
        hi_big = big[lab]
    else:
        hi_big = np.zeros_like(hi)
    out = np.where(keep, mask, np.where((prob < low) | hi_big, 0.0, IGNORE)).astype(np.float32)
    if valid is not None:
        out[~valid] = IGNORE
    return out


def nuclei_propagation(
    points_xy: np.ndarray,
    detected_xy: np.ndarray,
    shape: tuple[int, int],
    r1: float,
    r2: float,
    sigma: float,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """The "ST-nu" ablation: Eq. 1 over the labeled points plus the model's detections.

    Detections closer than r1 to a labeled point are dropped (that nucleus is labeled
    already); the others are added as if the user had clicked them.
    """
    pts = np.asarray(points_xy, float).reshape(-1, 2)
    det = np.asarray(detected_xy, float).reshape(-1, 2)
    if len(pts) and len(det):
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(pts).query(det)
        det = det[dist >= r1]
    return extended_gaussian_mask(np.concatenate([pts, det]), shape, r1, r2, sigma, valid)
