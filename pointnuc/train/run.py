"""The training run behind ``pointnuc train``: a project's points -> a complete model folder.

Stages pass objects, not folder names: the project yields :class:`TrainingImage`
samples (:func:`pointnuc.train.samples.load_training_images`), stage 1 turns them into
detected points, stage 2 into a segmenter, and the model folder
(:mod:`pointnuc.models.bundle`) records all of it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pointnuc
from pointnuc.config import TrainConfig
from pointnuc.errors import InputError, TrainingError
from pointnuc.io.base import DEFAULT_BACKGROUND_CLASS, Project
from pointnuc.models.calibration import ColourReference, Thresholds
from pointnuc.models.layout import ModelLayout, check_model_dir
from pointnuc.progress import overall_progress
from pointnuc.train.correction import ParentModel
from pointnuc.train.samples import TrainingImage, detection_samples, load_training_images, points_between

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    """What ``pointnuc train`` reports at the end."""

    model_dir: Path
    n_images: int
    n_points: int
    n_detected: int
    seconds: float
    device: str
    thresholds: Thresholds = field(default_factory=Thresholds)
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
    background_class: str | None = DEFAULT_BACKGROUND_CLASS,
    parent: ParentModel | None = None,
) -> TrainSummary:
    """Stage 1 then stage 2 on a project's marks; leaves a complete model folder at ``out``.

    ``background_class``: the class of the user's background areas and points (None: none read).

    ``parent``: a correction round (:mod:`pointnuc.train.correction`): both stages start from its
    weights, the images are normalised to its colour reference, and it is recorded in provenance
    (``config`` is then its short schedule, :func:`~pointnuc.train.correction.correction_config`).

    ``resume``: continue the interrupted run in ``out`` from its checkpoints (same
    configuration and the same points, else a TrainingError); a missing or empty ``out``
    starts from the beginning. ``keep_checkpoints``: keep ``checkpoints/`` when the run
    finishes (by default it is removed: most of a model folder's size, needed only to resume).
    ``weights``: ImageNet weights for the encoder (default: torch's cache, else torchvision's
    download unless ``offline``, else random initialisation; see :func:`resolve_encoder_start`).
    """
    import torch

    from pointnuc.models.bundle import load_info
    from pointnuc.train.fit import resolve_device

    t0 = time.time()
    layout = ModelLayout(out)
    if parent is not None and Path(out).resolve() == parent.root.resolve():
        raise InputError(f"--from: the new model cannot replace its parent {parent.root}; choose another --out")
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
        project, config, point_class=point_class, region_class=region_class, pixel_size_um=pixel_size_um,
        background_class=background_class,
        reference=parent.norm_reference if parent is not None else None,
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
                      previous=prev.provenance if prev is not None else None, background_class=background_class,
                      parent=parent)
    finally:
        logging.getLogger("pointnuc").removeHandler(handler)
        handler.close()


def training_plan(config: TrainConfig, n_detection: int, n_segmentation: int) -> list[tuple[str, int]]:
    """The batches each stage of a training will run, named as the stages are (``fit``'s ``stage_name``),
    estimated from the configuration and the number of training images/regions of each stage (the
    overall progress bar's first total; each stage's own count replaces its estimate when it starts)."""
    det_cfg = config.for_detection()
    d, s = det_cfg.detection, config.segmentation
    det_steps = -(-n_detection * det_cfg.data.patches_per_image // d.batch_size)
    seg_steps = -(-n_segmentation * config.data.patches_per_image // s.batch_size)
    rounds = d.rounds if d.variant in ("ST-bg", "ST-nu") else 0
    plan = [(f"detector-round{k}", det_steps * (d.round_epochs if k > 0 and d.round_epochs > 0 else d.epochs))
            for k in range(rounds + 1)]
    plan.append(("segmenter", seg_steps * s.epochs))
    if s.refine_epochs > 0:
        plan.append(("segmenter-refine", seg_steps * s.refine_epochs))
    if s.crf_epochs > 0 and s.crf_beta > 0:
        plan.append(("segmenter-crf", seg_steps * s.crf_epochs))
    return plan


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
    ref: ColourReference,
    counts: dict[str, int],
    *,
    dev: torch.device,
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
    background_class: str | None = DEFAULT_BACKGROUND_CLASS,
    parent: ParentModel | None = None,
) -> TrainSummary:
    """Stage 1 and stage 2 on loaded samples, saving the model description after each.

    ``previous``: the provenance of the interrupted run being resumed (its start is kept).
    ``parent``: the model a correction round starts from (see :func:`train_project`).
    """
    import torch

    from pointnuc.models.bundle import ModelInfo, save_info
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
    det_start = seg_start = None
    if parent is None:
        start = resolve_encoder_start(config.encoder, weights, offline=offline, progress=progress)
        weights, encoder_start = start.file, start.to_json()
    else:  # a correction round: no ImageNet start, the parent's weights
        from pointnuc.models.bundle import load_network
        from pointnuc.train.detect import DetectorStart

        det_start = DetectorStart(load_network(parent.root, "detector").state_dict(),
                                  parent.thresholds.detection_prob, parent.thresholds.detection_min_area_px)
        seg_start = load_network(parent.root, "segmenter").state_dict()
        weights, encoder_start = None, {"source": "parent model", "parent": str(parent.root.resolve())}
        log.info("correction round from %s (digest %s): %d detector and %d segmenter epochs", parent.root,
                 parent.digest, config.detection.epochs, config.segmentation.epochs + config.segmentation.crf_epochs)
    provenance: dict[str, Any] = {
        "project": str(project.root),
        "encoder_start": encoder_start,
        "images": counts,
        "point_class": point_class,
        "region_class": region_class,
        "background_class": background_class,
        "pixel_size_override_um": pixel_size_um,
        "seed": config.seed,
        "device": str(dev),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pointnuc": pointnuc.__version__,
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    if parent is not None:
        provenance["correction"] = parent.record()
    if previous is not None:  # a resumed run: when it first started, and each time it was resumed
        provenance["resumed"] = [*previous.get("resumed", []), provenance["started"]]
        provenance["started"] = previous.get("started", provenance["started"])
    info = ModelInfo(config=config, norm_reference=ref, provenance=provenance)
    save_info(out, info)  # describes the run from the start, so --resume can check it

    # stage 1 may work at a coarser pixel size (detection.pixel_size_um): the same regions, resampled
    samples1 = detection_samples(samples, config)
    # one progress bar for all stages (stage 1's rounds, stage 2's phases), with the time left for all of them
    with overall_progress(training_plan(config, len(samples1), len(samples)), "training", "batch", enabled=progress):
        det = train_detector(samples1, config.for_detection(), layout, device=dev, resume=resume, progress=progress, weights=weights,
                               start=det_start)
        if samples1 is not samples:
            det.points = points_between(det.points, samples1, samples)  # now at the segmenter's pixel size
        info.thresholds = replace(info.thresholds, detection_prob=float(det.threshold),
                                  detection_min_area_px=float(det.min_area_px))
        info.metrics["detection"] = det.metrics
        info.provenance["stage1_seconds"] = round(time.time() - t0, 1)
        save_info(out, info)

        t1 = time.time()
        seg = train_segmenter(samples, det.points, config, layout, device=dev, resume=resume, progress=progress, weights=weights,
                              detector_state=det.model.state_dict(), start_state=seg_start)
        info.thresholds = replace(seg.thresholds, detection_prob=info.thresholds.detection_prob,
                                  detection_min_area_px=info.thresholds.detection_min_area_px)
        info.metrics["segmentation"] = seg.metrics
        info.provenance["stage2_seconds"] = round(time.time() - t1, 1)
        info.provenance["seconds"] = round(time.time() - t0, 1)
        save_info(out, info)
    from pointnuc.report import write_report

    report = write_report(layout, samples, det, seg, device=str(dev))
    info.provenance["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
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
        thresholds=info.thresholds,
        held_back_line=report.held_back.line(),
    )
