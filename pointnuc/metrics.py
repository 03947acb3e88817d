"""Detection and segmentation metrics of Qu et al. 2020 (§V) as pure functions.

Detection (Eq. 11): one-to-one matching within ``radius``, counted as the authors'
code did: each ground-truth point, in row-major order (by y, then x), takes its
nearest still-free detection if that one is closer than ``radius``; scores are pooled
over images (TP/FP/FN summed, all TP distances together).

Segmentation, on instance label images (0 = background, other values = objects):
pixel accuracy and pixel F1 on the foreground, object-level Dice (Eq. 12),
AJI as defined by Kumar et al. 2017 (Eq. 13), and :func:`aji_authors`, the AJI
as the authors' released code computed it (kept only to set our numbers beside
the paper's).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pointnuc.errors import InputError


@dataclass(frozen=True)
class DetectionCounts:
    """Matching result for one image."""

    tp: int
    fp: int
    fn: int
    distances: np.ndarray = field(default_factory=lambda: np.zeros(0))  #: distance of each TP to its GT point


def _as_points(xy: np.ndarray | Iterable, what: str) -> np.ndarray:
    a = np.asarray(xy, dtype=float)
    if a.size == 0:
        return np.zeros((0, 2))
    if a.ndim != 2 or a.shape[1] != 2:
        raise InputError(f"{what} must be an (N, 2) array of x/y coordinates, got shape {a.shape}")
    return a


def detection_counts(pred_xy: np.ndarray, gt_xy: np.ndarray, radius: float) -> DetectionCounts:
    """TP/FP/FN of detections ``pred_xy`` against ground truth ``gt_xy`` (both (N, 2) x/y).

    Each GT point in row-major order (y, then x) is matched to its nearest free
    detection if that is strictly closer than ``radius``; a detection matches once.
    """
    pred = _as_points(pred_xy, "detections")
    gt = _as_points(gt_xy, "ground-truth points")
    if radius <= 0:
        raise InputError("matching radius must be positive")
    order = np.lexsort((gt[:, 0], gt[:, 1]))
    free = np.ones(len(pred), bool)
    dists: list[float] = []
    if len(pred) and len(gt):
        from scipy.spatial import cKDTree

        tree = cKDTree(pred)
        for g in gt[order]:
            # candidates within the radius, nearest first; take the first free one
            idx = tree.query_ball_point(g, r=radius)
            if not idx:
                continue
            idx = np.asarray(idx)
            idx = idx[free[idx]]
            if idx.size == 0:
                continue
            d = np.hypot(*(pred[idx] - g).T)
            k = int(np.argmin(d))
            if d[k] < radius:
                free[idx[k]] = False
                dists.append(float(d[k]))
    tp = len(dists)
    return DetectionCounts(tp=tp, fp=len(pred) - tp, fn=len(gt) - tp, distances=np.asarray(dists, float))


def detection_scores(counts: Iterable[DetectionCounts]) -> dict[str, float]:
    """Pooled precision ``P``, recall ``R``, ``F1``, and mean/std (``mu_d``, ``sigma_d``) of TP distances."""
    counts = list(counts)
    tp = sum(c.tp for c in counts)
    fp = sum(c.fp for c in counts)
    fn = sum(c.fn for c in counts)
    d = np.concatenate([c.distances for c in counts]) if counts else np.zeros(0)
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {
        "P": p,
        "R": r,
        "F1": f1,
        "mu_d": float(d.mean()) if d.size else float("nan"),
        "sigma_d": float(d.std()) if d.size else float("nan"),
        "TP": tp,
        "FP": fp,
        "FN": fn,
    }


def gt_points_from_labels(labels: np.ndarray) -> np.ndarray:
    """Ground-truth points as the authors made them: ``(min + max) // 2`` of each object's bounding box.

    Returns (N, 2) x/y at pixel centres (QuPath convention, + 0.5), in label order.
    """
    from scipy import ndimage as ndi

    lab = np.asarray(labels)
    objs = ndi.find_objects(lab.astype(np.int64, copy=False))
    pts = []
    for sl in objs:
        if sl is None:
            continue
        r = (sl[0].start + sl[0].stop - 1) // 2
        c = (sl[1].start + sl[1].stop - 1) // 2
        pts.append((c + 0.5, r + 0.5))
    return np.asarray(pts, float).reshape(-1, 2)


# ---------------------------------------------------------------- segmentation


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise InputError(f"label images must be 2-D and of the same shape, got {gt.shape} and {pred.shape}")
    return gt, pred


def _sequential(lab: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel to 0..n (0 stays background); returns (labels, n)."""
    vals, inv = np.unique(lab.ravel(), return_inverse=True)
    if vals[0] != 0:
        inv = inv + 1
        n = len(vals)
    else:
        n = len(vals) - 1
    return inv.reshape(lab.shape).astype(np.int64), n


def _contingency(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overlap counts (Ng+1, Ns+1), GT areas (Ng+1) and prediction areas (Ns+1), index 0 = background."""
    g, ng = _sequential(gt)
    s, ns = _sequential(pred)
    inter = np.bincount((g * (ns + 1) + s).ravel(), minlength=(ng + 1) * (ns + 1)).reshape(ng + 1, ns + 1)
    return inter, inter.sum(1), inter.sum(0)


def pixel_scores(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Pixel accuracy ``acc`` and foreground ``F1`` (plus ``precision``, ``recall``) of two label images."""
    gt, pred = _check_pair(gt, pred)
    g, p = gt.ravel() > 0, pred.ravel() > 0
    tp = float(np.count_nonzero(g & p))
    fp = float(np.count_nonzero(~g & p))
    fn = float(np.count_nonzero(g & ~p))
    acc = float(np.count_nonzero(g == p)) / g.size
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"acc": acc, "F1": f1, "precision": prec, "recall": rec}


def dice_obj(gt: np.ndarray, pred: np.ndarray) -> float:
    """Object-level Dice (Eq. 12): area-weighted best-overlap Dice, GT→prediction and prediction→GT, averaged.

    Each object is paired with the object of the other image it overlaps most (Dice 0
    when it overlaps none). Two empty images score 1; one empty image scores 0.
    """
    gt, pred = _check_pair(gt, pred)
    inter, ga, sa = _contingency(gt, pred)
    if len(ga) == 1 and len(sa) == 1:
        return 1.0
    if len(ga) == 1 or len(sa) == 1:
        return 0.0
    ov = inter[1:, 1:].astype(float)

    def one_way(ov: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        j = np.argmax(ov, axis=1)
        best = ov[np.arange(len(a)), j]
        d = np.where(best > 0, 2 * best / (a + b[j]), 0.0)
        return float(np.sum(a / a.sum() * d))

    ga1, sa1 = ga[1:].astype(float), sa[1:].astype(float)
    return 0.5 * (one_way(ov, ga1, sa1) + one_way(ov.T, sa1, ga1))


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Eq. 13, Kumar et al. 2017).

    Each GT object G_i is paired with the prediction S_j of largest IoU (a prediction
    may serve several GT objects); C += |G_i ∩ S_j|, U += |G_i ∪ S_j|; a GT object
    overlapping nothing adds its own area to U; predictions never paired add their
    area to U. Two empty images score 1.
    """
    gt, pred = _check_pair(gt, pred)
    inter, ga, sa = _contingency(gt, pred)
    ng, ns = len(ga) - 1, len(sa) - 1
    if ng == 0:
        return 1.0 if ns == 0 else 0.0
    if ns == 0:
        return 0.0
    i = inter[1:, 1:].astype(float)
    u = ga[1:, None] + sa[None, 1:] - i
    iou = i / u
    j = np.argmax(iou, axis=1)
    rows = np.arange(ng)
    hit = i[rows, j] > 0
    c = float(i[rows, j][hit].sum())
    un = float(u[rows, j][hit].sum() + ga[1:][~hit].sum())
    used = np.zeros(ns, bool)
    used[j[hit]] = True
    un += float(sa[1:][~used].sum())
    return c / un


def aji_authors(gt: np.ndarray, pred: np.ndarray) -> float:
    """AJI as the authors' released code computed it (``AJI_fast``), for comparison with the paper only.

    Same as :func:`aji` except that a GT object overlapping no prediction is paired
    with prediction #1 (lowest label): that object's area is added to the union
    again each time and it counts as used. Reads lower than :func:`aji`.
    """
    gt, pred = _check_pair(gt, pred)
    inter, ga, sa = _contingency(gt, pred)
    ng, ns = len(ga) - 1, len(sa) - 1
    if ns == 0:
        return 0.0
    if ng == 0:  # their code: c = u = 0 plus unused predictions -> 0
        return 0.0
    i = inter[1:, 1:].astype(float)
    u = ga[1:, None] + sa[None, 1:] - i
    j = np.argmax(i / u, axis=1)
    rows = np.arange(ng)
    c = float(i[rows, j].sum())
    un = float(u[rows, j].sum())
    used = np.zeros(ns, bool)
    used[j] = True
    un += float(sa[1:][~used].sum())
    return c / un


def segmentation_scores(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """All segmentation metrics of one image: ``acc``, ``F1``, ``dice_obj``, ``aji``, ``aji_authors``."""
    px = pixel_scores(gt, pred)
    return {
        "acc": px["acc"],
        "F1": px["F1"],
        "dice_obj": dice_obj(gt, pred),
        "aji": aji(gt, pred),
        "aji_authors": aji_authors(gt, pred),
    }


def mean_scores(per_image: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over images (the paper averages segmentation metrics per image)."""
    rows = list(per_image)
    if not rows:
        return {}
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
