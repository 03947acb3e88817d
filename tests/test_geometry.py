"""Label image -> polygon tracing and nucleus measurements."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import shapely
from helpers import mask_to_polygon, nucleus_measurements
from shapely.geometry import Polygon, box

from pointnuc.geometry import expand_cells, labels_to_polygons, trace_mask, valid_polygon


def test_single_pixel_is_unit_square_on_corners():
    m = np.zeros((4, 5), bool)
    m[1, 2] = True
    ring = trace_mask(m)
    assert Polygon(ring).equals(box(2, 1, 3, 2))
    assert ring[0].tolist() == [2, 1] and ring[-1].tolist() == [2, 1]
    assert len(ring) == 5  # 4 corners + closing vertex, no collinear ones


def test_l_shape_hand_computed():
    lab = np.zeros((5, 5), int)
    lab[1:4, 1] = 7  # column x=1, rows 1..3
    lab[3, 2:4] = 7  # foot along row 3
    polys = labels_to_polygons(lab)
    assert list(polys) == [7]
    p = polys[7]
    assert p.area == 5 and p.is_valid
    expected = Polygon([(1, 1), (1, 4), (4, 4), (4, 3), (2, 3), (2, 1)])
    assert p.equals(expected)
    assert len(p.exterior.coords) == 7  # 6 corners


def test_area_equals_pixel_count_random_blobs():
    rng = np.random.default_rng(3)
    lab = np.zeros((60, 60), int)
    for i in range(1, 15):
        cy, cx = rng.integers(6, 54, 2)
        rr, cc = np.ogrid[:60, :60]
        lab[((rr - cy) ** 2 + (cc - cx) ** 2) < rng.integers(4, 30)] = i
    polys = labels_to_polygons(lab)
    for k, p in polys.items():
        assert p.is_valid
        assert p.area == (lab == k).sum() or p.area >= (lab == k).sum()  # >: a smaller piece was dropped/hole filled


def test_holes_filled_and_largest_piece_kept_and_diagonal_pinch_valid():
    lab = np.zeros((10, 12), int)
    lab[1:6, 1:6] = 1
    lab[3, 3] = 0  # a hole -> filled
    lab[8, 8] = 1  # a separate 1-pixel piece -> dropped
    lab[1, 8] = 2
    lab[2, 9] = 2  # two pixels touching only diagonally -> one kept
    polys = labels_to_polygons(lab)
    assert polys[1].area == 25 and len(polys[1].interiors) == 0
    assert polys[2].area == 1 and polys[2].is_valid
    # a loop of pixels closed only through a diagonal touch ((2,3)-(3,2)): the enclosed pixel
    # (2,2) counts as a hole and is filled, so the outline is one simple ring
    ring = np.zeros((6, 6), bool)
    ring[1, 1:4] = ring[1:4, 1] = ring[3, 1:3] = ring[2, 3] = True
    p = mask_to_polygon(ring)
    assert p.is_valid and p.area == ring.sum() + 1


def test_offset_and_scale():
    lab = np.zeros((4, 4), int)
    lab[1, 1] = 3
    p = labels_to_polygons(lab, offset_xy=(100, 200), scale=2.0)[3]
    assert p.equals(box(102, 202, 104, 204))


def test_matches_qupath_contour_tracing_exactly(shared):
    """Vertices equal QuPath 0.6's ContourTracing output for the fixture's detections."""
    from PIL import Image

    fx = shared / "fixtures" / "qupath-0.6.0" / "detections"
    labels = np.array(Image.open(shared / "data/monuseg/train/TCGA-A7-A13E-01Z-00-DX1_label.png"))
    expected = json.loads((fx / "expected.json").read_text(encoding="utf-8"))["objects"]
    feats = json.loads((fx / "detections.featurecollection.geojson").read_text(encoding="utf-8"))["features"]
    polys = labels_to_polygons(labels)
    for exp, feat in zip(expected, feats):
        lab = exp["source_label_id"]
        qupath = feat.get("nucleusGeometry") or feat["geometry"]
        ours = polys[lab]
        assert ours.area == exp["nucleus_area_px"]
        assert [list(map(float, c)) for c in qupath["coordinates"][0]] == [list(c) for c in ours.exterior.coords]


def test_speed_thousands_per_second():
    rng = np.random.default_rng(0)
    lab = np.zeros((1000, 1000), np.int32)
    k = 0
    for cy in range(12, 1000, 25):
        for cx in range(12, 1000, 25):
            k += 1
            r = rng.integers(5, 11)
            lab[cy - r : cy + r, cx - r : cx + r] = k
    t = time.perf_counter()
    polys = labels_to_polygons(lab)
    dt = time.perf_counter() - t
    assert len(polys) == k == 1600
    # ~2,500/s on one idle core; the bound leaves room for a loaded 2-core CI machine
    assert len(polys) / dt > 300, f"{len(polys) / dt:.0f} polygons/s"


def test_measurements_hand_computed():
    sq = box(0, 0, 4, 4)
    m = nucleus_measurements(sq, 0.5)
    assert m["Nucleus: Area"] == pytest.approx(4.0)  # 16 px² * 0.25, in µm² (QuPath names no unit)
    assert m["Nucleus: Perimeter"] == pytest.approx(8.0)
    assert m["Nucleus: Circularity"] == pytest.approx(4 * math.pi * 16 / 256)
    assert m["Nucleus: Max caliper"] == pytest.approx(math.sqrt(2) * 2)  # the diagonal, 4√2 px
    assert m["Nucleus: Min caliper"] == pytest.approx(2.0)
    assert m["Nucleus: Eccentricity"] == pytest.approx(0.0, abs=1e-7)
    mp = nucleus_measurements(sq, None)  # without a pixel size: the same names, in px
    assert mp["Nucleus: Area"] == 16 and mp["Nucleus: Perimeter"] == 16


def test_valid_polygon_fixes_bowtie_and_picks_largest():
    bowtie = Polygon([(0, 0), (4, 4), (4, 0), (0, 4)])
    assert not bowtie.is_valid
    p = valid_polygon(bowtie)
    assert p is not None and p.is_valid and p.area == pytest.approx(4.0)
    assert valid_polygon(Polygon()) is None


def test_expand_cells_contain_nuclei_and_do_not_overlap():
    a, b = box(0, 0, 4, 4), box(6, 0, 10, 4)
    cells = expand_cells([a, b], 3.0)
    assert all(c.is_valid for c in cells)
    assert cells[0].covers(a) and cells[1].covers(b)
    assert cells[0].intersection(cells[1]).area == pytest.approx(0.0, abs=1e-6)
    assert cells[0].bounds[0] == pytest.approx(-3.0)  # grown away from the neighbour
    assert cells[0].bounds[2] == pytest.approx(5.0)  # stopped half way to the neighbour
    one = expand_cells([a], 1.0)[0]
    assert one.area == pytest.approx(a.buffer(1.0, quad_segs=4).area)


def test_polygon_pixels_by_centres_with_holes_origin_and_scale():
    from pointnuc.geometry import polygon_pixels

    ring = box(1, 2, 4, 5)  # pixels rows 2..4, cols 1..3
    mask = np.zeros((6, 6), bool)
    mask[polygon_pixels(ring, (6, 6))] = True
    assert np.argwhere(mask).tolist() == [[r, c] for r in range(2, 5) for c in range(1, 4)]
    holed = ring.difference(box(2, 3, 3, 4))  # without the middle pixel
    mask[:] = False
    mask[polygon_pixels(holed, (6, 6))] = True
    assert mask.sum() == 8 and not mask[3, 2]
    # array pixel (r, c) centred at full-res (100 + 4 (c + 0.5), 50 + 4 (r + 0.5)): box x in [104, 108) holds c = 1 only
    rr, cc = polygon_pixels(box(104, 50, 108, 54), (3, 3), origin_xy=(100, 50), scale=4.0)
    assert rr.tolist() == [0] and cc.tolist() == [1]


@pytest.mark.parametrize("seed", [0, 1])
def test_all_outlines_at_once_equal_one_by_one(seed: int) -> None:
    """labels_to_polygons (all rings traced together) = the per-instance tracer, vertex for vertex,
    on touching instances, holes, several pieces, diagonal pinches; measurements_many = nucleus_measurements."""
    from helpers import labels_to_polygons_each as _labels_to_polygons_each

    from pointnuc.measurements import measurements_many

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:200, :240]
    lab = np.zeros((200, 240), np.int64)
    for i in range(1, 80):
        cy, cx, ry, rx = rng.uniform(0, 200), rng.uniform(0, 240), rng.uniform(2, 10), rng.uniform(2, 10)
        lab[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = i  # later ones overlap (touch) earlier ones
    lab[150:200, 0:50] = rng.integers(80, 84, (50, 50)) * (rng.random((50, 50)) < 0.6)  # pieces, holes, pinches
    lab[0, 0] = 90  # a single pixel in a corner
    for kw in ({}, {"simplify_px": 0.75, "scale": 2.0, "offset_xy": (100.0, 50.0)}, {"scale": 0.5}):
        a, b = labels_to_polygons(lab, **kw), _labels_to_polygons_each(lab, **kw)
        assert list(a) == list(b) and len(a) > 60
        if "simplify_px" not in kw:
            for k in a:
                assert np.array_equal(shapely.get_coordinates(a[k]), shapely.get_coordinates(b[k])), k
            continue
        # simplified: plain Douglas-Peucker instead of the topology-preserving variant. Valid, same
        # direction, within the tolerance of the staircase; the same outline for nearly all (a
        # ring may start at another vertex; a speckle's may lose one more vertex)
        exact = labels_to_polygons(lab, scale=kw["scale"], offset_xy=kw["offset_xy"])
        same = 0
        for k in a:
            assert a[k].is_valid and a[k].exterior.is_ccw == b[k].exterior.is_ccw
            assert shapely.hausdorff_distance(a[k], exact[k]) <= kw["simplify_px"] * kw["scale"] + 1e-9
            same += shapely.equals_exact(shapely.normalize(a[k]), shapely.normalize(b[k]), 0)
        assert same >= 0.9 * len(a)
    polys = np.array(list(a.values()), dtype=object)
    for px in (0.25, None):
        assert measurements_many(polys, px) == [nucleus_measurements(p, px) for p in polys]
