"""Where a model folder's files are, and where a project's models live (torch-free).

Layout of one model folder (the one place that defines it; :mod:`pointnuc.models.bundle`
reads and writes what is inside)::

    MODEL_DIR/
      pointnuc-model.json   format version, pointnuc version, config, pixel size,
                            colour-normalisation reference, tuned thresholds, provenance,
                            SHA-256 of each weights file (checked on load)
      detector.pt           stage-1 weights (state_dict)
      segmenter.pt          stage-2 weights (state_dict), after CRF fine-tuning
      points/NAME.json      stage-1 detected points per training image (x/y, full-res px)
      checkpoints/          checkpoints for --resume (removed when training finishes,
                            unless --keep-checkpoints)
      report/               loss curves and review figures (PNG), metrics.json
      train.log             the run's log

A project's models are dated folders in ``PROJECT_FOLDER/pointnuc-models/``.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pointnuc.errors import InputError, OutputExistsError
from pointnuc.io.paths import check_output_dir

if TYPE_CHECKING:
    from pointnuc.config import TrainConfig
    from pointnuc.io.base import Project

MODELS_FOLDER = "pointnuc-models"
MODEL_JSON = "pointnuc-model.json"
DETECTOR_WEIGHTS = "detector.pt"
SEGMENTER_WEIGHTS = "segmenter.pt"
#: the weights files whose SHA-256 the model description records
WEIGHT_FILES = (DETECTOR_WEIGHTS, SEGMENTER_WEIGHTS)


@dataclass(frozen=True)
class ModelLayout:
    """Paths inside a model folder."""

    root: Path

    @property
    def meta(self) -> Path:
        return self.root / MODEL_JSON

    @property
    def detector(self) -> Path:
        return self.root / DETECTOR_WEIGHTS

    @property
    def segmenter(self) -> Path:
        return self.root / SEGMENTER_WEIGHTS

    @property
    def points(self) -> Path:
        return self.root / "points"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def log(self) -> Path:
        return self.root / "train.log"


def default_model_dir(project: Project, config: TrainConfig) -> Path:
    """A new, dated model folder inside the project's folder."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return project.root / MODELS_FOLDER / f"{stamp}-{config.profile}"


def newest_model_dir(project: Project) -> Path:
    """The most recent model trained for this project (by the time it was saved)."""
    folder = project.root / MODELS_FOLDER
    cands = sorted(folder.glob(f"*/{MODEL_JSON}"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    done = [p.parent for p in cands if ModelLayout(p.parent).segmenter.is_file()]
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
    layout = ModelLayout(out)
    has_model = layout.meta.is_file()
    started = out.is_dir() and any(p.name != layout.log.name for p in out.iterdir())
    if resume and not has_model and started:
        raise InputError(f"--resume: {out} holds no interrupted pointnuc training")
    if overwrite and not resume and out.is_dir() and any(out.iterdir()) and not has_model:
        raise OutputExistsError(
            f"--overwrite replaces only a pointnuc model folder, and {out} is not one; choose another --out"
        )
