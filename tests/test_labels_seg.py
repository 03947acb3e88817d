"""Voronoi and cluster labels (stage 2) on small hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from pointnuc.config import SegmentationConfig
from pointnuc.labels.cluster import cluster_label, disk, labels_for_image
from pointnuc.labels.voronoi import BACKGROUND, IGNORE, NUCLEUS, nearest_point_map, voronoi_label


def xy(rc: list[tuple[int, int]]) -> np.ndarray:
    """Pixel (row, col) -> QuPath x/y of the pixel centre."""
    return np.array([(c + 0.5, r + 0.5) for r, c in rc], float)


def test_disk_sizes():
    assert disk(0).sum() == 1
    assert disk(1).sum() == 5
    assert disk(2).sum() == 13


def test_no_points_all_ignored_and_one_point_has_no_edges():
    lab = voronoi_label(np.zeros((0, 2)), (9, 9))
    assert (lab == IGNORE).all()
    lab = voronoi_label(xy([(4, 4)]), (9, 9), dilation_px=2)
    assert not (lab == BACKGROUND).any()
    assert (lab == NUCLEUS).sum() == 13
    assert lab[4, 4] == NUCLEUS and lab[4, 6] == NUCLEUS and lab[4, 7] == IGNORE


def test_two_points_edge_is_the_bisector():
    lab = voronoi_label(xy([(5, 5), (5, 15)]), (11, 21), dilation_px=2)
    bg_cols = np.unique(np.nonzero(lab == BACKGROUND)[1])
    # the bisector lies at column 10 (equidistant); the two-pixel edge is columns 9-10 or 10-11
    assert len(bg_cols) == 2 and 10 in bg_cols
    assert ((lab == BACKGROUND).sum(axis=0)[bg_cols] == 11).all()  # every row, border to border
    assert (lab == NUCLEUS).sum() == 26


def test_point_at_the_border():
    lab = voronoi_label(xy([(0, 0), (0, 9)]), (6, 10), dilation_px=2)
    nuc = np.argwhere(lab == NUCLEUS)
    # quarter disk of radius 2 at the corner: (0,0) (0,1) (0,2) (1,0) (1,1) (2,0)
    corner = {tuple(p) for p in nuc if p[1] < 5}
    assert corner == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)}
    assert (lab == BACKGROUND).any()


def test_points_outside_are_dropped_and_duplicates_merge():
    ids, dist = nearest_point_map(np.array([[2.2, 2.7], [2.9, 2.1], [50.0, 1.0], [-1.0, 3.0]]), (5, 5))
    assert ids.max() == 0  # one unique pixel (row 2, col 2) remains
    assert dist[2, 2] == 0


@pytest.mark.parametrize("pts", [[(5, 5), (5, 20), (20, 12)], [(r, c) for r in (4, 14, 24) for c in (4, 14, 24)]])
def test_cells_are_separated_by_edges(pts):
    lab = voronoi_label(xy(pts), (29, 29), dilation_px=2)
    cells, n = ndi.label(lab != BACKGROUND)  # 4-connectivity
    assert n == len(pts)
    assert sorted(cells[r, c] for r, c in pts) == list(range(1, n + 1))


def _discs(shape, centres, radius, rng):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    truth = np.zeros(shape, bool)
    for r, c in centres:
        truth |= (yy - r) ** 2 + (xx - c) ** 2 <= radius**2
    img = np.where(truth[..., None], [70, 40, 110], [225, 200, 215]).astype(float)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), truth


def test_cluster_label_finds_discs_and_keeps_close_nuclei_apart():
    rng = np.random.default_rng(0)
    # two discs of radius 8 with a 3-pixel gap between them (columns 29-31), and two lone discs
    centres = [(20, 20), (20, 40), (60, 25), (55, 65)]
    img, truth = _discs((80, 80), centres, 8, rng)
    lab = cluster_label(img, xy(centres), dist_clip_px=20, min_size_px=30, dilate_px=5, erode_px=7,
                        bg_select_px=5, bg_exclusion_px=10)
    nuc, bg = lab == NUCLEUS, lab == BACKGROUND
    assert (nuc & truth).sum() / nuc.sum() > 0.95  # precision
    # recall: the clean-up trims erode - dilate = 2 px, (6/8)^2 = 0.56 of a radius-8 disc; the trimmed
    # rim is ignored, not background
    assert (nuc & truth).sum() / truth.sum() > 0.5
    assert not (bg & truth).any()
    assert bg.sum() > 0.3 * (~truth).sum()
    # the gap between the two close discs is not closed into one nucleus
    assert not nuc[20, 29:32].any()
    _, n = ndi.label(nuc)
    assert n == 4


def test_labels_follow_pixel_size():
    rng = np.random.default_rng(1)
    centres = [(20, 20), (20, 48), (50, 30)]
    img, truth = _discs((70, 70), centres, 8, rng)
    cfg = SegmentationConfig()
    vor, clu = labels_for_image(img, xy(centres), cfg, pixel_size_um=0.25)
    assert (vor == NUCLEUS).sum() == 3 * 13  # 0.5 µm at 0.25 µm/px = radius 2
    vor2, _ = labels_for_image(img, xy(centres), cfg, pixel_size_um=0.5)
    assert (vor2 == NUCLEUS).sum() == 3 * 5  # radius 1 px
    assert ((clu == NUCLEUS) & truth).sum() > 0.5 * truth.sum()
