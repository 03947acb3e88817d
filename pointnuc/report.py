"""The training report: PNGs a person looks at, in ``MODEL_DIR/report/``.

- ``losses.png``: training loss per epoch, one panel per stage and round (detector
  round 0..k, segmenter, CRF fine-tuning), with the selected epoch marked;
- ``overlay_NN_NAME.png``: a few held-back tiles with the predicted nucleus outlines
  (green), stage-1 detected points (yellow), the user's training points (blue) and
  held-back points (red rings), so the user can judge the model before running it;
- ``metrics.json``: the numbers behind them.

Drawn with Pillow (no plotting library needed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pointnuc.models.bundle import ModelLayout
from pointnuc.train.samples import TrainingImage

PANEL_W, PANEL_H, PAD = 360, 220, 40


def plot_curves(curves: dict[str, tuple[list[float], int | None]], path: Path, title: str = "training loss per epoch") -> Path:
    """One panel per named curve (values per epoch, selected epoch or None), written as a PNG."""
    n = max(len(curves), 1)
    cols = min(n, 3)
    rows = -(-n // cols)
    im = Image.new("RGB", (cols * PANEL_W, rows * PANEL_H + 24), "white")
    dr = ImageDraw.Draw(im)
    dr.text((8, 6), title, fill="black")
    for k, (name, (vals, best)) in enumerate(curves.items()):
        ox, oy = (k % cols) * PANEL_W, 24 + (k // cols) * PANEL_H
        x0, y0, x1, y1 = ox + PAD, oy + 20, ox + PANEL_W - 12, oy + PANEL_H - 28
        dr.rectangle([x0, y0, x1, y1], outline="gray")
        dr.text((ox + PAD, oy + 4), name, fill="black")
        v = np.asarray([x for x in vals if np.isfinite(x)], float)
        if len(v) == 0:
            continue
        lo, hi = float(v.min()), float(v.max())
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        dr.text((ox + 2, y0 - 4), f"{hi:.3g}", fill="black")
        dr.text((ox + 2, y1 - 8), f"{lo:.3g}", fill="black")
        m = len(vals)

        def xy(i: int, val: float) -> tuple[float, float]:
            fx = 0.5 if m == 1 else i / (m - 1)
            return x0 + 6 + fx * (x1 - x0 - 12), y1 - 6 - (val - lo) / (hi - lo) * (y1 - y0 - 12)

        pts = [xy(i, val) for i, val in enumerate(vals) if np.isfinite(val)]
        if len(pts) > 1:
            dr.line(pts, fill=(30, 90, 200), width=2)
        for p in pts:
            dr.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(30, 90, 200))
        if best is not None and 1 <= best <= m and np.isfinite(vals[best - 1]):
            bx, by = xy(best - 1, vals[best - 1])
            dr.ellipse([bx - 5, by - 5, bx + 5, by + 5], outline=(220, 30, 30), width=2)
        dr.text((x0, y1 + 6), f"epoch 1..{m}" + (f", selected {best}" if best else ""), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    detected_xy: np.ndarray | None = None,
    train_xy: np.ndarray | None = None,
    holdout_xy: np.ndarray | None = None,
    zoom: int = 2,
) -> Image.Image:
    """RGB image with instance outlines (green) and points drawn on top, enlarged ``zoom`` times."""
    from skimage.segmentation import find_boundaries

    rgb = np.asarray(image, np.uint8).copy()
    rgb[find_boundaries(labels, mode="inner")] = (0, 230, 0)
    im = Image.fromarray(rgb).resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.NEAREST)
    dr = ImageDraw.Draw(im)
    for pts, colour, r, ring in ((detected_xy, (255, 220, 0), 2, False), (train_xy, (40, 120, 255), 3, False),
                                 (holdout_xy, (255, 40, 40), 5, True)):
        for x, y in np.asarray(pts if pts is not None else np.zeros((0, 2)), float).reshape(-1, 2):
            cx, cy = x * zoom, y * zoom
            if ring:
                dr.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=2)
            else:
                dr.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return im


def _tile_around(sample: TrainingImage, size: int) -> tuple[int, int, int, int]:
    """A tile (y0, y1, x0, x1) centred on the densest cluster of held-back (else training) points."""
    h, w = sample.image.shape[:2]
    pts = sample.holdout if len(sample.holdout) else sample.points
    if len(pts):
        c = np.median(np.asarray(pts, float), axis=0)
        cx, cy = int(c[0]), int(c[1])
    else:
        cx, cy = w // 2, h // 2
    y0 = int(np.clip(cy - size // 2, 0, max(h - size, 0)))
    x0 = int(np.clip(cx - size // 2, 0, max(w - size, 0)))
    return y0, min(y0 + size, h), x0, min(x0 + size, w)


def _in(xy: np.ndarray | None, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    a = np.asarray(xy if xy is not None else np.zeros((0, 2)), float).reshape(-1, 2)
    keep = (a[:, 0] >= x0) & (a[:, 0] < x1) & (a[:, 1] >= y0) & (a[:, 1] < y1)
    return a[keep] - (x0, y0)


def write_report(layout: ModelLayout, samples: Sequence[TrainingImage], det: Any, seg: Any, *,
                 n_tiles: int = 4, tile: int = 256, device: str = "cpu") -> list[Path]:
    """Write losses.png, overlay PNGs and metrics.json for a finished training; returns the files."""
    from pointnuc.train.segment import segment_image

    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    curves: dict[str, tuple[list[float], int | None]] = {}
    for name, hist in (getattr(det, "history", None) or {}).items():
        curves[f"detector {name}"] = (hist.losses, hist.best_epoch)
    for name, hist in (getattr(seg, "history", None) or {}).items():
        curves[f"segmenter {name}"] = (hist.losses, hist.best_epoch)
    files = [plot_curves(curves, out / "losses.png")]
    chosen = sorted(samples, key=lambda s: -len(s.holdout))[:n_tiles]
    det_pts = getattr(det, "points", None) or {}
    for k, s in enumerate(chosen):
        y0, y1, x0, x1 = _tile_around(s, tile)
        img = s.image[y0:y1, x0:x1]
        lab = segment_image(seg.model, img, seg.thresholds, method=seg.metrics.get("method", "cc"), device=device)
        im = overlay(img, lab, detected_xy=_in(det_pts.get(s.name), y0, x0, y1, x1),
                     train_xy=_in(s.points, y0, x0, y1, x1), holdout_xy=_in(s.holdout, y0, x0, y1, x1))
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s.name)
        p = out / f"overlay_{k:02d}_{safe}.png"
        im.save(p)
        files.append(p)
    metrics = {"detection": getattr(det, "metrics", {}), "segmentation": getattr(seg, "metrics", {}),
               "thresholds": getattr(seg, "thresholds", {})}
    mp = out / "metrics.json"
    mp.write_text(json.dumps(metrics, indent=1, default=_default), encoding="utf-8")
    files.append(mp)
    return files


def _default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
