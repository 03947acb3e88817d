"""The correction loop: ``pointnuc suggest`` writes questions and replaces only its own; ``train --from``
starts from a model, says so in its provenance, and refuses a model it cannot start from."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from synth import label_points, render_nuclei, write_geojson_project
from test_io_qupath import fake_project  # noqa: F401  (the fixture)

from pointnuc.cli import main
from pointnuc.io.base import SUGGESTION_MARKER

NAMES = ("a", "b")
QUICK = ["--set", "data.pixel_size_um=0.5", "--set", "detection.epochs=2", "--set", "detection.rounds=0",
         "--set", "segmentation.epochs=2", "--set", "segmentation.crf_epochs=0"]


def _project(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    clicked = {}
    for i, name in enumerate(NAMES):
        img, lab = render_nuclei((160, 160), 30, radius=5.5, seed=20 + i, min_gap=1.2)
        pts = label_points(lab)
        clicked[name] = pts[np.random.default_rng(i).choice(len(pts), 10, replace=False)]
        write_geojson_project(root / "proj", name, img, clicked[name], pixel_size_um=0.5)
    return root / "proj", clicked


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("loop")
    proj, clicked = _project(root)
    res = CliRunner().invoke(main, ["train", str(proj), "--profile", "tiny", "--out", str(root / "m0"),
                                    "--no-progress", *QUICK])
    assert res.exit_code == 0, res.output
    return proj, root / "m0", clicked


def _features(path: Path) -> list[dict]:
    return json.loads(path.read_text())["features"]


def _suggestions(path: Path) -> list[dict]:
    return [f for f in _features(path) if f["properties"]["classification"]["name"] == "pointnuc suggestion"]


def _one_error_line(res, message: str) -> None:
    assert res.exit_code not in (0, None), res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pointnuc: error:"), res.stderr
    assert message in lines[0], lines[0]


def test_suggest_writes_n_replaces_only_its_own_and_counts_answers(trained, tmp_path: Path) -> None:
    from shapely.geometry import box

    from pointnuc.io import NucleusObject, open_project

    src, model, clicked = trained
    proj = tmp_path / "proj"
    shutil.copytree(src, proj)
    exports = {n: (proj / f"{n}.geojson").read_bytes() for n in NAMES}
    # pointnuc's file already holds its nuclei, and a suggestion someone answered there by hand (class Nucleus)
    open_project(proj).write_nuclei({"a.tif": [NucleusObject(box(10, 10, 20, 20), 0.9)]})
    out_a = proj / "pointnuc-geojson" / "a.geojson"
    feats = _features(out_a)
    feats.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [150.0, 150.0]},
                  "properties": {"objectType": "annotation", "classification": {"name": "Nucleus", "color": [1, 2, 3]},
                                 "measurements": {SUGGESTION_MARKER: 7.0}}})
    out_a.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))

    res = CliRunner().invoke(main, ["suggest", str(proj), "--model", str(model), "--n", "6"])
    assert res.exit_code == 0, res.output
    sugg = {n: _suggestions(proj / "pointnuc-geojson" / f"{n}.geojson") for n in NAMES}
    assert sum(map(len, sugg.values())) == 6 and all(len(v) == 3 for v in sugg.values())  # spread over images
    ranks = sorted(f["properties"]["measurements"][SUGGESTION_MARKER] for v in sugg.values() for f in v)
    assert ranks == [1, 2, 3, 4, 5, 6]
    for n in NAMES:  # away from the user's points: at least two nucleus radii (2 x 5.5 px)
        xy = np.array([f["geometry"]["coordinates"] for f in sugg[n]])
        d = np.hypot(*(xy[:, None, :] - clicked[n][None]).transpose(2, 0, 1))
        assert d.min() >= 11.0
    kinds = [f["properties"].get("objectType") for f in _features(out_a)]
    assert kinds.count("detection") == 1 and len(_features(out_a)) == 1 + 1 + 3  # nucleus, answered point, 3 new

    # a re-run replaces its own unanswered suggestions only
    res = CliRunner().invoke(main, ["suggest", str(proj), "--model", str(model), "--n", "2"])
    assert res.exit_code == 0, res.output
    assert sum(len(_suggestions(proj / "pointnuc-geojson" / f"{n}.geojson")) for n in NAMES) == 2
    assert len(_features(out_a)) == 2 + len(_suggestions(out_a))
    assert {n: (proj / f"{n}.geojson").read_bytes() for n in NAMES} == exports  # the user's files: never written
    assert (out_a.with_name("a.geojson.bak")).is_file()

    # the user answers one (reclassified in QuPath, exported over a.geojson): inspect counts it
    record = json.loads((proj / "pointnuc-suggestions.json").read_text())
    first_image = next(iter(record["images"]))
    s = record["images"][first_image][0]
    answer = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [s["x"], s["y"]]},
              "properties": {"objectType": "annotation", "classification": {"name": "Background", "color": [0, 0, 0]},
                             "measurements": {SUGGESTION_MARKER: s["rank"]}}}
    export = proj / f"{first_image.rsplit('.', 1)[0]}.geojson"
    doc = json.loads(export.read_text())
    doc["features"].append(answer)
    export.write_text(json.dumps(doc))
    res = CliRunner().invoke(main, ["inspect", str(proj), "--json"])
    assert res.exit_code == 0, res.output
    counts = {im["name"]: im["suggestions"] for im in json.loads(res.output)["images"]}
    assert counts[first_image] == {"answered": 1, "unanswered": len(record["images"][first_image]) - 1}
    assert sum(c["answered"] + c["unanswered"] for c in counts.values()) == 2


def test_suggestion_answers_rules() -> None:
    from shapely.geometry import Point

    from pointnuc.io.objects import QuPathObject
    from pointnuc.suggest import suggestion_answers

    rec = {"class": "q", "images": {"i": [
        {"rank": 1, "x": 10.0, "y": 10.0, "radius_px": 5.0, "detected": True},
        {"rank": 2, "x": 50.0, "y": 50.0, "radius_px": 5.0, "detected": False},
        {"rank": 3, "x": 90.0, "y": 90.0, "radius_px": 5.0, "detected": False},
        {"rank": 4, "x": 20.0, "y": 80.0, "radius_px": 5.0, "detected": True},
    ]}}
    objs = [QuPathObject("annotation", Point(50, 50), "q", {SUGGESTION_MARKER: 2}),  # still a question
            QuPathObject("annotation", Point(93, 88), "Nucleus", {SUGGESTION_MARKER: 3}),  # moved and reclassified
            QuPathObject("annotation", Point(10, 10), "Nucleus", {SUGGESTION_MARKER: 9})]  # another run's rank
    assert suggestion_answers(rec, {"i": objs}) == {"i": (1, 3)}
    # deleting the detection a suggestion sits on answers it
    assert suggestion_answers(rec, {"i": objs}, {"i": np.array([[11.0, 9.0]])}) == {"i": (2, 2)}
    # so does an outline drawn there (the suggestion point left as it was), or a background area over it;
    # an area of the suggestions' own class or a far one does not
    drawn = [*objs, QuPathObject("annotation", Point(21, 79).buffer(6), "Nucleus", {}),
             QuPathObject("annotation", Point(50, 50).buffer(3), "q", {}),
             QuPathObject("annotation", Point(150, 150).buffer(20), "Background", {})]
    assert suggestion_answers(rec, {"i": drawn}) == {"i": (2, 2)}


def test_suggest_in_a_qupath_project_keeps_user_objects(trained, fake_project: Path) -> None:  # noqa: F811
    from test_io_qupath import A7, FAKE

    from pointnuc.io.qupath_project import QuPathProjectFile
    from pointnuc.suggest import suggest_project

    _, model, _ = trained
    proj = QuPathProjectFile(fake_project, paquo=FAKE)
    data = fake_project / "data" / "1" / "data.qpdata"
    def user_objects(doc: list[dict]) -> list[tuple]:
        return [(a["roi"], a["class"]) for a in doc if a["class"] != "pointnuc suggestion"]

    user = user_objects(json.loads(data.read_text())["annotations"])
    summary = suggest_project(proj, model, n=4, pixel_size_um=0.5)
    assert len(summary.suggestions) == 4
    after = json.loads(data.read_text())["annotations"]
    mine = [a for a in after if a["class"] == "pointnuc suggestion"]
    assert user_objects(after) == user
    assert len(mine) == sum(s.image == A7 for s in summary.suggestions)
    assert (fake_project / "pointnuc-backup").is_dir()
    suggest_project(proj, model, n=1, pixel_size_um=0.5)
    again = json.loads(data.read_text())["annotations"]
    assert user_objects(again) == user
    assert len([a for a in again if a["class"] == "pointnuc suggestion"]) <= 1


def test_train_from_refuses_a_model_it_cannot_start_from(trained, tmp_path: Path) -> None:
    proj, model, _ = trained
    res = CliRunner().invoke(main, ["train", str(proj), "--from", str(model), "--profile", "quick",
                                    "--out", str(tmp_path / "m"), "--no-progress"])
    _one_error_line(res, "--from: ")
    assert "encoder tiny" in res.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pointnuc-model.json").write_text(json.dumps({"format": "something-else"}))
    res = CliRunner().invoke(main, ["train", str(proj), "--from", str(tmp_path / "other"), "--out",
                                    str(tmp_path / "m"), "--no-progress"])
    _one_error_line(res, "not a pointnuc model description")
    assert not (tmp_path / "m").exists()


def test_train_from_starts_from_the_parent_and_names_it(trained, tmp_path: Path) -> None:
    import torch

    from pointnuc.infer.results import model_digest
    from pointnuc.models.bundle import load_network
    from pointnuc.models.net import build_network

    proj, model, _ = trained
    child = tmp_path / "m1"
    res = CliRunner().invoke(main, ["train", str(proj), "--from", str(model), "--out", str(child), "--no-progress"])
    assert res.exit_code == 0, res.output
    meta = json.loads((child / "pointnuc-model.json").read_text())
    corr = meta["provenance"]["correction"]
    assert corr["parent_digest"] == model_digest(model) and Path(corr["parent"]) == model.resolve()
    parent_meta = json.loads((model / "pointnuc-model.json").read_text())
    assert corr["parent_weights_sha256"] == parent_meta["weights_sha256"]
    assert meta["norm_reference"] == parent_meta["norm_reference"]  # the parent's colours
    base = parent_meta["config"]
    assert meta["config"]["detection"]["rounds"] == 0
    assert meta["config"]["detection"]["epochs"] == max(1, math.ceil(base["detection"]["epochs"] / 4))
    assert meta["config"]["encoder"] == "tiny" and meta["pixel_size_um"] == 0.5
    for which, ch in (("detector", 1), ("segmenter", 2)):
        p = load_network(model, which).state_dict()
        c = load_network(child, which).state_dict()
        torch.manual_seed(0)
        fresh = build_network(ch, "tiny", pretrained=False).state_dict()

        def dist(a, b):
            return sum(float((a[k].float() - b[k].float()).norm()) for k in a if a[k].is_floating_point())
        assert dist(c, p) < 0.5 * dist(fresh, p), which  # it moved a little from the parent, nowhere near a fresh start
    # a chain of rounds keeps the first training's schedule as its base
    res = CliRunner().invoke(main, ["train", str(proj), "--from", str(child), "--out", str(tmp_path / "m2"),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    meta2 = json.loads((tmp_path / "m2" / "pointnuc-model.json").read_text())
    assert meta2["config"] == meta["config"]
    assert meta2["provenance"]["correction"]["parent_digest"] == model_digest(child)
