"""Stage 2: a nucleus segmenter trained from points (paper §IV).

Pipeline: points per image (stage-1 detections plus the user's training points) ->
Voronoi and cluster labels -> training with partial cross-entropy (Eqs. 5-6) ->
optionally one self-training round on the segmenter's confident predictions (ours,
``refine_epochs``; off: it did not help on MoNuSeg) -> dense-CRF-loss fine-tuning
(Eq. 10) -> checkpoint and threshold chosen on held-back data -> weights in the model
folder.

Selection without masks (the default; a user's project has only points). For each
held-back point h (never used as a label in either stage) we look at the predicted
instance under it. h is *well segmented* when that instance exists and holds no other
known point (the training points, stage-1 detections and other held-back points, after
dropping those within r1/2 of h, which mark h's own nucleus): a miss and a merge with a
neighbour both fail.
That rewards recall and separation but not tight outlines, and a map that paints
everything would still pass where points are sparse, so we subtract half the share of
predicted instances that hold no known point at all (spurious blobs and the fragments
of an over-split nucleus):

    score = (well segmented held-back points / held-back points) − 0.5 · (empty instances / instances)

The checkpoint (per epoch, at threshold 0.5) is chosen by this score. The probability
threshold is not: the score cannot see how far an outline reaches and favoured high
thresholds that shrink every nucleus (on MoNuSeg it chose 0.4-0.7 where the validation
masks chose 0.3), so the points-only protocol keeps the softmax cut, 0.5. Matching the
predicted area to the expected one (Σp) was tried and failed on weak models, whose
diffuse background probabilities inflate Σp (README example: 0.3, AJI .25 vs .42 at 0.5).

With ``selection="masks"`` (the paper's protocol; benchmarks only) the mean Kumar AJI
on tuning images with ground-truth labels chooses the checkpoint and the threshold;
when those exist both scores are recorded. The fully supervised reference (same net,
binary masks) is ``supervised=True``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pointnuc.config import TrainConfig
from pointnuc.errors import InputError, TrainingError
from pointnuc.infer.instances import instances_from_probability, nucleus_probability
from pointnuc.labels.cluster import labels_for_image
from pointnuc.labels.voronoi import IGNORE as LABEL_IGNORE
from pointnuc.models.bundle import ModelLayout, save_weights
from pointnuc.models.calibration import Thresholds
from pointnuc.models.net import build_network, transfer_weights
from pointnuc.train.data import IGNORE, PatchDataset
from pointnuc.train.fit import FitHistory, fit, resolve_device
from pointnuc.train.samples import TrainingImage
from pointnuc.train.seg_losses import CLUSTER, TARGET_NEAREST, Stage2Loss, supervised_ce

log = logging.getLogger(__name__)

THRESHOLDS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
EMPTY_PENALTY = 0.5


@dataclass
class SegmenterResult:
    """What stage 2 hands on."""

    model: nn.Module
    thresholds: Thresholds  #: prob, min_area_px, h_px (working pixels); detection ones at their defaults
    history: dict[str, FitHistory]  #: "segmentation", "crf" (or "supervised")
    metrics: dict[str, Any]
    plain_state: dict[str, torch.Tensor] | None = None  #: weights before CRF fine-tuning (benchmarks)
    labels: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  #: (Voronoi, cluster) per sample
    #: best states under the protocol *not* used for selection ("plain-aji", "crf-aji", ...), for benchmarks
    alt_states: dict[str, dict[str, torch.Tensor] | None] = field(default_factory=dict)


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

    Channels: Voronoi label, cluster label (0/1, IGNORE elsewhere), then RGB in [0, 1].
    """
    vor, clu = labels_for_image(sample.image, points_xy, config.segmentation, config.data.pixel_size_um, seed=config.seed)
    t = np.empty((5,) + vor.shape, np.float32)
    t[0] = np.where(vor == LABEL_IGNORE, IGNORE, vor)
    t[1] = np.where(clu == LABEL_IGNORE, IGNORE, clu)
    t[2:] = np.moveaxis(sample.image, -1, 0).astype(np.float32) / 255.0
    return t, vor, clu


def refined_targets(targets: np.ndarray, prob: np.ndarray, low: float, high: float) -> np.ndarray:
    """Stage-2 targets with the cluster channel replaced by the segmenter's confident predictions.

    Nucleus where ``prob > high``, background where ``prob < low``, ignored between. The
    Voronoi channel (nucleus at the points, background on the edges between them) is
    kept and goes on pulling the round towards one nucleus per point.
    """
    t = targets.copy()
    t[CLUSTER] = np.where(prob > high, 1.0, np.where(prob < low, 0.0, IGNORE)).astype(np.float32)
    return t


# ------------------------------------------------------------------------ selection scores


def holdout_counts(labels: np.ndarray, holdout_xy: np.ndarray, known_xy: np.ndarray, same_radius: float) -> dict[str, int]:
    """Counts behind the points-only score on one image (see the module docstring).

    ``good``: held-back points whose instance holds no other known point; ``n``: held-back
    points; ``instances``; ``empty``: instances holding neither a known nor a held-back point.
    """
    h, w = labels.shape

    def lab_at(xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, float).reshape(-1, 2)
        r = np.clip(np.floor(xy[:, 1]).astype(int), 0, h - 1)
        c = np.clip(np.floor(xy[:, 0]).astype(int), 0, w - 1)
        return labels[r, c]

    hold = np.asarray(holdout_xy, float).reshape(-1, 2)
    known = np.asarray(known_xy, float).reshape(-1, 2)
    if len(hold) and len(known):
        from scipy.spatial import cKDTree

        d, _ = cKDTree(hold).query(known)
        known = known[d > same_radius]
    n_inst = int(labels.max())
    occupied = np.zeros(n_inst + 1, np.int64)
    np.add.at(occupied, lab_at(known), 1)
    lh = lab_at(hold)
    any_pt = occupied.copy()
    np.add.at(any_pt, lh, 1)
    # well segmented: inside an instance that holds no known point and no other held-back point
    good = int(np.count_nonzero((lh > 0) & (any_pt[lh] == 1)))
    present = np.zeros(n_inst + 1, bool)
    present[np.unique(labels)] = True
    if len(known) == 0:  # nothing known besides the held-back points: empty instances cannot be told
        return {"good": good, "n": len(hold), "instances": 0, "empty": 0}
    empty = int(np.count_nonzero(present[1:] & (any_pt[1:] == 0)))
    return {"good": good, "n": len(hold), "instances": int(present[1:].sum()), "empty": empty}


def points_score(counts: Sequence[dict[str, int]]) -> float:
    """Pooled points-only score: good share minus EMPTY_PENALTY × empty-instance share."""
    n = sum(c["n"] for c in counts)
    inst = sum(c["instances"] for c in counts)
    if n == 0:
        return float("nan")
    return sum(c["good"] for c in counts) / n - EMPTY_PENALTY * (sum(c["empty"] for c in counts) / max(inst, 1))


@dataclass
class _Tuner:
    """Scores a model on held-back data at several thresholds."""

    samples: list[TrainingImage]  #: images with held-back points (points protocol)
    known: list[np.ndarray]  #: known points per sample (training + detections)
    mask_samples: list[TrainingImage]  #: images with gt_labels (mask protocol)
    same_radius: float
    min_area_px: float
    h_px: float
    method: str
    device: torch.device

    def probs(self, model: nn.Module, which: list[TrainingImage]) -> list[np.ndarray]:
        return [nucleus_probability(model, s.image, device=self.device) for s in which]

    def _inst(self, p: np.ndarray, t: float, valid: np.ndarray) -> np.ndarray:
        lab = instances_from_probability(p, threshold=t, min_area_px=self.min_area_px, method=self.method, h_px=self.h_px)
        return np.where(valid, lab, 0)

    def score(self, model: nn.Module, thresholds: Sequence[float]) -> dict[float, dict[str, float]]:
        from pointnuc.metrics import aji

        out: dict[float, dict[str, float]] = {t: {} for t in thresholds}
        if self.samples:
            probs = self.probs(model, self.samples)
            for t in thresholds:
                counts = [holdout_counts(self._inst(p, t, s.valid), s.holdout, k, self.same_radius)
                          for p, s, k in zip(probs, self.samples, self.known)]
                out[t]["points"] = points_score(counts)
        if self.mask_samples:
            probs = self.probs(model, self.mask_samples)
            for t in thresholds:
                out[t]["aji"] = float(np.mean([aji(s.gt_labels, self._inst(p, t, s.valid)) for p, s in zip(probs, self.mask_samples)]))
        return out


# ------------------------------------------------------------------------ training


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
    tune_samples: Sequence[TrainingImage] | None = None,
    selection: str = "points",
    supervised: bool = False,
    merge_user_points: bool = True,
    detector_state: Mapping[str, torch.Tensor] | None = None,
) -> SegmenterResult:
    """Train the stage-2 segmenter, pick checkpoint and threshold, save its weights.

    ``points``: working-resolution x/y per sample name (stage-1 detections, or all true
    points for the "GT points" row); with ``merge_user_points`` the samples' own training
    points are added (detections within r1 of one are dropped). ``tune_samples``: extra
    images not trained on; their held-back points join the points protocol, and with
    ``gt_labels`` they serve ``selection="masks"`` (paper protocol). ``supervised``: the
    fully supervised reference (needs ``gt_labels`` on every sample; no CRF).
    ``detector_state``: the stage-1 detector's weights, the segmenter's start when
    ``segmentation.init_from_detector`` is set.
    """
    if selection not in ("points", "masks"):
        raise InputError("selection must be 'points' or 'masks'")
    tune_samples = list(tune_samples or [])
    if selection == "masks" and not (tune_samples and all(s.gt_labels is not None for s in tune_samples)):
        raise InputError("mask-based selection needs tuning images with ground-truth labels")
    samples = [s for s in samples if s.image.size and s.valid.any()]
    if not samples:
        raise TrainingError("no training image or region has any pixels")
    seg = config.segmentation
    dev = resolve_device(device)
    px = config.data.px
    r1 = px(config.data.nucleus_radius_um)
    min_area_px = seg.min_area_um2 / config.data.pixel_size_um**2
    h_px = px(seg.watershed_h_um)
    t_start = time.perf_counter()

    # ---- labels
    labels: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    targets: list[np.ndarray] = []
    known: dict[str, np.ndarray] = {}
    if supervised:
        if any(s.gt_labels is None for s in samples):
            raise InputError("the fully supervised reference needs ground-truth labels on every training image")
        for s in samples:
            targets.append(np.where(s.gt_labels > 0, 1.0, 0.0).astype(np.float32)[None])
            known[s.name] = np.zeros((0, 2))
    else:
        missing = [s.name for s in samples if s.name not in points]
        if missing:
            raise InputError(f"no points for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; run stage 1 first")
        for s in samples:
            pts = np.asarray(points[s.name], float).reshape(-1, 2)
            if merge_user_points:
                pts = merge_points(pts, s.points, r1)
            if len(pts) == 0:
                log.warning("%s has no points: its labels are empty (all ignored)", s.name)
            known[s.name] = pts
            t, vor, clu = stage2_targets(s, pts, config)
            targets.append(t)
            labels[s.name] = (vor, clu)
    t_labels = time.perf_counter() - t_start
    log.info("stage 2 labels for %d images in %.1f s", len(samples), t_labels)

    # ---- selection data
    hold_samples = [s for s in samples if len(s.holdout)] + [s for s in tune_samples if len(s.holdout)]
    # known points of a tuning image: its stage-1 detections when ``points`` has them, else its training points
    hold_known = [known[s.name] if s.name in known else merge_points(points.get(s.name, np.zeros((0, 2))), s.points, r1)
                  for s in hold_samples]
    tuner = _Tuner(
        samples=hold_samples, known=hold_known,
        mask_samples=[s for s in tune_samples if s.gt_labels is not None],
        same_radius=r1 / 2, min_area_px=min_area_px, h_px=h_px, method=seg.instance_method, device=dev,
    )
    key = "aji" if selection == "masks" else "points"
    if key == "points" and not hold_samples:
        log.warning("no held-back points: the last epoch is kept and the threshold stays at 0.5")

    other = "points" if key == "aji" else "aji"
    alt: dict[str, Any] = {"score": -np.inf, "state": None}

    last_epoch = {"n": seg.epochs}  # of the fit in progress

    def on_epoch_end(epoch: int, model: nn.Module) -> dict[str, Any]:
        if key == "points" and not hold_samples:
            return {}
        if epoch % seg.select_every and epoch != last_epoch["n"]:
            return {}
        sc = tuner.score(model, [0.5])[0.5]
        # benchmarks: also keep the best state under the other protocol, when it can be scored
        o = sc.get(other, float("nan"))
        if np.isfinite(o) and o > alt["score"]:
            alt.update(score=o, state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        return {**sc, "score": sc.get(key, float("nan"))}

    torch.manual_seed(config.seed)
    if seg.init_from_detector and detector_state is not None:
        model = build_network(2, config.encoder, pretrained=False)
        fresh = transfer_weights(model, detector_state)
        log.info("the segmenter starts from the detector's weights (%s start at zero)", ", ".join(fresh))
    else:
        if seg.init_from_detector:
            log.warning("no detector weights given: the segmenter starts without them")
        model = build_network(2, config.encoder, weights, pretrained=True)
    nearest = (True,) if supervised else TARGET_NEAREST
    ds = PatchDataset(samples, targets, config.data, nearest=nearest, seed=config.seed + 7)
    common = dict(batch_size=seg.batch_size, device=dev, checkpoint_dir=layout.checkpoints, seed=config.seed + 7,
                  resume=resume, progress=progress, on_epoch_end=on_epoch_end, schedule=seg.lr_schedule,
                  ema=seg.ema)
    history: dict[str, FitHistory] = {}
    refine_kept: bool | None = None
    plain_state = None
    alt_states: dict[str, dict[str, torch.Tensor] | None] = {}
    if supervised:
        history["supervised"] = fit(model, ds, supervised_ce, epochs=seg.epochs, lr=seg.lr, stage_name="segmenter-supervised",
                                    config={"train": config.to_dict(), "stage": "supervised"}, **common)
    else:
        sigma_xy = px(seg.crf_sigma_xy_um)
        loss = Stage2Loss(alpha=seg.alpha)
        history["segmentation"] = fit(model, ds, loss, epochs=seg.epochs, lr=seg.lr, stage_name="segmenter",
                                      config={"train": config.to_dict(), "stage": "plain"}, **common)
        if seg.refine_epochs > 0:
            before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            last_epoch["n"] = seg.refine_epochs
            refined = [refined_targets(t, nucleus_probability(model, s.image, device=dev, tta=True), seg.refine_low, seg.refine_high)
                       for s, t in zip(samples, targets)]
            ds_refined = PatchDataset(samples, refined, config.data, nearest=nearest, seed=config.seed + 11)
            history["refine"] = fit(model, ds_refined, loss, epochs=seg.refine_epochs, lr=seg.lr, stage_name="segmenter-refine",
                                    config={"train": config.to_dict(), "stage": "refine"}, **common)
            b0, b1 = history["segmentation"].best_score, history["refine"].best_score
            refine_kept = b0 is None or (b1 is not None and b1 >= b0)  # kept only when the held-back score does not fall
            if not refine_kept:
                log.info("self-training round scored %.3f < %.3f before it: the segmenter before the round is kept", b1 or np.nan, b0)
                model.load_state_dict(before)
            else:  # CRF fine-tuning goes on from the refined labels
                ds = ds_refined
        plain_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        alt_states[f"plain-{other}"] = alt["state"]
        alt.update(score=-np.inf, state=None)
        if seg.crf_epochs > 0 and seg.crf_beta > 0:
            last_epoch["n"] = seg.crf_epochs
            crf = Stage2Loss(alpha=seg.alpha, beta=seg.crf_beta, sigma_xy_px=sigma_xy, sigma_rgb=seg.crf_sigma_rgb,
                             crf_downsample=crf_downsample(sigma_xy))
            history["crf"] = fit(model, ds, crf, epochs=seg.crf_epochs, lr=seg.crf_lr, stage_name="segmenter-crf",
                                 config={"train": config.to_dict(), "stage": "crf"}, **common)
            alt_states[f"crf-{other}"] = alt["state"]

    # ---- threshold
    metrics: dict[str, Any] = {"selection": key, "label_seconds": t_labels, "r1_px": r1, "min_area_px": min_area_px,
                               "h_px": h_px, "method": seg.instance_method, "refine_kept": refine_kept,
                               "n_points": int(sum(len(v) for v in known.values())),
                               "n_holdout": int(sum(len(s.holdout) for s in hold_samples))}
    prob_t = 0.5
    if key == "masks" or hold_samples:
        table = tuner.score(model, THRESHOLDS)
        metrics["threshold_table"] = {str(t): v for t, v in table.items()}
        finite = [t for t in THRESHOLDS if np.isfinite(table[t].get(key, np.nan))]
        if key == "masks" and finite:  # points-only keeps 0.5: the points score is recorded, not used (module docstring)
            best = max(table[t][key] for t in finite)
            # prefer 0.5 (the natural softmax cut) unless another threshold is clearly better
            prob_t = 0.5 if table[0.5].get(key, -np.inf) >= best - 0.005 else max(finite, key=lambda t: table[t][key])
        metrics["selection_score"] = table[prob_t].get(key, float("nan"))
    metrics["threshold_rule"] = "best val AJI" if key == "masks" else "fixed 0.5"
    thresholds = Thresholds.for_config(config, prob=float(prob_t))
    metrics["seconds"] = time.perf_counter() - t_start
    save_weights(layout.segmenter, model)
    log.info("segmenter: threshold %.2f (%s selection), %.0f s", prob_t, key, metrics["seconds"])
    return SegmenterResult(model=model, thresholds=thresholds, history=history, metrics=metrics,
                           plain_state=plain_state, labels=labels, alt_states=alt_states)


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
