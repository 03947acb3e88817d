"""Training losses. Targets follow :mod:`pointnuc.train.data`: values < 0 are ignored."""

from __future__ import annotations

import torch


def weighted_mse(logits: torch.Tensor, targets: torch.Tensor, fg_weight: float = 10.0) -> torch.Tensor:
    """Paper Eq. 2: weighted MSE of sigmoid(logits) over non-ignored pixels.

    Weight ``fg_weight`` where the target is > 0, 1 where it is 0; pixels with target < 0
    are left out. The sum is divided by the number of non-ignored pixels (not by the
    weights), as in the paper's Eq. 2; a batch with no labelled pixel gives 0 (with grad).
    """
    prob = torch.sigmoid(logits)
    keep = targets >= 0
    w = torch.where(targets > 0, torch.full_like(targets, fg_weight), torch.ones_like(targets))
    w = w * keep
    err = w * (prob - targets.clamp(min=0)) ** 2
    return err.sum() / keep.sum().clamp(min=1)
