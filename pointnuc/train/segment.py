"""Stage 2: a nucleus segmenter trained from points (paper §IV).

Pipeline: points per image (stage-1 detections plus the user's training points) ->
Voronoi and cluster labels -> training with partial cross-entropy (Eqs. 5-6) ->
optionally one self-training round on the segmenter's confident predictions (ours,
``refine_epochs``; off: it did not help on MoNuSeg) -> dense-CRF-loss fine-tuning
(Eq. 10) -> checkpoint chosen on held-back data -> weights in the model folder.

The checkpoint is chosen by the selection strategy (:mod:`pointnuc.train.selection`; by
default the held-back points); the probability threshold stays at the softmax cut, 0.5
(why: :mod:`pointnuc.train.selection`). :class:`SegmenterTraining` holds what every stage-2
run shares, so a benchmark's own run (the fully supervised reference) reuses it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pointnuc.config import TrainConfig
from pointnuc.errors import InputError, TrainingError
from pointnuc.infer.instances import instances_from_probability
from pointnuc.infer.predict import nucleus_probability
from pointnuc.labels.cluster import labels_for_image
from pointnuc.labels.marks import segmentation_marks
from pointnuc.labels.voronoi import IGNORE as LABEL_IGNORE
from pointnuc.models.bundle import ModelLayout, save_weights
from pointnuc.models.calibration import Thresholds
from pointnuc.models.net import build_network, transfer_weights
from pointnuc.train.data import IGNORE, PatchDataset
from pointnuc.train.fit import FitHistory, FitSettings, LossFn, fit, resolve_device
from pointnuc.train.samples import TrainingImage
from pointnuc.train.seg_losses import CLUSTER, TARGET_NEAREST, Stage2Loss
from pointnuc.train.selection import (
    SEGMENTATION_THRESHOLDS,
    HeldBackPoints,
    SegmenterContext,
    SegmenterSelection,
)

log = logging.getLogger(__name__)

@dataclass
class SegmenterResult:
    """What stage 2 hands on."""

    model: nn.Module
    thresholds: Thresholds  #: prob, min_area_px, h_px (working pixels); detection ones at their defaults
    history: dict[str, FitHistory]  #: "segmentation", "crf" (or "supervised")
    metrics: dict[str, Any]
    labels: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  #: (Voronoi, cluster) per sample


# ------------------------------------------------------------------------ points and labels


def merge_points(detected: np.ndarray, user: np.ndarray, radius: float) -> np.ndarray:
    """User points plus the detections farther than ``radius`` from every user point (authors' rule)."""
    det = np.asarray(detected, float).reshape(-1, 2)
    usr = np.asarray(user, float).reshape(-1, 2)
    if len(usr) == 0 or len(det) == 0:
        return np.concatenate([usr, det])
    from scipy.spatial import cKDTree

    d, _ = cKDTree(usr).query(det)
    return np.concatenate([usr, det[d > radius]])


def stage2_targets(sample: TrainingImage, points_xy: np.ndarray, config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Target array (5, H, W) for :class:`~pointnuc.train.data.PatchDataset`, plus the two labels.

    Channels: Voronoi label, cluster label (0/1, IGNORE elsewhere), then RGB in [0, 1]. The user's
    outlines and background marks override both labels (:func:`~pointnuc.labels.marks.segmentation_marks`).
    """
    vor, clu = labels_for_image(sample.image, points_xy, config.segmentation, config.data.pixel_size_um, seed=config.seed)
    vor, clu = segmentation_marks(vor, sample.marks), segmentation_marks(clu, sample.marks)
    t = np.empty((5,) + vor.shape, np.float32)
    t[0] = np.where(vor == LABEL_IGNORE, IGNORE, vor)
    t[1] = np.where(clu == LABEL_IGNORE, IGNORE, clu)
    t[2:] = np.moveaxis(sample.image, -1, 0).astype(np.float32) / 255.0
    return t, vor, clu


def unmarked_points(points_xy: np.ndarray, marks: np.ndarray | None) -> np.ndarray:
    """The points that lie on no mark of the user's (stage-1 detections on a background mark or
    inside an outline are dropped: the marks say what is there)."""
    pts = np.asarray(points_xy, float).reshape(-1, 2)
    if marks is None or not len(pts):
        return pts
    r = np.clip(np.floor(pts[:, 1]).astype(int), 0, marks.shape[0] - 1)
    c = np.clip(np.floor(pts[:, 0]).astype(int), 0, marks.shape[1] - 1)
    return pts[marks[r, c] == 0]


def refined_targets(targets: np.ndarray, prob: np.ndarray, low: float, high: float,
                    marks: np.ndarray | None = None) -> np.ndarray:
    """Stage-2 targets with the cluster channel replaced by the segmenter's confident predictions.

    Nucleus where ``prob > high``, background where ``prob < low``, ignored between; the user's
    ``marks`` still override it. The Voronoi channel (nucleus at the points, background on the
    edges between them) is kept and goes on pulling the round towards one nucleus per point.
    """
    t = targets.copy()
    t[CLUSTER] = segmentation_marks(np.where(prob > high, 1.0, np.where(prob < low, 0.0, IGNORE)).astype(np.float32),
                                    marks)
    return t


# ------------------------------------------------------------------------ training


class SegmenterTraining:
    """What one stage-2 run shares: its samples, device and selection, the network's start, each fit
    (checkpoints, scores per epoch) and the end (threshold, metrics, weights saved)."""

    def __init__(self, samples: Sequence[TrainingImage], config: TrainConfig, layout: ModelLayout, *,
                 device: str | torch.device, resume: bool, progress: bool, selection: SegmenterSelection) -> None:
        self.samples = [s for s in samples if s.image.size and s.valid.any()]
        if not self.samples:
            raise TrainingError("no training image or region has any pixels")
        self.config, self.layout, self.selection = config, layout, selection
        self.resume, self.progress = resume, progress
        self.dev = resolve_device(device)
        self.r1 = config.data.px(config.data.nucleus_radius_um)
        self.thresholds = Thresholds.for_config(config)  # minimum area and watershed depth in working px
        self.t_start = time.perf_counter()
        self._last_epoch = config.segmentation.epochs  # of the fit in progress

    def prepare_selection(self, known: Mapping[str, np.ndarray], points: Mapping[str, np.ndarray]) -> None:
        """Hand the selection the points known per training sample (and the stage-1 points given)."""
        self.selection.prepare(SegmenterContext(self.samples, known, points, self.r1, self.thresholds,
                                                self.config.segmentation.instance_method, self.dev))
        if not self.selection.active:
            log.warning("no held-back points: the last epoch is kept and the threshold stays at 0.5")

    def network(self, weights: Path | None, detector_state: Mapping[str, torch.Tensor] | None,
                start_state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """The segmenter's start: a trained segmenter's weights (``start_state``, a correction round), else
        the detector's (``segmentation.init_from_detector``), else ImageNet's."""
        torch.manual_seed(self.config.seed)
        if start_state is not None:
            model = build_network(2, self.config.encoder, pretrained=False)
            model.load_state_dict(dict(start_state))
            return model
        init = self.config.segmentation.init_from_detector
        if init and detector_state is not None:
            model = build_network(2, self.config.encoder, pretrained=False)
            fresh = transfer_weights(model, detector_state)
            log.info("the segmenter starts from the detector's weights (%s start at zero)", ", ".join(fresh))
            return model
        if init:
            log.warning("no detector weights given: the segmenter starts without them")
        return build_network(2, self.config.encoder, weights, pretrained=True)

    def fit(self, model: nn.Module, dataset: PatchDataset, loss: LossFn, stage: str, *, name: str, epochs: int,
            lr: float) -> FitHistory:
        """One phase of training (checkpoint ``name``), scored by the selection every ``select_every`` epochs."""
        seg = self.config.segmentation
        self._last_epoch = epochs
        settings = FitSettings(epochs=epochs, lr=lr, batch_size=seg.batch_size, seed=self.config.seed + 7,
                               schedule=seg.lr_schedule, ema=seg.ema)
        return fit(model, dataset, loss, settings, device=self.dev, checkpoint_dir=self.layout.checkpoints,
                   stage_name=name, resume=self.resume, progress=self.progress, on_epoch_end=self._on_epoch_end,
                   config={"train": self.config.to_dict(), "stage": stage})

    def _on_epoch_end(self, epoch: int, model: nn.Module) -> dict[str, Any]:
        if not self.selection.active:
            return {}
        if epoch % self.config.segmentation.select_every and epoch != self._last_epoch:
            return {}
        return self.selection.epoch_scores(model)

    def finish(self, model: nn.Module, history: dict[str, FitHistory], *, known: Mapping[str, np.ndarray],
               labels: dict[str, tuple[np.ndarray, np.ndarray]], label_seconds: float,
               refine_kept: bool | None = None) -> SegmenterResult:
        """Score the final model at every threshold (recorded), save its weights; the threshold stays 0.5."""
        sel, th = self.selection, self.thresholds
        metrics: dict[str, Any] = {"selection": sel.key, "label_seconds": label_seconds, "r1_px": self.r1,
                                   "min_area_px": th.min_area_px, "h_px": th.h_px,
                                   "method": self.config.segmentation.instance_method, "refine_kept": refine_kept,
                                   "n_points": int(sum(len(v) for v in known.values())),
                                   "n_holdout": int(sum(len(s.holdout) for s in sel.held_back))}
        prob_t = 0.5  # the points score is recorded, not used (pointnuc.train.selection)
        if sel.active:
            table = sel.score(model, SEGMENTATION_THRESHOLDS)
            metrics["threshold_table"] = {str(t): v for t, v in table.items()}
            metrics["selection_score"] = table[prob_t].get(sel.key, float("nan"))
        metrics["threshold_rule"] = "fixed 0.5"
        metrics["seconds"] = time.perf_counter() - self.t_start
        save_weights(self.layout.segmenter, model)
        log.info("segmenter: threshold %.2f (%s selection), %.0f s", prob_t, sel.key, metrics["seconds"])
        return SegmenterResult(model=model, thresholds=replace(th, prob=prob_t), history=history, metrics=metrics,
                               labels=labels)


def train_segmenter(
    samples: list[TrainingImage],
    points: dict[str, np.ndarray],
    config: TrainConfig,
    layout: ModelLayout,
    *,
    device: str | torch.device = "auto",
    resume: bool = False,
    progress: bool = True,
    weights: Path | None = None,
    merge_user_points: bool = True,
    detector_state: Mapping[str, torch.Tensor] | None = None,
    selection: SegmenterSelection | None = None,
    start_state: Mapping[str, torch.Tensor] | None = None,
) -> SegmenterResult:
    """Train the stage-2 segmenter, pick its checkpoint, save its weights.

    ``points``: working-resolution x/y per sample name (stage-1 detections, or all true
    points for the "GT points" row); with ``merge_user_points`` the samples' own training
    points are added (detections within r1 of one are dropped). ``detector_state``: the
    stage-1 detector's weights, the segmenter's start when ``segmentation.init_from_detector``
    is set. ``selection``: how checkpoints are scored (default: the held-back points). ``start_state``:
    a trained segmenter's weights to start from (a correction round).
    """
    run = SegmenterTraining(samples, config, layout, device=device, resume=resume, progress=progress,
                            selection=selection or HeldBackPoints())
    samples, seg = run.samples, config.segmentation
    missing = [s.name for s in samples if s.name not in points]
    if missing:
        raise InputError(f"no points for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; run stage 1 first")
    labels: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    targets: list[np.ndarray] = []
    known: dict[str, np.ndarray] = {}
    for s in samples:
        pts = unmarked_points(points[s.name], s.marks)
        if merge_user_points:
            pts = merge_points(pts, s.points, run.r1)
        if len(pts) == 0:
            log.warning("%s has no points: its labels are empty (all ignored)", s.name)
        known[s.name] = pts
        t, vor, clu = stage2_targets(s, pts, config)
        targets.append(t)
        labels[s.name] = (vor, clu)
    t_labels = time.perf_counter() - run.t_start
    log.info("stage 2 labels for %d images in %.1f s", len(samples), t_labels)
    run.prepare_selection(known, points)

    model = run.network(weights, detector_state, start_state)
    ds = PatchDataset(samples, targets, config.data, nearest=TARGET_NEAREST, seed=config.seed + 7)
    loss = Stage2Loss(alpha=seg.alpha)
    history = {"segmentation": run.fit(model, ds, loss, "plain", name="segmenter", epochs=seg.epochs, lr=seg.lr)}
    refine_kept: bool | None = None
    if seg.refine_epochs > 0:
        before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        refined = [refined_targets(t, nucleus_probability(model, s.image, device=run.dev, tta=True), seg.refine_low,
                                   seg.refine_high, s.marks) for s, t in zip(samples, targets)]
        ds_refined = PatchDataset(samples, refined, config.data, nearest=TARGET_NEAREST, seed=config.seed + 11)
        history["refine"] = run.fit(model, ds_refined, loss, "refine", name="segmenter-refine",
                                    epochs=seg.refine_epochs, lr=seg.lr)
        b0, b1 = history["segmentation"].best_score, history["refine"].best_score
        refine_kept = b0 is None or (b1 is not None and b1 >= b0)  # kept only when the held-back score does not fall
        if not refine_kept:
            log.info("self-training round scored %.3f < %.3f before it: the segmenter before the round is kept", b1 or np.nan, b0)
            model.load_state_dict(before)
        else:  # CRF fine-tuning goes on from the refined labels
            ds = ds_refined
    run.selection.phase_end("plain", model)
    if seg.crf_epochs > 0 and seg.crf_beta > 0:
        sigma_xy = config.data.px(seg.crf_sigma_xy_um)
        crf = Stage2Loss(alpha=seg.alpha, beta=seg.crf_beta, sigma_xy_px=sigma_xy, sigma_rgb=seg.crf_sigma_rgb,
                         crf_downsample=crf_downsample(sigma_xy))
        history["crf"] = run.fit(model, ds, crf, "crf", name="segmenter-crf", epochs=seg.crf_epochs, lr=seg.crf_lr)
        run.selection.phase_end("crf", model)
    return run.finish(model, history, known=known, labels=labels, label_seconds=t_labels, refine_kept=refine_kept)


def crf_downsample(sigma_xy_px: float, max_sigma_px: float = 5.0) -> int:
    """Factor by which the CRF term is evaluated on a coarser grid so that σ_xy stays ≤ ``max_sigma_px``."""
    return max(1, int(np.ceil(sigma_xy_px / max_sigma_px)))


def segment_image(
    model: nn.Module, image: np.ndarray, thresholds: Thresholds, *, method: str = "cc",
    device: str | torch.device = "cpu", tta: bool = False,
) -> np.ndarray:
    """Instance labels (int32) of a colour-normalised image at the working resolution."""
    p = nucleus_probability(model, image, device=device, tta=tta)
    return instances_from_probability(p, threshold=thresholds.prob, min_area_px=thresholds.min_area_px, method=method,
                                      h_px=thresholds.h_px)
