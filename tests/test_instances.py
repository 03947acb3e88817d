"""Probability map -> instances (connected components and watershed split)."""

from __future__ import annotations

import numpy as np
import pytest

from pointnuc.errors import InputError
from pointnuc.infer.instances import instances_from_probability


def _two_touching_discs(gap: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[:40, :60]
    a = (yy - 20) ** 2 + (xx - 19) ** 2 <= 81
    b = (yy - 20) ** 2 + (xx - (37 + gap)) ** 2 <= 81
    return (a | b).astype(np.float32)


def test_cc_merges_touching_discs_watershed_splits_them():
    p = _two_touching_discs()
    cc = instances_from_probability(p, method="cc", min_area_px=10)
    ws = instances_from_probability(p, method="watershed", min_area_px=10)
    assert cc.max() == 1
    assert ws.max() == 2
    # the cut is near the middle column (28)
    left = ws[20, 10]
    assert ws[20, 26] == left and ws[20, 30] != left
    assert (ws > 0).sum() == (cc > 0).sum()


def test_threshold_small_objects_and_holes():
    p = np.zeros((30, 30), np.float32)
    p[2:12, 2:12] = 0.9
    p[6:8, 6:8] = 0.1  # 4-pixel hole: filled
    p[20:22, 20:22] = 0.9  # 4 pixels: below min area
    p[15:25, 2:8] = 0.4  # below threshold
    lab = instances_from_probability(p, threshold=0.5, min_area_px=5)
    assert lab.dtype == np.int32 and lab.max() == 1
    assert (lab == 1).sum() == 100
    lab = instances_from_probability(p, threshold=0.3, min_area_px=5)
    assert lab.max() == 2


def test_a_single_disc_is_not_split_and_bad_input_raises():
    yy, xx = np.mgrid[:30, :30]
    p = ((yy - 15) ** 2 / 100 + (xx - 15) ** 2 / 30 <= 1).astype(np.float32)  # an ellipse
    assert instances_from_probability(p, method="watershed").max() == 1
    with pytest.raises(InputError):
        instances_from_probability(p, method="magic")
    with pytest.raises(InputError):
        instances_from_probability(p[None])
