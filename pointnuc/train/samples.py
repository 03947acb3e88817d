"""The unit both training stages consume: one image (or region) at the working resolution."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pointnuc.config import TrainConfig

#: Fewest points (training + held back) we train from. Below ~10 clicked nuclei a
#: 16-crop batch holds on average less than one labeled nucleus, the network learns
#: "background everywhere", and there is nothing left to hold back for tuning.
MIN_POINTS = 10


@dataclass
class TrainingImage:
    """One training image or region, resampled to the model's working pixel size.

    All coordinates here are at the working resolution, QuPath convention (x = column,
    y = row, pixel (r, c) centred at (c + 0.5, r + 0.5)). ``to_full_res`` maps them back.
    """

    name: str  #: unique id: image name, plus ``#k`` for the k-th region of an image
    image_name: str  #: the project's image name
    image: np.ndarray  #: uint8 RGB (H, W, 3), colour-normalised (Reinhard)
    points: np.ndarray  #: (N, 2) float xy: the user's points used for training
    holdout: np.ndarray  #: (M, 2) float xy: user's points held back for tuning/selection
    valid: np.ndarray  #: bool (H, W): inside the training region; labels outside are ignored
    origin_xy: tuple[float, float] = (0.0, 0.0)  #: full-res x/y of this array's top-left corner
    scale: float = 1.0  #: full-res pixels per working pixel
    gt_labels: np.ndarray | None = None  #: int instance labels (H, W); benchmarks / paper protocol only

    def rescaled(self, pixel_size_ratio: float) -> "TrainingImage":
        """This sample with ``pixel_size_ratio`` times the pixel size (2: half the pixels a side).

        Pixels are averaged (box filter) when shrinking, masks and labels taken by nearest
        neighbour; points keep their full-resolution place.
        """
        from PIL import Image

        h, w = self.valid.shape
        hh, ww = max(1, round(h / pixel_size_ratio)), max(1, round(w / pixel_size_ratio))
        if (hh, ww) == (h, w):
            return self
        f = w / ww  # old pixels per new pixel, as the slide reader counts scale
        box = Image.BOX if pixel_size_ratio > 1 else Image.BILINEAR

        def nearest(a: np.ndarray) -> np.ndarray:
            return np.asarray(Image.fromarray(a).resize((ww, hh), Image.NEAREST))

        return replace(
            self,
            image=np.asarray(Image.fromarray(self.image).resize((ww, hh), box)),
            points=self.points / f,
            holdout=self.holdout / f,
            valid=nearest(self.valid),
            scale=self.scale * f,
            gt_labels=None if self.gt_labels is None else nearest(self.gt_labels.astype(np.int32)),
        )

    def to_full_res(self, xy: np.ndarray) -> np.ndarray:
        """Working-resolution x/y -> full-resolution QuPath x/y."""
        return np.asarray(xy, float) * self.scale + np.asarray(self.origin_xy, float)


def points_between(points: Mapping[str, np.ndarray], src: Sequence[TrainingImage],
                   dst: Sequence[TrainingImage]) -> dict[str, np.ndarray]:
    """Working-resolution points found on ``src`` samples, moved onto the same-named ``dst`` samples
    (the same regions at another pixel size)."""
    scale = {s.name: s.scale for s in src}
    return {d.name: np.asarray(points[d.name], float) * (scale[d.name] / d.scale) for d in dst if d.name in points}


def detection_samples(samples: Sequence[TrainingImage], config: "TrainConfig") -> Sequence[TrainingImage]:
    """``samples`` (at ``config.data.pixel_size_um``) as stage 1 sees them, at ``detection.pixel_size_um``;
    ``samples`` itself when the two pixel sizes are the same."""
    ratio = config.for_detection().data.pixel_size_um / config.data.pixel_size_um
    return samples if ratio == 1 else [s.rescaled(ratio) for s in samples]

