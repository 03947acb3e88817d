"""What the benchmarks add to pointnuc's training: ground truth carried beside the samples, and the
paper's protocol plugged in through pointnuc's selection strategies (:mod:`pointnuc.train.selection`).

- :class:`PaperProtocol`: tuning images kept apart from training, whose held-back points join
  pointnuc's and whose masks give the paper's scores (pooled detection F1 in stage 1, Kumar AJI in
  stage 2); it also keeps the states a benchmark reports (before CRF, best under the other score).
- :func:`train_supervised`: the fully supervised reference, pointnuc's segmenter run on full masks.

pointnuc itself never sees ground truth: a user's project has points only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pointnuc.config import TrainConfig
from pointnuc.errors import InputError
from pointnuc.metrics import aji, detection_counts, detection_scores, gt_points_from_labels
from pointnuc.models.layout import ModelLayout
from pointnuc.train.data import PatchDataset
from pointnuc.train.detect import predict_probabilities
from pointnuc.train.samples import TrainingImage
from pointnuc.train.seg_losses import supervised_ce
from pointnuc.train.segment import SegmenterResult, SegmenterTraining, merge_points
from pointnuc.train.selection import (
    AREA_FRACTIONS,
    DETECTION_THRESHOLDS,
    HeldBackPoints,
    SegmenterContext,
    Tuning,
    detection_components,
    tune_on_points,
)

log = logging.getLogger(__name__)

#: ground truth: int instance labels per sample name, at the sample's pixels
Truth = dict[str, np.ndarray]
#: called after each detector round with the round's tunings by protocol
RoundHook = Callable[[int, nn.Module, dict[str, Tuning]], None]
State = dict[str, torch.Tensor]


def labels_like(labels: np.ndarray, sample: TrainingImage) -> np.ndarray:
    """Instance ``labels`` of a sample's image (at another size) at the sample's pixels, nearest neighbour."""
    h, w = sample.valid.shape
    if labels.shape == (h, w):
        return labels
    return np.asarray(Image.fromarray(labels.astype(np.int32)).resize((w, h), Image.Resampling.NEAREST))


def rescaled_truth(truth: Mapping[str, np.ndarray], samples: Sequence[TrainingImage]) -> Truth:
    """``truth`` on ``samples``: the same images at another pixel size (as ``detection_samples`` gives them)."""
    return {s.name: labels_like(truth[s.name], s) for s in samples if s.name in truth}


def tune_on_masks(probs: Sequence[np.ndarray], samples: Sequence[TrainingImage], truth: Mapping[str, np.ndarray],
                  radius: float) -> Tuning:
    """Threshold/min-area maximising pooled F1 against ground-truth points (paper protocol)."""
    gts = [gt_points_from_labels(truth[s.name]) for s in samples]
    table = []
    for t in DETECTION_THRESHOLDS:
        comps = [detection_components(p, s.valid, float(t)) for p, s in zip(probs, samples)]
        for f in AREA_FRACTIONS:
            a = float(f * math.pi * radius * radius)
            dets = [xy[area >= max(a, 1)] for xy, area in comps]
            sc = detection_scores([detection_counts(d, g, radius) for d, g in zip(dets, gts)])
            table.append({"threshold": float(t), "min_area_px": a, "score": sc["F1"], "n_detections": sum(map(len, dets))})
    pick = max(table, key=lambda row: row["score"])
    return Tuning(pick["threshold"], pick["min_area_px"], pick["score"], int(pick["n_detections"]), "masks", table)


def _copy(model: nn.Module) -> State:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@dataclass
class PaperProtocol(HeldBackPoints):
    """pointnuc's selection with the paper's beside it, for both stages.

    ``tune_samples``: images not trained on; their held-back points join pointnuc's points
    protocol, and with ``truth`` for all of them the mask scores are made too. ``use``: which
    one chooses (``points``, pointnuc's, or ``masks``). Stage 2 keeps ``plain_state`` (the
    weights before CRF fine-tuning) and ``alt_states`` (``plain-aji``, ``crf-aji``: the best
    weights of each phase under the score not used).
    """

    tune_samples: Sequence[TrainingImage] = ()
    truth: Truth = field(default_factory=dict)
    use: str = "points"
    on_round_end: RoundHook | None = None
    plain_state: State | None = None
    alt_states: dict[str, State | None] = field(default_factory=dict)
    _alt: tuple[float, State | None] = (-math.inf, None)

    def __post_init__(self) -> None:
        if self.use not in ("points", "masks"):
            raise InputError("selection must be 'points' or 'masks'")
        if self.use == "masks" and not (self.tune_samples and self._all_with_truth()):
            raise InputError("mask-based selection needs tuning images with ground-truth labels")
        self.key = "aji" if self.use == "masks" else "points"

    def _with_truth(self) -> list[TrainingImage]:
        return [s for s in self.tune_samples if s.name in self.truth]

    def _all_with_truth(self) -> bool:
        return all(s.name in self.truth for s in self.tune_samples)

    @property
    def other(self) -> str:
        """The stage-2 score not used for selection."""
        return "points" if self.key == "aji" else "aji"

    # ---- stage 1

    def tune(self, round_k: int, model: nn.Module, probs: Sequence[np.ndarray], samples: Sequence[TrainingImage],
             r1: float, device: torch.device) -> tuple[Tuning, dict[str, Tuning]]:
        tune = list(self.tune_samples)
        tprobs = predict_probabilities(model, tune, device) if tune else []
        tunings = {"points": tune_on_points(list(probs) + tprobs, list(samples) + tune, r1)}
        if tune and self._all_with_truth():
            tunings["masks"] = tune_on_masks(tprobs, tune, self.truth, r1)
        if self.on_round_end is not None:
            self.on_round_end(round_k, model, tunings)
        return tunings[self.use], tunings

    # ---- stage 2

    def prepare(self, ctx: SegmenterContext) -> None:
        super().prepare(ctx)
        self.plain_state, self.alt_states, self._alt = None, {}, (-math.inf, None)
        extra = [s for s in self.tune_samples if len(s.holdout)]
        self.held_back += extra
        # a tuning image's known points: its stage-1 detections when given, and its training points
        self.held_back_known += [ctx.known[s.name] if s.name in ctx.known
                                 else merge_points(ctx.points.get(s.name, np.zeros((0, 2))), s.points, ctx.r1)
                                 for s in extra]

    @property
    def active(self) -> bool:
        return self.key == "aji" or bool(self.held_back)

    def score(self, model: nn.Module, thresholds: Sequence[float]) -> dict[float, dict[str, float]]:
        out = super().score(model, thresholds)
        masks = self._with_truth()
        if masks:
            probs = self.probabilities(model, masks)
            for t in thresholds:
                out[t]["aji"] = float(np.mean([aji(self.truth[s.name], self.instances(p, t, s.valid))
                                               for p, s in zip(probs, masks)]))
        return out

    def epoch_scores(self, model: nn.Module) -> dict[str, float]:
        scores = super().epoch_scores(model)
        other = scores.get(self.other, float("nan"))
        if np.isfinite(other) and other > self._alt[0]:
            self._alt = (other, _copy(model))
        return scores

    def phase_end(self, phase: str, model: nn.Module) -> None:
        if phase == "plain":
            self.plain_state = _copy(model)
        self.alt_states[f"{phase}-{self.other}"] = self._alt[1]
        self._alt = (-math.inf, None)


def train_supervised(
    samples: list[TrainingImage],
    truth: Mapping[str, np.ndarray],
    points: Mapping[str, np.ndarray],
    config: TrainConfig,
    layout: ModelLayout,
    *,
    device: str | torch.device = "auto",
    resume: bool = False,
    progress: bool = True,
    weights: Path | None = None,
    detector_state: Mapping[str, torch.Tensor] | None = None,
    selection: PaperProtocol | None = None,
) -> SegmenterResult:
    """The fully supervised reference: pointnuc's segmenter (network, schedule, selection) trained on the
    binary ground-truth masks instead of point labels, without CRF fine-tuning.

    ``points``: stage-1 points of the tuning images (their known points for the points score).
    """
    run = SegmenterTraining(samples, config, layout, device=device, resume=resume, progress=progress,
                            selection=selection or PaperProtocol())
    if any(s.name not in truth for s in run.samples):
        raise InputError("the fully supervised reference needs ground-truth labels on every training image")
    targets = [np.where(truth[s.name] > 0, 1.0, 0.0).astype(np.float32)[None] for s in run.samples]
    known = {s.name: np.zeros((0, 2)) for s in run.samples}
    label_seconds = time.perf_counter() - run.t_start
    log.info("stage 2 labels for %d images in %.1f s", len(run.samples), label_seconds)
    run.prepare_selection(known, points)
    model = run.network(weights, detector_state)
    ds = PatchDataset(run.samples, targets, config.data, nearest=(True,), seed=config.seed + 7)
    seg = config.segmentation
    history = {"supervised": run.fit(model, ds, supervised_ce, "supervised", name="segmenter-supervised",
                                     epochs=seg.epochs, lr=seg.lr)}
    return run.finish(model, history, known=known, labels={}, label_seconds=label_seconds)
