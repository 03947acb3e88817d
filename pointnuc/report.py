"""The training report: PNGs a person looks at, in ``MODEL_DIR/report/``.

- ``losses.png``: training loss per epoch, one panel per stage and round (detector
  round 0..k, segmenter, CRF fine-tuning), epochs numbered, the selected one marked;
- ``review_NN_NAME.png``: the images the user clicked in with the most held-back points,
  at the image's own resolution, with the final model's outlines, the user's points, and
  each held-back point marked found or missed, under a legend and a one-line count: the
  one independent check a points-only training has, since held-back points were never
  trained on;
- ``metrics.json``: the numbers behind them (``held_back``: found, total, added).

Drawn with Pillow (no plotting library needed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pointnuc.io.paths import safe_file_name
from pointnuc.models.bundle import ModelLayout
from pointnuc.train.samples import TrainingImage

PANEL_W, PANEL_H, PAD = 360, 232, 40
OUTLINE, TRAINED, FOUND, MISSED = (0, 230, 0), (40, 120, 255), (0, 200, 255), (255, 40, 40)
MAX_REVIEW_PX = 1600  #: a review figure shows at most this many image pixels a side (a crop around the held-back points)


@dataclass
class HeldBackCheck:
    """How the final model does on the points it never saw, and what it adds beyond the clicks."""

    found: int = 0  #: held-back points in a nucleus of their own (one the model outlines, holding no other point)
    total: int = 0  #: held-back points
    added: int = 0  #: outlined nuclei that hold no point of the user's (held back or trained on)
    nuclei: int = 0  #: outlined nuclei in the training images
    per_image: dict[str, tuple[int, int, int]] = field(default_factory=dict)  #: sample -> (found, total, added)

    def add(self, name: str, found: int, total: int, added: int, nuclei: int) -> None:
        self.found += found
        self.total += total
        self.added += added
        self.nuclei += nuclei
        self.per_image[name] = (found, total, added)

    def line(self) -> str:
        """One sentence for the end of ``pointnuc train``."""
        if self.total == 0:
            return (f"No points were held back, so nothing checks the model independently; it outlines "
                    f"{self.nuclei} nuclei in the training images, {self.added} where no one clicked.")
        return (f"Held-back points: the model outlines {self.found} of {self.total} "
                f"({100 * self.found / self.total:.0f} %) as nuclei of their own without having trained on them, "
                f"and {self.added} more nuclei where no one clicked in the training images.")


def plot_curves(curves: dict[str, tuple[list[float], int | None]], path: Path, title: str = "training loss per epoch") -> Path:
    """One panel per named curve (values per epoch, selected epoch or None), written as a PNG."""
    n = max(len(curves), 1)
    cols = min(n, 3)
    rows = -(-n // cols)
    im = Image.new("RGB", (cols * PANEL_W, rows * PANEL_H + 24), "white")
    dr = ImageDraw.Draw(im)
    dr.text((8, 6), title, fill="black")
    for k, (name, (vals, best)) in enumerate(curves.items()):
        _panel(dr, (k % cols) * PANEL_W, 24 + (k // cols) * PANEL_H, name, vals, best)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def _panel(dr: ImageDraw.ImageDraw, ox: int, oy: int, name: str, vals: list[float], best: int | None) -> None:
    """One curve's panel, its top-left corner at (ox, oy)."""
    x0, y0, x1, y1 = ox + PAD, oy + 20, ox + PANEL_W - 12, oy + PANEL_H - 28
    dr.rectangle([x0, y0, x1, y1], outline="gray")
    dr.text((ox + PAD, oy + 4), name, fill="black")
    v = np.asarray([x for x in vals if np.isfinite(x)], float)
    if len(v) == 0:
        return
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    dr.text((ox + 2, y0 - 4), f"{hi:.3g}", fill="black")
    dr.text((ox + 2, y1 - 8), f"{lo:.3g}", fill="black")
    m = len(vals)
    span = max(m - 1, 1)  # a one-epoch stage is one point at epoch 1, not a point in mid-air

    def xy(i: int, val: float) -> tuple[float, float]:
        return x0 + 6 + i / span * (x1 - x0 - 12), y1 - 6 - (val - lo) / (hi - lo) * (y1 - y0 - 12)

    for e in sorted({1, m, (m + 1) // 2}):  # epoch ticks
        tx = xy(e - 1, lo)[0]
        dr.line([(tx, y1), (tx, y1 + 3)], fill="gray")
        dr.text((tx - 3, y1 + 4), str(e), fill="black")

    pts = [xy(i, val) for i, val in enumerate(vals) if np.isfinite(val)]
    if len(pts) > 1:
        dr.line(pts, fill=(30, 90, 200), width=2)
    for p in pts:
        dr.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(30, 90, 200))
    if best is not None and 1 <= best <= m and np.isfinite(vals[best - 1]):
        bx, by = xy(best - 1, vals[best - 1])
        dr.ellipse([bx - 5, by - 5, bx + 5, by + 5], outline=(220, 30, 30), width=2)
    label = (f"epoch (1 epoch, loss {vals[0]:.3g})" if m == 1 else "epoch") + (f", selected {best}" if best else "")
    dr.text((x0 + (x1 - x0) // 2 - 40, y1 + 14), label, fill="black")


def _legend(dr: ImageDraw.ImageDraw, x: int, y: int) -> None:
    """The key to a review figure's marks, one row."""
    items = ((OUTLINE, "outline: a nucleus the model found", "line"), (TRAINED, "your point, trained on", "dot"),
             (FOUND, "held-back point, found", "ring"), (MISSED, "held-back point, missed", "ring"))
    for colour, text, kind in items:
        if kind == "line":
            dr.line([(x, y + 6), (x + 14, y + 6)], fill=colour, width=2)
        elif kind == "dot":
            dr.ellipse([x + 3, y + 2, x + 11, y + 10], fill=colour)
        else:
            dr.ellipse([x + 1, y, x + 13, y + 12], outline=colour, width=2)
        dr.text((x + 20, y + 1), text, fill="black")
        x += 28 + int(dr.textlength(text))


def review_figure(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    train_xy: np.ndarray,
    holdout_xy: np.ndarray,
    found: np.ndarray,
    zoom: int = 1,
    title: str = "",
) -> Image.Image:
    """The image enlarged ``zoom`` times (to its own resolution), outlines traced at that size, points, legend, title."""
    from skimage.segmentation import find_boundaries

    rgb = Image.fromarray(np.asarray(image, np.uint8))
    if zoom > 1:
        rgb = rgb.resize((rgb.width * zoom, rgb.height * zoom), Image.Resampling.BICUBIC)
        labels = np.repeat(np.repeat(labels, zoom, axis=0), zoom, axis=1)
    arr = np.asarray(rgb).copy()
    arr[find_boundaries(labels, mode="inner")] = OUTLINE
    top, bottom = 22, 24
    im = Image.new("RGB", (max(arr.shape[1], 640), arr.shape[0] + top + bottom), "white")
    im.paste(Image.fromarray(arr), (0, top))
    dr = ImageDraw.Draw(im)
    dr.text((4, 5), title, fill="black")
    _legend(dr, 4, top + arr.shape[0] + 6)
    r = 3 + zoom
    for x, y in np.asarray(train_xy, float).reshape(-1, 2):
        cx, cy = x * zoom, y * zoom + top
        dr.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=TRAINED)
    for (x, y), ok in zip(np.asarray(holdout_xy, float).reshape(-1, 2), found):
        cx, cy = x * zoom, y * zoom + top
        dr.ellipse([cx - r - 2, cy - r - 2, cx + r + 2, cy + r + 2], outline=FOUND if ok else MISSED, width=2)
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


def _in(xy: np.ndarray | None, y0: int, x0: int, y1: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
    """The points inside the tile, shifted to it, and which ones they were."""
    a = np.asarray(xy if xy is not None else np.zeros((0, 2)), float).reshape(-1, 2)
    keep = (a[:, 0] >= x0) & (a[:, 0] < x1) & (a[:, 1] >= y0) & (a[:, 1] < y1)
    return a[keep] - (x0, y0), keep


@dataclass
class Report:
    """What :func:`write_report` wrote and found."""

    files: list[Path]
    held_back: HeldBackCheck


def write_report(layout: ModelLayout, samples: Sequence[TrainingImage], det: Any, seg: Any, *,
                 n_images: int = 4, device: str = "cpu") -> Report:
    """Write losses.png, review PNGs and metrics.json for a finished training.

    Every training sample is segmented with the final model to count the held-back points
    found; the ``n_images`` samples with the most held-back points get a review figure.
    """
    from pointnuc.train.segment import segment_image
    from pointnuc.train.selection import holdout_counts, holdout_found

    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("overlay_*.png"):  # the figures of reports before review_*.png
        old.unlink()
    curves: dict[str, tuple[list[float], int | None]] = {}
    for name, hist in (getattr(det, "history", None) or {}).items():
        curves[f"detector {name}"] = (hist.losses, hist.best_epoch)
    for name, hist in (getattr(seg, "history", None) or {}).items():
        curves[f"segmenter {name}"] = (hist.losses, hist.best_epoch)
    files = [plot_curves(curves, out / "losses.png")]
    check = HeldBackCheck()
    method = seg.metrics.get("method", "cc")
    chosen = {s.name for s in sorted(samples, key=lambda s: -len(s.holdout))[:n_images]}
    k = 0
    for s in samples:
        lab = segment_image(seg.model, s.image, seg.thresholds, method=method, device=device)
        c = holdout_counts(lab, s.holdout, s.points, same_radius=0.0)
        found_n, total, added = c["good"], c["n"], c["empty"]
        check.add(s.name, found_n, total, added, c["instances"])
        if s.name not in chosen:
            continue
        zoom = max(1, round(s.scale))  # back to the image's own resolution
        y0, y1, x0, x1 = _tile_around(s, max(MAX_REVIEW_PX // zoom, 64))
        hold, keep = _in(s.holdout, y0, x0, y1, x1)
        found = holdout_found(lab, s.holdout, s.points, same_radius=0.0)[keep]
        title = (f"{s.name}: {found_n} of {total} held-back points found, {added} nuclei outlined where no one "
                 f"clicked" + ("" if (y0, x0, y1, x1) == (0, 0, *s.image.shape[:2]) else " (whole image; crop shown)"))
        im = review_figure(s.image[y0:y1, x0:x1], lab[y0:y1, x0:x1], train_xy=_in(s.points, y0, x0, y1, x1)[0],
                           holdout_xy=hold, found=found, zoom=zoom, title=title)
        p = out / f"review_{k:02d}_{safe_file_name(s.name)}.png"
        im.save(p)
        files.append(p)
        k += 1
    metrics = {"detection": getattr(det, "metrics", {}), "segmentation": getattr(seg, "metrics", {}),
               "thresholds": seg.thresholds.to_json(), "held_back": asdict(check)}
    mp = out / "metrics.json"
    mp.write_text(json.dumps(metrics, indent=1, default=_default), encoding="utf-8")
    files.append(mp)
    return Report(files, check)


def _default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
