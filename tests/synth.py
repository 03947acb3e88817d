"""Synthetic H&E-like images with known nuclei, for fast end-to-end tests."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np

BACKGROUND = np.array([232, 190, 215], float)  # eosin pink
NUCLEUS = np.array([95, 60, 150], float)  # haematoxylin purple


def render_nuclei(
    shape: tuple[int, int], n: int, radius: float, *, seed: int = 0, min_gap: float = 1.5
) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 image with ``n`` non-overlapping elliptic nuclei and its instance labels."""
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[0:h, 0:w]
    centres: list[tuple[float, float]] = []
    tries = 0
    while len(centres) < n and tries < n * 200:
        tries += 1
        cy, cx = rng.uniform(radius, h - radius), rng.uniform(radius, w - radius)
        if any((cy - y) ** 2 + (cx - x) ** 2 < (2 * radius * min_gap) ** 2 for y, x in centres):
            continue
        centres.append((cy, cx))
        a, b = radius * rng.uniform(0.8, 1.2), radius * rng.uniform(0.8, 1.2)
        t = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(t) + dy * np.sin(t)) / a
        v = (-dx * np.sin(t) + dy * np.cos(t)) / b
        labels[(u * u + v * v) <= 1] = len(centres)
    img = np.where(labels[..., None] > 0, NUCLEUS, BACKGROUND)
    img = img + rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), labels


def label_points(labels: np.ndarray) -> np.ndarray:
    """QuPath x/y of each nucleus's bounding-box centre pixel (as the fixtures and the paper's code)."""
    from pointnuc.metrics import gt_points_from_labels

    return gt_points_from_labels(labels)


def write_tiff(path: Path, image: np.ndarray, pixel_size_um: float | None) -> None:
    """A plain RGB TIFF with resolution tags (pixels per cm) as the QuPath fixtures."""
    import tifffile

    kw = {}
    if pixel_size_um:
        ppcm = 1e4 / pixel_size_um
        kw = {"resolution": (ppcm, ppcm), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, image, photometric="rgb", **kw)


def points_feature(points_xy: np.ndarray, class_name: str = "Nucleus", color=(255, 228, 22)) -> dict:
    """A QuPath points annotation as GeoJSON."""
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": {"type": "MultiPoint", "coordinates": [[float(x), float(y)] for x, y in points_xy]},
        "properties": {"objectType": "annotation", "classification": {"name": class_name, "color": list(color)}},
    }


def write_geojson_project(
    folder: Path, name: str, image: np.ndarray, points_xy: np.ndarray, pixel_size_um: float | None = 0.5,
    extra_features: list[dict] | None = None,
) -> Path:
    """A folder project: NAME.tif + NAME.geojson (a QuPath FeatureCollection export)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tiff(folder / f"{name}.tif", image, pixel_size_um)
    feats = [points_feature(points_xy)] + list(extra_features or [])
    (folder / f"{name}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return folder
