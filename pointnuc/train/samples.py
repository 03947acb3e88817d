"""The unit both training stages consume: one image (or region) at the working resolution,
and how a project's points and regions become such samples (boxes, held-back points, colour)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from shapely.geometry.base import BaseGeometry

from pointnuc.errors import TrainingError
from pointnuc.io.base import DEFAULT_BACKGROUND_CLASS
from pointnuc.models.calibration import ColourReference

if TYPE_CHECKING:
    from pointnuc.config import TrainConfig
    from pointnuc.io.base import ImageAnnotations, ImageRef, Project

log = logging.getLogger(__name__)

#: Fewest points (training + held back) we train from. Below ~10 clicked nuclei a
#: 16-crop batch holds on average less than one labeled nucleus, the network learns
#: "background everywhere", and there is nothing left to hold back for tuning.
MIN_POINTS = 10
#: a large slide without regions is trained on in windows of this many working px (plus a margin) around its points
WINDOW_PX = 1024


@dataclass
class TrainingImage:
    """One training image or region, resampled to the model's working pixel size.

    All coordinates here are at the working resolution, QuPath convention (x = column,
    y = row, pixel (r, c) centred at (c + 0.5, r + 0.5)). ``to_full_res`` maps them back.
    """

    name: str  #: unique id: image name, plus ``#k`` for the k-th region of an image
    image_name: str  #: the project's image name
    image: np.ndarray  #: uint8 RGB (H, W, 3), colour-normalised (Reinhard)
    points: np.ndarray  #: (N, 2) float xy: the user's points used for training
    holdout: np.ndarray  #: (M, 2) float xy: user's points held back for tuning/selection
    valid: np.ndarray  #: bool (H, W): inside the training region; labels outside are ignored
    origin_xy: tuple[float, float] = (0.0, 0.0)  #: full-res x/y of this array's top-left corner
    scale: float = 1.0  #: full-res pixels per working pixel
    #: uint8 (H, W) codes of the user's other marks (background, outlines: :mod:`pointnuc.labels.marks`); None: none
    marks: np.ndarray | None = None

    def rescaled(self, pixel_size_ratio: float) -> TrainingImage:
        """This sample with ``pixel_size_ratio`` times the pixel size (2: half the pixels a side).

        Pixels are averaged (box filter) when shrinking, the mask and the marks taken by nearest
        neighbour; points keep their full-resolution place.
        """
        from PIL import Image

        h, w = self.valid.shape
        hh, ww = max(1, round(h / pixel_size_ratio)), max(1, round(w / pixel_size_ratio))
        if (hh, ww) == (h, w):
            return self
        f = w / ww  # old pixels per new pixel, as the slide reader counts scale
        box = Image.Resampling.BOX if pixel_size_ratio > 1 else Image.Resampling.BILINEAR
        return replace(
            self,
            image=np.asarray(Image.fromarray(self.image).resize((ww, hh), box)),
            points=self.points / f,
            holdout=self.holdout / f,
            valid=np.asarray(Image.fromarray(self.valid).resize((ww, hh), Image.Resampling.NEAREST)),
            scale=self.scale * f,
            marks=None if self.marks is None else np.asarray(
                Image.fromarray(self.marks).resize((ww, hh), Image.Resampling.NEAREST)),
        )

    def to_full_res(self, xy: np.ndarray) -> np.ndarray:
        """Working-resolution x/y -> full-resolution QuPath x/y."""
        return np.asarray(xy, float) * self.scale + np.asarray(self.origin_xy, float)


def points_between(points: Mapping[str, np.ndarray], src: Sequence[TrainingImage],
                   dst: Sequence[TrainingImage]) -> dict[str, np.ndarray]:
    """Working-resolution points found on ``src`` samples, moved onto the same-named ``dst`` samples
    (the same regions at another pixel size)."""
    scale = {s.name: s.scale for s in src}
    return {d.name: np.asarray(points[d.name], float) * (scale[d.name] / d.scale) for d in dst if d.name in points}


def detection_samples(samples: Sequence[TrainingImage], config: TrainConfig) -> Sequence[TrainingImage]:
    """``samples`` (at ``config.data.pixel_size_um``) as stage 1 sees them, at ``detection.pixel_size_um``;
    ``samples`` itself when the two pixel sizes are the same."""
    ratio = config.for_detection().data.pixel_size_um / config.data.pixel_size_um
    return samples if ratio == 1 else [s.rescaled(ratio) for s in samples]


def _boxes_for_image(
    image: ImageRef, regions: Sequence[BaseGeometry], points_xy: np.ndarray, downsample: float, config: TrainConfig
) -> list[tuple[int, int, int, int, BaseGeometry | None]]:
    """Full-res boxes (x, y, w, h, region geometry or None) to train on for one image.

    Regions: each region's bounding box. Otherwise the whole image when it is at most
    ``max_whole_image_px`` working px a side, else a :data:`WINDOW_PX` grid cell around
    each group of points plus ``region_margin_um`` on every side.
    """
    if regions:
        out = []
        for geom in regions:
            x0, y0, x1, y1 = geom.bounds
            x0, y0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
            x1, y1 = min(int(np.ceil(x1)), image.width), min(int(np.ceil(y1)), image.height)
            if x1 - x0 < 2 or y1 - y0 < 2:
                log.warning("a training region on %s has no pixels inside the image; skipped", image.name)
                continue
            out.append((x0, y0, x1 - x0, y1 - y0, geom))
        return out
    limit = config.data.max_whole_image_px * downsample
    if image.width <= limit and image.height <= limit:
        return [(0, 0, image.width, image.height, None)]
    # a large slide: windows around the points (grid cells that hold points, plus a margin)
    cell = int(WINDOW_PX * downsample)
    image_um = config.data.pixel_size_um / downsample  # the image's own µm per pixel
    margin = round(config.data.region_margin_um / image_um)
    keys = sorted({(int(x // cell), int(y // cell)) for x, y in points_xy})
    out = []
    for cx, cy in keys:
        x0, y0 = max(cx * cell - margin, 0), max(cy * cell - margin, 0)
        x1, y1 = min((cx + 1) * cell + margin, image.width), min((cy + 1) * cell + margin, image.height)
        out.append((x0, y0, x1 - x0, y1 - y0, None))
    return out


def split_holdout(points: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held back): a random ``fraction`` of ``points`` held back, but never all of them."""
    n_hold = round(len(points) * fraction)
    if len(points) - n_hold < 1:
        n_hold = 0
    order = rng.permutation(len(points))
    return points[order[n_hold:]], points[order[:n_hold]]


def mark_anchors(ann: ImageAnnotations) -> np.ndarray:
    """Places (full-res x/y) a large slide's training windows must hold: the background marks' centres."""
    geoms = [*ann.background_areas, *ann.deleted]
    centres = np.asarray([(g.centroid.x, g.centroid.y) for g in geoms], float).reshape(-1, 2)
    return np.concatenate([ann.background_points_xy.reshape(-1, 2), centres])


def sample_marks(ann: ImageAnnotations, shape: tuple[int, int], origin_xy: tuple[float, float], scale: float,
                 config: TrainConfig, held_back: Sequence[int] | np.ndarray = ()) -> np.ndarray | None:
    """The image's marks rasterised on one sample's grid (:func:`pointnuc.labels.marks.rasterise_marks`).

    ``held_back``: indices into ``ann.nucleus_points_xy`` held back for tuning; their outlines are
    left out, so the held-back check never sees a nucleus the network was shown.
    """
    from pointnuc.labels.marks import RING_UM, rasterise_marks

    held, first = {int(i) for i in held_back}, len(ann.points_xy)  # the outlines' centres follow the clicked points
    outlines = [g for i, g in enumerate(ann.outlines) if first + i not in held]
    if not (outlines or ann.has_background_marks):
        return None
    return rasterise_marks(shape, origin_xy=origin_xy, scale=scale, r1_px=config.data.px(config.data.nucleus_radius_um),
                           ring_px=config.data.px(RING_UM), background_areas=ann.background_areas,
                           background_points_xy=ann.background_points_xy, deleted=ann.deleted,
                           outlines=outlines, nucleus_points_xy=ann.points_xy)


def load_training_images(
    project: Project,
    config: TrainConfig,
    *,
    point_class: str = "Nucleus",
    region_class: str | None = None,
    pixel_size_um: float | None = None,
    image_names: Sequence[str] | None = None,
    background_class: str | None = DEFAULT_BACKGROUND_CLASS,
    reference: Mapping[str, Sequence[float]] | None = None,
) -> tuple[list[TrainingImage], ColourReference, dict[str, int]]:
    """Read every image's marks at the working resolution, colour-normalised.

    Nucleus points are the clicked points and the centres of the user's outlines; the other
    marks (background areas and points of ``background_class``, deleted detections, outlines)
    go into each sample's ``marks``. An image with marks but no points is trained on too.
    Returns the samples, the colour reference computed over them (:func:`pointnuc.stain.colour_reference`)
    or ``reference`` when given (a parent model's: :mod:`pointnuc.train.correction`), and nucleus points per image.
    """
    from pointnuc.geometry import polygon_pixels
    from pointnuc.io.slide import open_slide, pixel_size_or_error
    from pointnuc.stain import colour_normalize, colour_reference

    rng = np.random.default_rng(config.seed)
    raw: list[TrainingImage] = []
    counts: dict[str, int] = {}
    total = 0  # distinct points inside the training boxes
    others: dict[str, int] = {}  # points of other classes, for the hint when there are none of point_class
    wanted = set(image_names) if image_names else None
    for image in project.images():
        if wanted is not None and image.name not in wanted:
            continue
        ann = project.annotations(image, point_class=point_class, region_class=region_class,
                                  background_class=background_class)
        nuclei_xy = ann.nucleus_points_xy
        counts[image.name] = len(nuclei_xy)
        for cls, n in ann.other_point_counts.items():
            others[cls] = others.get(cls, 0) + n
        if len(nuclei_xy) == 0 and not ann.has_background_marks:
            log.info("%s: no %r points, not used for training", image.name, point_class)
            continue
        px = pixel_size_or_error(image, pixel_size_um)
        ds = config.data.pixel_size_um / px
        boxes = []  # (k, pixels, valid mask, points in working px, which points lie in the box, origin, scale)
        anchors = np.concatenate([nuclei_xy, mark_anchors(ann)])
        with open_slide(image.path, pixel_size_um=px) as slide:
            for k, (x, y, w, h, geom) in enumerate(_boxes_for_image(image, ann.regions, anchors, ds, config)):
                arr = slide.read_region(x, y, w, h, downsample=ds)
                hh, ww = arr.shape[:2]
                scale = w / ww
                if geom is not None:
                    valid = np.zeros((hh, ww), bool)
                    valid[polygon_pixels(geom, (hh, ww), origin_xy=(x, y), scale=scale)] = True
                else:
                    valid = np.ones((hh, ww), bool)
                local = (nuclei_xy - np.array([x, y], float)) / scale
                ij = np.floor(local).astype(int)
                inside = (ij[:, 0] >= 0) & (ij[:, 1] >= 0) & (ij[:, 0] < ww) & (ij[:, 1] < hh)
                inside[inside] = valid[ij[inside, 1], ij[inside, 0]]
                boxes.append((k, arr, valid, local, inside, (float(x), float(y)), float(scale)))
        # held-back points are drawn per image, so a point in two overlapping windows or regions
        # is never trained on in one and held back in the other
        in_any = np.flatnonzero(np.any([b[4] for b in boxes], axis=0)) if boxes else np.zeros(0, int)
        train_idx, hold_idx = split_holdout(in_any, config.data.holdout_fraction, rng)
        total += len(in_any)
        for k, arr, valid, local, inside, origin, scale in boxes:
            marks = sample_marks(ann, valid.shape, origin, scale, config, held_back=hold_idx)
            if marks is not None and not (marks[valid] != 0).any():
                marks = None
            if not inside.any() and marks is None:
                continue
            raw.append(
                TrainingImage(
                    name=f"{image.name}#{k}",
                    image_name=image.name,
                    image=arr,
                    points=local[train_idx[inside[train_idx]]],
                    holdout=local[hold_idx[inside[hold_idx]]],
                    valid=valid,
                    origin_xy=origin,
                    scale=scale,
                    marks=marks,
                )
            )
    if total == 0:
        found = ", ".join(f"{k!r} ({v})" for k, v in sorted(others.items()))
        hint = f"; the project has points of {found}: pass --point-class to use them" if found else (
            "; click points with QuPath's Points tool using that class, or choose the class with --point-class")
        raise TrainingError(f"no {point_class!r} points found in any image of the project{hint}")
    if total < MIN_POINTS:
        raise TrainingError(f"only {total} {point_class!r} points in the project; pointnuc needs at least {MIN_POINTS}")
    ref: dict[str, Sequence[float]] = (
        {**reference} if reference is not None
        else {**colour_reference([s.image for s in raw], stain=config.data.stain_normalise)})
    for s in raw:
        s.image = colour_normalize(s.image, ref)
    return raw, ColourReference.from_json(ref), counts
