"""GeoJSON-folder projects, `pointnuc inspect`, writing results back, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from shapely.geometry import box

from pointnuc.errors import InputError, OutputExistsError
from pointnuc.io import NucleusObject, WriteOptions, open_project
from pointnuc.io.geojson import read_features
from pointnuc.io.geojson_project import GeoJSONFolderProject, export_candidates
from pointnuc.io.paths import prepare_output_dir

A7 = "TCGA-A7-A13E-01Z-00-DX1"
B0 = "TCGA-B0-5711-01Z-00-DX1"


def _fx(shared: Path) -> Path:
    return shared / "fixtures" / "qupath-0.6.0"


def make_folder(shared: Path, dest: Path, forms: dict[str, str]) -> Path:
    """A GeoJSON-folder project from the fixture: images linked, exports copied as NAME.geojson etc."""
    fx = _fx(shared)
    dest.mkdir(parents=True, exist_ok=True)
    for stem, form in forms.items():
        (dest / f"{stem}.tif").symlink_to(fx / "points-project" / "images" / f"{stem}.tif")
        src = fx / "points-project.geojson" / (f"{stem}.geojson" if form == "default" else f"{stem}.featurecollection.geojson")
        shutil.copy(src, dest / (f"{stem}.geojson" if form == "default" else f"{stem}.featurecollection.geojson"))
    return dest


def _cli(*args: str):
    from pointnuc.cli import main

    return CliRunner().invoke(main, list(args))


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("forms", [{A7: "default", B0: "collection"}, {A7: "collection", B0: "default"}])
def test_inspect_json_equals_expected(shared: Path, tmp_path: Path, forms: dict[str, str]):
    folder = make_folder(shared, tmp_path / "proj", forms)
    res = _cli("inspect", str(folder), "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    expected = json.loads((_fx(shared) / "expected.json").read_text(encoding="utf-8"))
    assert report["kind"] == "geojson-folder"
    assert [im["name"] for im in report["images"]] == [im["image_name"] for im in expected["images"]]
    for got, exp in zip(report["images"], expected["images"]):
        assert (got["width"], got["height"]) == (exp["width"], exp["height"])
        assert got["pixel_size_um"] == exp["pixel_size_um"][0] == expected["pixel_size_um"]
        others = {o["class"]: o["n_points"] for o in exp["other_annotations"] if o["roi"] == "PointsROI"}
        assert got["points"] == {"Nucleus": exp["n_nucleus_points"], **others}
        assert got["n_regions"] == sum(o["roi"] == "RectangleROI" for o in exp["other_annotations"])
        assert got["n_pointnuc_objects"] == exp["n_detections"] == 0
    assert report["total_points"] == 31 + 34
    # the table form
    res = _cli("inspect", str(folder))
    assert res.exit_code == 0 and "65 'Nucleus' points" in res.stdout and "Other: 5" in res.stdout
    # the point sets themselves, through the Project interface
    proj = open_project(folder)
    for image, exp in zip(proj.images(), expected["images"]):
        ann = proj.annotations(image)
        assert sorted(map(tuple, ann.points_xy.tolist())) == sorted(map(tuple, exp["nucleus_points_xy"]))


def test_export_name_candidates():
    assert export_candidates("a.b.tif") == ["a.b.tif.geojson", "a.b.geojson", "a.b.tif.featurecollection.geojson",
                                            "a.b.featurecollection.geojson"]
    assert "x.geojson" in export_candidates("x.ome.tif")


def test_pointnuc_objects_counted_in_a_users_export(shared: Path, tmp_path: Path):
    """Detections pointnuc wrote, imported into QuPath and exported again, are counted."""
    folder = make_folder(shared, tmp_path / "proj", {A7: "default"})
    shutil.copy(_fx(shared) / "detections" / "detections.geojson", folder / f"{A7}.geojson")
    proj = open_project(folder)
    ann = proj.annotations(proj.images()[0])
    assert ann.n_pointnuc_objects == 4 and len(ann.points_xy) == 0


def test_write_nuclei_replaces_own_objects_only(shared: Path, tmp_path: Path):
    folder = make_folder(shared, tmp_path / "proj", {A7: "default"})
    user_export = (folder / f"{A7}.geojson").read_bytes()
    proj = open_project(folder)
    name = f"{A7}.tif"
    first = [NucleusObject(box(10, 10, 20, 20), 0.9), NucleusObject(box(600, 600, 610, 612), 0.8)]
    [out] = proj.write_nuclei({name: first})
    assert out == folder / "pointnuc-geojson" / f"{A7}.geojson"
    assert len(read_features(out)) == 2
    # a re-run replaces, not adds
    proj.write_nuclei({name: first})
    assert len(read_features(out)) == 2
    assert (out.with_name(out.name + ".bak")).is_file()
    # replace only within an area: the object at (600, 600) stays, the one at (10, 10) is replaced
    new = [NucleusObject(box(30, 30, 40, 40), 0.7), NucleusObject(box(50, 50, 55, 55), 0.6)]
    proj.write_nuclei({name: new}, replace_within={name: box(0, 0, 100, 100)})
    feats = read_features(out)
    scores = sorted(f["properties"]["measurements"]["pointnuc score"] for f in feats)
    assert scores == pytest.approx([0.6, 0.7, 0.8], abs=1e-6)
    assert (folder / f"{A7}.geojson").read_bytes() == user_export  # the user's export is never touched
    ann = proj.annotations(proj.images()[0])
    assert ann.n_pointnuc_objects == 3 and len(ann.points_xy) == 31
    # cells, to another output folder
    proj2 = open_project(folder, output_dir=tmp_path / "elsewhere")
    [out2] = proj2.write_nuclei({name: new}, options=WriteOptions("cell"))
    assert out2.parent == tmp_path / "elsewhere" / "pointnuc-geojson"
    assert all("nucleusGeometry" in f for f in read_features(out2))
    with pytest.raises(InputError, match="no image named"):
        proj.write_nuclei({"nope.tif": new})


def test_folder_without_images_and_images_without_exports(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images and no QuPath project"):
        open_project(empty)
    (empty / "x.geojson").write_text("[]")
    with pytest.raises(InputError, match="GeoJSON files but no images"):
        open_project(empty)
    from PIL import Image

    only = tmp_path / "only"
    only.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(only / "a.png")
    proj = open_project(only)
    assert isinstance(proj, GeoJSONFolderProject)
    [im] = proj.images()
    assert (im.name, im.width, im.height, im.pixel_size_um) == ("a.png", 30, 20, None)
    assert len(proj.annotations(im).points_xy) == 0
    assert open_project(only, pixel_size_um=0.5).images()[0].pixel_size_um == 0.5


def test_prepare_output_dir(tmp_path: Path):
    d = prepare_output_dir(tmp_path / "new" / "out")
    assert d.is_dir()
    (d / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_output_dir(d)
    assert prepare_output_dir(d, overwrite=True) == d and (d / "f").is_file()
    with pytest.raises(InputError, match="is a file"):
        prepare_output_dir(d / "f")


# --------------------------------------------------------------------------- bad input through the CLI


def _bad_cases(shared: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    from PIL import Image

    cases: dict[str, tuple[Path, str]] = {"missing": (tmp_path / "does-not-exist", "project not found")}
    d = tmp_path / "neither"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    cases["neither"] = (d, "no images and no QuPath project")
    d = make_folder(shared, tmp_path / "notqupath", {A7: "default"})
    (d / f"{A7}.geojson").write_text('{"type": "Topology", "objects": {}}')
    cases["not-qupath-geojson"] = (d, "not a QuPath GeoJSON export")
    d = make_folder(shared, tmp_path / "truncated", {A7: "collection"})
    p = d / f"{A7}.featurecollection.geojson"
    p.write_bytes(p.read_bytes()[:200])
    cases["truncated"] = (d, "truncated")
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "slide.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    (d / "slide.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 5)
    cases["corrupt-image"] = (d, "cannot read image")
    d = make_folder(shared, tmp_path / "outside", {A7: "default"})
    small = d / "small.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(small)
    shutil.copy(d / f"{A7}.geojson", d / "small.geojson")
    cases["points-outside"] = (d, "lie outside its 100x100 pixels")
    d = tmp_path / "qp-notjson"
    d.mkdir()
    (d / "project.qpproj").write_text("{ this is not json")
    cases["qpproj-not-json"] = (d, "not JSON")
    return cases


def test_bad_input_one_line_nonzero_exit_nothing_written(shared: Path, tmp_path: Path):
    for label, (path, message) in _bad_cases(shared, tmp_path).items():
        before = _listing(path.parent)
        res = _cli("inspect", str(path), "--json")
        assert res.exit_code != 0, label
        assert res.exception is None or isinstance(res.exception, SystemExit), (label, res.exception)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("pointnuc: error:"), (label, res.stderr)
        assert message in lines[0], (label, lines[0])
        assert "Traceback" not in res.output
        assert _listing(path.parent) == before, label


def test_example_folder_reads_without_shared_data(tmp_path: Path):
    """The example shipped in the repository: one image, its QuPath export, 34 points, 1 region."""
    example = Path(__file__).resolve().parents[1] / "examples" / "monuseg-B0-5711"
    if not example.is_dir():
        pytest.skip("examples/ not present")
    proj = open_project(example, output_dir=tmp_path)
    [im] = proj.images()
    assert (im.name, im.width, im.height, im.pixel_size_um) == (f"{B0}.tif", 1000, 1000, 0.25)
    ann = proj.annotations(im)
    assert len(ann.points_xy) == 34 and len(ann.regions) == 1 and ann.other_point_counts == {"Other": 5}
    assert ann.regions[0].bounds == (0.0, 0.0, 500.0, 1000.0)
    [out] = proj.write_nuclei({im.name: [NucleusObject(box(1, 1, 9, 9), 0.5)]})
    assert out.parent == tmp_path / "pointnuc-geojson"


def test_safe_file_name_keeps_letters_digits_and_dashes() -> None:
    """One rule for every file pointnuc names after an image (kept results, review figures)."""
    from pointnuc.io.paths import safe_file_name

    assert safe_file_name("TCGA-A7 slide:1/2.tif") == "TCGA-A7_slide_1_2.tif"
    assert safe_file_name("Schnitt µ 1.svs") == "Schnitt_µ_1.svs"  # letters of any script are kept
    assert safe_file_name("x" * 100) == "x" * 80 and safe_file_name("abc", max_chars=2) == "ab"
