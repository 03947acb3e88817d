"""A correction round (``pointnuc train --from MODEL``): both stages start from a trained model.

The parent model gives its detector and segmenter weights, its colour reference (every
training image is normalised to it, so its weights see the colours they were trained on) and
its detection threshold (the first detector targets are its self-training targets, Eq. 3,
at that threshold). Its marks and the user's new ones are all used.

The short schedule (:func:`correction_config`): :data:`CORRECTION_FRACTION` of each phase's
epochs of the *base* configuration (the fresh training's, carried along a chain of rounds),
rounded up, at least one; no self-training rounds (the parent's own predictions give the
background its rounds taught, see :func:`pointnuc.train.detect.train_detector`), no
segmenter refine round. Goal: a round costs at most a quarter of a fresh training.

The parent is recorded in the new model's provenance (``correction``): its folder, its digest
(:func:`pointnuc.infer.results.model_digest`, the one ``segment`` keys results by), its
weights' SHA-256, and the base configuration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pointnuc.config import TrainConfig
from pointnuc.errors import InputError, ModelFormatError
from pointnuc.models.calibration import ColourReference, Thresholds
from pointnuc.models.layout import ModelLayout

#: share of each phase's epochs a correction round trains
CORRECTION_FRACTION = 0.25


@dataclass(frozen=True)
class ParentModel:
    """The model a correction round starts from (weights are read when training starts)."""

    root: Path
    config: TrainConfig
    base: TrainConfig  #: the fresh training's configuration the short schedule is cut from
    norm_reference: ColourReference | None
    thresholds: Thresholds
    digest: str
    weights_sha256: dict[str, str]

    def record(self) -> dict[str, Any]:
        """What the new model's provenance says about its parent."""
        return {"parent": str(self.root.resolve()), "parent_digest": self.digest,
                "parent_weights_sha256": self.weights_sha256, "fraction": CORRECTION_FRACTION,
                "base_config": self.base.to_dict()}


def load_parent(path: Path) -> ParentModel:
    """A finished pointnuc model folder as a parent; anything else is one InputError line."""
    from pointnuc.infer.results import model_digest
    from pointnuc.models.bundle import load_info

    try:
        info = load_info(Path(path))
    except ModelFormatError as err:
        raise InputError(f"--from: {err}") from None
    layout = ModelLayout(Path(path))
    missing = [p.name for p in (layout.detector, layout.segmenter) if not p.is_file()]
    if missing:
        raise InputError(f"--from: {path} has no {' or '.join(missing)}; give a finished model folder")
    corr = info.provenance.get("correction")
    base = info.config
    if isinstance(corr, Mapping) and isinstance(corr.get("base_config"), dict):
        base = TrainConfig.from_dict(corr["base_config"])
    return ParentModel(root=Path(path), config=info.config, base=base, norm_reference=info.norm_reference,
                       thresholds=info.thresholds, digest=model_digest(Path(path)),
                       weights_sha256=dict(info.weights_sha256 or {}))


def check_compatible(parent: ParentModel, config: TrainConfig) -> None:
    """One InputError line when ``config`` cannot start from ``parent``'s weights (encoder, pixel sizes)."""
    checks = [
        ("encoder", parent.config.encoder, config.encoder),
        ("working pixel size (µm/px)", parent.config.data.pixel_size_um, config.data.pixel_size_um),
        ("detector pixel size (µm/px)", parent.config.for_detection().data.pixel_size_um,
         config.for_detection().data.pixel_size_um),
    ]
    for what, theirs, ours in checks:
        if theirs != ours:
            raise InputError(f"--from: {parent.root} has {what} {theirs}, this training {ours}; "
                             f"drop --profile/--set to train with the model's own, or train afresh")


def correction_config(parent: ParentModel, base: TrainConfig | None = None,
                      overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The short schedule cut from ``base`` (default: the parent's base), ``overrides`` applied last.

    Raises InputError when the result cannot start from the parent's weights.
    """
    base = base if base is not None else parent.base
    check_compatible(parent, base)
    d, s = base.detection, base.segmentation
    short = base.replace(**{
        "detection.epochs": max(1, math.ceil(CORRECTION_FRACTION * d.epochs)),
        "detection.rounds": 0,
        "segmentation.epochs": max(1, math.ceil(CORRECTION_FRACTION * s.epochs)),
        "segmentation.crf_epochs": math.ceil(CORRECTION_FRACTION * s.crf_epochs),
        "segmentation.refine_epochs": 0,
    })
    if overrides:
        short = short.replace(**dict(overrides))
    check_compatible(parent, short)
    return short
