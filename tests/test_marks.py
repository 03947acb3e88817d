"""Every kind of mark a QuPath user makes is supervision: reading each kind in both project forms,
and the training targets they become (stage 1 and stage 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Point, box, mapping
from synth import label_points, points_feature, render_nuclei, write_geojson_project

from pointnuc.config import profile_config
from pointnuc.io import NucleusObject, open_project
from pointnuc.io.geojson import read_features
from pointnuc.io.written import read_written
from pointnuc.labels.marks import BACKGROUND, BACKGROUND_POINT_RADIUS, OUTLINE, RING
from pointnuc.train.detect import detection_radii, initial_mask
from pointnuc.train.samples import load_training_images
from pointnuc.train.segment import stage2_targets, unmarked_points

NAME = "img"
IMG = f"{NAME}.tif"  #: its name in the project
SIZE = 200


def _feature(geom, cls: str, object_type: str = "annotation") -> dict:
    return {"type": "Feature", "id": f"user-{cls}-{geom.bounds[0]:g}", "geometry": mapping(geom),
            "properties": {"objectType": object_type, "classification": {"name": cls, "color": [1, 2, 3]}}}


@pytest.fixture(scope="module")
def scene() -> dict:
    """A synthetic image, its nuclei's points, and places far from every nucleus for background marks."""
    img, labels = render_nuclei((SIZE, SIZE), 14, 8.0, seed=3)
    pts = label_points(labels)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    d = np.min(np.hypot(xx[..., None] - pts[:, 0], yy[..., None] - pts[:, 1]), axis=-1)
    far = (d > 45) & (xx > 15) & (xx < SIZE - 15) & (yy > 15) & (yy < SIZE - 15)
    cands = np.argwhere(far)
    assert len(cands) >= 3, "the scene needs empty places"
    # three empty places, far apart: a deleted detection, a kept one, a background point
    places = [cands[0]]
    for rc in cands:
        if all(np.hypot(*(rc - p)) > 30 for p in places):
            places.append(rc)
        if len(places) == 3:
            break
    assert len(places) == 3
    return {"image": img, "labels": labels, "points": pts, "places": [(float(c) + 0.5, float(r) + 0.5) for r, c in places]}


def _config():
    return profile_config("tiny", **{"data.holdout_fraction": 0.0})


def _project(tmp: Path, scene: dict, extra: list[dict]) -> Path:
    return write_geojson_project(tmp / "proj", NAME, scene["image"], scene["points"][1:], pixel_size_um=0.25,
                                 extra_features=extra)


def _export_after_review(folder: Path, deleted_index: int) -> None:
    """As a user in QuPath: import pointnuc's objects, delete one, export everything again (ids kept)."""
    export = folder / f"{NAME}.geojson"
    user = json.loads(export.read_text())["features"]
    written = read_features(folder / "pointnuc-geojson" / f"{NAME}.geojson")
    kept = [f for i, f in enumerate(written) if i != deleted_index]
    export.write_text(json.dumps({"type": "FeatureCollection", "features": user + kept}))


def test_deleted_detection_becomes_background_in_the_next_training_targets(tmp_path: Path, scene: dict):
    (dx, dy), (kx, ky), _ = scene["places"]
    deleted_poly, kept_poly = Point(dx, dy).buffer(7), Point(kx, ky).buffer(7)
    folder = _project(tmp_path, scene, [])
    project = open_project(folder)
    # a first segment wrote three detections, then a second one (the last) wrote these two and a nucleus
    project.write_nuclei({IMG: [NucleusObject(box(1, 1, 9, 9), 0.5)]})
    nucleus = Point(*scene["points"][0]).buffer(6)
    project.write_nuclei({IMG: [NucleusObject(deleted_poly, 0.7), NucleusObject(kept_poly, 0.6),
                                 NucleusObject(nucleus, 0.9)]})
    assert len(read_written(folder, IMG)) == 3  # the record is of the last write only
    # before the user exported anything, nothing is taken as deleted
    assert open_project(folder).annotations(open_project(folder).images()[0]).deleted == ()
    _export_after_review(folder, deleted_index=0)
    project = open_project(folder)
    ann = project.annotations(project.images()[0])
    assert len(ann.deleted) == 1 and ann.deleted[0].equals_exact(deleted_poly, 0.02)
    assert ann.mark_counts()["deleted_detections"] == 1

    config = _config()
    samples, _, _ = load_training_images(project, config)
    (s,) = samples
    assert s.marks is not None
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    in_deleted = np.hypot(xx - dx, yy - dy) < 6.5
    in_kept = np.hypot(xx - kx, yy - ky) < 6.5
    assert (s.marks[in_deleted] == BACKGROUND).all() and (s.marks[in_kept] == 0).all()
    # stage 1: background (0, taught) on the deleted detection; the unreviewed one stays unlabeled
    m = initial_mask(s, "ext-GM", detection_radii(config))
    assert (m[in_deleted] == 0).all()
    assert (m[in_kept] == -1).all()
    unmarked = s.__class__(**{**s.__dict__, "marks": None})
    assert (initial_mask(unmarked, "ext-GM", detection_radii(config))[in_deleted] == -1).all()
    # stage 2: background in both labels, and a stage-1 detection there is not a point
    pts = np.concatenate([s.points, [[dx, dy]]])
    assert len(unmarked_points(pts, s.marks)) == len(s.points)
    t, vor, clu = stage2_targets(s, unmarked_points(pts, s.marks), config)
    assert (t[0][in_deleted] == 0).all() and (t[1][in_deleted] == 0).all()
    assert (vor[in_deleted] == 0).all() and (clu[in_deleted] == 0).all()


def test_deleted_detection_where_the_user_clicked_a_nucleus_is_not_background(tmp_path: Path, scene: dict):
    folder = _project(tmp_path, scene, [])
    project = open_project(folder)
    wrong = Point(*scene["points"][1]).buffer(12)  # holds a user point: the user deleted a wrong outline
    (kx, ky) = scene["places"][1]
    project.write_nuclei({IMG: [NucleusObject(wrong, 0.7), NucleusObject(Point(kx, ky).buffer(5), 0.6)]})
    _export_after_review(folder, deleted_index=0)
    project = open_project(folder)
    assert project.annotations(project.images()[0]).deleted == ()


def test_outline_becomes_a_full_mask_in_stage2_and_a_point_in_stage1(tmp_path: Path, scene: dict):
    labels = scene["labels"]
    k = int(labels[int(scene["points"][0][1]), int(scene["points"][0][0])])
    rr, cc = np.nonzero(labels == k)
    outline = box(cc.min(), rr.min(), cc.max() + 1, rr.max() + 1)  # the nucleus's bounding box, drawn as a rectangle
    folder = _project(tmp_path, scene, [_feature(outline, "Nucleus")])
    project = open_project(folder)
    ann = project.annotations(project.images()[0])
    assert len(ann.outlines) == 1 and ann.mark_counts()["outlines"] == 1
    config = _config()
    (s,), _, counts = load_training_images(project, config)
    assert counts[IMG] == len(scene["points"])  # the outline's centre counts as a nucleus point
    c = np.array([outline.centroid.x, outline.centroid.y])
    assert np.min(np.hypot(*(s.points - c).T)) < 1e-6
    inside = np.zeros((SIZE, SIZE), bool)
    inside[int(outline.bounds[1]):int(outline.bounds[3]), int(outline.bounds[0]):int(outline.bounds[2])] = True
    assert (s.marks[inside] == OUTLINE).all() and (s.marks == OUTLINE).sum() == inside.sum()
    ring = s.marks == RING
    assert ring.any() and not (ring & inside).any()
    # stage 1: a nucleus at its centre (a point's Gaussian), never background inside it
    m = initial_mask(s, "ext-GM", detection_radii(config))
    assert m[int(c[1]), int(c[0])] > 0.9 and not (m[inside] == 0).any()
    # stage 2: the whole outline is nucleus in both labels, its ring background
    t, vor, clu = stage2_targets(s, s.points, config)
    assert (vor[inside] == 1).all() and (clu[inside] == 1).all()
    assert (t[0][ring] == 0).all() and (t[1][ring] == 0).all()


def test_held_back_outline_is_not_trained_on(tmp_path: Path, scene: dict):
    """An outline whose centre is held back for tuning is no mask either: the check must not see a nucleus it was shown."""
    labels = scene["labels"]
    outlines = []
    for x, y in scene["points"]:
        rr, cc = np.nonzero(labels == labels[int(y), int(x)])
        outlines.append(box(cc.min(), rr.min(), cc.max() + 1, rr.max() + 1))
    folder = write_geojson_project(tmp_path / "proj", NAME, scene["image"], np.zeros((0, 2)), pixel_size_um=0.25,
                                   extra_features=[_feature(g, "Nucleus") for g in outlines])
    config = profile_config("tiny", **{"data.holdout_fraction": 0.3})
    (s,), _, counts = load_training_images(open_project(folder), config)
    assert counts[IMG] == len(outlines) and len(s.holdout) and len(s.points) + len(s.holdout) == len(outlines)
    for g in outlines:
        c = np.array([g.centroid.x, g.centroid.y])
        r0, r1, c0, c1 = int(g.bounds[1]), int(g.bounds[3]), int(g.bounds[0]), int(g.bounds[2])
        held = np.min(np.hypot(*(s.holdout - c).T)) < 1e-6
        assert held != (np.min(np.hypot(*(s.points - c).T)) < 1e-6)
        on = s.marks[r0:r1, c0:c1] == OUTLINE
        assert (not on.any()) if held else on.mean() > 0.5  # boxes may overlap a neighbour's


def test_background_area_and_point_give_background_targets(tmp_path: Path, scene: dict):
    (ax, ay), _, (px, py) = scene["places"]
    area = box(ax - 10, ay - 10, ax + 10, ay + 10)
    extra = [_feature(area, "Background"), points_feature(np.array([[px, py]]), "Background")]
    folder = _project(tmp_path, scene, extra)
    project = open_project(folder)
    ann = project.annotations(project.images()[0])
    assert ann.mark_counts() == {"points": len(scene["points"]) - 1, "outlines": 0, "background_areas": 1,
                                 "background_points": 1, "deleted_detections": 0}
    # another background class: those marks are other classes' points / unused areas
    other = project.annotations(project.images()[0], background_class="Stroma")
    assert other.mark_counts()["background_areas"] == 0 and other.other_point_counts == {"Background": 1}
    config = _config()
    (s,), _, _ = load_training_images(project, config)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    in_area = (abs(xx - ax) < 9.5) & (abs(yy - ay) < 9.5)
    r1 = detection_radii(config).r1
    # a background point marks the spot clicked: a disc of BACKGROUND_POINT_RADIUS r1, nothing beyond it
    d = np.hypot(xx - px, yy - py)
    in_disc = d < BACKGROUND_POINT_RADIUS * r1 - 0.5
    assert in_disc.sum() >= 5 and (s.marks[in_disc] == BACKGROUND).all()
    assert (s.marks[(d > BACKGROUND_POINT_RADIUS * r1 + 0.5) & (d < r1) & ~in_area] != BACKGROUND).all()
    assert (s.marks[in_area] == BACKGROUND).all()
    m = initial_mask(s, "ext-GM", detection_radii(config))
    assert (m[in_area] == 0).all() and (m[in_disc] == 0).all()
    t, vor, clu = stage2_targets(s, s.points, config)
    for lab in (vor, clu, t[0], t[1]):
        assert (lab[in_area] == 0).all() and (lab[in_disc] == 0).all()
    # carried through a rescale (stage 1 at a coarser pixel size)
    half = s.rescaled(2.0)
    assert half.marks is not None and half.marks.shape == half.valid.shape
    assert (half.marks[int(ay / 2), int(ax / 2)] == BACKGROUND)


def test_an_image_with_only_background_marks_is_trained_on(tmp_path: Path, scene: dict):
    folder = _project(tmp_path, scene, [])
    from synth import write_tiff

    write_tiff(folder / "empty.tif", scene["image"], 0.25)
    (folder / "empty.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        _feature(box(20, 20, 60, 60), "Background")]}))
    samples, _, counts = load_training_images(open_project(folder), _config())
    empty = [s for s in samples if s.image_name == "empty.tif"]
    assert counts["empty.tif"] == 0 and len(empty) == 1 and len(empty[0].points) == 0
    assert (empty[0].marks[25:55, 25:55] == BACKGROUND).all()


def test_inspect_counts_each_kind_of_mark(tmp_path: Path, scene: dict):
    from click.testing import CliRunner

    from pointnuc.cli import main

    (ax, ay), _, (px, py) = scene["places"]
    extra = [_feature(box(ax - 5, ay - 5, ax + 5, ay + 5), "Background"),
             points_feature(np.array([[px, py], [px + 3, py]]), "Background"),
             _feature(Point(*scene["points"][0]).buffer(6), "Nucleus")]
    folder = _project(tmp_path, scene, extra)
    res = CliRunner().invoke(main, ["inspect", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    want = {"points": len(scene["points"]) - 1, "outlines": 1, "background_areas": 1, "background_points": 2,
            "deleted_detections": 0}
    assert report["images"][0]["marks"] == want and report["total_marks"] == want
    text = CliRunner().invoke(main, ["inspect", str(folder)]).stdout
    assert "deleted detections" in text and "Background areas" in text


# --------------------------------------------------------------------------- both project forms


def _objects_spec(scene: dict) -> tuple[list[tuple[str, object]], list]:
    """The same user objects for both forms: (class, geometry)."""
    from shapely.geometry import MultiPoint

    (ax, ay), _, (px, py) = scene["places"]
    return [
        ("Nucleus", MultiPoint([tuple(p) for p in scene["points"][1:]])),
        ("Nucleus", Point(*scene["points"][0]).buffer(6)),
        ("Background", box(ax - 10, ay - 10, ax + 10, ay + 10)),
        ("Background", MultiPoint([(px, py)])),
    ]


def _marks_summary(ann) -> dict:
    return {"counts": ann.mark_counts(), "points": sorted(map(tuple, ann.points_xy.round(2).tolist())),
            "outlines": sorted(g.wkt for g in ann.outlines), "areas": sorted(g.wkt for g in ann.background_areas),
            "bg_points": ann.background_points_xy.round(2).tolist(),
            "deleted": sorted(tuple(round(v, 1) for v in g.bounds) for g in ann.deleted)}


def test_both_project_forms_read_the_same_marks(shared: Path, tmp_path: Path, scene: dict):
    """The GeoJSON folder and the QuPath project (paquo's API, stand-in from test_io_qupath) give the same marks,
    the deleted detection included."""
    from test_io_qupath import FAKE  # the stand-in for paquo

    from pointnuc.io.qupath_project import QuPathProjectFile

    spec = _objects_spec(scene)
    dets = [NucleusObject(Point(*scene["places"][1]).buffer(5), 0.6), NucleusObject(box(5, 5, 12, 12), 0.7)]
    # GeoJSON folder
    folder = tmp_path / "folder"
    folder.mkdir()
    fx = shared / "fixtures" / "qupath-0.6.0" / "points-project"
    image = min((fx / "images").iterdir())
    shutil.copy(image, folder / image.name)
    (folder / (image.stem + ".geojson")).write_text(json.dumps({"type": "FeatureCollection", "features": [
        _feature(g, c) for c, g in spec]}))
    gj = open_project(folder)
    gj.write_nuclei({image.name: dets})
    export = folder / (image.stem + ".geojson")
    written = read_features(folder / "pointnuc-geojson" / (image.stem + ".geojson"))
    feats = json.loads(export.read_text())["features"] + written[1:]  # the user deleted the first
    export.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    got_gj = _marks_summary(open_project(folder).annotations(open_project(folder).images()[0]))
    # QuPath project through paquo's API (the stand-in keeps no ids: objects are matched by their centres)
    root = tmp_path / "qp"
    (root / "images").mkdir(parents=True)
    for f in (fx / "images").iterdir():
        (root / "images" / f.name).symlink_to(f)
    shutil.copy(fx / "project.qpproj", root / "project.qpproj")
    for n in (1, 2):
        ann = [{"roi": g.wkt, "class": c} for c, g in spec] if n == 1 else []
        (root / "data" / str(n)).mkdir(parents=True)
        (root / "data" / str(n) / "data.qpdata").write_text(json.dumps({"annotations": ann, "detections": []}))
        (root / "data" / str(n) / "server.json").write_text("{}")
    qp = QuPathProjectFile(root, paquo=FAKE)
    name = qp.images()[0].name
    assert name == image.name
    qp.write_nuclei({name: dets})
    data = json.loads((root / "data" / "1" / "data.qpdata").read_text())
    data["detections"] = data["detections"][1:]  # the user deleted the first
    (root / "data" / "1" / "data.qpdata").write_text(json.dumps(data))
    qp = QuPathProjectFile(root, paquo=FAKE)
    got_qp = _marks_summary(qp.annotations(qp.images()[0]))
    assert got_gj == got_qp
    assert got_gj["counts"] == {"points": len(scene["points"]) - 1, "outlines": 1, "background_areas": 1,
                                "background_points": 1, "deleted_detections": 1}


@pytest.mark.qupath
def test_real_qupath_a_deleted_detection_is_found_by_its_id(shared: Path, tmp_path: Path, qupath_dir: Path):
    """In a real QuPath project: pointnuc records the ids QuPath gave its detections; one deleted in QuPath is
    background, the one kept is not. QuPath's own GeoJSON import keeps the ids pointnuc writes (the folder form)."""
    from qupath_kit import kit, python_with_qupath

    work = shutil.copytree(shared / "fixtures/qupath-0.6.0/points-project", tmp_path / "points-project")
    got = python_with_qupath(f"""
from shapely.geometry import box
from pointnuc.io import NucleusObject, open_project
from pointnuc.io.written import read_written
proj = open_project({str(work)!r})
name = proj.images()[0].name
proj.write_nuclei({{name: [NucleusObject(box(10, 10, 20, 20), 0.9), NucleusObject(box(40, 40, 50, 52), 0.8)]}})
proj.close()
ids = [o.id for o in read_written({str(work)!r}, name)]
from paquo.projects import QuPathProject
with QuPathProject({str(work)!r}, mode="r+") as qp:  # the user deletes the first detection in QuPath
    qp.update_image_paths(try_relative=True)
    h = qp.images[0].hierarchy
    gone = next(d for d in h.detections if d.roi.bounds == (10.0, 10.0, 20.0, 20.0))
    h.detections.discard(gone)
ann = open_project({str(work)!r}).annotations(open_project({str(work)!r}).images()[0])
answer({{"ids": ids, "deleted": [list(g.bounds) for g in ann.deleted], "counts": ann.mark_counts()}})
""")
    assert len(got["ids"]) == 2 and all(isinstance(i, str) and len(i) == 36 for i in got["ids"])
    assert got["deleted"] == [[10.0, 10.0, 20.0, 20.0]] and got["counts"]["deleted_detections"] == 1
    # the folder form relies on QuPath keeping pointnuc's ids through File > Import objects
    folder = tmp_path / "folder"
    shutil.copytree(shared / "fixtures/qupath-0.6.0/points-project/images", folder)
    gj = open_project(folder)
    gj.write_nuclei({gj.images()[0].name: [NucleusObject(box(10, 10, 20, 20), 0.9)]})
    out = next((folder / "pointnuc-geojson").glob("*.geojson"))
    read = kit("read-geojson", out)["files"][str(out)]
    assert read["error"] is None
    assert [o["id"] for o in read["objects"]] == [f["id"] for f in read_features(out)]


def test_train_cli_reads_the_background_class_it_is_given(tmp_path: Path, scene: dict):
    """One tiny run: ``--background-class`` reaches the training and is recorded in the model's provenance."""
    from click.testing import CliRunner

    from pointnuc.cli import main

    folder = _project(tmp_path, scene, [_feature(box(*scene["places"][0], scene["places"][0][0] + 8,
                                                     scene["places"][0][1] + 8), "Stroma")])
    out = tmp_path / "model"
    res = CliRunner().invoke(main, ["train", str(folder), "--profile", "tiny", "--background-class", "Stroma",
                                    "--out", str(out), "--offline", "--no-progress"])
    assert res.exit_code == 0, res.output
    from pointnuc.models.layout import MODEL_JSON

    meta = json.loads((out / MODEL_JSON).read_text())
    assert meta["provenance"]["background_class"] == "Stroma"
