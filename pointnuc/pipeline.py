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
from pointnuc.io.base import DEFAULT_WRITE, ImageRef, NucleusObject, Project, WriteOptions
from pointnuc.io.paths import check_output_dir, safe_file_name
from pointnuc.train.samples import MIN_POINTS, TrainingImage, detection_samples, points_between

if TYPE_CHECKING:
    import torch

    from pointnuc.infer.wsi import SlideResult
    from pointnuc.models.bundle import ModelInfo

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
    ``resume`` needs a pointnuc model folder, or a missing or empty one (a run interrupted
    before it wrote anything starts from the beginning).
    """
    check_output_dir(out, overwrite=overwrite or resume,
                     hint="pass --overwrite to replace it or --resume to continue training there")
    has_model = (out / MODEL_JSON).is_file()
    started = out.is_dir() and any(p.name != "train.log" for p in out.iterdir())
    if resume and not has_model and started:
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
    held_back_line: str = ""  #: how many held-back points the model found, and how many nuclei it adds


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
    offline: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    keep_checkpoints: bool = False,
) -> TrainSummary:
    """Stage 1 then stage 2 on a project's points; leaves a complete model folder at ``out``.

    ``resume``: continue the interrupted run in ``out`` from its checkpoints (same
    configuration and the same points, else a TrainingError); a missing or empty ``out``
    starts from the beginning. ``keep_checkpoints``: keep ``checkpoints/`` when the run
    finishes (by default it is removed: most of a model folder's size, needed only to resume).
    ``weights``: ImageNet weights for the encoder (default: torch's cache, else torchvision's
    download unless ``offline``, else random initialisation; see :func:`resolve_encoder_start`).
    """
    import torch

    from pointnuc.models.bundle import ModelLayout, load_info
    from pointnuc.train.fit import resolve_device

    t0 = time.time()
    layout = ModelLayout(out)
    check_model_dir(out, overwrite=overwrite, resume=resume)
    prev = None
    if resume and layout.meta.is_file():
        prev = load_info(out)
        if prev.config != config:
            raise TrainingError(f"--resume: {out} was trained with another configuration; use a new --out or the same options")
        if prev.provenance.get("finished"):
            raise InputError(f"--resume: the training in {out} has finished; use it (pointnuc segment --model {out}) "
                             "or train into a new --out")
    elif resume:
        log.info("--resume: nothing to resume in %s; training from the beginning", out)
    dev = resolve_device(device)
    torch.manual_seed(config.seed)

    # read and check all input before anything is written
    samples, ref, counts = load_training_images(
        project, config, point_class=point_class, region_class=region_class, pixel_size_um=pixel_size_um
    )
    if prev is not None:
        _check_same_input(out, prev.provenance, counts, point_class, region_class, pixel_size_um)
    if overwrite and not resume and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(layout.log, encoding="utf-8")  # the run's log lives with the model
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("pointnuc").addHandler(handler)
    try:
        return _train(project, out, config, samples, ref, counts, dev=dev, t0=t0, point_class=point_class,
                      region_class=region_class, pixel_size_um=pixel_size_um, weights=weights, offline=offline,
                      resume=prev is not None,
                      progress=progress, keep_checkpoints=keep_checkpoints,
                      previous=prev.provenance if prev is not None else None)
    finally:
        logging.getLogger("pointnuc").removeHandler(handler)
        handler.close()


def _check_same_input(
    out: Path, provenance: dict, counts: dict[str, int], point_class: str, region_class: str | None,
    pixel_size_um: float | None,
) -> None:
    """A TrainingError when the project's points or the reading options changed since the run in ``out``."""
    before = {
        "images": provenance.get("images"), "point_class": provenance.get("point_class"),
        "region_class": provenance.get("region_class"), "pixel_size_override_um": provenance.get("pixel_size_override_um"),
    }
    now = {"images": counts, "point_class": point_class, "region_class": region_class,
           "pixel_size_override_um": pixel_size_um}
    changed = [k for k in now if k in provenance and before[k] != now[k]]
    if changed:
        what = "the project's points" if changed[0] == "images" else f"the {changed[0].replace('_', ' ')}"
        raise TrainingError(f"--resume: {what} changed since the interrupted run in {out}; "
                            "resume with the same project and options, or train into a new --out")


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
    offline: bool,
    resume: bool,
    progress: bool,
    keep_checkpoints: bool = False,
    previous: dict | None = None,
) -> TrainSummary:
    """Stage 1 and stage 2 on loaded samples, saving the model description after each.

    ``previous``: the provenance of the interrupted run being resumed (its start is kept).
    """
    import torch

    from pointnuc.models.bundle import ModelInfo, ModelLayout, save_info
    from pointnuc.models.net import resolve_encoder_start
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
    start = resolve_encoder_start(config.encoder, weights, offline=offline, progress=progress)
    weights = start.file
    provenance = {
        "project": str(project.root),
        "encoder_start": start.to_json(),
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
    if previous is not None:  # a resumed run: when it first started, and each time it was resumed
        provenance["resumed"] = [*previous.get("resumed", []), provenance["started"]]
        provenance["started"] = previous.get("started", provenance["started"])
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
    save_info(out, info)
    from pointnuc.report import write_report

    report = write_report(layout, samples, det, seg, device=str(dev))
    log.info(report.held_back.line())
    info.provenance["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    save_info(out, info)  # finished: --resume now refuses this folder, so its checkpoints may go
    if not keep_checkpoints and layout.checkpoints.is_dir():
        # most of a model folder's size (Adam's state: ~3x the weights per stage), needed only to resume
        shutil.rmtree(layout.checkpoints, ignore_errors=True)
    return TrainSummary(
        model_dir=out,
        n_images=len({s.image_name for s in samples}),
        n_points=n_points,
        n_detected=int(sum(len(p) for p in det.points.values())),
        seconds=time.time() - t0,
        device=str(dev),
        thresholds=dict(info.thresholds),
        held_back_line=report.held_back.line(),
    )


# --------------------------------------------------------------------------- segmentation

RESULTS_FOLDER = "pointnuc-results"
#: what a kept result holds and how it is made: bump it when either changes, and older kept results are recomputed
RESULT_FORMAT = 2
#: an image is enlarged at most this much, or shrunk at most this much, to the model's pixel size; beyond
#: that its nuclei are a pixel or two wide (or the tiles are counted in thousands): a typo'd pixel size
MAX_ENLARGEMENT = 4.0
MAX_REDUCTION = 16.0
#: an image's file is recognised by its size and this many evenly spread chunks of this many bytes
SAMPLE_CHUNKS, SAMPLE_BYTES = 8, 32 * 1024


@dataclass(frozen=True)
class ResultKey:
    """Everything that changes one image's nuclei: a kept result is reused only when its key equals the run's.

    A kept result holds the nuclei only (full-resolution outlines, score, measurements at the
    pixel size). How they are written is applied on every write and is not part of the key:
    ``--objects``, ``--cell-expansion`` and ``--class`` change what goes into the project, not
    the nuclei, so changing them rewrites from the kept result without recomputing. Not in the
    key either: the device, batch and tile size (tiled prediction equals untiled to < 1e-5; CPU
    and GPU differ by rounding only). The image's file is recognised by its size and sampled
    bytes; when its modification time changed too, by a digest of all of it (:func:`reuse_problem`).
    """

    image: str  #: the image's name in the project
    width: int
    height: int
    file_size: int
    file_sample: str  #: digest of the file's size and sampled bytes
    pixel_size_um: float  #: of the image's full resolution, as this run uses it (override or file)
    model: str  #: digest of the model's description (config, thresholds) and segmenter weights
    within: str | None  #: digest of the --within area, None for the whole image
    tta: bool
    format: int = RESULT_FORMAT
    pointnuc: str = field(default_factory=lambda: pointnuc.__version__)


@dataclass
class ImagePlan:
    """One image ``pointnuc segment`` will process, and what it will do with it."""

    image: ImageRef
    region: BaseGeometry | None  #: full-res shapely geometry to segment within, None = whole image
    result: Path  #: where its result is kept
    pixel_size_um: float | None  #: override or the image's; None: the run stops before any work
    key: ResultKey | None  #: what its result depends on (None without a pixel size)
    reuse: bool = False  #: the kept result was made with this very key: no need to segment
    why: str = ""  #: why a kept result is not reused (recomputed), "" when there is none
    n_kept: int | None = None  #: nuclei in the kept result that is reused
    error: str = ""  #: why this image cannot be segmented (its file's pixel size is out of proportion)

    @property
    def done(self) -> bool:
        """A current result is kept (it is reused, not segmented again)."""
        return self.reuse

    def action(self, write: bool) -> str:
        """What the run does with this image, in words (the dry run prints it)."""
        if self.error:
            return f"fail ({self.error})"
        if self.reuse:
            return "write kept result" if write else "nothing (kept result is current)"
        return f"recompute ({self.why})" if self.why else "segment"


@dataclass
class SegmentSummary:
    """What ``pointnuc segment`` reports at the end."""

    model_dir: Path
    results_dir: Path
    nuclei: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  #: kept results reused
    recomputed: dict[str, str] = field(default_factory=dict)  #: image -> why its kept result was not reused
    tiles: dict[str, tuple[int, int]] = field(default_factory=dict)  #: image -> (tiles looked at, tiles of the area)
    failed: dict[str, str] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)


def results_dir(project: Project, model_dir: Path, tta: bool = False) -> Path:
    """Per-image results of one model on one project (resume state and shard output).

    Keyed by the model folder's name and a digest of its description, so a model
    retrained into the same folder never reuses the old model's results, and by the
    test-time augmentation, so ``--tta`` never reuses (or is mistaken for) a plain run.
    Each result inside is checked against its own record before reuse (:class:`ResultKey`).
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


def model_digest(model_dir: Path) -> str:
    """Digest of what the model computes with: its description (config, thresholds) and segmenter weights."""
    import hashlib

    h = hashlib.sha1()
    found = False
    for name in (MODEL_JSON, "segmenter.pt"):
        f = Path(model_dir) / name
        if f.is_file():
            found = True
            h.update(name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16] if found else "unknown"


def _model_pixel_size(model_dir: Path) -> float | None:
    """The model's working pixel size from its description, None when it cannot be read (loading it says why)."""
    import json

    try:
        value = json.loads((Path(model_dir) / MODEL_JSON).read_text(encoding="utf-8")).get("pixel_size_um")
        return float(value) if value else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def file_sample(path: Path) -> tuple[int, int, str]:
    """(size, modification time in ns, digest of the size and sampled bytes) of a file: cheap on any size."""
    import hashlib

    st = Path(path).stat()
    h = hashlib.sha1(str(st.st_size).encode())
    with open(path, "rb") as f:
        if st.st_size <= SAMPLE_CHUNKS * SAMPLE_BYTES:
            h.update(f.read())
        else:
            for off in np.linspace(0, st.st_size - SAMPLE_BYTES, SAMPLE_CHUNKS).astype(np.int64):
                f.seek(int(off))
                h.update(f.read(SAMPLE_BYTES))
    return st.st_size, st.st_mtime_ns, h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """Digest of a whole file."""
    import hashlib

    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _region_digest(region: BaseGeometry | None) -> str | None:
    import hashlib

    return None if region is None else hashlib.sha1(region.wkb).hexdigest()[:8]


def result_file(out_dir: Path, image_name: str, region: BaseGeometry | None) -> Path:
    """Where one image's result is kept: its name made safe for any file system, then ``~`` and a
    digest of the exact name, so that two images never share one (``slide a.tif`` and ``slide_a.tif``,
    or names differing in case on macOS/Windows); for an area (``--within``) the area's digest too,
    so a result is never reused for another area."""
    import hashlib

    stem = f"{safe_file_name(image_name)}~{hashlib.sha1(image_name.encode('utf-8')).hexdigest()[:10]}"
    region_digest = _region_digest(region)
    return out_dir / (f"{stem}.geojson" if region_digest is None else f"{stem}.within-{region_digest}.geojson")


def record_file(result: Path) -> Path:
    """The record of how a kept result was made, beside it (``.json`` for ``.geojson``)."""
    return result.with_suffix(".json")


def read_record(result: Path) -> dict | None:
    """A kept result's record, None when there is none (or it cannot be read: the result is then not trusted)."""
    import json

    f = record_file(result)
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("key"), dict) else None


def reuse_problem(record: dict | None, key: ResultKey, path: Path) -> str | None:
    """Why a kept result made as ``record`` says may not stand for ``key`` (the image file at ``path``),
    in words for the user; None when it may be reused."""
    from dataclasses import asdict

    if record is None:
        return "no record of how the kept result was made"
    old = record["key"]
    new = asdict(key)
    if old.get("image") != key.image:
        return f"the kept result is another image's ({old.get('image')!r})"
    if old.get("format") != key.format or old.get("pointnuc") != key.pointnuc:
        return f"made by pointnuc {old.get('pointnuc')} (now {key.pointnuc})"
    if old.get("model") != key.model:
        return "the model changed"
    if old.get("pixel_size_um") != key.pixel_size_um:
        was = old.get("pixel_size_um")
        was_txt = f"{was:g}" if isinstance(was, (int, float)) else str(was)
        return f"pixel size changed {was_txt} -> {key.pixel_size_um:g} µm/px"
    if old.get("within") != key.within:
        return "the --within area changed"
    if old.get("tta") != key.tta:
        return "--tta changed"
    if any(old.get(k) != new[k] for k in ("width", "height", "file_size", "file_sample")):
        return "the image file changed"
    file_info = record.get("file") or {}
    if file_info.get("mtime_ns") != path.stat().st_mtime_ns and file_info.get("sha1") != file_digest(path):
        return "the image file changed"
    if any(old.get(k) != v for k, v in new.items()):  # a field a later pointnuc added
        return "the kept result was made differently"
    return None


def scale_problem(image: ImageRef, px: float, model_px: float) -> str | None:
    """Why an image cannot be segmented at pixel size ``px`` by a model working at ``model_px``: it would be
    enlarged or shrunk out of all proportion (a typo'd or wrong pixel size); None when it can."""
    factor = px / model_px  # > 1: the image is enlarged
    if factor <= MAX_ENLARGEMENT and 1 / factor <= MAX_REDUCTION:
        return None
    w, h = round(image.width * factor), round(image.height * factor)
    how = f"enlarged {factor:.3g}x" if factor > 1 else f"shrunk {1 / factor:.3g}x"
    return (f"image {image.name!r} at {px:g} µm/px would be {how} to the model's {model_px:g} µm/px "
            f"({image.width} x {image.height} px become {w:,} x {h:,}); nuclei cannot be segmented at that scale: "
            "check the pixel size (--pixel-size; 0.25 for 40x, 0.5 for 20x)")


def plan_segmentation(
    project: Project,
    model_dir: Path,
    *,
    image_names: Sequence[str] = (),
    within_class: str | None = None,
    shard: tuple[int, int] | None = None,
    redo: bool = False,
    tta: bool = False,
    pixel_size_um: float | None = None,
) -> list[ImagePlan]:
    """Which images (and areas) to segment, and for each whether its kept result is reused or why not.

    The one planning function of ``segment``, its ``--dry-run`` and ``--merge``. Unknown names,
    an empty --within class, and an implausible ``pixel_size_um`` (override), or one out of all
    proportion to the model's (:func:`scale_problem`), are errors; an image whose own pixel size
    is out of proportion gets ``error`` (the run fails it and goes on with the others).
    """
    from shapely.ops import unary_union

    from pointnuc.errors import PixelSizeError
    from pointnuc.io.slide import checked_pixel_size

    if pixel_size_um is not None:
        pixel_size_um = checked_pixel_size(pixel_size_um)
    images = project.images()
    by_name = {im.name: im for im in images}
    missing = [n for n in image_names if n not in by_name]
    if missing:
        raise InputError(f"no image named {missing[0]!r} in the project (see `pointnuc inspect`)")
    names = list(image_names) if image_names else [im.name for im in images]
    names = shard_filter(names, shard)
    out_dir = results_dir(project, model_dir, tta)
    digest = model_digest(model_dir)
    model_px = _model_pixel_size(model_dir)
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
        px = pixel_size_um if pixel_size_um is not None else image.pixel_size_um
        plan = ImagePlan(image=image, region=region, result=result_file(out_dir, name, region),
                         pixel_size_um=None if px is None else float(px), key=None)
        problem = scale_problem(image, float(px), model_px) if px is not None and model_px else None
        if problem and pixel_size_um is not None:
            raise PixelSizeError(problem)  # the --pixel-size given is wrong for every image
        if problem:
            plan.error = problem
            plans.append(plan)
            continue
        if px is not None:
            try:
                size, _, sample = file_sample(image.path)
            except OSError:  # segmenting it reports the unreadable file
                size, sample = -1, ""
            plan.key = ResultKey(image=name, width=image.width, height=image.height, file_size=size,
                                 file_sample=sample, pixel_size_um=float(px), model=digest,
                                 within=_region_digest(region), tta=tta)
        if plan.result.is_file():
            if redo:
                plan.why = "--redo"
            elif plan.key is None:
                plan.why = "no pixel size"
            else:
                record = read_record(plan.result)
                try:
                    problem = reuse_problem(record, plan.key, image.path)
                except OSError:
                    problem = "the image file cannot be read"
                if problem is None:
                    plan.reuse, plan.n_kept = True, (record or {}).get("nuclei")
                else:
                    plan.why = problem
        plans.append(plan)
    if within_class and not any_region:
        raise InputError(f"no {within_class!r} annotations in the selected images; draw one in QuPath or drop --within")
    return plans


def keep_result(plan: ImagePlan, nuclei: Sequence[NucleusObject], *, seconds: float, tiles: tuple[int, int],
                device: str) -> None:
    """Keep one image's nuclei and the record of how they were made (the record last: a result
    without one, e.g. after a crash between the two, is never reused)."""
    import json
    from dataclasses import asdict

    from pointnuc.geometry import object_area
    from pointnuc.fileio import write_text_atomic
    from pointnuc.io.geojson import write_nuclei_file

    assert plan.key is not None and plan.pixel_size_um is not None
    record_file(plan.result).unlink(missing_ok=True)
    # nuclei only, as detections: how they are written into the project is applied on each write
    write_nuclei_file(plan.result, nuclei, pixel_size_um=plan.pixel_size_um,
                      clip_to=object_area(plan.image.width, plan.image.height, plan.region))
    st = plan.image.path.stat()
    record = {
        "key": asdict(plan.key),
        "file": {"path": str(plan.image.path), "mtime_ns": st.st_mtime_ns, "sha1": file_digest(plan.image.path)},
        "nuclei": len(nuclei),
        "tiles": list(tiles),
        "seconds": round(seconds, 2),
        "device": device,
        "python": platform.python_version(),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_text_atomic(record_file(plan.result), json.dumps(record, indent=1))


def segment_project(
    project: Project,
    model_dir: Path,
    *,
    image_names: Sequence[str] = (),
    within_class: str | None = None,
    device: str = "auto",
    pixel_size_um: float | None = None,
    write_options: WriteOptions = DEFAULT_WRITE,
    shard: tuple[int, int] | None = None,
    write: bool = True,
    redo: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    tta: bool = False,
) -> SegmentSummary:
    """Segment the planned images; per-image results are kept so a re-run continues.

    A kept result is reused only when it was made with everything that changes it unchanged
    (:class:`ResultKey`); otherwise it is recomputed and ``summary.recomputed`` says why. With
    ``write`` (no shard), each image's nuclei go into the project as soon as it is done,
    replacing pointnuc's earlier objects in that area only, as ``write_options`` says (detections
    or cells, their class). The project is locked for the
    run (:mod:`pointnuc.io.lock`): a second writer is refused; ``--shard`` runs share the lock.
    """
    from pointnuc.io.lock import project_lock

    with project_lock(project.root, "segment", shared=shard is not None):
        return _segment_locked(
            project, model_dir, image_names=image_names, within_class=within_class, device=device,
            pixel_size_um=pixel_size_um, write_options=write_options, shard=shard, write=write,
            redo=redo, batch_size=batch_size, progress=progress, tta=tta,
        )


def _segment_locked(
    project: Project, model_dir: Path, *, image_names: Sequence[str], within_class: str | None, device: str,
    pixel_size_um: float | None, write_options: WriteOptions, shard: tuple[int, int] | None, write: bool,
    redo: bool, batch_size: int | None, progress: bool, tta: bool,
) -> SegmentSummary:
    from pointnuc.io.geojson import read_nuclei
    from pointnuc.io.slide import pixel_size_or_error

    plans = plan_segmentation(project, model_dir, image_names=image_names, within_class=within_class, shard=shard,
                              redo=redo, tta=tta, pixel_size_um=pixel_size_um)
    # every image's pixel size before any work, so a missing one stops the run with nothing half-done
    for p in plans:
        if not p.reuse and not p.error:
            pixel_size_or_error(p.image, pixel_size_um)
    out_dir = results_dir(project, model_dir, tta)
    summary = SegmentSummary(model_dir=Path(model_dir), results_dir=out_dir)
    for p in plans:
        if p.error:
            summary.failed[p.image.name] = p.error
            log.error("%s: %s", p.image.name, p.error)
    plans = [p for p in plans if not p.error]
    todo = [p for p in plans if not p.reuse]
    net: torch.nn.Module | None = None
    info: ModelInfo | None = None
    dev: torch.device | None = None
    if todo:
        from pointnuc.models.bundle import load_info, load_network
        from pointnuc.train.fit import resolve_device

        info = load_info(model_dir)
        net = load_network(model_dir, "segmenter", info)
        dev = resolve_device(device)
        net.to(dev)
    out_dir.mkdir(parents=True, exist_ok=True)
    for plan in plans:
        name = plan.image.name
        if plan.reuse:
            summary.skipped.append(name)
            nuclei = read_nuclei(plan.result)
        else:
            if plan.why:
                log.info("%s: segmenting again: %s", name, plan.why)
                summary.recomputed[name] = plan.why
            assert net is not None and info is not None and dev is not None
            res = _segment_one(plan, net, info, dev, batch_size=batch_size, progress=progress, tta=tta, summary=summary)
            if res is None:
                continue
            nuclei = res.nuclei
        summary.nuclei[name] = len(nuclei)
        if write and shard is None:
            summary.written += project.write_nuclei(
                {name: nuclei}, options=write_options, replace_within={name: plan.region},
            )
    return summary


def _segment_one(plan: ImagePlan, net: torch.nn.Module, info: ModelInfo, dev: torch.device, *,
                 batch_size: int | None, progress: bool, tta: bool, summary: SegmentSummary) -> SlideResult | None:
    """Segment one planned image and keep its result; None (and ``summary.failed``) when it fails."""
    from pointnuc.infer.wsi import segment_slide
    from pointnuc.io.slide import open_slide

    name, px = plan.image.name, plan.pixel_size_um
    assert px is not None
    log.info("%s: %d x %d px at %g µm/px, segmented at the model's %g µm/px", name, plan.image.width,
             plan.image.height, px, info.pixel_size_um)
    t0 = time.time()
    try:
        with open_slide(plan.image.path, pixel_size_um=px) as slide:
            res = segment_slide(slide, net, info, region=plan.region, device=dev, batch_size=batch_size,
                                progress=progress, name=name, tta=tta)
    except Exception as err:  # one bad slide must not stop the others
        if not isinstance(err, PointnucError):
            log.debug("failure on %s", name, exc_info=True)
        summary.failed[name] = f"{err.__class__.__name__}: {err}"
        log.error("%s failed: %s", name, err)
        return None
    seconds = time.time() - t0
    summary.seconds[name] = seconds
    summary.tiles[name] = (res.n_tiles, res.n_tiles_total)
    if res.n_tiles == 0:
        log.warning("%s: no tissue found: nothing was looked at", name)
    keep_result(plan, res.nuclei, seconds=seconds, tiles=(res.n_tiles, res.n_tiles_total), device=str(dev))
    return res


def merge_results(
    project: Project, model_dir: Path, *, write_options: WriteOptions = DEFAULT_WRITE,
    within_class: str | None = None, tta: bool = False,
) -> SegmentSummary:
    """Write every current per-image result of ``model_dir`` (e.g. from --shard runs, with ``tta`` as they
    ran) into the project. Images without one, or whose kept result no longer fits (another pixel size, a
    changed image or model), are not written and are listed in ``summary.failed`` with the reason."""
    from pointnuc.io.geojson import read_nuclei
    from pointnuc.io.lock import project_lock

    with project_lock(project.root, "segment --merge"):
        plans = plan_segmentation(project, model_dir, within_class=within_class, tta=tta)
        out_dir = results_dir(project, model_dir, tta)
        summary = SegmentSummary(model_dir=Path(model_dir), results_dir=out_dir)
        batch = {}
        within = {}
        for plan in plans:
            name = plan.image.name
            if not plan.reuse:
                summary.failed[name] = f"not merged: {plan.error or plan.why or 'no kept result'}"
                continue
            batch[name] = read_nuclei(plan.result)
            within[name] = plan.region
            summary.nuclei[name] = len(batch[name])
        if not batch:
            why = "; ".join(f"{n}: {w.removeprefix('not merged: ')}" for n, w in list(summary.failed.items())[:3])
            raise InputError(f"no current results to merge in {out_dir} ({why}); "
                             f"run `pointnuc segment --shard K/N{' --tta' if tta else ''}` first")
        summary.written = project.write_nuclei(batch, options=write_options, replace_within=within)
    return summary
