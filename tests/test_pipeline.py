"""pipeline: which full-resolution boxes are trained on, and how points and regions land in them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pointnuc.config import profile_config
from pointnuc.io.base import ImageRef
from pointnuc.pipeline import _boxes_for_image


def _ref(w: int, h: int, um: float) -> ImageRef:
    return ImageRef(name="s", path=Path("s.tif"), width=w, height=h, pixel_size_um=um)


def test_large_slide_windows_have_the_margin_in_microns() -> None:
    # 0.25 µm/px slide, model at 0.5 µm/px: downsample 2; 25 µm margin = 100 slide px,
    # a cell of 1024 working px = 2048 slide px
    config = profile_config("tiny", **{"data.pixel_size_um": 0.5, "data.max_whole_image_px": 1000})
    assert config.data.region_margin_um == 25.0
    image = _ref(10000, 8000, 0.25)
    boxes = _boxes_for_image(image, (), np.array([[3000.0, 100.0]]), 2.0, config)
    x0, x1 = 2048 - 100, 2 * 2048 + 100  # the point's cell, x in [2048, 4096), plus the margin
    assert boxes == [(x0, 0, x1 - x0, 2048 + 100, None)]  # clipped at the top edge
