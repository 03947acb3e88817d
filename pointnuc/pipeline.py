"""The few high-level functions the CLI calls: train a model, segment a project.

Each lives with its step: the training run in :mod:`pointnuc.train.run`, model folders in
:mod:`pointnuc.models.layout`, segmenting a project in :mod:`pointnuc.infer.project`.
"""

from __future__ import annotations

from pointnuc.infer.merge import merge_results
from pointnuc.infer.project import SegmentSummary, plan_segmentation, segment_project
from pointnuc.models.layout import default_model_dir, newest_model_dir
from pointnuc.train.run import TrainSummary, train_project

__all__ = [
    "SegmentSummary",
    "TrainSummary",
    "default_model_dir",
    "merge_results",
    "newest_model_dir",
    "plan_segmentation",
    "segment_project",
    "train_project",
]
