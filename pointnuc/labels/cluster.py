"""Cluster label of stage 2 (paper §IV-A): k-means on (distance to points, colour), cleaned per Voronoi cell.

k-means with k = 3 on (d/d_clip, R/255, G/255, B/255), d = distance to the nearest
point clipped at d_clip, so all four features lie in [0, 1]. For speed the centres
are fitted on a random subsample of 20,000 pixels and every pixel is then assigned to
its nearest centre. Nucleus cluster: the one holding most points. Background cluster: of
the other two, the one overlapping least with the points dilated by ``bg_select_px``
(ties, frequent with dense points: the one farther from the points on average).

The paper's background rule (``bg_rule="overlap"``) fails with stage-1 detections: a
few false detections in the stroma give the true background cluster some overlap while
a cluster of pale nuclei has none, and the nuclei become "background" (seen on MO image
TCGA-18-5592: 65 % of its background label was nucleus). Our default
(``bg_rule="distance"``) takes the cluster farther from the points on average, which
agrees with the paper's rule on clean points.

Clean-up (sizes are ours; the paper gives none, the authors' code used these at 40x):
nucleus components smaller than ``min_size_px`` are dropped; then inside each Voronoi
cell separately, the nucleus pixels are dilated by ``dilate_px``, holes are filled and
the result eroded by ``erode_px`` (a closing that also trims ``erode_px - dilate_px``),
so that nuclei of neighbouring cells are never joined. Background = background
cluster minus cleaned nuclei minus the neighbourhood (``bg_exclusion_px``) of every
point; everything else is ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from pointnuc.errors import InputError
from pointnuc.labels.voronoi import BACKGROUND, IGNORE, NUCLEUS, nearest_point_map, points_to_pixels

if TYPE_CHECKING:
    from pointnuc.config import SegmentationConfig


def disk(radius: float) -> np.ndarray:
    """Bool disk structuring element of the given radius in pixels (at least a single pixel)."""
    r = int(np.floor(max(radius, 0.0)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= radius * radius + 1e-9


def _kmeans_fit(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> tuple[np.ndarray, float]:
    """Lloyd's k-means from a k-means++ start; returns (centres, inertia)."""
    c = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min(((x[:, None, :] - np.asarray(c)[None]) ** 2).sum(-1), axis=1)
        c.append(x[rng.choice(len(x), p=d / d.sum()) if d.sum() > 0 else rng.integers(len(x))])
    cen = np.asarray(c, np.float64)
    for _ in range(iters):
        d = ((x[:, None, :] - cen[None]) ** 2).sum(-1)
        a = np.argmin(d, axis=1)
        new = np.array([x[a == j].mean(0) if np.any(a == j) else cen[j] for j in range(k)])
        if np.allclose(new, cen, atol=1e-6):
            cen = new
            break
        cen = new
    d = ((x[:, None, :] - cen[None]) ** 2).sum(-1)
    return cen, float(d.min(1).sum())


def kmeans_clusters(features: np.ndarray, k: int = 3, *, n_sample: int = 20000, seed: int = 0, n_init: int = 3) -> np.ndarray:
    """Cluster index per row of ``features`` (N, F): k-means fitted on a subsample, all rows assigned.

    Plain NumPy (k-means++ start, Lloyd iterations, best of ``n_init``): on a shared CPU
    a threaded k-means was several times slower for the same result.
    """
    n = len(features)
    rng = np.random.default_rng(seed)
    sample = features if n <= n_sample else features[rng.choice(n, n_sample, replace=False)]
    sample = np.asarray(sample, np.float64)
    best = min((_kmeans_fit(sample, k, rng) for _ in range(n_init)), key=lambda r: r[1])[0]
    c = best.astype(np.float32)
    # nearest centre for every pixel: |x|^2 is common to all centres and dropped
    d = -2.0 * np.asarray(features, np.float32) @ c.T + (c * c).sum(1)[None, :]
    return np.argmin(d, axis=1)


def _clean_per_cell(nuclei: np.ndarray, cells: np.ndarray, dilate_px: float, erode_px: float) -> np.ndarray:
    """Per Voronoi cell: dilate the cell's nucleus pixels, fill holes, erode; union of the results."""
    h, w = nuclei.shape
    out = np.zeros_like(nuclei)
    se_d, se_e = disk(dilate_px), disk(erode_px)
    pad = int(np.ceil(dilate_px)) + 2
    lab = np.where(nuclei, cells + 1, 0)
    for idx, sl in enumerate(ndi.find_objects(lab)):
        if sl is None:
            continue
        y0, y1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, h)
        x0, x1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, w)
        m = lab[y0:y1, x0:x1] == idx + 1
        m = ndi.binary_dilation(m, se_d)
        m = ndi.binary_fill_holes(m)
        # border_value=1: the crop's sides are either far from the set or the image border,
        # where a nucleus cut by the border must not be eroded from outside
        m = ndi.binary_erosion(m, se_e, border_value=1)
        out[y0:y1, x0:x1] |= m
    return out


def cluster_label(
    image_rgb: np.ndarray,
    points_xy: np.ndarray,
    *,
    dist_clip_px: float = 20.0,
    min_size_px: int = 30,
    dilate_px: float = 5.0,
    erode_px: float = 7.0,
    bg_select_px: float = 5.0,
    bg_exclusion_px: float = 10.0,
    seed: int = 0,
    nearest: tuple[np.ndarray, np.ndarray] | None = None,
    bg_rule: str = "distance",
) -> np.ndarray:
    """uint8 (H, W): 0 background, 1 nucleus, 2 ignored, from an RGB uint8 image and its points.

    Defaults are the pixel sizes at 40x (0.25 µm/px); :func:`labels_for_image` converts
    the µm values of :class:`~pointnuc.config.SegmentationConfig`. ``nearest``: output of
    :func:`~pointnuc.labels.voronoi.nearest_point_map` when already computed. Without
    points everything is ignored.
    """
    img = np.asarray(image_rgb)
    if img.ndim != 3 or img.shape[2] != 3:
        raise InputError(f"image must be RGB (H, W, 3), got shape {img.shape}")
    h, w = img.shape[:2]
    ids, dist = nearest if nearest is not None else nearest_point_map(points_xy, (h, w))
    out = np.full((h, w), IGNORE, np.uint8)
    if ids.max(initial=-1) < 0:
        return out
    if dist_clip_px <= 0:
        raise InputError("distance clip must be positive")
    feats = np.empty((h * w, 4), np.float32)
    feats[:, 0] = np.minimum(dist.ravel(), dist_clip_px) / dist_clip_px
    feats[:, 1:] = img.reshape(-1, 3).astype(np.float32) / 255.0
    clusters = kmeans_clusters(feats, 3, seed=seed).reshape(h, w)

    point_mask = dist == 0
    nucleus_idx = int(np.argmax(np.bincount(clusters[point_mask], minlength=3)))
    rest = [i for i in range(3) if i != nucleus_idx]
    near = dist <= bg_select_px
    if bg_rule == "overlap":  # the paper's rule; ties (0 vs 0 with dense points) go to the farther cluster
        bg_idx = min(rest, key=lambda i: (int(np.count_nonzero(near & (clusters == i))), -float(dist[clusters == i].mean())))
    else:  # "distance": the cluster farther from the points on average
        bg_idx = max(rest, key=lambda i: float(np.minimum(dist[clusters == i], dist_clip_px).mean()))

    nuclei = clusters == nucleus_idx
    if min_size_px > 0:
        cc, n = ndi.label(nuclei)
        sizes = np.bincount(cc.ravel(), minlength=n + 1)
        keep = sizes >= min_size_px
        keep[0] = False
        nuclei = keep[cc]
    refined = _clean_per_cell(nuclei, ids, dilate_px, erode_px)
    out[(clusters == bg_idx) & ~refined & (dist > bg_exclusion_px)] = BACKGROUND
    out[refined] = NUCLEUS
    return out


def labels_for_image(
    image_rgb: np.ndarray,
    points_xy: np.ndarray,
    seg_config: SegmentationConfig,
    pixel_size_um: float,
    *,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(Voronoi label, cluster label) of one image at ``pixel_size_um``, sizes taken from the config in µm."""
    from pointnuc.labels.voronoi import voronoi_label

    img = np.asarray(image_rgb)
    near = nearest_point_map(points_xy, img.shape[:2])
    px = lambda um: um / pixel_size_um
    vor = voronoi_label(points_xy, img.shape[:2], dilation_px=px(seg_config.point_dilation_um), nearest=near)
    clu = cluster_label(
        img,
        points_xy,
        dist_clip_px=px(seg_config.cluster_dist_clip_um),
        min_size_px=round(seg_config.cluster_min_area_um2 / pixel_size_um**2),
        dilate_px=px(seg_config.cluster_dilate_um),
        erode_px=px(seg_config.cluster_erode_um),
        bg_select_px=px(seg_config.cluster_bg_select_um),
        bg_exclusion_px=px(seg_config.cluster_bg_exclusion_um),
        seed=seed,
        nearest=near,
    )
    return vor, clu


__all__ = ["cluster_label", "disk", "kmeans_clusters", "labels_for_image", "points_to_pixels"]
