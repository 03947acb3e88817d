"""Scoring pointnuc's output against ground-truth instance label images."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pointnuc.errors import InputError
from pointnuc.metrics import detection_counts, detection_scores, gt_points_from_labels, mean_scores, segmentation_scores

_LABEL_SUFFIXES = (".png", ".tif", ".tiff")


def polygons_to_labels(polygons: Sequence, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise full-res polygons to an instance label image (1..N in the given order).

    A pixel belongs to a polygon when its centre (c + 0.5, r + 0.5) is inside, so
    outlines traced on pixel corners give back exactly the traced pixels.
    """
    from pointnuc.geometry import polygon_pixels

    out = np.zeros(shape, np.int32)
    for i, poly in enumerate(polygons, start=1):
        out[polygon_pixels(poly, shape)] = i
    return out


def _stem(path: Path) -> str:
    name = path.name
    name = re.sub(r"(\.featurecollection)?\.geojson$", "", name)
    name = re.sub(r"_label(\.(png|tif|tiff))$", "", name)
    name = re.sub(r"\.(png|tif|tiff|svs|ndpi|jpg|jpeg)$", "", name, flags=re.IGNORECASE)
    return name


def _pairs(pred: Path, truth: Path) -> list[tuple[str, Path, Path]]:
    if not pred.exists():
        raise InputError(f"predictions not found: {pred}")
    if not truth.exists():
        raise InputError(f"ground truth not found: {truth}")
    preds = [pred] if pred.is_file() else sorted(pred.glob("*.geojson"))
    truths = [truth] if truth.is_file() else sorted(p for p in truth.iterdir() if p.suffix.lower() in _LABEL_SUFFIXES)
    if pred.is_file() and truth.is_file():
        return [(_stem(pred), pred, truth)]
    # NAME_label.* wins over NAME.png when both (the image and its labels) are in the folder
    by_stem = {_stem(t): t for t in sorted(truths, key=lambda t: "_label" in t.name)}
    pairs = [(_stem(p), p, by_stem[_stem(p)]) for p in preds if _stem(p) in by_stem]
    if not pairs:
        raise InputError(f"no prediction in {pred} has a ground-truth label image of the same name in {truth}")
    return pairs


@dataclass
class Evaluation:
    """Per-image and summary scores."""

    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    segmentation: dict[str, float] = field(default_factory=dict)  #: mean over images, as the paper
    detection: dict[str, float] = field(default_factory=dict)  #: pooled over images, as the paper's code


def evaluate(pred: Path, truth: Path, *, radius_px: float = 11.0) -> Evaluation:
    """Detection and segmentation metrics of pointnuc GeoJSON output against label images."""
    from PIL import Image

    from pointnuc.io.geojson import read_nuclei

    ev = Evaluation()
    counts = []
    for name, p, t in _pairs(Path(pred), Path(truth)):
        try:
            gt = np.asarray(Image.open(t))
        except Exception as err:  # noqa: BLE001  (whatever Pillow raises, the file is the user's to fix)
            raise InputError(f"cannot read label image {t}: {err}") from None
        if gt.ndim != 2:
            raise InputError(f"{t} is not a single-channel instance label image")
        nuclei = read_nuclei(p)
        pred_lab = polygons_to_labels([n.polygon for n in nuclei], gt.shape)
        scores = segmentation_scores(gt, pred_lab)
        centroids = np.array([[n.polygon.centroid.x, n.polygon.centroid.y] for n in nuclei]).reshape(-1, 2)
        c = detection_counts(centroids, gt_points_from_labels(gt), radius_px)
        counts.append(c)
        scores.update({"n_pred": float(len(nuclei)), "n_true": float(len(np.unique(gt)) - 1)})
        ev.per_image[name] = scores
    ev.segmentation = mean_scores({k: v for k, v in s.items() if not k.startswith("n_")} for s in ev.per_image.values())
    ev.detection = detection_scores(counts)
    return ev
