"""Stage-1 target rules on tiny arrays, values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pointnuc.infer.points import points_from_probability
from pointnuc.labels.detection import (
    background_propagation,
    distance_to_points,
    extended_gaussian_mask,
    gaussian_mask,
    ignore_near,
    nuclei_propagation,
)
from pointnuc.stain import reinhard_normalize, reinhard_reference

# one point at the centre of pixel (row 2, col 3)
PT = np.array([[3.5, 2.5]])


def test_distance_uses_pixel_centres_and_cuts_at_max() -> None:
    d = distance_to_points(PT, (5, 7), max_dist=2.5)
    assert d[2, 3] == 0
    assert d[2, 4] == pytest.approx(1.0)
    assert d[3, 4] == pytest.approx(math.sqrt(2))
    assert d[4, 4] == pytest.approx(math.sqrt(5))
    assert np.isinf(d[2, 6])  # 3 > 2.5
    assert np.isinf(distance_to_points(np.zeros((0, 2)), (3, 3), 5)).all()


def test_extended_gaussian_mask_eq1() -> None:
    m = extended_gaussian_mask(PT, (5, 7), r1=2.0, r2=3.0, sigma=1.0)
    assert m[2, 3] == pytest.approx(1.0)  # D = 0
    assert m[2, 4] == pytest.approx(math.exp(-0.5))  # D = 1
    assert m[3, 4] == pytest.approx(math.exp(-1.0))  # D = sqrt 2
    assert m[2, 5] == 0.0  # D = 2 = r1: background ring starts at r1
    assert m[4, 4] == 0.0  # D = sqrt 5 in [r1, r2)
    assert m[2, 6] == -1.0  # D = 3 = r2: ignored
    assert m[0, 0] == -1.0  # D = sqrt 13
    valid = np.ones((5, 7), bool)
    valid[2, 3] = False
    assert extended_gaussian_mask(PT, (5, 7), 2.0, 3.0, 1.0, valid)[2, 3] == -1.0


def test_plain_gaussian_mask_ignores_nothing() -> None:
    m = gaussian_mask(PT, (5, 7), r1=2.0, sigma=1.0)
    assert m[2, 4] == pytest.approx(math.exp(-0.5))
    assert m[2, 5] == 0.0 and m[0, 0] == 0.0 and m[2, 6] == 0.0
    assert (m >= 0).all()


def test_two_points_nearest_wins() -> None:
    pts = np.array([[0.5, 0.5], [4.5, 0.5]])  # pixels (0,0) and (0,4)
    m = extended_gaussian_mask(pts, (1, 5), r1=1.5, r2=2.5, sigma=1.0)
    # cols: D = 0, 1, 2, 1, 0 -> 1, e^-0.5, 0 (ring), e^-0.5, 1
    assert m[0] == pytest.approx([1, math.exp(-0.5), 0, math.exp(-0.5), 1])


def _st_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """10 x 12 image, one labeled point at pixel (1, 1); r1 = 1.5 (pi r1^2 = 7.07), r2 = 3."""
    pts = np.array([[1.5, 1.5]])
    prob = np.full((10, 12), 0.5, np.float32)  # uncertain everywhere -> ignored
    prob[6:9, 8:11] = 0.9  # 3x3 = 9 px > 7.07: a large confident blob -> background
    prob[6:8, 1:3] = 0.9  # 2x2 = 4 px < 7.07: could be a nucleus -> stays ignored
    prob[0:3, 6:9] = 0.05  # confident background
    prob[0:3, 0:3] = 0.05  # ... but inside r2 of the point: Eq. 1 is kept
    mask = extended_gaussian_mask(pts, prob.shape, 1.5, 3.0, 1.0)
    return pts, prob, mask


def test_ignore_near_held_back_points() -> None:
    m = extended_gaussian_mask(PT, (5, 7), r1=2.0, r2=3.0, sigma=1.0)
    held = np.array([[5.5, 2.5]])  # pixel (2, 5): in PT's background ring (D = 2)
    out = ignore_near(m, held, 1.5)
    # within 1.5 of (2, 5): (2, 4), (2, 5), (2, 6), (1, 5), (3, 5), and the diagonals at sqrt 2
    assert (out[1:4, 4:7] == -1.0).all()
    assert out[2, 3] == pytest.approx(1.0) and out[0, 5] == m[0, 5] and out[4, 4] == 0.0  # D = √5 from (2, 5): kept
    assert np.array_equal(ignore_near(m, np.zeros((0, 2)), 1.5), m) and m[2, 5] == 0.0  # input untouched


def test_background_propagation_eq3_both_branches() -> None:
    pts, prob, mask = _st_case()
    out = background_propagation(mask, pts, prob, r1=1.5, r2=3.0, low=0.1, high=0.7)
    assert out[1, 1] == pytest.approx(1.0)  # labeled point kept
    assert out[1, 2] == pytest.approx(math.exp(-0.5))
    assert out[0, 0] == pytest.approx(math.exp(-1.0))  # D = sqrt 2 < r1, kept though p < 0.1
    assert out[3, 1] == 0.0  # D = 2: ring, kept as background
    assert (out[0:3, 6:9] == 0).all()  # p < 0.1 outside r2 -> background
    assert (out[6:9, 8:11] == 0).all()  # p > 0.7 in a 9 px component -> background
    assert (out[6:8, 1:3] == -1).all()  # p > 0.7 but only 4 px -> ignored
    assert out[5, 5] == -1  # 0.1 <= p <= 0.7 -> ignored
    assert out[1, 4] == -1  # D = 3 = r2 is outside the keep zone, p = 0.5 -> ignored


def test_background_propagation_component_straddling_r2() -> None:
    pts = np.array([[1.5, 1.5]])
    prob = np.full((6, 8), 0.5, np.float32)
    prob[0:3, 0:6] = 0.95  # 18 px component covering the point and beyond r2
    mask = extended_gaussian_mask(pts, prob.shape, 1.5, 3.0, 1.0)
    out = background_propagation(mask, pts, prob, 1.5, 3.0)
    assert out[1, 1] == pytest.approx(1.0)  # inside r2: mask kept, not turned into background
    assert out[1, 3] == 0.0  # D = 2 (ring)
    assert out[1, 4] == 0.0 and out[1, 5] == 0.0  # outside r2, in the big component -> background
    assert out[4, 4] == -1


def test_nuclei_propagation_adds_far_detections_only() -> None:
    pts = np.array([[1.5, 1.5]])
    det = np.array([[2.0, 1.5], [8.5, 6.5]])  # first is 0.5 from the labeled point -> dropped
    m = nuclei_propagation(pts, det, (10, 12), r1=1.5, r2=3.0, sigma=1.0)
    assert m[1, 1] == pytest.approx(1.0)  # D to the labeled point only (the near detection is not added)
    assert m[6, 8] == pytest.approx(1.0)  # the far detection is a new Gaussian
    assert m[6, 10] == 0.0  # D = 2 from it: ring
    assert m[6, 5] == -1.0


def test_points_from_probability() -> None:
    p = np.zeros((6, 8), np.float32)
    p[1:3, 1:3] = 0.9  # 4 px, centroid (row 1.5, col 1.5) -> x = y = 2.0
    p[4, 6] = 0.8  # 1 px at (4, 6) -> x 6.5, y 4.5
    p[0, 7] = 0.4  # below threshold
    xy = points_from_probability(p, 0.5, 0)
    assert xy.tolist() == [[2.0, 2.0], [6.5, 4.5]]
    assert points_from_probability(p, 0.5, 2).tolist() == [[2.0, 2.0]]
    assert points_from_probability(p, 0.95, 0).shape == (0, 2)
    d = np.zeros((3, 3), np.float32)
    d[0, 0] = d[1, 1] = 1.0  # diagonal neighbours: one 8-connected component
    assert points_from_probability(d, 0.5).tolist() == [[1.0, 1.0]]


def test_reinhard_moves_lab_stats_to_reference() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(60, 200, (16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) * 0.7 + 40, 0, 255).astype(np.uint8)
    ref = reinhard_reference([a])
    out = reinhard_normalize(b, ref)
    ref_b = reinhard_reference([out])
    assert np.allclose(ref_b["mean"], ref["mean"], atol=1.0)
    assert np.allclose(ref_b["std"], ref["std"], atol=1.0)
    assert np.array_equal(reinhard_normalize(a, ref), a)  # an image at the reference stays put
