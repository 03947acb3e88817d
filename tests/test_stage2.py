"""Stage 2 end to end on a tiny synthetic image, and the points-only selection score."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from synth import label_points, render_nuclei

from pointnuc.config import profile_config
from pointnuc.metrics import pixel_scores
from pointnuc.models.bundle import ModelLayout
from pointnuc.train.samples import TrainingImage
from pointnuc.train.segment import merge_points, segment_image, train_segmenter
from pointnuc.train.selection import holdout_counts, points_score


def test_holdout_counts_by_hand():
    lab = np.zeros((20, 30), np.int32)
    lab[0:10, 0:10] = 1  # holds held-back point A only: good
    lab[0:10, 12:30] = 2  # holds held-back point B and a known point: merge
    lab[12:20, 0:8] = 3  # no point at all: empty
    hold = np.array([[5.5, 5.5], [15.5, 5.5], [25.5, 15.5]])  # A, B, C (C in background: miss)
    known = np.array([[6.0, 6.0], [25.5, 5.5]])  # the first is A's own detection (dropped), the second B's neighbour
    c = holdout_counts(lab, hold, known, same_radius=2.0)
    assert c == {"good": 1, "n": 3, "instances": 3, "empty": 1}
    assert points_score([c]) == pytest.approx(1 / 3 - 0.5 * 1 / 3)
    # two held-back points in one instance: a merge, neither is well segmented
    c = holdout_counts(lab, np.array([[13.5, 2.5], [28.5, 8.5]]), np.zeros((0, 2)), same_radius=2.0)
    assert c["good"] == 0 and c["n"] == 2


def test_merge_points_keeps_user_points_and_far_detections():
    user = np.array([[10.0, 10.0]])
    det = np.array([[12.0, 10.0], [40.0, 10.0]])
    np.testing.assert_allclose(merge_points(det, user, 5.0), [[10.0, 10.0], [40.0, 10.0]])


def test_refined_targets_by_hand():
    from pointnuc.train.data import IGNORE
    from pointnuc.train.segment import refined_targets

    t = np.zeros((5, 1, 4), np.float32)
    t[0] = [[1, IGNORE, 0, IGNORE]]  # Voronoi channel: kept as it is
    t[1] = [[1, 1, 0, IGNORE]]  # cluster channel: replaced
    t[2:] = 0.5
    out = refined_targets(t, np.array([[0.9, 0.5, 0.1, 0.85]], np.float32), 0.2, 0.8)
    np.testing.assert_array_equal(out[1], [[1, IGNORE, 0, 1]])
    np.testing.assert_array_equal(out[0], t[0])
    np.testing.assert_array_equal(out[2:], t[2:])
    assert t[1, 0, 3] == IGNORE  # the input is not modified


def test_train_segmenter_self_training_round(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    img, gt = render_nuclei((96, 96), 8, 7.0, seed=4)
    pts = label_points(gt)
    sample = TrainingImage("s", "s", img, pts[:2], pts[5:], np.ones(gt.shape, bool))
    cfg = profile_config("tiny", **{"segmentation.epochs": 3, "segmentation.refine_epochs": 2, "segmentation.crf_epochs": 0,
                                    "segmentation.lr": 3e-3, "data.patches_per_image": 4})
    res = train_segmenter([sample], {"s": pts[:5]}, cfg, ModelLayout(tmp_path / "m"), device="cpu", progress=False)
    assert set(res.history) == {"segmentation", "refine"} and len(res.history["refine"].losses) == 2
    b0, b1 = res.history["segmentation"].best_score, res.history["refine"].best_score
    assert res.metrics["refine_kept"] == (b1 >= b0)


def test_transfer_weights_carries_all_but_the_last_layer():
    from pointnuc.models.net import build_network, transfer_weights

    torch.manual_seed(0)
    det = build_network(1, "tiny", pretrained=False)
    seg = build_network(2, "tiny", pretrained=False)
    fresh = transfer_weights(seg, det.state_dict())
    assert fresh == ["head.2.bias", "head.2.weight"]
    d, s = det.state_dict(), seg.state_dict()
    assert all(torch.equal(d[k], s[k]) for k in s if k not in fresh)
    assert not s["head.2.weight"].any() and not s["head.2.bias"].any()


def test_train_segmenter_starts_from_the_detector(tmp_path):
    from pointnuc.models.net import build_network

    torch.manual_seed(1)
    torch.set_num_threads(1)
    img, gt = render_nuclei((64, 64), 4, 7.0, seed=2)
    pts = label_points(gt)
    sample = TrainingImage("s", "s", img, pts[:2], np.zeros((0, 2)), np.ones(gt.shape, bool))
    det = build_network(1, "tiny", pretrained=False).state_dict()
    key = "stages.0.0.weight"
    for init in (True, False):
        cfg = profile_config("tiny", **{"segmentation.epochs": 1, "segmentation.crf_epochs": 0, "segmentation.lr": 1e-9,
                                        "segmentation.init_from_detector": init, "data.patches_per_image": 2})
        res = train_segmenter([sample], {"s": pts}, cfg, ModelLayout(tmp_path / f"m{init}"), device="cpu", progress=False,
                              detector_state=det)
        w = res.model.state_dict()[key].cpu()
        assert torch.allclose(w, det[key], atol=1e-6) == init  # a step of lr 1e-9 leaves the detector's weights in place


def test_train_segmenter_on_synthetic_discs(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    img, gt = render_nuclei((128, 128), 14, 7.0, seed=3)
    pts = label_points(gt)
    rng = np.random.default_rng(0)
    hold = rng.choice(len(pts), 3, replace=False)
    train = np.setdiff1d(np.arange(len(pts)), hold)
    sample = TrainingImage("s", "s", img, pts[train[:3]], pts[hold], np.ones(gt.shape, bool))
    cfg = profile_config(
        "tiny", **{"segmentation.epochs": 12, "segmentation.lr": 3e-3, "segmentation.crf_epochs": 1,
                   "segmentation.crf_lr": 1e-4, "data.patches_per_image": 8}
    )
    t0 = time.perf_counter()
    # stage-1 "detections": every nucleus, as a perfect detector would give
    res = train_segmenter([sample], {"s": pts}, cfg, ModelLayout(tmp_path / "m"), device="cpu", progress=False)
    assert time.perf_counter() - t0 < 60
    assert (tmp_path / "m" / "segmenter.pt").is_file()
    assert set(res.history) == {"segmentation", "crf"}
    assert res.thresholds.prob == 0.5 and res.metrics["threshold_rule"] == "fixed 0.5"  # points-only: the softmax cut
    assert set(res.metrics["threshold_table"]) == {"0.3", "0.4", "0.5", "0.6", "0.7"}
    lab = segment_image(res.model, img, res.thresholds)
    f1 = pixel_scores(gt, lab)["F1"]
    print(f"synthetic stage 2: pixel F1 {f1:.3f}, threshold {res.thresholds.prob}")
    assert f1 > 0.6, f1
    assert np.isfinite(res.metrics["selection_score"])

    # the training report: loss curves and a review figure with outlines, points and a legend
    from PIL import Image

    from pointnuc.report import FOUND, MISSED, OUTLINE, write_report

    report = write_report(ModelLayout(tmp_path / "m"), [sample], None, res)
    names = {f.name for f in report.files}
    assert "losses.png" in names and "metrics.json" in names
    ov = np.asarray(Image.open(next(f for f in report.files if f.name.startswith("review_"))))
    assert ov.shape[0] == 128 + 22 + 24 and ov.shape[1] >= 128  # the sample at its own resolution, title and legend
    assert ((ov == OUTLINE).all(-1)).sum() > 100  # outlines
    held = report.held_back
    assert held.total == len(sample.holdout) > 0 and 0 <= held.found <= held.total
    rings = ((ov[22:150] == FOUND).all(-1)).sum() + ((ov[22:150] == MISSED).all(-1)).sum()
    assert rings > 0  # held-back points, marked found or missed


def test_report_marks_held_back_points_as_holdout_counts_counts():
    """The review figure's found/missed marks and the end-of-train line use one rule (holdout_counts)."""
    from pointnuc.report import HeldBackCheck
    from pointnuc.train.selection import holdout_found

    lab = np.zeros((20, 30), np.int32)
    lab[0:10, 0:10] = 1
    lab[0:10, 12:30] = 2
    lab[12:20, 0:8] = 3
    hold = np.array([[5.5, 5.5], [15.5, 5.5], [25.5, 15.5]])  # alone in 1: found; with a trained point in 2; background
    train = np.array([[25.5, 5.5]])
    found = holdout_found(lab, hold, train, same_radius=0.0)
    c = holdout_counts(lab, hold, train, same_radius=0.0)
    assert found.tolist() == [True, False, False] and c["good"] == found.sum() == 1 and c["empty"] == 1
    check = HeldBackCheck()
    check.add("a", c["good"], c["n"], c["empty"], c["instances"])
    assert check.line().startswith("Held-back points: the model outlines 1 of 3 (33 %)") and "1 more nuclei" in check.line()
