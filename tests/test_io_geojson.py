"""QuPath GeoJSON: reading all three layouts, writing QuPath 0.6.0's exact text."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from pointnuc.errors import InputError, TrainingError
from pointnuc.io.base import ImageRef, NucleusObject, WriteOptions
from pointnuc.io.geojson import (
    dumps_features,
    feature_text,
    nuclei_features,
    read_features,
    read_nuclei,
    read_objects,
    write_nuclei_file,
)
from pointnuc.io.objects import require_points, summarise
from pointnuc.io.records import float32, inside


def _fx(shared: Path) -> Path:
    return shared / "fixtures" / "qupath-0.6.0"


def _ref(name: str = "img.tif", w: int = 1000, h: int = 1000) -> ImageRef:
    return ImageRef(name=name, path=Path(name), width=w, height=h, pixel_size_um=0.25)


@pytest.mark.parametrize("form", ["default", "feature_collection"])
def test_points_regions_match_expected_json(shared: Path, form: str):
    fx = _fx(shared)
    expected = json.loads((fx / "expected.json").read_text(encoding="utf-8"))
    for im in expected["images"]:
        objects = read_objects(fx / im["geojson"][form])
        assert len(objects) == im["geojson"]["n_objects"]
        ann = summarise(objects, _ref(im["image_name"], im["width"], im["height"]))
        assert len(ann.points_xy) == im["n_nucleus_points"]
        assert ann.points_xy.dtype == np.float64 and ann.points_xy.shape == (im["n_nucleus_points"], 2)
        # QuPath does not keep point order: compare sets
        assert sorted(map(tuple, ann.points_xy.tolist())) == sorted(map(tuple, im["nucleus_points_xy"]))
        # each point is the centre of its listed pixel
        rc = {tuple(p) for p in im["nucleus_points_pixel_rc"]}
        assert {(int(np.floor(y)), int(np.floor(x))) for x, y in ann.points_xy} == rc
        regions = [o for o in im["other_annotations"] if o["roi"] == "RectangleROI"]
        assert len(ann.regions) == len(regions)
        for geom, reg in zip(ann.regions, regions):
            assert list(geom.bounds) == reg["geojson_polygon_bounds"]
        others = {o["class"]: o["n_points"] for o in im["other_annotations"] if o["roi"] == "PointsROI"}
        assert ann.other_point_counts == others
        assert ann.n_pointnuc_objects == 0


def test_reserialising_fixture_is_byte_identical(shared: Path):
    fx = _fx(shared)
    for name, layout in [
        ("detections/detections.featurecollection.geojson", "collection"),
        ("detections/detections.geojson", "array"),
        ("points-project.geojson/TCGA-B0-5711-01Z-00-DX1.featurecollection.geojson", "collection"),
        ("points-project.geojson/TCGA-B0-5711-01Z-00-DX1.geojson", "array"),
    ]:
        text = (fx / name).read_text(encoding="utf-8")
        assert dumps_features(read_features(fx / name), layout) == text
    single = fx / "detections/single-detection.geojson"
    assert feature_text(read_features(single)[0]) == single.read_text(encoding="utf-8")


def test_written_detections_match_qupath_layout(shared: Path, tmp_path: Path):
    """Trace the fixture's nuclei, write them, and compare with what QuPath wrote."""
    from PIL import Image

    from pointnuc.geometry import labels_to_polygons

    fx = _fx(shared) / "detections"
    exp = json.loads((fx / "expected.json").read_text(encoding="utf-8"))["objects"][:3]
    qupath = json.loads((fx / "detections.featurecollection.geojson").read_text(encoding="utf-8"))["features"][:3]
    labels = np.array(Image.open(shared / "data/monuseg/train/TCGA-A7-A13E-01Z-00-DX1_label.png"))
    polys = labels_to_polygons(labels)
    nuclei = [NucleusObject(polygon=polys[o["source_label_id"]], score=o["measurements_put"]["pointnuc score"])
              for o in exp]
    out = write_nuclei_file(tmp_path / "out.geojson", nuclei, pixel_size_um=0.25)
    text = out.read_text(encoding="utf-8")
    assert text.startswith('{"type":"FeatureCollection","features":[{"type":"Feature","id":"')
    assert "\\u00b5" not in text  # (µ in QuPath's own text round-trips raw: test above)
    ours = json.loads(text)["features"]
    for o, q, e in zip(ours, qupath, exp):
        assert list(o) == ["type", "id", "geometry", "properties"]
        assert uuid.UUID(o["id"]).version == 4
        assert list(o["properties"]) == ["objectType", "classification", "measurements"]
        assert o["properties"]["classification"] == {"name": "Nucleus", "color": [255, 228, 22]}
        assert o["geometry"] == q["geometry"]
        m = o["properties"]["measurements"]
        # QuPath's cell-detection name for the area QuPath's shape features call "Area µm^2": the same value
        assert m["Nucleus: Area"] == q["properties"]["measurements"]["Area µm^2"] == e["measurements_put"]["Area µm^2"]
        assert m["pointnuc score"] == q["properties"]["measurements"]["pointnuc score"]
    # the geometry text itself is QuPath's (integers without .0, ", " inside pairs)
    q_geom = re.search(r'"geometry":(\{.*?\]\]\]\})', (fx / "single-detection.geojson").read_text(encoding="utf-8"))
    assert q_geom.group(1) in text
    assert float32(0.93) == 0.9300000071525574
    back = read_nuclei(out)
    assert [n.score for n in back] == [float32(e["measurements_put"]["pointnuc score"]) for e in exp]
    assert [n.polygon.area for n in back] == [e["nucleus_area_px"] for e in exp]


def test_cells_have_nucleus_geometry_and_expansion(tmp_path: Path):
    nuclei = [NucleusObject(box(10, 10, 20, 20), 0.5), NucleusObject(box(40, 10, 50, 20), 0.75)]
    feats = nuclei_features(nuclei, options=WriteOptions("cell", cell_expansion_um=2.0), pixel_size_um=0.5)
    for f, n in zip(feats, nuclei):
        assert list(f) == ["type", "id", "geometry", "nucleusGeometry", "properties"]
        assert f["properties"]["objectType"] == "cell"
        cell = Polygon(f["geometry"]["coordinates"][0])
        nuc = Polygon(f["nucleusGeometry"]["coordinates"][0])
        assert nuc.equals(n.polygon) and cell.covers(nuc)
        assert cell.bounds[1] == pytest.approx(6.0)  # 2 µm = 4 px at 0.5 µm/px
    m = feats[0]["properties"]["measurements"]
    assert m["Nucleus: Area"] == 25.0  # nucleus area, 100 px² * 0.25 µm², named as QuPath names a cell's
    assert m["Cell: Area"] > 25.0
    path = write_nuclei_file(tmp_path / "c.geojson", nuclei, options=WriteOptions("cell"))
    assert [n.polygon.area for n in read_nuclei(path)] == [100.0, 100.0]


def test_no_pixel_size_uses_px_units_and_invalid_polygons_are_fixed():
    bowtie = Polygon([(0, 0), (4, 4), (4, 0), (0, 4)])
    feats = nuclei_features([NucleusObject(bowtie, 0.9), NucleusObject(Polygon(), 0.1)])
    assert len(feats) == 1
    geom = Polygon(feats[0]["geometry"]["coordinates"][0])
    assert geom.is_valid and geom.area == pytest.approx(4.0)
    m = feats[0]["properties"]["measurements"]
    assert m["Nucleus: Area"] == 4.0  # px² (QuPath's names carry no unit)
    # coordinates at most 2 decimals, integers without .0
    t = feature_text(nuclei_features([NucleusObject(box(1.004, 2, 3.256, 4.5), 0.5)])[0])
    assert "[1, 2]" in t and "[3.26, 4.5]" in t and "1.004" not in t


def test_old_qupath_variants_and_layouts(tmp_path: Path):
    p = tmp_path / "old.geojson"
    p.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Point", "coordinates": [5.5, 6.5]},
                             "properties": {"classification": {"name": "Nucleus", "colorRGB": -1},
                                            "measurements": [{"name": "pointnuc score", "value": 0.5}]}}))
    [obj] = read_objects(p)
    assert obj.object_type == "annotation" and obj.class_name == "Nucleus" and obj.is_pointnuc
    p.write_text(json.dumps([{"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
                              "properties": {"classification": "Nucleus"}}]))
    ann = summarise(read_objects(p), _ref())
    assert ann.points_xy.tolist() == [[1, 2], [3, 4]]
    # a region as a GeometryCollection keeps its area parts; other classes' areas are not regions
    coll = {"type": "GeometryCollection", "geometries": [
        {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]},
        {"type": "LineString", "coordinates": [[0, 0], [50, 50]]}]}
    sq = {"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [5, 5], [0, 5], [0, 0]]]}
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": coll, "properties": {"classification": {"name": "Region*", "color": [0, 0, 180]}}},
        {"type": "Feature", "geometry": sq, "properties": {"classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": sq, "properties": {"objectType": "annotation"}}]}))
    ann = summarise(read_objects(p), _ref())
    assert [r.area for r in ann.regions] == [100.0]
    assert summarise(read_objects(p), _ref(), region_class="Tumor").regions[0].area == 25.0


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"type":"FeatureCollection","features":[{"type":"Feat', "truncated"),
        ('{"hello": "world"}', "not a QuPath GeoJSON"),
        ('[{"type":"Feature","properties":{}}]', "no geometry"),
        ("\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_geojson_is_input_error_naming_file(tmp_path: Path, content: str, message: str):
    p = tmp_path / "bad.geojson"
    p.write_text(content, encoding="latin-1")
    with pytest.raises(InputError, match=message) as err:
        read_objects(p)
    assert "bad.geojson" in str(err.value) and "\n" not in str(err.value)


def test_points_outside_image_are_an_error(shared: Path):
    objects = read_objects(_fx(shared) / "points-project.geojson/TCGA-A7-A13E-01Z-00-DX1.geojson")
    with pytest.raises(InputError, match="outside its 500x500 pixels"):
        summarise(objects, _ref(w=500, h=500), source="x.geojson")


def test_require_points_says_how():
    from pointnuc.io.base import ImageAnnotations

    ann = ImageAnnotations(points_xy=np.zeros((0, 2)), other_point_counts={"Other": 5})
    with pytest.raises(TrainingError, match="no 'Nucleus' points.*'Other' \\(5\\).*--point-class"):
        require_points(ann, _ref())
    ok = ImageAnnotations(points_xy=np.ones((2, 2)))
    assert require_points(ok, _ref()).shape == (2, 2)


def test_inside_uses_centroid():
    area = box(0, 0, 10, 10)
    assert inside(box(8, 8, 11, 11), area)  # centroid (9.5, 9.5) inside
    assert not inside(box(9, 9, 13, 13), area)  # centroid (11, 11) outside
    assert inside(box(100, 100, 101, 101), None)


def test_atomic_write_failure_keeps_the_old_file_and_no_tmp(tmp_path: Path, monkeypatch):
    import os

    from pointnuc.fileio import write_text_atomic

    target = tmp_path / "a.geojson"
    write_text_atomic(target, "old")

    def fail(*_args: object) -> None:
        raise OSError("simulated: disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.geojson"]


def test_write_options_are_checked_when_made() -> None:
    """The output options (``segment --objects --class --cell-expansion``) refuse what no writer can write."""
    assert WriteOptions() == WriteOptions("detection", "Nucleus", 2.0)
    with pytest.raises(InputError, match="object type must be one of detection, cell"):
        WriteOptions(object_type="annotation")
    with pytest.raises(InputError, match="cell expansion"):
        WriteOptions("cell", cell_expansion_um=-1.0)
    with pytest.raises(InputError, match="cell expansion"):
        WriteOptions("cell", cell_expansion_um=float("nan"))


def test_coordinates_are_written_as_each_value_alone_would_be() -> None:
    """Coordinate lists go through numpy and json's encoder (the bulk of a file's text): the same text as
    formatting each value on its own (2 decimals, whole numbers without ``.0``, no ``-0``)."""
    from pointnuc.io.geojson import _num, _positions

    rng = np.random.default_rng(0)
    for k in range(400):
        a = rng.normal(0, 2000, (int(rng.integers(1, 60)), 2))
        a = [np.round(a), np.round(a * 2) / 2, np.round(a, 2), a][k % 4]
        c = a.tolist() + [[-0.001, 0.004], [12.0, -3.5], [2.675, 1.005], [-2.675, 0.125]]
        assert _positions(c) == "[" + ",".join("[" + ", ".join(_num(v) for v in p) + "]" for p in c) + "]"


def test_outlines_rounded_together_are_rounded_as_one_by_one() -> None:
    """:func:`rounded_polygons` (one shapely call for the valid polygons) gives what rounding each alone gives,
    also for an invalid bow-tie, a speck, an empty polygon and None."""
    import shapely

    from pointnuc.io.records import _rounded_polygon, rounded_polygons

    rng = np.random.default_rng(0)
    polys = [shapely.Point(*rng.uniform(0, 1000, 2)).buffer(rng.uniform(1, 9), quad_segs=6) for _ in range(50)]
    polys += [shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)]), None, shapely.Polygon(),
              shapely.Point(1, 1).buffer(1e-3)]
    for a, p in zip(rounded_polygons(polys), polys, strict=True):
        b = _rounded_polygon(p) if p is not None else None
        assert (a is None and b is None) or (a is not None and b is not None and shapely.equals_exact(a, b, 0))
