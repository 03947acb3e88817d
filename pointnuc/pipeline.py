"""The few high-level functions the CLI calls: train a model, segment a project.

Stages pass objects, not folder names: the project yields :class:`TrainingImage`
samples, stage 1 turns them into detected points, stage 2 into a segmenter, and
the model folder (:mod:`pointnuc.models.bundle`) records all of it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from shapely.geometry.base import BaseGeometry

import pointnuc
from pointnuc.config import TrainConfig
from pointnuc.errors import InputError, OutputExistsError, PointnucError, TrainingError
from pointnuc.io.base import CELL_EXPANSION_UM, ImageRef, Project
from pointnuc.io.paths import check_output_dir
from pointnuc.train.samples import MIN_POINTS, TrainingImage, detection_samples, points_between

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MODELS_FOLDER = "pointnuc-models"
#: a large slide without regions is trained on in windows of this many working px (plus a margin) around its points
WINDOW_PX = 1024
MODEL_JSON = "pointnuc-model.json"  #: as pointnuc.models.bundle.MODEL_JSON (not imported: it needs torch)


# --------------------------------------------------------------------------- training data


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
    margin = int(round(config.data.region_margin_um / image_um))
    keys = sorted({(int(x // cell), int(y // cell)) for x, y in points_xy})
    out = []
    for cx, cy in keys:
        x0, y0 = max(cx * cell - margin, 0), max(cy * cell - margin, 0)
        x1, y1 = min((cx + 1) * cell + margin, image.width), min((cy + 1) * cell + margin, image.height)
        out.append((x0, y0, x1 - x0, y1 - y0, None))
    return out


def split_holdout(points: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held back): a random ``fraction`` of ``points`` held back, but never all of them."""
    n_hold = int(round(len(points) * fraction))
    if len(points) - n_hold < 1:
        n_hold = 0
    order = rng.permutation(len(points))
    return points[order[n_hold:]], points[order[:n_hold]]


def load_training_images(
    project: Project,
    config: TrainConfig,
    *,
    point_class: str = "Nucleus",
    region_class: str | None = None,
    pixel_size_um: float | None = None,
    image_names: Sequence[str] | None = None,
) -> tuple[list[TrainingImage], dict[str, list[float]], dict[str, int]]:
    """Read every image's points and regions at the working resolution, colour-normalised.

    Returns the samples, the colour reference computed over them (:func:`pointnuc.stain.colour_reference`), and points per image.
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
        ann = project.annotations(image, point_class=point_class, region_class=region_class)
        counts[image.name] = len(ann.points_xy)
        for cls, n in ann.other_point_counts.items():
            others[cls] = others.get(cls, 0) + n
        if len(ann.points_xy) == 0:
            log.info("%s: no %r points, not used for training", image.name, point_class)
            continue
        px = pixel_size_or_error(image, pixel_size_um)
        ds = config.data.pixel_size_um / px
        boxes = []  # (k, pixels, valid mask, points in working px, which points lie in the box)
        with open_slide(image.path, pixel_size_um=px) as slide:
            for k, (x, y, w, h, geom) in enumerate(_boxes_for_image(image, ann.regions, ann.points_xy, ds, config)):
                arr = slide.read_region(x, y, w, h, downsample=ds)
                hh, ww = arr.shape[:2]
                scale = w / ww
                if geom is not None:
                    valid = np.zeros((hh, ww), bool)
                    valid[polygon_pixels(geom, (hh, ww), origin_xy=(x, y), scale=scale)] = True
                else:
                    valid = np.ones((hh, ww), bool)
                local = (ann.points_xy - np.array([x, y], float)) / scale
                ij = np.floor(local).astype(int)
                inside = (ij[:, 0] >= 0) & (ij[:, 1] >= 0) & (ij[:, 0] < ww) & (ij[:, 1] < hh)
                inside[inside] = valid[ij[inside, 1], ij[inside, 0]]
                if inside.any():
                    boxes.append((k, arr, valid, local, inside, (float(x), float(y)), float(scale)))
        # held-back points are drawn per image, so a point in two overlapping windows or regions
        # is never trained on in one and held back in the other
        in_any = np.flatnonzero(np.any([b[4] for b in boxes], axis=0)) if boxes else np.zeros(0, int)
        train_idx, hold_idx = split_holdout(in_any, config.data.holdout_fraction, rng)
        total += len(in_any)
        for k, arr, valid, local, inside, origin, scale in boxes:
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
                )
            )
    if total == 0:
        found = ", ".join(f"{k!r} ({v})" for k, v in sorted(others.items()))
        hint = f"; the project has points of {found}: pass --point-class to use them" if found else (
            "; click points with QuPath's Points tool using that class, or choose the class with --point-class")
        raise TrainingError(f"no {point_class!r} points found in any image of the project{hint}")
    if total < MIN_POINTS:
        raise TrainingError(f"only {total} {point_class!r} points in the project; pointnuc needs at least {MIN_POINTS}")
    ref = colour_reference([s.image for s in raw], stain=config.data.stain_normalise)
    for s in raw:
        s.image = colour_normalize(s.image, ref)
    return raw, ref, counts


# --------------------------------------------------------------------------- model folder


def default_model_dir(project: Project, config: TrainConfig) -> Path:
    """A new, dated model folder inside the project's folder."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return project.root / MODELS_FOLDER / f"{stamp}-{config.profile}"


def newest_model_dir(project: Project) -> Path:
    """The most recent model trained for this project (by the time it was saved)."""
    folder = project.root / MODELS_FOLDER
    cands = sorted(folder.glob(f"*/{MODEL_JSON}"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    done = [p.parent for p in cands if (p.parent / "segmenter.pt").is_file()]
    if not done:
        raise InputError(f"no trained model found in {folder}; run `pointnuc train` first or pass --model")
    return done[-1]


def check_model_dir(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber an existing folder unless asked to (nothing is changed here).

    ``overwrite`` deletes the folder later, so it is allowed only on a pointnuc model
    folder (one holding ``pointnuc-model.json``) or an empty one, never on other files.
    """
    check_output_dir(out, overwrite=overwrite or resume,
                     hint="pass --overwrite to replace it or --resume to continue training there")
    has_model = (out / MODEL_JSON).is_file()
    if resume and not has_model:
        raise InputError(f"--resume: {out} holds no interrupted pointnuc training")
    if overwrite and not resume and out.is_dir() and any(out.iterdir()) and not has_model:
        raise OutputExistsError(
            f"--overwrite replaces only a pointnuc model folder, and {out} is not one; choose another --out"
        )


@dataclass
class TrainSummary:
    """What ``pointnuc train`` reports at the end."""

    model_dir: Path
    n_images: int
    n_points: int
    n_detected: int
    seconds: float
    device: str
    thresholds: dict[str, float] = field(default_factory=dict)


def train_project(
    project: Project,
    out: Path,
    config: TrainConfig,
    *,
    device: str = "auto",
    point_class: str = "Nucleus",
    region_class: str | None = None,
    pixel_size_um: float | None = None,
    weights: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainSummary:
    """Stage 1 then stage 2 on a project's points; leaves a complete model folder at ``out``."""
    import torch

    from pointnuc.models.bundle import ModelLayout, load_info
    from pointnuc.train.fit import resolve_device

    t0 = time.time()
    layout = ModelLayout(out)
    check_model_dir(out, overwrite=overwrite, resume=resume)
    if resume:
        prev = load_info(out)
        if prev.config != config:
            raise TrainingError(f"--resume: {out} was trained with another configuration; use a new --out or the same options")
    dev = resolve_device(device)
    torch.manual_seed(config.seed)

    # read and check all input before anything is written
    samples, ref, counts = load_training_images(
        project, config, point_class=point_class, region_class=region_class, pixel_size_um=pixel_size_um
    )
    if overwrite and not resume and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(layout.log, encoding="utf-8")  # the run's log lives with the model
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("pointnuc").addHandler(handler)
    try:
        return _train(project, out, config, samples, ref, counts, dev=dev, t0=t0, point_class=point_class,
                      region_class=region_class, pixel_size_um=pixel_size_um, weights=weights, resume=resume,
                      progress=progress)
    finally:
        logging.getLogger("pointnuc").removeHandler(handler)
        handler.close()


def _train(
    project: Project,
    out: Path,
    config: TrainConfig,
    samples: list[TrainingImage],
    ref: dict[str, list[float]],
    counts: dict[str, int],
    *,
    dev: "torch.device",
    t0: float,
    point_class: str,
    region_class: str | None,
    pixel_size_um: float | None,
    weights: Path | None,
    resume: bool,
    progress: bool,
) -> TrainSummary:
    """Stage 1 and stage 2 on loaded samples, saving the model description after each."""
    import torch

    from pointnuc.models.bundle import ModelInfo, ModelLayout, save_info
    from pointnuc.train.detect import train_detector
    from pointnuc.train.segment import train_segmenter

    layout = ModelLayout(out)
    n_points = sum(len(s.points) + len(s.holdout) for s in samples)
    log.info(
        "profile %r, model folder %s: %d training image(s)/region(s), %d points (%d held back for tuning), "
        "working at %.3g µm/px (detector %.3g), device %s",
        config.profile,
        out,
        len(samples),
        n_points,
        sum(len(s.holdout) for s in samples),
        config.data.pixel_size_um,
        config.for_detection().data.pixel_size_um,
        dev,
    )
    provenance = {
        "project": str(project.root),
        "images": counts,
        "point_class": point_class,
        "region_class": region_class,
        "pixel_size_override_um": pixel_size_um,
        "seed": config.seed,
        "device": str(dev),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pointnuc": pointnuc.__version__,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    info = ModelInfo(config=config, norm_reference=ref, provenance=provenance)
    save_info(out, info)  # describes the run from the start, so --resume can check it

    # stage 1 may work at a coarser pixel size (detection.pixel_size_um): the same regions, resampled
    samples1 = detection_samples(samples, config)
    det = train_detector(samples1, config.for_detection(), layout, device=dev, resume=resume, progress=progress, weights=weights)
    if samples1 is not samples:
        det.points = points_between(det.points, samples1, samples)  # now at the segmenter's pixel size
    info.thresholds.update({"detection_prob": float(det.threshold), "detection_min_area_px": float(det.min_area_px)})
    info.metrics["detection"] = det.metrics
    info.provenance["stage1_seconds"] = round(time.time() - t0, 1)
    save_info(out, info)

    t1 = time.time()
    seg = train_segmenter(samples, det.points, config, layout, device=dev, resume=resume, progress=progress, weights=weights,
                          detector_state=det.model.state_dict())
    info.thresholds.update({k: float(v) for k, v in seg.thresholds.items()})
    info.metrics["segmentation"] = seg.metrics
    info.provenance["stage2_seconds"] = round(time.time() - t1, 1)
    info.provenance["seconds"] = round(time.time() - t0, 1)
    info.provenance["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    save_info(out, info)
    from pointnuc.report import write_report

    write_report(layout, samples, det, seg, device=str(dev))
    return TrainSummary(
        model_dir=out,
        n_images=len({s.image_name for s in samples}),
        n_points=n_points,
        n_detected=int(sum(len(p) for p in det.points.values())),
        seconds=time.time() - t0,
        device=str(dev),
        thresholds=dict(info.thresholds),
    )


# --------------------------------------------------------------------------- segmentation

RESULTS_FOLDER = "pointnuc-results"


@dataclass
class ImagePlan:
    """One image ``pointnuc segment`` will process."""

    image: ImageRef
    region: BaseGeometry | None  #: full-res shapely geometry to segment within, None = whole image
    done: bool  #: a result from this model already exists (skipped unless --redo)


@dataclass
class SegmentSummary:
    """What ``pointnuc segment`` reports at the end."""

    model_dir: Path
    results_dir: Path
    nuclei: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)


def results_dir(project: Project, model_dir: Path, tta: bool = False) -> Path:
    """Per-image results of one model on one project (resume state and shard output).

    Keyed by the model folder's name and a digest of its description, so a model
    retrained into the same folder never reuses the old model's results, and by the
    test-time augmentation, so ``--tta`` never reuses (or is mistaken for) a plain run.
    """
    import hashlib

    from pointnuc.models.bundle import ModelLayout

    meta = ModelLayout(Path(model_dir)).meta
    digest = hashlib.sha1(meta.read_bytes()).hexdigest()[:8] if meta.is_file() else "unknown"
    return project.root / RESULTS_FOLDER / f"{Path(model_dir).resolve().name}-{digest}{'-tta' if tta else ''}"


def shard_filter(names: Sequence[str], shard: tuple[int, int] | None) -> list[str]:
    """The image names shard K of N handles (1-based K), by position in project order."""
    if shard is None:
        return list(names)
    k, n = shard
    if not (n >= 1 and 1 <= k <= n):
        raise InputError(f"--shard {k}/{n}: need 1 <= K <= N")
    return [name for i, name in enumerate(names) if i % n == k - 1]


def plan_segmentation(
    project: Project,
    model_dir: Path,
    *,
    image_names: Sequence[str] = (),
    within_class: str | None = None,
    shard: tuple[int, int] | None = None,
    redo: bool = False,
    tta: bool = False,
) -> list[ImagePlan]:
    """Which images (and areas) to segment; unknown names or an empty --within class are errors."""
    from shapely.ops import unary_union

    images = project.images()
    by_name = {im.name: im for im in images}
    missing = [n for n in image_names if n not in by_name]
    if missing:
        raise InputError(f"no image named {missing[0]!r} in the project (see `pointnuc inspect`)")
    names = list(image_names) if image_names else [im.name for im in images]
    names = shard_filter(names, shard)
    out_dir = results_dir(project, model_dir, tta)
    plans = []
    any_region = False
    for name in names:
        image = by_name[name]
        region = None
        if within_class:
            ann = project.annotations(image, region_class=within_class)
            if not ann.regions:
                continue
            region = unary_union(list(ann.regions))
            any_region = True
        done = result_file(out_dir, name, region).is_file() and not redo
        plans.append(ImagePlan(image=image, region=region, done=done))
    if within_class and not any_region:
        raise InputError(f"no {within_class!r} annotations in the selected images; draw one in QuPath or drop --within")
    return plans


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def result_file(out_dir: Path, image_name: str, region: BaseGeometry | None) -> Path:
    """Where one image's result is kept: ``NAME.geojson`` for the whole image, and for an area
    (``--within``) a file named after that area, so a result is never reused for another area."""
    if region is None:
        return out_dir / f"{_safe(image_name)}.geojson"
    import hashlib

    return out_dir / f"{_safe(image_name)}.within-{hashlib.sha1(region.wkb).hexdigest()[:8]}.geojson"


def segment_project(
    project: Project,
    model_dir: Path,
    *,
    image_names: Sequence[str] = (),
    within_class: str | None = None,
    device: str = "auto",
    pixel_size_um: float | None = None,
    object_type: str = "detection",
    class_name: str = "Nucleus",
    shard: tuple[int, int] | None = None,
    write: bool = True,
    redo: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    tta: bool = False,
    cell_expansion_um: float = CELL_EXPANSION_UM,
) -> SegmentSummary:
    """Segment the planned images; per-image results are kept so a re-run continues.

    With ``write`` (no shard), each image's nuclei go into the project as soon as it is
    done, replacing pointnuc's earlier objects in that area only. ``cell_expansion_um``:
    how far cells reach beyond their nuclei (``object_type="cell"``).
    """
    from pointnuc.geometry import object_area
    from pointnuc.infer.wsi import segment_slide
    from pointnuc.io.geojson import read_nuclei, write_nuclei_file
    from pointnuc.io.slide import open_slide, pixel_size_or_error
    from pointnuc.models.bundle import load_info, load_network
    from pointnuc.train.fit import resolve_device

    plans = plan_segmentation(project, model_dir, image_names=image_names, within_class=within_class, shard=shard,
                              redo=redo, tta=tta)
    # every image's pixel size before any work, so a missing one stops the run with nothing half-done
    pixel_sizes = {p.image.name: pixel_size_or_error(p.image, pixel_size_um) for p in plans if not p.done}
    info = load_info(model_dir)
    net = load_network(model_dir, "segmenter", info)
    dev = resolve_device(device)
    net.to(dev)
    out_dir = results_dir(project, model_dir, tta)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = SegmentSummary(model_dir=Path(model_dir), results_dir=out_dir)
    for plan in plans:
        name = plan.image.name
        result = result_file(out_dir, name, plan.region)
        if plan.done:
            summary.skipped.append(name)
            nuclei = read_nuclei(result)
        else:
            t0 = time.time()
            px = pixel_sizes[name]
            try:
                with open_slide(plan.image.path, pixel_size_um=px) as slide:
                    res = segment_slide(slide, net, info, region=plan.region, device=dev, batch_size=batch_size,
                                        progress=progress, name=name, tta=tta)
            except Exception as err:  # one bad slide must not stop the others
                if not isinstance(err, PointnucError):
                    log.debug("failure on %s", name, exc_info=True)
                summary.failed[name] = f"{err.__class__.__name__}: {err}"
                log.error("%s failed: %s", name, err)
                continue
            nuclei = res.nuclei
            write_nuclei_file(result, nuclei, object_type=object_type, class_name=class_name, pixel_size_um=px,
                              cell_expansion_um=cell_expansion_um,
                              clip_to=object_area(plan.image.width, plan.image.height, plan.region))
            summary.seconds[name] = time.time() - t0
        summary.nuclei[name] = len(nuclei)
        if write and shard is None:
            summary.written += project.write_nuclei(
                {name: nuclei}, object_type=object_type, class_name=class_name, replace_within={name: plan.region},
                cell_expansion_um=cell_expansion_um,
            )
    return summary


def merge_results(
    project: Project, model_dir: Path, *, object_type: str = "detection", class_name: str = "Nucleus",
    within_class: str | None = None, tta: bool = False, cell_expansion_um: float = CELL_EXPANSION_UM,
) -> SegmentSummary:
    """Write every per-image result of ``model_dir`` (e.g. from --shard runs, with ``tta`` as they ran) into the project."""
    from pointnuc.io.geojson import read_nuclei

    plans = plan_segmentation(project, model_dir, within_class=within_class, tta=tta)
    out_dir = results_dir(project, model_dir, tta)
    summary = SegmentSummary(model_dir=Path(model_dir), results_dir=out_dir)
    batch = {}
    within = {}
    for plan in plans:
        f = result_file(out_dir, plan.image.name, plan.region)
        if not f.is_file():
            summary.skipped.append(plan.image.name)
            continue
        batch[plan.image.name] = read_nuclei(f)
        within[plan.image.name] = plan.region
        summary.nuclei[plan.image.name] = len(batch[plan.image.name])
    if not batch:
        raise InputError(f"no results to merge in {out_dir}; run `pointnuc segment --shard K/N{' --tta' if tta else ''}` first")
    summary.written = project.write_nuclei(batch, object_type=object_type, class_name=class_name, replace_within=within,
                                           cell_expansion_um=cell_expansion_um)
    return summary
