"""Outlines without staircases, and no fragments (issue #27).

Sub-pixel outlines (:func:`pointnuc.contours.contour_polygons`, pointnuc's default) against the pixel
staircase they replace (``outline="pixels"``), on synthetic discs whose true boundary is known: a model
working at 0.5 µm/px on 0.25 µm/px images (2 full-res px per working px), the nucleus probability a
smooth step across each disc's circle, as a trained network's is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from click.testing import CliRunner
from scipy import ndimage as ndi
from synth import write_tiff
from test_segment_guards import _stand_in_model

from pointnuc.cli import main
from pointnuc.contours import contour_polygons
from pointnuc.infer.instances import instances_from_probability
from pointnuc.infer.polygons import InstanceParams, TileContext, tile_nuclei
from pointnuc.infer.tiling import make_grid

DS = 2.0  # full-res px per working px (0.25 µm/px images, a 0.5 µm/px model)
PX = 0.25


def _discs(size: int = 250, seed: int = 0) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """A working-res probability map of separate discs (radius 3-7 working px), and the discs as full-res
    (x, y, r): 1 / (1 + exp(-(r - d) / 0.7)) at each pixel centre, d its distance from the centre."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] + 0.5
    prob = np.zeros((size, size), np.float32)
    truth = []
    for cy in range(14, size - 10, 24):
        for cx in range(14, size - 10, 24):
            y, x, r = cy + rng.uniform(-3, 3), cx + rng.uniform(-3, 3), rng.uniform(3, 7)
            prob = np.maximum(prob, 1 / (1 + np.exp(np.clip(-(r - np.hypot(yy - y, xx - x)) / 0.7, -50, 50))))
            truth.append((x * DS, y * DS, r * DS))
    return prob, truth


def _nuclei(prob: np.ndarray, outline: str, ds: float = DS, **kw: float) -> list[shapely.Polygon]:
    g = make_grid(prob.shape[0], prob.shape[1], tile_size=256, halo=0)
    assert len(g.tiles) == 1
    ctx = TileContext((0, 0), ds, PX, InstanceParams(threshold=0.5, min_area_px=5), outline=outline, **kw)
    pad = np.zeros((256, 256), np.float32)
    pad[: prob.shape[0], : prob.shape[1]] = prob
    found, _ = tile_nuclei(pad, g.tiles[0], ctx)
    return [n.polygon for n in found]


def _shape_errors(polys: list[shapely.Polygon], truth: list[tuple[float, float, float]]) -> dict[str, float]:
    """Means over discs: distance of the outline (sampled every 0.2 px) from the true circle (full-res px),
    perimeter excess over 2πr, total absolute turning over 2π (1 for a convex outline), and the share of
    vertices on the working grid (both coordinates even)."""
    centres = np.array([(x, y) for x, y, _ in truth])
    dist, excess, turning, on_grid = [], [], [], []
    for p in polys:
        c = np.array(p.centroid.coords[0])
        x, y, r = truth[int(np.argmin(np.hypot(*(centres - c).T)))]
        xy = np.asarray(shapely.segmentize(p, 0.2).exterior.coords)
        dist.append(np.abs(np.hypot(xy[:, 0] - x, xy[:, 1] - y) - r).mean())
        excess.append(p.length / (2 * np.pi * r) - 1)
        v = np.asarray(p.exterior.coords)[:-1]
        d = np.diff(np.vstack((v, v[:1])), axis=0)
        ang = np.arctan2(d[:, 1], d[:, 0])
        turning.append(np.abs((np.diff(np.r_[ang, ang[0]]) + np.pi) % (2 * np.pi) - np.pi).sum() / (2 * np.pi))
        on_grid.append(np.mean(np.all(np.isclose(v % DS, 0) | np.isclose(v % DS, DS), axis=1)))
    return {"dist": float(np.mean(dist)), "excess": float(np.mean(excess)), "turning": float(np.mean(turning)),
            "on_grid": float(np.mean(on_grid))}


def test_outlines_follow_the_true_disc_not_the_working_grid() -> None:
    prob, truth = _discs()
    old, new = _nuclei(prob, "pixels"), _nuclei(prob, "subpixel")
    assert len(old) == len(new) == len(truth) == 100
    e_old, e_new = _shape_errors(old, truth), _shape_errors(new, truth)
    # the staircase: every vertex on the 2-px grid, half a full-res px from the circle on average
    assert e_old["on_grid"] == 1.0 and e_old["dist"] > 0.4
    # sub-pixel: vertices between grid points, 10x closer to the circle, no staircase in length or turns
    assert e_new["on_grid"] < 0.1
    assert e_new["dist"] < 0.1 * e_old["dist"] and e_new["dist"] < 0.08
    assert abs(e_new["excess"]) < 0.02 < abs(e_old["excess"])
    assert e_new["turning"] < 1.01 < e_old["turning"]
    assert all(p.is_valid and isinstance(p, shapely.Polygon) for p in new)
    # the same nuclei: each new outline covers its staircase's area within a few %
    a_old = sorted(p.area for p in old)
    a_new = sorted(p.area for p in new)
    assert np.allclose(a_new, a_old, rtol=0.15)


def test_auto_outlines_are_subpixel_only_where_the_model_works_coarser_than_the_image() -> None:
    """The default: sub-pixel where a working pixel spans several image pixels (the staircase would show),
    the pixel outline where the model works at the image's own resolution (as close to the truth on MO, cheaper)."""
    prob, _ = _discs(120)

    def same(a: list[shapely.Polygon], b: list[shapely.Polygon]) -> bool:
        return len(a) == len(b) and all(x.equals_exact(y, 1e-9) for x, y in zip(a, b))

    for ds, expected, other in ((DS, "subpixel", "pixels"), (1.0, "pixels", "subpixel")):
        auto = _nuclei(prob, "auto", ds=ds)
        assert auto and same(auto, _nuclei(prob, expected, ds=ds)) and not same(auto, _nuclei(prob, other, ds=ds))


def test_touching_nuclei_do_not_overlap_and_outlines_stay_in_the_image() -> None:
    """Overlapping discs split by the watershed share a boundary without overlapping; discs cut by the
    image's edge end on it."""
    size = 120
    yy, xx = np.mgrid[:size, :size] + 0.5
    discs = [(30, 30, 9), (30, 47, 9), (46, 38, 8), (80, 80, 10), (94, 90, 9), (3, 100, 7), (60, size - 2, 6)]
    prob = np.zeros((size, size), np.float32)
    for y, x, r in discs:
        prob = np.maximum(prob, 1 / (1 + np.exp(np.clip(-(r - np.hypot(yy - y, xx - x)) / 0.7, -50, 50))))
    lab = instances_from_probability(prob, threshold=0.5, min_area_px=5, method="watershed", h_px=1.0)
    assert lab.max() == len(discs)  # the touching discs were split
    polys = list(contour_polygons(lab, prob, 0.5, scale=DS, simplify_px=0.02).values())
    assert len(polys) == len(discs) and all(p.is_valid for p in polys)
    touching = 0
    for i in range(len(polys)):
        for j in range(i + 1, len(polys)):
            if polys[i].distance(polys[j]) < 0.5:
                touching += 1
                # the overlap is at most a sliver of the simplification tolerance along the shared boundary
                assert polys[i].intersection(polys[j]).area < 0.02 * polys[i].intersection(polys[j]).length + 1e-9
                assert polys[i].intersection(polys[j]).area < 0.5
    assert touching >= 3
    lo, hi = shapely.total_bounds(np.array(polys, dtype=object)).reshape(2, 2)
    assert lo.min() >= 0 and hi.max() <= size * DS
    assert lo[1] == 0 and hi[0] == size * DS  # the cut discs end on the edge itself


def test_outlines_keep_the_instance_whole() -> None:
    """A ring-shaped probability (a hole inside, below the threshold but filled in the label) gives one
    shell without holes; a diagonal-only join (8-connected label) stays one outline."""
    prob = np.zeros((20, 20), np.float32)
    prob[4:14, 4:14] = 0.9
    prob[8:10, 8:10] = 0.2  # filled as a small hole by instances_from_probability
    prob[14, 14] = prob[15, 15] = 0.9  # joined only diagonally
    lab = instances_from_probability(prob, threshold=0.5, min_area_px=5)
    assert lab.max() == 1
    p = contour_polygons(lab, prob, 0.5)[1]
    assert not p.interiors and p.is_valid
    assert p.contains(shapely.Point(9, 9)) and p.contains(shapely.Point(15.5, 15.5))


def test_no_nucleus_under_the_minimum_area_is_kept() -> None:
    prob, _ = _discs()
    kw = {"min_area_um2": 0.0}
    areas = np.array([p.area for p in _nuclei(prob, "subpixel", **kw)]) * PX * PX
    kept = np.array([p.area for p in _nuclei(prob, "subpixel", min_area_um2=10.0)]) * PX * PX
    assert (areas < 10).sum() >= 10  # discs of radius 3 to 3.6 working px (7 to 10 µm²)
    assert len(kept) == (areas >= 10).sum() and kept.min() >= 10


@pytest.mark.parametrize("minimum", [None, 12.0])
def test_segment_writes_nothing_under_min_area(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               minimum: float | None) -> None:
    """`pointnuc segment` (default 5 µm², or --min-area) writes no smaller object, also where the image's
    edge cuts one; a changed --min-area recomputes the kept result."""
    from pointnuc.io.geojson import read_features

    model = _stand_in_model(tmp_path / "model", monkeypatch)
    proj = tmp_path / "p"
    proj.mkdir()
    size = 400
    img = np.full((size, size, 3), 235, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    rng = np.random.default_rng(1)
    # dark blobs from 1 to 40 µm² (radius 2.3 to 14 full-res px), some cut by the image's edge
    centres = [(y, x) for y in range(20, size, 45) for x in range(20, size, 45)] + [(1, 150), (200, size - 2)]
    for y, x in centres:
        img[np.hypot(yy - y, xx - x) <= rng.uniform(2.3, 14)] = (60, 40, 110)
    img = ndi.gaussian_filter(img.astype(float), (1, 1, 0)).astype(np.uint8)
    write_tiff(proj / "blobs.tif", img, PX)
    args = ["segment", str(proj), "--model", str(model), "--no-progress"]
    res = CliRunner().invoke(main, args + ([] if minimum is None else ["--min-area", str(minimum)]))
    assert res.exit_code == 0, res.output
    areas = np.array([shapely.geometry.shape(f["geometry"]).area
                      for f in read_features(proj / "pointnuc-geojson" / "blobs.geojson")]) * PX * PX
    assert len(areas) > 20 and areas.min() >= (5.0 if minimum is None else minimum)
    res = CliRunner().invoke(main, args + ["--min-area", "0"])
    assert res.exit_code == 0 and "--min-area changed" in res.output, res.output
    every = np.array([shapely.geometry.shape(f["geometry"]).area
                      for f in read_features(proj / "pointnuc-geojson" / "blobs.geojson")]) * PX * PX
    assert len(every) > len(areas) and every.min() < 5.0
