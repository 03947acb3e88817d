"""Probability map -> instances (connected components and watershed split)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import canonical_labels

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


def _clumps(seed: int, size: int = 256) -> np.ndarray:
    """A probability map of overlapping discs and ellipses (clumps of 2-4 nuclei), thin bridges and lone nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    p = np.zeros((size, size), np.float32)
    for _ in range(60):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(3, 12, 2)
        p = np.maximum(p, np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) * 1.5).astype(np.float32))
    for _ in range(6):  # one-pixel bridges and diagonal steps
        y, x = rng.integers(0, size - 20, 2)
        p[y, x : x + 15] = 0.9
        for k in range(8):
            p[y + k, x + 15 + k] = 0.9
    return p


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("h_px", [0.5, 1.5])
def test_per_component_watershed_equals_the_whole_tile_one(seed: int, h_px: float) -> None:
    from helpers import watershed_reference as _watershed_reference
    from helpers import watershed_tile as _watershed_tile

    from pointnuc.infer.instances import _watershed, fill_small_holes

    p = _clumps(seed)
    fast = instances_from_probability(p, method="watershed", min_area_px=5, h_px=h_px)
    # exactly the whole-tile computation on the same distance map...
    mask = fill_small_holes(p >= 0.5, 20)
    assert np.array_equal(canonical_labels(_watershed(mask, h_px)), canonical_labels(_watershed_tile(mask, h_px)))
    # ...and the same instances as before per-component splitting
    old = _watershed_reference(p, min_area_px=5, h_px=h_px)
    assert fast.max() > 40 and fast.max() > instances_from_probability(p, method="cc", min_area_px=5).max()
    assert np.array_equal(canonical_labels(fast), canonical_labels(old))


def test_fill_small_holes_is_binary_fill_holes_by_size() -> None:
    from scipy import ndimage as ndi

    from pointnuc.infer.instances import fill_small_holes

    rng = np.random.default_rng(3)
    for density in (0.3, 0.55, 0.7):
        mask = rng.random((120, 90)) < density
        for max_hole in (1, 3, 10):
            holes = ndi.binary_fill_holes(mask) & ~mask
            lab, n = ndi.label(holes)
            small = np.bincount(lab.ravel(), minlength=n + 1) < max_hole
            small[0] = False
            assert np.array_equal(fill_small_holes(mask, max_hole), mask | small[lab])


def test_flip_tta_is_flip_equivariant() -> None:
    import torch

    from pointnuc.infer.predict import predict_channel
    from pointnuc.models.net import build_network

    torch.manual_seed(0)
    net = build_network(1, "tiny", pretrained=False).eval()
    img = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    p = predict_channel(net, img, 0, activation="sigmoid", tta=True)
    q = predict_channel(net, np.ascontiguousarray(img[::-1]), 0, activation="sigmoid", tta=True)
    np.testing.assert_allclose(q[::-1], p, atol=1e-5)  # the average over the four flips does not care about a flip
    plain = predict_channel(net, img, 0, activation="sigmoid", tta=False)
    assert plain.shape == p.shape and not np.allclose(plain, p, atol=1e-5)
