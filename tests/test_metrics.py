"""Metrics against hand-computed small cases."""

from __future__ import annotations

import numpy as np
import pytest

from pointnuc.errors import InputError
from pointnuc.metrics import (
    DetectionCounts,
    aji,
    aji_authors,
    detection_counts,
    detection_scores,
    dice_obj,
    gt_points_from_labels,
    pixel_scores,
    segmentation_scores,
)

# ------------------------------------------------------------------ detection


def test_detection_one_to_one_and_radius_is_strict():
    gt = np.array([[10.0, 10.0], [30.0, 10.0]])
    pred = np.array([[13.0, 14.0], [30.0, 21.0], [100.0, 100.0]])  # d = 5, 11 (== r, not a TP), far
    c = detection_counts(pred, gt, radius=11)
    assert (c.tp, c.fp, c.fn) == (1, 2, 1)
    np.testing.assert_allclose(c.distances, [5.0])


def test_detection_row_major_order_decides_shared_detection():
    # one detection between two GT points; GT at y=5 comes first in row-major order and wins,
    # even though the other GT point (listed first, y=9) is nearer
    gt = np.array([[0.0, 9.0], [0.0, 5.0]])
    pred = np.array([[0.0, 8.0]])  # d = 1 to (0,9), 3 to (0,5)
    c = detection_counts(pred, gt, radius=11)
    assert (c.tp, c.fp, c.fn) == (1, 0, 1)
    np.testing.assert_allclose(c.distances, [3.0])


def test_detection_nearest_free_after_first_is_taken():
    gt = np.array([[0.0, 0.0], [4.0, 0.0]])
    pred = np.array([[1.0, 0.0], [9.0, 0.0]])
    c = detection_counts(pred, gt, radius=6)
    # GT (0,0) takes (1,0) at d=1; GT (4,0) then takes (9,0) at d=5
    assert (c.tp, c.fp, c.fn) == (2, 0, 0)
    np.testing.assert_allclose(c.distances, [1.0, 5.0])


def test_detection_empty_inputs():
    c = detection_counts(np.zeros((0, 2)), np.array([[1.0, 1.0]]), 5)
    assert (c.tp, c.fp, c.fn) == (0, 0, 1)
    c = detection_counts(np.array([[1.0, 1.0]]), [], 5)
    assert (c.tp, c.fp, c.fn) == (0, 1, 0)
    with pytest.raises(InputError):
        detection_counts(np.zeros((3, 3)), np.zeros((1, 2)), 5)


def test_detection_scores_are_pooled():
    a = DetectionCounts(3, 1, 0, np.array([1.0, 2.0, 3.0]))
    b = DetectionCounts(1, 0, 3, np.array([6.0]))
    s = detection_scores([a, b])
    # pooled: TP 4, FP 1, FN 3 -> P .8, R 4/7
    assert s["P"] == pytest.approx(0.8)
    assert s["R"] == pytest.approx(4 / 7)
    assert s["F1"] == pytest.approx(2 * 0.8 * (4 / 7) / (0.8 + 4 / 7))
    assert s["mu_d"] == pytest.approx(3.0)
    assert s["sigma_d"] == pytest.approx(np.std([1, 2, 3, 6]))


def test_gt_points_bounding_box_centre_rounded_down():
    lab = np.zeros((10, 10), int)
    lab[2:6, 3:5] = 1  # rows 2..5 -> (2+5)//2 = 3, cols 3..4 -> 3
    lab[7, 8] = 2
    np.testing.assert_allclose(gt_points_from_labels(lab), [[3.5, 3.5], [8.5, 7.5]])


# --------------------------------------------------------------- segmentation


def _case() -> tuple[np.ndarray, np.ndarray]:
    """GT: A (rows 0-1, cols 0-3, 8 px), B (rows 4-5, cols 0-1, 4 px), C (row 7, cols 6-7, 2 px).
    Pred: P1 covers A's left half plus 2 px outside (6 px), P2 = B exactly, P3 stray (1 px)."""
    gt = np.zeros((8, 8), int)
    gt[0:2, 0:4] = 1
    gt[4:6, 0:2] = 2
    gt[7, 6:8] = 3
    pred = np.zeros((8, 8), int)
    pred[0:3, 0:2] = 5  # 4 px in A + 2 px in row 2
    pred[4:6, 0:2] = 7
    pred[3, 7] = 9
    return gt, pred


def test_pixel_scores_hand_computed():
    gt, pred = _case()
    s = pixel_scores(gt, pred)
    # GT fg 14 px, pred fg 11 px, TP 8, FP 3, FN 6, TN 64-17=47
    assert s["acc"] == pytest.approx((8 + 47) / 64)
    assert s["F1"] == pytest.approx(16 / (16 + 3 + 6))


def test_dice_obj_hand_computed():
    gt, pred = _case()
    # GT side (weights 8/14, 4/14, 2/14): A-P1 2*4/(8+6)=4/7, B-P2 1, C none 0
    g = 8 / 14 * (4 / 7) + 4 / 14 * 1.0
    # pred side (weights 6/11, 4/11, 1/11): P1-A 4/7, P2-B 1, P3 none 0
    s = 6 / 11 * (4 / 7) + 4 / 11 * 1.0
    assert dice_obj(gt, pred) == pytest.approx((g + s) / 2)


def test_aji_kumar_hand_computed():
    gt, pred = _case()
    # A-P1: I 4, U 10; B-P2: I 4, U 4; C unmatched: U += 2; P3 unused: U += 1
    assert aji(gt, pred) == pytest.approx(8 / 17)


def test_aji_authors_quirk_hand_computed():
    gt, pred = _case()
    # as Kumar, but C is paired with prediction #1 (P1, label 5): U += 2 + 6 instead of 2
    assert aji_authors(gt, pred) == pytest.approx(8 / 23)
    assert aji_authors(gt, pred) < aji(gt, pred)


def test_perfect_and_empty_cases():
    gt, _ = _case()
    relabelled = np.where(gt > 0, gt + 10, 0)
    s = segmentation_scores(gt, relabelled)
    for k in ("acc", "F1", "dice_obj", "aji", "aji_authors"):
        assert s[k] == pytest.approx(1.0), k
    empty = np.zeros_like(gt)
    assert aji(gt, empty) == 0.0 and dice_obj(gt, empty) == 0.0
    assert aji(empty, empty) == 1.0 and dice_obj(empty, empty) == 1.0
    with pytest.raises(InputError):
        aji(gt, gt[:4])


def test_aji_prediction_may_serve_two_gt_objects():
    gt = np.zeros((4, 6), int)
    gt[:, 0:3] = 1
    gt[:, 3:6] = 2
    pred = np.ones((4, 6), int)  # one merged object
    # G1-S: I 12, U 24; G2-S: I 12, U 24 -> 24/48
    assert aji(gt, pred) == pytest.approx(0.5)
    # each GT half: Dice 2*12/(12+24) = 2/3; the merged object pairs with one half: 2/3
    assert dice_obj(gt, pred) == pytest.approx(2 / 3)
