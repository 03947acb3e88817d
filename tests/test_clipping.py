"""Cells and nuclei end at the image border, and inside a ``--within`` region where one is given.

Before the fix a cell of a nucleus at the left border reached 4 px (2 µm at 0.5 µm/px) outside
the image (on MoNuSeg: bounds (-8.0, 8.0, 35.0, 51.0) on a 1000 x 1000 image, 214 such cells
on 4 images), and QuPath logged a precision-model warning for each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import Point, Polygon, box, shape
from synth import write_geojson_project

from pointnuc.geometry import clip_polygons, expand_cells, object_area
from pointnuc.io.base import NucleusObject, WriteOptions
from pointnuc.io.geojson_project import GeoJSONFolderProject
from pointnuc.io.records import nucleus_records

W, H = 64, 48


def _border_nuclei() -> list[NucleusObject]:
    """Nuclei touching each side of a W x H image, one straddling it, one in the middle."""
    return [
        NucleusObject(box(0, 20, 6, 26), 0.9),  # at the left border
        NucleusObject(box(58, 0, 64, 5), 0.8),  # top-right corner
        NucleusObject(box(30, 44, 36, 48), 0.7),  # bottom
        NucleusObject(Point(0, 40).buffer(4), 0.6),  # half outside (a traced outline never is; a stitched one may)
        NucleusObject(box(30, 20, 36, 26), 0.5),  # inside, far from the border
    ]


def _inside(geom, area) -> bool:
    return area.buffer(1e-9).covers(geom)


@pytest.mark.parametrize("object_type", ["detection", "cell"])
def test_objects_written_to_a_folder_project_stay_in_the_image(tmp_path: Path, object_type: str) -> None:
    rng = np.random.default_rng(0)
    write_geojson_project(tmp_path, "img", rng.integers(0, 255, (H, W, 3), np.uint8), np.array([[10.5, 10.5]]),
                          pixel_size_um=0.5)
    proj = GeoJSONFolderProject(tmp_path)
    [path] = proj.write_nuclei({"img.tif": _border_nuclei()}, options=WriteOptions(object_type, cell_expansion_um=2.0))
    feats = json.loads(path.read_text(encoding="utf-8"))["features"]
    assert len(feats) == 5
    image = box(0, 0, W, H)
    for f in feats:
        geom = shape(f["geometry"])
        assert geom.geom_type == "Polygon" and geom.is_valid
        assert _inside(geom, image), geom.bounds
        if object_type == "cell":
            nucleus = shape(f["nucleusGeometry"])
            assert nucleus.is_valid and _inside(nucleus, image) and geom.covers(nucleus)
    if object_type == "cell":
        # cells still grow where there is room: the middle one by 4 px on every side, the left one rightwards
        middle, left = shape(feats[4]["geometry"]), shape(feats[0]["geometry"])
        assert middle.bounds == pytest.approx((26, 16, 40, 30), abs=0.01)
        assert left.bounds[0] == 0 and left.bounds[2] == pytest.approx(10, abs=0.01)


def test_objects_stay_inside_the_within_region(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_geojson_project(tmp_path, "img", rng.integers(0, 255, (H, W, 3), np.uint8), np.array([[10.5, 10.5]]),
                          pixel_size_um=0.5)
    proj = GeoJSONFolderProject(tmp_path)
    region = Polygon([(2, 2), (40, 2), (40, 30), (2, 46)])  # a slanted edge, not on the pixel grid
    nuclei = [NucleusObject(box(30, 20, 36, 26), 0.5), NucleusObject(box(36, 10, 44, 16), 0.5)]  # the 2nd crosses x = 40
    for object_type in ("detection", "cell"):
        [path] = proj.write_nuclei({"img.tif": nuclei}, options=WriteOptions(object_type, cell_expansion_um=3.0),
                                   replace_within={"img.tif": region})
        feats = json.loads(path.read_text(encoding="utf-8"))["features"]
        assert len(feats) == 2
        for f in feats:
            geom = shape(f["geometry"])
            assert geom.is_valid and region.buffer(0.01).covers(geom)  # 0.01: coordinates are written to 2 decimals
        assert shape(feats[1]["geometry"]).bounds[2] == pytest.approx(40, abs=0.01)


def test_nucleus_records_clip_and_keep_cells_around_their_nuclei() -> None:
    area = object_area(W, H)
    recs = nucleus_records(_border_nuclei(), options=WriteOptions("cell", cell_expansion_um=2.0), pixel_size_um=0.5,
                           clip_to=area)
    for cell, nucleus, meas in recs:
        assert cell.is_valid and nucleus.is_valid and cell.covers(nucleus) and _inside(cell, area)
        # the measurements are those of the outlines written (the half-outside nucleus: its inside half)
        assert meas["Nucleus: Area"] == pytest.approx(nucleus.area * 0.25, rel=1e-6)
        assert meas["Cell: Area"] == pytest.approx(cell.area * 0.25, rel=1e-6)
    assert recs[3][1].bounds[0] == 0 and recs[3][1].area == pytest.approx(Point(0, 40).buffer(4).area / 2, rel=0.02)
    # without clip_to nothing is cut (callers that know the image always pass it)
    free = nucleus_records(_border_nuclei(), options=WriteOptions("cell", cell_expansion_um=2.0), pixel_size_um=0.5)
    assert free[0][0].bounds[0] == pytest.approx(-4)


def test_clip_polygons_and_object_area() -> None:
    inside, across, outside = box(1, 1, 3, 3), box(-2, 1, 2, 3), box(-5, -5, -1, -1)
    out = clip_polygons([inside, across, outside], box(0, 0, 10, 10))
    assert out[0] is inside and out[1].equals(box(0, 1, 2, 3)) and out[2] is None
    # a region cutting a nucleus in two: the larger piece is kept, as one valid polygon
    two = clip_polygons([box(0, 0, 10, 2)], shapely.union(box(0, 0, 3, 5), box(5, 0, 10, 5)))[0]
    assert two.equals(box(5, 0, 10, 2))
    assert object_area(10, 8).equals(box(0, 0, 10, 8))
    assert object_area(10, 8, box(5, -5, 20, 4)).equals(box(5, 0, 10, 4))


def test_expand_cells_within() -> None:
    a, b = box(0, 0, 4, 4), box(6, 0, 10, 4)
    cells = expand_cells([a, b], 3.0, within=box(0, 0, 20, 20))
    assert [c.bounds for c in cells] == [pytest.approx((0, 0, 5, 7)), pytest.approx((5, 0, 13, 7))]
    assert cells[0].covers(a) and cells[1].covers(b)
    [one] = expand_cells([a], 1.0, within=box(0, 0, 20, 20))
    assert one.bounds == pytest.approx((0, 0, 5, 5))


def test_a_cell_is_replaced_with_its_nucleus_inside_the_region(tmp_path: Path) -> None:
    """`--objects cell` then `--within R`: a cell whose nucleus lies in R but whose outline's centroid does
    not was kept beside the new object for the same nucleus (ownership went by the cell's centroid)."""
    rng = np.random.default_rng(0)
    write_geojson_project(tmp_path, "img", rng.integers(0, 255, (H, W, 3), np.uint8), np.array([[10.5, 10.5]]),
                          pixel_size_um=0.5)
    proj = GeoJSONFolderProject(tmp_path)
    nuclei = [NucleusObject(box(10, 40, 13, 46), 0.9), NucleusObject(box(16, 40, 21, 46), 0.8)]
    [path] = proj.write_nuclei({"img.tif": nuclei}, options=WriteOptions("cell", cell_expansion_um=2.0))
    cells = json.loads(path.read_text(encoding="utf-8"))["features"]
    region = box(0, 0, 19.5, H)  # holds both nuclei's centroids; the second cell's centroid lies beyond it
    assert all(region.covers(shape(f["nucleusGeometry"]).centroid) for f in cells)
    assert not region.covers(shape(cells[1]["geometry"]).centroid)
    proj.write_nuclei({"img.tif": nuclei}, options=WriteOptions("detection"), replace_within={"img.tif": region})
    feats = json.loads(path.read_text(encoding="utf-8"))["features"]
    assert [f["properties"]["objectType"] for f in feats] == ["detection", "detection"]  # each nucleus once
