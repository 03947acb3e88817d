"""Stage 1: a nucleus detector trained from partial points (paper §III).

Pipeline: Eq. 1 masks from the user's points -> initial training (``ext-GM``; ``GM`` uses
plain Gaussian masks) -> for ``ST-bg``/``ST-nu``, ``rounds`` rounds of self-training, each
retraining the previous round's model on masks updated from its own predictions (Eq. 3
background propagation, or added detections for ST-nu) -> threshold and minimum
component area tuned on held-back points -> detected points on every training image.

Tuning criterion (points only, the honest protocol): held-back points are a random
sample of the nuclei, so they estimate recall; the number of nuclei is estimated from
above as min(N_det / recall) over (threshold, min-area) pairs, which gives an F1
estimate per pair (details in :func:`tune_on_points`). With ground-truth masks on
tuning images (benchmarks: the paper protocol) the pair maximising pooled F1 can be
used instead.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pointnuc.config import TrainConfig
from pointnuc.errors import InputError, TrainingError
from pointnuc.infer.points import points_from_probability
from pointnuc.infer.predict import predict_channel
from pointnuc.labels.detection import (
    background_propagation,
    extended_gaussian_mask,
    gaussian_mask,
    ignore_near,
    nuclei_propagation,
)
from pointnuc.models.bundle import ModelLayout, save_weights
from pointnuc.models.net import build_network
from pointnuc.train.data import PatchDataset
from pointnuc.train.fit import FitHistory, fit, resolve_device
from pointnuc.train.losses import weighted_mse
from pointnuc.train.samples import MIN_POINTS, TrainingImage

log = logging.getLogger(__name__)


THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(0.05, 0.851, 0.05), 2))
#: minimum component areas tried, as fractions of the mean nucleus area π r1²
AREA_FRACTIONS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3)


@dataclass(frozen=True)
class Radii:
    """Eq. 1 radii in working pixels."""

    r1: float
    r2: float
    sigma: float


def detection_radii(config: TrainConfig) -> Radii:
    """r1 = nucleus radius at the working pixel size, r2 = r2_factor·r1, σ = sigma_factor·r1."""
    r1 = config.data.px(config.data.nucleus_radius_um)
    return Radii(r1=r1, r2=config.detection.r2_factor * r1, sigma=config.detection.sigma_factor * r1)


@dataclass
class Tuning:
    """A (threshold, min-area) choice and how it scored."""

    threshold: float
    min_area_px: float
    score: float  #: points: estimated F1 (from held-back points); masks: pooled F1
    n_detections: int
    protocol: str  #: "points" | "masks"
    table: list[dict[str, float]] = field(default_factory=list)  #: every pair tried


@dataclass
class DetectorResult:
    """What stage 1 hands on."""

    model: nn.Module
    threshold: float
    min_area_px: float
    points: dict[str, np.ndarray]  #: detected points per sample name, working-resolution x/y
    history: dict[str, FitHistory]  #: per round ("round0", ...)
    metrics: dict[str, Any]


# ------------------------------------------------------------------------ targets


def initial_mask(sample: TrainingImage, variant: str, radii: Radii) -> np.ndarray:
    """The round-0 target of one sample: plain Gaussian mask for GM, Eq. 1 otherwise.

    Within r1 of a held-back point nothing is taught (see :func:`ignore_near`).
    """
    shape = sample.image.shape[:2]
    if variant == "GM":
        m = gaussian_mask(sample.points, shape, radii.r1, radii.sigma, sample.valid)
    else:
        m = extended_gaussian_mask(sample.points, shape, radii.r1, radii.r2, radii.sigma, sample.valid)
    return ignore_near(m, sample.holdout, radii.r1)


def self_training_mask(
    sample: TrainingImage, variant: str, radii: Radii, mask0: np.ndarray, prob: np.ndarray,
    detected: np.ndarray, low: float, high: float,
) -> np.ndarray:
    """The next round's target: Eq. 3 on the initial mask (ST-bg) or Eq. 1 with detections added (ST-nu).

    Within r1 of a held-back point nothing is taught, as in :func:`initial_mask`.
    """
    if variant == "ST-bg":
        m = background_propagation(mask0, sample.points, prob, radii.r1, radii.r2, low, high, sample.valid)
    elif variant == "ST-nu":
        m = nuclei_propagation(sample.points, detected, mask0.shape, radii.r1, radii.r2, radii.sigma, sample.valid)
    else:
        raise InputError(f"variant {variant} has no self-training")
    return ignore_near(m, sample.holdout, radii.r1)


# ------------------------------------------------------------------------ prediction and tuning


def predict_probabilities(model: nn.Module, samples: Sequence[TrainingImage], device: torch.device | str,
                          tta: bool = True) -> list[np.ndarray]:
    """Detector probability maps (H, W) for each sample (sigmoid, sliding window).

    ``tta`` (default): averaged over the four flips. On the MO split this raised the quick
    detector's test F1 from .775 to .787 (threshold tuned on held-back points either way);
    training uses it for self-training targets, tuning and the detected points.
    """
    return [predict_channel(model, s.image, 0, activation="sigmoid", tta=tta, device=device) for s in samples]


def detect(prob: np.ndarray, valid: np.ndarray | None, threshold: float, min_area_px: float) -> np.ndarray:
    """Points (N, 2) x/y from a probability map, dropping those outside ``valid``."""
    xy = points_from_probability(prob, threshold, min_area_px)
    if valid is not None and len(xy):
        r = np.clip(xy[:, 1].astype(int), 0, valid.shape[0] - 1)
        c = np.clip(xy[:, 0].astype(int), 0, valid.shape[1] - 1)
        xy = xy[valid[r, c]]
    return xy


def _components(prob: np.ndarray, valid: np.ndarray | None, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (N, 2) and areas (N,) of all components above ``threshold`` (inside ``valid``)."""
    xy_all = points_from_probability(prob, threshold, 0)
    from scipy import ndimage as ndi

    lab, n = ndi.label(prob > threshold, structure=np.ones((3, 3), bool))
    area = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(float)
    if valid is not None and len(xy_all):
        r = np.clip(xy_all[:, 1].astype(int), 0, valid.shape[0] - 1)
        c = np.clip(xy_all[:, 0].astype(int), 0, valid.shape[1] - 1)
        ok = valid[r, c]
        xy_all, area = xy_all[ok], area[ok]
    return xy_all, area


def tune_on_points(probs: Sequence[np.ndarray], samples: Sequence[TrainingImage], r1: float) -> Tuning:
    """Threshold/min-area from held-back points only, by an estimated F1 (see below).

    Held-back points are a uniformly random sample of the nuclei (the paper's setting:
    the user clicks a random ~10%). For a (threshold, min-area) pair giving ``N_det``
    detections, the share ``R`` of held-back points matched one-to-one within r1
    estimates recall, so ``TP ≈ R·N_true``. The number of nuclei ``N_true`` is unknown,
    but ``N_det / R = N_true / P >= N_true`` for every pair (P = precision <= 1), so the
    smallest ``N_det / R`` over pairs that still match enough points estimates it from
    above (tight where precision is high). Then ``F1 = 2·TP / (N_det + N_true)`` is
    estimated for each pair and the best is taken. Recall of held-back points alone
    would always favour the lowest threshold; this does not. Without held-back points
    the training points are used instead (optimistic: the network has seen them),
    with a warning.

    Only images with held-back points are counted: recall is measured on them, so the
    detections it divides must come from the same images. Counting the detections of
    images without any (a benchmark's training images, whose maps the network has fitted)
    shifted the estimate: on the MO split it chose (0.05, 28.5 px) where the held-back
    images alone chose (0.15, 9.5 px), test F1 .716 against .797.

    The same holds within an image that was trained on: its clicked nuclei are found
    almost always, held-back ones at recall ``R``, so detections matched to clicked
    points are left out of ``N_det``, and ``N_true`` and F1 are those of the unclicked
    nuclei, the ones a new image is made of. Counted, they add ``clicked / R`` where only
    ``clicked`` nuclei are, which favours low thresholds (on the MO user protocol the
    chosen pair stayed the same for three seeds).
    """
    from pointnuc.metrics import detection_counts

    refs = [s.holdout for s in samples]
    clicked = [s.points for s in samples]
    if sum(len(h) for h in refs) == 0:
        log.warning("no held-back points: tuning the detection threshold on the training points (optimistic)")
        refs = [s.points for s in samples]
        clicked = [np.zeros((0, 2)) for _ in samples]
    keep = [i for i, ref in enumerate(refs) if len(ref)]
    probs, samples = [probs[i] for i in keep], [samples[i] for i in keep]
    refs, clicked = [refs[i] for i in keep], [clicked[i] for i in keep]
    n_ref = sum(len(h) for h in refs)
    if n_ref == 0:
        raise TrainingError("no points to tune the detection threshold on")
    table: list[dict[str, float]] = []
    for t in THRESHOLDS:
        comps = [_components(p, s.valid, float(t)) for p, s in zip(probs, samples)]
        for f in AREA_FRACTIONS:
            a = float(f * math.pi * r1 * r1)
            matched, n_det, n_new = 0, 0, 0
            for (xy, area), ref, seen in zip(comps, refs, clicked):
                det = xy[area >= max(a, 1)]
                n_det += len(det)
                n_new += len(det) - (detection_counts(det, seen, r1).tp if len(seen) and len(det) else 0)
                matched += detection_counts(det, ref, r1).tp if len(ref) else 0
            table.append({"threshold": float(t), "min_area_px": a, "recall": matched / n_ref, "n_detections": n_det,
                          "n_unclicked": n_new})
    # pairs matching too few held-back points give a noisy N_det / R
    # (a small project may hold back fewer than 5 points: then all of them must be found)
    need = max(min(5.0, n_ref), 0.2 * n_ref)
    enough = [r for r in table if r["recall"] * n_ref >= need]
    if not enough:
        # nothing to estimate precision from: take the most sensitive setting rather than
        # one that detects nothing (all estimated scores would be 0)
        log.warning("the detector finds too few of the %d held-back points; using the most sensitive threshold", n_ref)
        pick = max(table, key=lambda r: (r["recall"], r["n_detections"] > 0, -r["threshold"], -r["min_area_px"]))
        for r in table:
            r["n_true_est"], r["score"] = float(n_ref), 0.0
        return Tuning(pick["threshold"], pick["min_area_px"], 0.0, int(pick["n_detections"]), "points", table)
    n_true = min(r["n_unclicked"] / r["recall"] for r in enough)
    for r in table:
        tp = r["recall"] * n_true
        r["n_true_est"] = n_true
        r["score"] = 2 * tp / (r["n_unclicked"] + n_true) if r["n_unclicked"] + n_true > 0 else 0.0
    pick = max(table, key=lambda r: (r["score"], r["threshold"]))
    return Tuning(pick["threshold"], pick["min_area_px"], pick["score"], int(pick["n_detections"]), "points", table)


def gt_points(sample: TrainingImage) -> np.ndarray:
    """Ground-truth points of a sample with ``gt_labels`` (bounding-box centres, as the paper's code)."""
    from pointnuc.metrics import gt_points_from_labels

    if sample.gt_labels is None:
        raise InputError(f"{sample.name} has no ground-truth labels")
    return gt_points_from_labels(sample.gt_labels)


def tune_on_masks(probs: Sequence[np.ndarray], samples: Sequence[TrainingImage], radius: float) -> Tuning:
    """Threshold/min-area maximising pooled F1 against ground-truth points (paper protocol)."""
    from pointnuc.metrics import detection_counts, detection_scores

    gts = [gt_points(s) for s in samples]
    table = []
    for t in THRESHOLDS:
        comps = [_components(p, s.valid, float(t)) for p, s in zip(probs, samples)]
        for f in AREA_FRACTIONS:
            a = float(f * math.pi * radius * radius)
            dets = [xy[area >= max(a, 1)] for xy, area in comps]
            sc = detection_scores([detection_counts(d, g, radius) for d, g in zip(dets, gts)])
            table.append({"threshold": float(t), "min_area_px": a, "score": sc["F1"], "n_detections": sum(map(len, dets))})
    pick = max(table, key=lambda row: row["score"])
    return Tuning(pick["threshold"], pick["min_area_px"], pick["score"], int(pick["n_detections"]), "masks", table)


# ------------------------------------------------------------------------ points on disk


def _file_name(name: str) -> str:
    return re.sub(r"[\\/:*?\"<>|]", "_", name) + ".json"


def save_points(layout: ModelLayout, sample: TrainingImage, xy_working: np.ndarray) -> Path:
    """Write a sample's detected points (full-resolution QuPath x/y) to ``points/NAME.json``."""
    layout.points.mkdir(parents=True, exist_ok=True)
    path = layout.points / _file_name(sample.name)
    full = sample.to_full_res(np.asarray(xy_working, float).reshape(-1, 2))
    doc = {"name": sample.name, "image_name": sample.image_name, "coordinates": "full-resolution pixels, QuPath x/y",
           "points_xy": full.round(3).tolist()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc), encoding="utf-8")
    tmp.replace(path)
    return path


def load_points(layout: ModelLayout, name: str) -> np.ndarray:
    """A sample's detected points (full-resolution x/y) as saved by :func:`save_points`."""
    path = layout.points / _file_name(name)
    if not path.is_file():
        raise InputError(f"no detected points for {name} in {layout.root}; run stage 1 first")
    return np.asarray(json.loads(path.read_text(encoding="utf-8"))["points_xy"], float).reshape(-1, 2)


# ------------------------------------------------------------------------ training


def check_samples(samples: Sequence[TrainingImage]) -> list[TrainingImage]:
    """Drop samples without pixels (warning); refuse too few points (TrainingError)."""
    kept = []
    for s in samples:
        if s.image.size == 0 or not s.valid.any():
            log.warning("skipping %s: the region has no pixels", s.name)
            continue
        kept.append(s)
    if not kept:
        raise TrainingError("no training image or region has any pixels")
    n_train = sum(len(s.points) for s in kept)
    n_all = n_train + sum(len(s.holdout) for s in kept)
    if n_all == 0:
        raise TrainingError("no points of the nucleus class were found on any training image")
    if n_all < MIN_POINTS:
        raise TrainingError(f"only {n_all} points were found; click at least {MIN_POINTS} nuclei to train a detector")
    if n_train == 0:
        raise TrainingError("every point was held back for tuning; lower the holdout fraction")
    return kept


RoundHook = Callable[[int, nn.Module, dict[str, Tuning]], None]


def train_detector(
    samples: list[TrainingImage],
    config: TrainConfig,
    layout: ModelLayout,
    *,
    device: str | torch.device = "auto",
    resume: bool = False,
    progress: bool = True,
    weights: Path | None = None,
    tune_samples: Sequence[TrainingImage] | None = None,
    selection: str = "points",
    on_round_end: RoundHook | None = None,
) -> DetectorResult:
    """Train the stage-1 detector, tune its threshold, save weights and detected points.

    ``selection``: ``points`` (held-back points, default) or ``masks`` (pooled F1 on
    ``tune_samples`` that carry ``gt_labels``; the paper protocol). The held-back points of
    ``tune_samples`` (images not trained on) join those of ``samples`` for the points
    protocol; with ground truth on all of them both tunings are reported in ``metrics``. ``on_round_end(k, model,
    tunings)`` is called after the initial training (k = 0) and after each self-training
    round with the round's tunings by protocol, ``points`` and, where made, ``masks``
    (benchmarks use it to score every round).
    """
    if selection not in ("points", "masks"):
        raise InputError("selection must be 'points' or 'masks'")
    if selection == "masks" and not (tune_samples and all(s.gt_labels is not None for s in tune_samples)):
        raise InputError("mask-based selection needs tuning images with ground-truth labels")
    samples = check_samples(samples)
    dev = resolve_device(device)
    det_cfg = config.detection
    radii = detection_radii(config)
    variant = det_cfg.variant
    rounds = det_cfg.rounds if variant in ("ST-bg", "ST-nu") else 0
    torch.manual_seed(config.seed)
    model = build_network(1, config.encoder, weights, pretrained=True)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return weighted_mse(logits, targets, det_cfg.fg_weight)

    masks0 = [initial_mask(s, variant, radii) for s in samples]
    targets = masks0
    histories: dict[str, FitHistory] = {}
    metrics: dict[str, Any] = {"variant": variant, "r1_px": radii.r1, "r2_px": radii.r2, "sigma_px": radii.sigma,
                               "n_points": int(sum(len(s.points) for s in samples)),
                               "n_holdout": int(sum(len(s.holdout) for s in samples)), "rounds": {}}
    tuning: Tuning | None = None
    probs: list[np.ndarray] = []
    for k in range(rounds + 1):
        ds = PatchDataset(samples, [t[None] for t in targets], config.data, seed=config.seed + 1000 * k)
        epochs = det_cfg.round_epochs if (k > 0 and det_cfg.round_epochs > 0) else det_cfg.epochs
        hist = fit(
            model, ds, loss_fn, epochs=epochs, lr=det_cfg.lr, batch_size=det_cfg.batch_size, device=dev,
            checkpoint_dir=layout.checkpoints, stage_name=f"detector-round{k}", seed=config.seed + 1000 * k,
            resume=resume, progress=progress, config={"train": config.to_dict(), "round": k},
            schedule=det_cfg.lr_schedule, ema=det_cfg.ema,
        )
        histories[f"round{k}"] = hist
        probs = predict_probabilities(model, samples, dev)
        tprobs = predict_probabilities(model, tune_samples, dev) if tune_samples else []
        # held-back points of the training images and of any tuning images
        tunings = {"points": tune_on_points(probs + tprobs, list(samples) + list(tune_samples or []), radii.r1)}
        rm: dict[str, Any] = {"points": _tuning_summary(tunings["points"]), "loss": hist.losses,
                              "patches_per_s": _mean([e.patches_per_s for e in hist.epochs]),
                              "data_wait_share": _mean([e.data_wait_share for e in hist.epochs])}
        if tune_samples:
            if all(s.gt_labels is not None for s in tune_samples):
                tunings["masks"] = tune_on_masks(tprobs, tune_samples, radii.r1)
                rm["masks"] = _tuning_summary(tunings["masks"])
        tuning = tunings[selection]
        metrics["rounds"][f"round{k}"] = rm
        log.info("detector round %d: threshold %.2f, min area %.1f px, %s score %.3f",
                 k, tuning.threshold, tuning.min_area_px, tuning.protocol, tuning.score)
        if on_round_end is not None:
            on_round_end(k, model, tunings)
        if k < rounds:
            new = []
            for s, m0, p in zip(samples, masks0, probs):
                det = detect(p, s.valid, tuning.threshold, tuning.min_area_px)
                new.append(self_training_mask(s, variant, radii, m0, p, det, det_cfg.bg_low, det_cfg.bg_high))
            targets = new
    assert tuning is not None
    points = {s.name: detect(p, s.valid, tuning.threshold, tuning.min_area_px) for s, p in zip(samples, probs)}
    save_weights(layout.detector, model)
    for s in samples:
        save_points(layout, s, points[s.name])
    metrics.update(threshold=tuning.threshold, min_area_px=tuning.min_area_px, selection=tuning.protocol,
                   n_detected=int(sum(len(v) for v in points.values())))
    return DetectorResult(model=model, threshold=tuning.threshold, min_area_px=tuning.min_area_px, points=points,
                          history=histories, metrics=metrics)


def _tuning_summary(t: Tuning) -> dict[str, Any]:
    out = {"threshold": t.threshold, "min_area_px": t.min_area_px, "score": t.score, "n_detections": t.n_detections}
    row = next((r for r in t.table if r["threshold"] == t.threshold and r["min_area_px"] == t.min_area_px), {})
    for key in ("recall", "n_true_est"):
        if key in row:
            out[key] = row[key]
    return out


def _mean(v: Sequence[float]) -> float:
    return float(np.mean(v)) if len(v) else float("nan")
