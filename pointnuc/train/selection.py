"""Choosing on held-back data: stage 1's threshold and minimum area, stage 2's checkpoint.

A user's project has points only, so pointnuc chooses with the points it held back from
training: :class:`HeldBackPoints`, the default of both stages. A benchmark with ground-truth
masks plugs its own choice in through the same protocols, :class:`DetectorSelection` and
:class:`SegmenterSelection` (the paper's mask protocol: ``benchmarks/harness.py``).

Stage 1 (:func:`tune_on_points`): held-back points are a random sample of the nuclei, so
they estimate recall; the number of nuclei is estimated from above as min(N_det / recall)
over (threshold, min-area) pairs, which gives an F1 estimate per pair. The grid reaches below
its floor (:data:`FLOOR_THRESHOLDS`) only when the choice sits there: a detector whose
probabilities shrank (correction rounds with many background marks) is not cut off at 0.05,
and every other choice is the one the grid alone gives.

Stage 2 (:func:`holdout_counts`, :func:`points_score`). For each held-back point h (never
used as a label in either stage) we look at the predicted instance under it. h is *well
segmented* when that instance exists and holds no other known point (the training points,
stage-1 detections and other held-back points, after dropping those within r1/2 of h,
which mark h's own nucleus): a miss and a merge with a neighbour both fail.
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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from pointnuc.errors import TrainingError
from pointnuc.infer.instances import instances_from_probability
from pointnuc.infer.points import points_from_probability
from pointnuc.infer.predict import nucleus_probability
from pointnuc.models.calibration import Thresholds
from pointnuc.train.samples import TrainingImage

log = logging.getLogger(__name__)

#: stage 1: detector probability thresholds tried
DETECTION_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(0.05, 0.851, 0.05), 2))
#: stage 1: thresholds below the grid, tried only when the choice sits at its floor (see :func:`tune_on_points`)
FLOOR_THRESHOLDS: tuple[float, ...] = (0.01, 0.02, 0.03)
#: stage 1: minimum component areas tried, as fractions of the mean nucleus area π r1²
AREA_FRACTIONS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3)
#: stage 2: nucleus probability thresholds scored after training (recorded; the threshold stays 0.5)
SEGMENTATION_THRESHOLDS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
EMPTY_PENALTY = 0.5


# ------------------------------------------------------------------------ stage 1


@dataclass
class Tuning:
    """A (threshold, min-area) choice and how it scored."""

    threshold: float
    min_area_px: float
    score: float  #: points: estimated F1 (from held-back points); masks: pooled F1
    n_detections: int
    protocol: str  #: "points" | "masks"
    table: list[dict[str, float]] = field(default_factory=list)  #: every pair tried


def detection_components(prob: np.ndarray, valid: np.ndarray | None, threshold: float) -> tuple[np.ndarray, np.ndarray]:
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

    When the estimate picks the grid's floor (:data:`DETECTION_THRESHOLDS`' first value), the
    pairs of :data:`FLOOR_THRESHOLDS` are added and the choice made again on the whole table
    (``N_true`` included): correction rounds with many background marks shrink the detector's
    probabilities, and their choices sat at 0.05. A choice above the floor never looks below it,
    so it stays the one the grid alone gives; ties keep the higher threshold.
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

    def rows(thresholds: Sequence[float]) -> list[dict[str, float]]:
        table: list[dict[str, float]] = []
        for t in thresholds:
            comps = [detection_components(p, s.valid, float(t)) for p, s in zip(probs, samples)]
            for f in AREA_FRACTIONS:
                a = float(f * math.pi * r1 * r1)
                matched, n_det, n_new = 0, 0, 0
                for (xy, area), ref, seen in zip(comps, refs, clicked):
                    det = xy[area >= max(a, 1)]
                    n_det += len(det)
                    n_new += len(det) - (detection_counts(det, seen, r1).tp if len(seen) and len(det) else 0)
                    matched += detection_counts(det, ref, r1).tp if len(ref) else 0
                table.append({"threshold": float(t), "min_area_px": a, "recall": matched / n_ref,
                              "n_detections": n_det, "n_unclicked": n_new})
        return table

    table = rows(DETECTION_THRESHOLDS)
    tuning = _pick_on_points(table, n_ref)
    # at the floor by its estimate (not the most sensitive setting of too few matched points): look below it
    if tuning.score > 0 and tuning.threshold == DETECTION_THRESHOLDS[0]:
        tuning = _pick_on_points(rows(FLOOR_THRESHOLDS) + table, n_ref)
    return tuning


def _pick_on_points(table: list[dict[str, float]], n_ref: int) -> Tuning:
    """The best row of :func:`tune_on_points`'s ``table`` by estimated F1 (each row gets ``n_true_est`` and
    ``score``); score 0 and the most sensitive row when too few held-back points are matched."""
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


# ------------------------------------------------------------------------ stage 2


def _occupancy(labels: np.ndarray, holdout_xy: np.ndarray, known_xy: np.ndarray,
               same_radius: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(instance under each held-back point, points per instance, known points kept): known points
    within ``same_radius`` of a held-back point are the same nucleus and left out."""
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
    any_pt = np.zeros(int(labels.max()) + 1, np.int64)
    np.add.at(any_pt, lab_at(known), 1)
    lh = lab_at(hold)
    np.add.at(any_pt, lh, 1)
    return lh, any_pt, len(known)


def holdout_found(labels: np.ndarray, holdout_xy: np.ndarray, known_xy: np.ndarray, same_radius: float) -> np.ndarray:
    """Per held-back point: well segmented, i.e. inside an instance that holds no known point and
    no other held-back point."""
    lh, any_pt, _ = _occupancy(labels, holdout_xy, known_xy, same_radius)
    return (lh > 0) & (any_pt[lh] == 1)


def holdout_counts(labels: np.ndarray, holdout_xy: np.ndarray, known_xy: np.ndarray, same_radius: float) -> dict[str, int]:
    """Counts behind the points-only score on one image (see the module docstring).

    ``good``: held-back points whose instance holds no other known point (:func:`holdout_found`);
    ``n``: held-back points; ``instances``; ``empty``: instances holding neither a known nor a
    held-back point.
    """
    lh, any_pt, n_known = _occupancy(labels, holdout_xy, known_xy, same_radius)
    good = int(np.count_nonzero((lh > 0) & (any_pt[lh] == 1)))
    if n_known == 0:  # nothing known besides the held-back points: empty instances cannot be told
        return {"good": good, "n": len(lh), "instances": 0, "empty": 0}
    present = np.zeros(len(any_pt), bool)
    present[np.unique(labels)] = True
    empty = int(np.count_nonzero(present[1:] & (any_pt[1:] == 0)))
    return {"good": good, "n": len(lh), "instances": int(present[1:].sum()), "empty": empty}


def points_score(counts: Sequence[dict[str, int]]) -> float:
    """Pooled points-only score: good share minus EMPTY_PENALTY × empty-instance share."""
    n = sum(c["n"] for c in counts)
    inst = sum(c["instances"] for c in counts)
    if n == 0:
        return float("nan")
    return sum(c["good"] for c in counts) / n - EMPTY_PENALTY * (sum(c["empty"] for c in counts) / max(inst, 1))




# ------------------------------------------------------------------------ the strategies


class DetectorSelection(Protocol):
    """How stage 1 chooses its (threshold, minimum area) after each round."""

    def tune(self, round_k: int, model: nn.Module, probs: Sequence[np.ndarray], samples: Sequence[TrainingImage],
             r1: float, device: torch.device) -> tuple[Tuning, dict[str, Tuning]]:
        """After round ``round_k`` (``probs``: the detector's maps of the training ``samples``): the tuning
        to use and every tuning made, by protocol (all are recorded in the metrics)."""
        ...


@dataclass(frozen=True)
class SegmenterContext:
    """What stage 2 hands its selection before training."""

    samples: Sequence[TrainingImage]  #: the training samples
    known: Mapping[str, np.ndarray]  #: per training sample: its known points (training points, detections)
    points: Mapping[str, np.ndarray]  #: the stage-1 points stage 2 was given, per sample name
    r1: float  #: nucleus radius, working px
    thresholds: Thresholds  #: minimum area and watershed depth of the instances
    method: str  #: instance method (cc or watershed)
    device: torch.device


class SegmenterSelection(Protocol):
    """How stage 2 scores its checkpoints on held-back data."""

    key: str  #: the score that picks the checkpoint
    held_back: list[TrainingImage]  #: images scored by their held-back points (after :meth:`prepare`)

    def prepare(self, ctx: SegmenterContext) -> None:
        """Called once before training, with the points stage 2 knows."""
        ...

    @property
    def active(self) -> bool:
        """Whether there is anything to score (else the last epoch is kept)."""
        ...

    def epoch_scores(self, model: nn.Module) -> dict[str, float]:
        """Scores of ``model`` at the end of an epoch, with the one that picks the checkpoint as ``score``."""
        ...

    def phase_end(self, phase: str, model: nn.Module) -> None:
        """Called when a training phase ends (``plain``: before CRF fine-tuning, ``crf``), with its model."""
        ...

    def score(self, model: nn.Module, thresholds: Sequence[float]) -> dict[float, dict[str, float]]:
        """Scores of ``model`` at each probability threshold, by protocol."""
        ...


@dataclass
class HeldBackPoints:
    """pointnuc's choice in both stages: the user's points held back from training (the default)."""

    key: str = "points"
    held_back: list[TrainingImage] = field(default_factory=list)
    held_back_known: list[np.ndarray] = field(default_factory=list)  #: known points of each held-back image
    ctx: SegmenterContext | None = None

    def tune(self, round_k: int, model: nn.Module, probs: Sequence[np.ndarray], samples: Sequence[TrainingImage],
             r1: float, device: torch.device) -> tuple[Tuning, dict[str, Tuning]]:
        tuning = tune_on_points(probs, samples, r1)
        return tuning, {"points": tuning}

    def prepare(self, ctx: SegmenterContext) -> None:
        self.ctx = ctx
        self.held_back = [s for s in ctx.samples if len(s.holdout)]
        self.held_back_known = [ctx.known[s.name] for s in self.held_back]

    @property
    def active(self) -> bool:
        return bool(self.held_back)

    def epoch_scores(self, model: nn.Module) -> dict[str, float]:
        sc = self.score(model, [0.5])[0.5]
        return {**sc, "score": sc.get(self.key, float("nan"))}

    def phase_end(self, phase: str, model: nn.Module) -> None:
        pass  # the model in training is all pointnuc keeps

    def score(self, model: nn.Module, thresholds: Sequence[float]) -> dict[float, dict[str, float]]:
        out: dict[float, dict[str, float]] = {t: {} for t in thresholds}
        if self.held_back:
            probs = self.probabilities(model, self.held_back)
            for t in thresholds:
                counts = [holdout_counts(self.instances(p, t, s.valid), s.holdout, k, self.context.r1 / 2)
                          for p, s, k in zip(probs, self.held_back, self.held_back_known)]
                out[t]["points"] = points_score(counts)
        return out

    @property
    def context(self) -> SegmenterContext:
        if self.ctx is None:
            raise RuntimeError("the selection was not prepared for stage 2")
        return self.ctx

    def probabilities(self, model: nn.Module, samples: Sequence[TrainingImage]) -> list[np.ndarray]:
        return [nucleus_probability(model, s.image, device=self.context.device) for s in samples]

    def instances(self, prob: np.ndarray, threshold: float, valid: np.ndarray) -> np.ndarray:
        """Instance labels of one map at ``threshold``, inside ``valid``."""
        th, ctx = self.context.thresholds, self.context
        lab = instances_from_probability(prob, threshold=threshold, min_area_px=th.min_area_px, method=ctx.method,
                                         h_px=th.h_px)
        return np.where(valid, lab, 0)
