"""``pointnuc suggest``: the places where one answer from the user helps the model most.

The model runs on every image of the project (the detector on the four flips, and the
segmenter). Candidate places are the detector's peaks (components above half its threshold)
and the segmenter's nuclei the detector does not see. Each is scored by three uncertainties,
each in [0, 1], and ranked by the largest (ties by their mean):

- ``threshold``: the detector's probability at its peak near the model's threshold,
  ``1 - |p - t| / max(t, 1 - t)``;
- ``flips``: disagreement between the four flips, ``min(1, 2·std)`` of their probabilities;
- ``stages``: disagreement between the detector (nucleus or not at its threshold) and the
  segmenter's nucleus probability there.

Places closer than two nucleus radii to a user mark (points of any class, outlines of the
nucleus class, background areas) or to a better suggestion are skipped; the N kept are spread
over the images (each image's best, then each one's second best, ...). They are written as one
Point annotation each, of class :data:`SUGGESTION_CLASS`, carrying the measurement
:data:`~pointnuc.io.base.SUGGESTION_MARKER` = their rank (1 = most useful). A re-run replaces
the suggestions of that class that are still unanswered and nothing else.

The user answers a suggestion by reclassifying its point to ``Nucleus`` (a nucleus is there),
to ``Background`` (none is), or by deleting the detection it sits on. What was suggested is
kept in ``PROJECT_FOLDER/pointnuc-suggestions.json`` (:data:`RECORD_FILE`), so
:func:`suggestion_answers` can count the answered and unanswered ones.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pointnuc.errors import InputError
from pointnuc.io.base import DEFAULT_BACKGROUND_CLASS, SUGGESTION_MARKER, ImageRef, Project

if TYPE_CHECKING:
    import torch

    from pointnuc.io.objects import QuPathObject

log = logging.getLogger(__name__)

#: class of the suggestion points pointnuc writes
SUGGESTION_CLASS = "pointnuc suggestion"
#: the record of the latest suggestions, in the project's folder
RECORD_FILE = "pointnuc-suggestions.json"
REASONS = ("threshold", "flips", "stages")


@dataclass(frozen=True)
class Suggestion:
    """One place to ask about, in full-resolution QuPath coordinates."""

    image: str
    x: float
    y: float
    score: float  #: the largest of the three uncertainties
    reason: str  #: which one: threshold | flips | stages
    detected: bool  #: the model detects a nucleus here (deleting that detection answers "no")
    radius_px: float  #: the model's nucleus radius in the image's full-resolution pixels
    mean: float = 0.0  #: the mean of the three uncertainties (breaks ties)
    rank: int = 0  #: 1 = most useful, over the project


@dataclass
class SuggestSummary:
    """What ``pointnuc suggest`` reports."""

    suggestions: list[Suggestion]
    written: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  #: image -> why it was not looked at
    record: Path | None = None


# ------------------------------------------------------------------------ scoring (pure)


def candidates(det_flips: np.ndarray, threshold: float, seg_prob: np.ndarray, *, r1_px: float,
               min_area_px: float = 0.0) -> list[tuple[float, float, float, float, str, bool]]:
    """Scored candidate places of one image: ``(x, y, score, mean, reason, detected)``.

    ``det_flips``: the detector's probability (4, H, W) on the four flips, mapped back;
    ``seg_prob``: the segmenter's nucleus probability at any size (scaled onto the detector's
    grid). x/y and ``r1_px`` (the nucleus radius) are in the detector's working pixels.
    """
    from scipy import ndimage as ndi

    flips = np.asarray(det_flips, np.float32)
    mean, std = flips.mean(0), flips.std(0)
    h, w = mean.shape
    sy, sx = seg_prob.shape[0] / h, seg_prob.shape[1] / w
    t = float(threshold)
    span = max(t, 1 - t)

    def seg_at(r: float, c: float) -> float:
        return float(seg_prob[min(int(r * sy), seg_prob.shape[0] - 1), min(int(c * sx), seg_prob.shape[1] - 1)])

    out = []

    def add(r: int, c: float, p: float, s: float, sp: float) -> None:
        u = (1 - abs(p - t) / span, min(1.0, 2 * s), abs(float(p >= t) - sp))
        k = int(np.argmax(u))
        out.append((c + 0.5, r + 0.5, float(u[k]), float(np.mean(u)), REASONS[k], bool(p >= t)))

    lab, n = ndi.label(mean > 0.5 * t, structure=np.ones((3, 3), bool))
    peaks = ndi.maximum_position(mean, lab, range(1, n + 1)) if n else []
    std_max = ndi.maximum(std, lab, range(1, n + 1)) if n else []
    for (r, c), s in zip(peaks, np.atleast_1d(std_max)):
        add(int(r), float(c), float(mean[r, c]), float(s), seg_at(r, c))
    # the segmenter's nuclei the detector does not see at all
    seg_lab, m = ndi.label(seg_prob > 0.5)
    if m:
        areas = np.bincount(seg_lab.ravel(), minlength=m + 1)[1:]
        centres = ndi.center_of_mass(seg_prob > 0.5, seg_lab, range(1, m + 1))
        peak_xy = np.array([(c, r) for r, c in peaks], float).reshape(-1, 2)
        for (r, c), area in zip(centres, areas):
            if area < max(min_area_px, 1):
                continue
            rr, cc = min(int(r / sy), h - 1), min(int(c / sx), w - 1)
            if len(peak_xy) and np.min(np.hypot(peak_xy[:, 0] - cc, peak_xy[:, 1] - rr)) <= r1_px:
                continue
            add(rr, float(cc), float(mean[rr, cc]), float(std[rr, cc]), seg_at(rr, cc))
    return out


def select(per_image: Mapping[str, Sequence[Suggestion]], marks: Mapping[str, np.ndarray], n: int) -> list[Suggestion]:
    """The ``n`` suggestions to write, ranked 1..n: per image the best first, each at least two nucleus
    radii from the image's ``marks`` (x/y) and from better ones; spread over images in turns."""
    kept: dict[str, list[Suggestion]] = {}
    for name, cands in per_image.items():
        taken: list[Suggestion] = []
        mk = np.asarray(marks.get(name, np.zeros((0, 2))), float).reshape(-1, 2)
        for s in sorted(cands, key=lambda s: (-s.score, -s.mean, s.y, s.x)):
            gap = 2 * s.radius_px
            if len(mk) and np.min(np.hypot(mk[:, 0] - s.x, mk[:, 1] - s.y)) < gap:
                continue
            if any(np.hypot(o.x - s.x, o.y - s.y) < gap for o in taken):
                continue
            taken.append(s)
        kept[name] = taken
    chosen: list[Suggestion] = []
    turn = 0
    while len(chosen) < n and any(len(v) > turn for v in kept.values()):
        row = sorted((v[turn] for v in kept.values() if len(v) > turn), key=lambda s: (-s.score, -s.mean))
        chosen.extend(row[: n - len(chosen)])
        turn += 1
    return [Suggestion(**{**asdict(s), "rank": i + 1}) for i, s in enumerate(chosen)]


def mark_positions(objects: Sequence[QuPathObject], *, suggestion_class: str = SUGGESTION_CLASS,
                   point_class: str = "Nucleus", background_class: str = DEFAULT_BACKGROUND_CLASS) -> np.ndarray:
    """x/y of the user's marks on an image: every point (unanswered suggestions excepted) and the vertices
    and centre of outlines of ``point_class`` and areas of ``background_class``."""
    from shapely.geometry import MultiPoint, Point

    xy: list[np.ndarray] = []
    for o in objects:
        g = o.geometry
        if g is None or g.is_empty:
            continue
        if isinstance(g, (Point, MultiPoint)):
            if o.class_name == suggestion_class and SUGGESTION_MARKER in o.measurements:
                continue
            pts = [g] if isinstance(g, Point) else list(g.geoms)
            xy.append(np.array([[p.x, p.y] for p in pts], float))
        elif o.class_name in (point_class, background_class):
            c = g.representative_point()
            ring = np.asarray(g.exterior.coords if hasattr(g, "exterior") else g.envelope.exterior.coords, float)
            xy.append(np.vstack([[c.x, c.y], ring[:, :2]]))
    return np.concatenate(xy) if xy else np.zeros((0, 2))


# ------------------------------------------------------------------------ the model on a project


def image_suggestions(image: ImageRef, pixel_size_um: float, det: torch.nn.Module, seg: torch.nn.Module,
                      info: Any, device: torch.device) -> list[Suggestion]:
    """Every scored candidate place of one image (full-resolution coordinates)."""
    from pointnuc.io.slide import open_slide
    from pointnuc.stain import colour_normalize

    cfg = info.config
    det_px, seg_px = cfg.for_detection().data.pixel_size_um, cfg.data.pixel_size_um
    with open_slide(image.path, pixel_size_um=pixel_size_um) as slide:
        def read(px: float) -> np.ndarray:
            arr = slide.read_region(0, 0, image.width, image.height, downsample=px / pixel_size_um)
            return colour_normalize(arr, info.norm_reference) if info.norm_reference is not None else arr

        img_det = read(det_px)
        img_seg = img_det if seg_px == det_px else read(seg_px)
    from pointnuc.infer.predict import nucleus_probability, predict_flips

    flips = np.stack(predict_flips(det, img_det, 0, activation="sigmoid", device=device))
    seg_prob = nucleus_probability(seg, img_seg, device=device)
    r1 = cfg.data.nucleus_radius_um / det_px
    scale = image.width / img_det.shape[1]  # full-res px per detector px
    th = info.thresholds
    out = []
    for x, y, score, mean, reason, detected in candidates(flips, th.detection_prob, seg_prob, r1_px=r1,
                                                          min_area_px=th.min_area_px):
        out.append(Suggestion(image=image.name, x=x * scale, y=y * scale, score=score, reason=reason,
                              detected=detected, radius_px=cfg.data.nucleus_radius_um / pixel_size_um, mean=mean))
    return out


def suggest_project(
    project: Project,
    model_dir: Path,
    *,
    n: int = 20,
    class_name: str = SUGGESTION_CLASS,
    point_class: str = "Nucleus",
    background_class: str = DEFAULT_BACKGROUND_CLASS,
    device: str = "auto",
    pixel_size_um: float | None = None,
) -> SuggestSummary:
    """Run the model on the project's images, write the ``n`` most useful questions, keep their record.

    Images larger than the model's ``data.max_whole_image_px`` (working px a side) are skipped
    (``summary.skipped``). The project is locked for the write (:mod:`pointnuc.io.lock`).
    """
    from pointnuc.infer.results import model_digest
    from pointnuc.io.lock import project_lock
    from pointnuc.io.slide import pixel_size_or_error
    from pointnuc.models.bundle import load_info, load_network
    from pointnuc.train.fit import resolve_device

    if n < 1:
        raise InputError("--n must be at least 1")
    if class_name in (point_class, background_class):
        raise InputError(f"the suggestion class must differ from {point_class!r} and {background_class!r}")
    info = load_info(model_dir)
    dev = resolve_device(device)
    det, seg = load_network(model_dir, "detector", info).to(dev), load_network(model_dir, "segmenter", info).to(dev)
    summary = SuggestSummary(suggestions=[])
    per_image: dict[str, list[Suggestion]] = {}
    marks: dict[str, np.ndarray] = {}
    limit = info.config.data.max_whole_image_px
    with project_lock(project.root, "suggest"):
        images = project.images()
        for image in images:
            px = pixel_size_or_error(image, pixel_size_um)
            side = max(image.width, image.height) * px / info.config.data.pixel_size_um
            if side > limit:
                summary.skipped[image.name] = f"{side:.0f} working px a side > data.max_whole_image_px {limit}"
                log.warning("%s: not looked at (%s)", image.name, summary.skipped[image.name])
                continue
            marks[image.name] = mark_positions(project.annotation_objects(image), suggestion_class=class_name,
                                               point_class=point_class, background_class=background_class)
            per_image[image.name] = image_suggestions(image, px, det, seg, info, dev)
            log.info("%s: %d candidate places", image.name, len(per_image[image.name]))
        chosen = select(per_image, marks, n)
        by_image: dict[str, list[tuple[float, float, dict[str, float]]]] = {im.name: [] for im in images}
        for s in chosen:
            by_image[s.image].append((s.x, s.y, {SUGGESTION_MARKER: float(s.rank)}))
        summary.written = project.write_suggestions(by_image, class_name=class_name)
        summary.suggestions = chosen
        summary.record = write_record(project.root, chosen, model_dir=Path(model_dir), digest=model_digest(model_dir),
                                      class_name=class_name)
    return summary


# ------------------------------------------------------------------------ the record and the answers


def write_record(root: Path, suggestions: Sequence[Suggestion], *, model_dir: Path, digest: str,
                 class_name: str) -> Path:
    """Keep what was suggested (replacing the record of earlier suggestions)."""
    from pointnuc.fileio import write_text_atomic

    images: dict[str, list[dict[str, Any]]] = {}
    for s in suggestions:
        d = asdict(s)
        images.setdefault(d.pop("image"), []).append(d)
    doc = {"format": 1, "class": class_name, "model": str(Path(model_dir).resolve()), "model_digest": digest,
           "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "images": images}
    path = Path(root) / RECORD_FILE
    write_text_atomic(path, json.dumps(doc, indent=1))
    return path


def read_record(root: Path) -> dict[str, Any] | None:
    """The record of the latest suggestions in the project folder ``root``; None when there is none."""
    path = Path(root) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"{path} is damaged; delete it and run `pointnuc suggest` again") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), dict):
        raise InputError(f"{path} is not a pointnuc suggestions record")
    return doc


def suggestion_answers(
    record: Mapping[str, Any],
    objects: Mapping[str, Sequence[QuPathObject]],
    deleted_xy: Mapping[str, np.ndarray] | None = None,
) -> dict[str, tuple[int, int]]:
    """(answered, unanswered) per image of the record.

    A suggestion is answered when a point carrying its rank (:data:`SUGGESTION_MARKER`) within two
    nucleus radii of it is of another class than the suggestions' (reclassified), when an area of
    another class (a nucleus outline the user drew there, a background area) lies within a radius of it,
    or, where the model detected a nucleus there, when a deleted pointnuc detection (``deleted_xy``, per
    image) lies within a radius of it. ``objects``: each image's annotations as the project holds them now.
    """
    import shapely
    from shapely.geometry import Point

    cls = record.get("class", SUGGESTION_CLASS)
    out: dict[str, tuple[int, int]] = {}
    for name, items in record["images"].items():
        marked = [(float(o.measurements[SUGGESTION_MARKER]), o.geometry.x, o.geometry.y, o.class_name)
                  for o in objects.get(name, ())
                  if SUGGESTION_MARKER in o.measurements and isinstance(o.geometry, Point)]
        areas = [o.geometry for o in objects.get(name, ()) if o.class_name != cls and o.geometry.area > 0]
        gone = np.asarray((deleted_xy or {}).get(name, np.zeros((0, 2))), float).reshape(-1, 2)
        answered = 0
        for s in items:
            r = float(s["radius_px"])
            near = [c for rank, x, y, c in marked
                    if rank == s["rank"] and np.hypot(x - s["x"], y - s["y"]) <= 2 * r]
            drawn = bool(areas) and bool(np.any(shapely.distance(areas, Point(s["x"], s["y"])) <= r))
            if any(c != cls for c in near) or drawn or (
                    s.get("detected") and len(gone) and np.min(np.hypot(gone[:, 0] - s["x"], gone[:, 1] - s["y"])) <= r):
                answered += 1
        out[name] = (answered, len(items) - answered)
    return out


def project_answers(project: Project, deleted_xy: Mapping[str, np.ndarray] | None = None
                    ) -> dict[str, tuple[int, int]] | None:
    """:func:`suggestion_answers` of the project's latest suggestions; None when it has none."""
    record = read_record(project.root)
    if record is None:
        return None
    refs = {im.name: im for im in project.images()}
    objects = {name: project.annotation_objects(refs[name]) for name in record["images"] if name in refs}
    return suggestion_answers(record, objects, deleted_xy)
