"""Stage-2 losses (paper Eqs. 5-6 and 10). Targets follow :mod:`pointnuc.train.data`: values < 0 are ignored.

Kept apart from :mod:`pointnuc.train.losses` (stage 1) only because both were written
at the same time; the target channels of stage 2 are defined here, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pointnuc.train.crf import crf_loss

#: Target channels of a stage-2 training image: Voronoi label, cluster label, then the RGB
#: image in [0, 1] (for the CRF term; the network itself gets the normalised image).
VOR, CLUSTER, RGB = 0, 1, slice(2, 5)
#: Resampling of those channels when augmenting: labels nearest, colour bilinear.
TARGET_NEAREST = (True, True, False, False, False)


def partial_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of 2-class ``logits`` (B, 2, H, W) over pixels whose ``target`` (B, H, W) is 0 or 1.

    Pixels with a negative target are ignored; the mean is over the others (0, with
    gradient, when there are none).
    """
    keep = target >= 0
    t = torch.where(keep, target, torch.zeros_like(target)).long()
    ce = F.cross_entropy(logits, t, reduction="none")
    return (ce * keep).sum() / keep.sum().clamp(min=1)


@dataclass(frozen=True)
class Stage2Loss:
    """L = α·L_vor + (1−α)·L_cluster (+ β·CRF when ``beta`` > 0), called as ``loss(logits, targets)``."""

    alpha: float = 0.5
    beta: float = 0.0  #: weight of the dense-CRF term (0: plain training)
    sigma_xy_px: float = 4.5
    sigma_rgb: float = 0.1
    crf_downsample: int = 1

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.alpha * partial_ce(logits, targets[:, VOR]) + (1 - self.alpha) * partial_ce(logits, targets[:, CLUSTER])
        if self.beta > 0:
            rgb = targets[:, RGB]
            valid = rgb[:, 0] >= 0
            prob = torch.softmax(logits, dim=1)[:, 1]
            loss = loss + self.beta * crf_loss(
                prob, rgb.clamp(min=0), valid, sigma_xy_px=self.sigma_xy_px, sigma_rgb=self.sigma_rgb,
                downsample=self.crf_downsample,
            )
        return loss


def supervised_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fully supervised reference: cross-entropy against the binary mask in channel 0 (< 0 ignored)."""
    return partial_ce(logits, targets[:, 0])
