"""pointnuc against a real QuPath 0.6.0, end to end through the CLI.

Projects are built with paquo: three synthetic H&E-like TIFFs at 0.5 µm/px in a folder beside the
project; on each image a Points annotation of class ``Nucleus`` (a third of the nuclei), a user
rectangle of class ``Tumor`` and a user detection of class ``Stroma``. Every ``pointnuc`` command
runs as ``python -m pointnuc`` in a child process (it starts a JVM when it opens a .qpproj), and
after each step the project is reopened with QuPath's own classes (``tests/qupath_kit.py``, also a
child process) and checked: every detection/cell ROI is a valid polygon inside the image (cells:
their nucleus too, and inside the cell), the user's objects are unchanged (id, class, geometry),
no nucleus is there twice, and the counts are those pointnuc reported. Every GeoJSON file pointnuc
writes is read back by QuPath's ``PathIO.readObjects``: no exception, same objects and types.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPoint, box
from synth import label_points, render_nuclei, write_geojson_project, write_tiff

from pointnuc.io.base import POINTNUC_MARKER
from pointnuc.measurements import measurement_names

pytestmark = pytest.mark.qupath

NAMES = ("synth-a.tif", "synth-b.tif", "synth-c.tif")
H, W = 192, 224
PX = 0.5
TUMOR = box(0, 0, 112, H)  # the left half of every image
STROMA = box(150, 150, 166, 162)
#: QuPath's cell-detection measurements (shape and H&E stains: segment measures the image's pixels)
DETECTION_KEYS = [*measurement_names(cells=False), POINTNUC_MARKER]
CELL_KEYS = [*measurement_names(cells=True), POINTNUC_MARKER]
# enough for a model that finds the synthetic nuclei (40 of 40 per image), no more: no self-training round
TRAIN_SETTINGS = ["--profile", "tiny", "--set", "data.pixel_size_um=0.5", "--set", "detection.epochs=6",
                  "--set", "detection.rounds=0", "--set", "segmentation.epochs=4", "--set", "data.patches_per_image=8"]

# --------------------------------------------------------------------------- helpers


def pointnuc(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python -m pointnuc ARGS`` in a child process (with QuPath); a hang fails instead of blocking."""
    from qupath_kit import REPO, child_env

    # one torch thread, as the in-process tests use: for the tiny networks here a second OpenMP thread
    # gains nothing, and on a busy 2-core machine it made `train` 9x slower (56 s instead of 6 s)
    env = child_env({"OMP_NUM_THREADS": "1"})
    try:
        return subprocess.run([sys.executable, "-m", "pointnuc", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pointnuc {' '.join(map(str, args))} did not finish in {timeout:.0f} s", pytrace=False)


def ok(r: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have succeeded."""
    assert r.returncode == 0, f"exit {r.returncode}\n{_quiet(r.stdout)}\n{_quiet(r.stderr)}"
    return r.stdout


def _quiet(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if " [DEBUG] " not in ln and " [INFO] " not in ln)[-4000:]


def stdout_json(out: str) -> Any:
    """stdout holds pointnuc's output only (QuPath logs at WARN, to stderr), so --json parses whole."""
    return json.loads(out)


def reported(out: str) -> dict[str, int]:
    """The nuclei per image that ``pointnuc segment`` reported."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^  (\S+): (\d+) nuclei", out, re.MULTILINE)}


def geom(wkb_hex: str) -> shapely.Geometry:
    return shapely.from_wkb(bytes.fromhex(wkb_hex))


def qupath_warnings(r: subprocess.CompletedProcess[str]) -> list[str]:
    from qupath_kit import log_warnings

    return log_warnings(r.stdout + r.stderr)


def dump(project: Path) -> dict[str, dict[str, Any]]:
    """Each image of the project as QuPath's classes read it."""
    from qupath_kit import kit

    return {im["name"]: im for im in kit("dump-project", project)["images"]}


def user_objects(image: dict[str, Any]) -> dict[str, tuple]:
    """The user's objects by id: type, class and geometry (normalised: QuPath does not keep the order of points)."""
    return {o["id"]: (o["type"], o["class"], shapely.normalize(geom(o["wkb"])).wkb_hex)
            for o in image["objects"] if POINTNUC_MARKER not in o["measurements"]}


def check(project: Path, users: dict[str, dict[str, tuple]]) -> dict[str, list[dict[str, Any]]]:
    """The checks after every step; returns each image's pointnuc objects (as QuPath has them)."""
    out = {}
    for name, im in dump(project).items():
        image = box(0, 0, im["width"], im["height"])
        assert user_objects(im) == users[name], f"{name}: the user's objects changed"
        mine = [o for o in im["objects"] if POINTNUC_MARKER in o["measurements"]]
        for o in mine:
            assert o["type"] in ("detection", "cell") and o["class"] == "Nucleus", o
            assert o["roi_type"] == "Polygon" and o["valid"], o
            g = geom(o["wkb"])
            assert g.geom_type == "Polygon" and image.covers(g), (name, g.bounds)
            if o["type"] == "cell":
                assert o["nucleus_valid"], o
                n = geom(o["nucleus_wkb"])
                assert n.geom_type == "Polygon" and image.covers(n) and g.buffer(1e-6).covers(n), (name, n.bounds)
                assert list(o["measurements"]) == CELL_KEYS
            else:
                assert list(o["measurements"]) == DETECTION_KEYS
        assert len({o["id"] for o in mine}) == len(mine)
        nuclei = np.array([geom(o.get("nucleus_wkb") or o["wkb"]) for o in mine], dtype=object)
        tree = shapely.STRtree(nuclei)
        for i, j in zip(*tree.query(nuclei, predicate="intersects")):
            if i < j:
                a, b = nuclei[i], nuclei[j]
                iou = a.intersection(b).area / a.union(b).area
                assert iou < 0.5, f"{name}: a nucleus twice near {a.centroid}"
        out[name] = mine
    return out


def centroid_in(o: dict[str, Any], area: shapely.Geometry) -> bool:
    return area.covers(geom(o["wkb"]).centroid)


def read_back_geojson(files: list[Path]) -> None:
    """QuPath's File > Import objects (PathIO.readObjects) reads every file whole, with the same objects."""
    from qupath_kit import kit

    assert files
    res = kit("read-geojson", *files)
    for f in files:
        got = res["files"][str(f)]
        assert got["error"] is None, (f, got["error"])
        feats = json.loads(f.read_text(encoding="utf-8"))["features"]
        assert [o["type"] for o in got["objects"]] == [ft["properties"]["objectType"] for ft in feats], f
        assert all(o["valid"] and (o["type"] != "cell" or o["nucleus_valid"]) for o in got["objects"]), f
    assert not res["log_warnings"], res["log_warnings"][:5]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def images(qupath_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The TIFFs (in ``images/``, beside the projects) and the clicked points of each (with a real QuPath)."""
    root = tmp_path_factory.mktemp("qupath-e2e")
    folder = root / "images"
    folder.mkdir()
    data = {}
    for i, name in enumerate(NAMES):
        img, lab = render_nuclei((H, W), 40, radius=5.5, seed=20 + i, min_gap=1.2)
        pts = label_points(lab)
        clicked = pts[np.random.default_rng(i).choice(len(pts), len(pts) // 3, replace=False)]
        write_tiff(folder / name, img, PX)
        data[name] = {"path": folder / name, "image": img, "clicked": clicked}
    return {"root": root, "images": data}


def build_project(images: dict[str, Any], name: str) -> tuple[Path, dict[str, dict[str, tuple]]]:
    """A new project ``name`` with the three images and the user's objects; (folder, user objects per image)."""
    from qupath_kit import kit

    folder = images["root"] / name
    spec = {"project": str(folder), "images": [
        {"path": str(d["path"]), "objects": [
            {"type": "annotation", "class": "Nucleus", "wkt": MultiPoint(d["clicked"].tolist()).wkt},
            {"type": "annotation", "class": "Tumor", "wkt": TUMOR.wkt},
            {"type": "detection", "class": "Stroma", "wkt": STROMA.wkt},
        ]} for d in images["images"].values()]}
    spec_file = images["root"] / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    users = {im["name"]: user_objects(im) for im in kit("build-project", spec_file)["images"]}
    assert sorted(users) == sorted(NAMES) and all(len(u) == 3 for u in users.values())
    return folder, users


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model(images: dict[str, Any]) -> tuple[Path, dict[str, bytes], dict[str, bytes]]:
    """A tiny model trained on a .qpproj (one for every test here); the project's files before and after."""
    project, _ = build_project(images, "train")
    before = _files(project)
    out = images["root"] / "model"
    ok(pointnuc("train", project / "project.qpproj", "--out", out, "--no-progress", *TRAIN_SETTINGS, timeout=300))
    assert (out / "pointnuc-model.json").is_file() and (out / "segmenter.pt").is_file()
    return out, before, _files(project)


# --------------------------------------------------------------------------- tests


def test_inspect_and_train_read_the_project_without_changing_it(images: dict[str, Any], model) -> None:
    _, before, after = model
    assert after == before  # training only reads
    project, _ = build_project(images, "inspect")
    report = stdout_json(ok(pointnuc("inspect", project, "--json")))
    assert report["kind"] == "qupath"
    assert [im["name"] for im in report["images"]] == list(NAMES)
    for im in report["images"]:
        clicked = images["images"][im["name"]]["clicked"]
        assert im["points"] == {"Nucleus": len(clicked)} and (im["width"], im["height"]) == (W, H)
        assert im["pixel_size_um"] == PX and im["n_pointnuc_objects"] == 0
    report = stdout_json(ok(pointnuc("inspect", project, "--json", "--region-class", "Tumor")))
    assert all(im["n_regions"] == 1 for im in report["images"])


def test_segment_rerun_cells_within_and_one_image(images: dict[str, Any], model) -> None:
    """A user's sequence on one project, checked with QuPath after every step."""
    model_dir = model[0]
    project, users = build_project(images, "sequence")
    seg = ("segment", project, "--model", model_dir, "--no-progress")

    # 1. segment: detections, as many as reported
    out = ok(pointnuc(*seg))
    counts = reported(out)
    assert sorted(counts) == sorted(NAMES) and all(n > 10 for n in counts.values()), out
    first = check(project, users)
    assert {n: len(m) for n, m in first.items()} == counts
    assert all(o["type"] == "detection" for m in first.values() for o in m)

    # 2. a re-run: the kept results, replacing (not adding to) the objects of the first run
    out = ok(pointnuc(*seg))
    assert out.count("(done earlier)") == 3 and reported(out) == counts, out
    again = check(project, users)
    for name in NAMES:
        assert sorted(o["wkb"] for o in again[name]) == sorted(o["wkb"] for o in first[name])

    # 3. cells: the same nuclei, each in a cell that ends at the image border
    r = pointnuc(*seg, "--objects", "cell")
    out = ok(r)
    assert reported(out) == counts
    assert not [w for w in qupath_warnings(r) if "precision" in w.lower()], qupath_warnings(r)[:3]
    cells = check(project, users)
    for name in NAMES:
        assert all(o["type"] == "cell" for o in cells[name])
        assert sorted(o["nucleus_wkb"] for o in cells[name]) == sorted(o["wkb"] for o in first[name])
    reach = [geom(o["wkb"]).bounds for m in cells.values() for o in m]
    assert min(b[0] for b in reach) == 0 or max(b[2] for b in reach) == W  # some cells do meet the border

    # 4. --within Tumor: detections inside the rectangle replace what was there; the cells outside stay
    out = ok(pointnuc(*seg, "--within", "Tumor"))
    within_counts = reported(out)
    assert sorted(within_counts) == sorted(NAMES)
    inside = check(project, users)
    for name in NAMES:
        new = [o for o in inside[name] if o["type"] == "detection"]
        kept = [o for o in inside[name] if o["type"] == "cell"]
        assert len(new) == within_counts[name] > 0
        assert all(TUMOR.buffer(0.01).covers(geom(o["wkb"])) for o in new)  # cut at the region's edge
        assert sorted(o["id"] for o in kept) == sorted(o["id"] for o in cells[name] if not centroid_in(o, TUMOR))

    # 5. --image: only that image is segmented again (whole image); the others keep their objects, ids and all
    out = ok(pointnuc(*seg, "--image", "synth-b.tif"))
    assert reported(out) == {"synth-b.tif": counts["synth-b.tif"]}
    last = check(project, users)
    assert all(o["type"] == "detection" for o in last["synth-b.tif"]) and len(last["synth-b.tif"]) == counts["synth-b.tif"]
    for name in ("synth-a.tif", "synth-c.tif"):
        assert [o["id"] for o in last[name]] == [o["id"] for o in inside[name]]
    report = stdout_json(ok(pointnuc("inspect", project, "--json")))
    assert {im["name"]: im["n_pointnuc_objects"] for im in report["images"]} == {n: len(m) for n, m in last.items()}

    # every GeoJSON file pointnuc kept (whole images, the Tumor areas) is one QuPath reads
    read_back_geojson(sorted((project / "pointnuc-results").rglob("*.geojson")))


def test_shards_then_merge(images: dict[str, Any], model) -> None:
    model_dir = model[0]
    project, users = build_project(images, "shards")
    seg = ("segment", project, "--model", model_dir, "--no-progress")
    counts: dict[str, int] = {}
    before = _files(project)
    for k in (1, 2):
        out = ok(pointnuc(*seg, "--shard", f"{k}/2"))
        part = reported(out)
        assert part and not set(part) & set(counts), out
        counts.update(part)
        # shards never write into the project: only their results beside it
        assert {f: b for f, b in _files(project).items() if not f.startswith("pointnuc-results")} == before
    assert sorted(counts) == sorted(NAMES)
    out = ok(pointnuc(*seg, "--merge"))
    assert f"Merged {sum(counts.values())} nuclei from 3 image(s)" in out, out
    merged = check(project, users)
    assert {n: len(m) for n, m in merged.items()} == counts
    assert all(o["type"] == "detection" for m in merged.values() for o in m)


def test_geojson_folder_files_are_read_by_qupath(images: dict[str, Any], model, tmp_path: Path) -> None:
    """The GeoJSON path: detections and cells written for a folder of images + exports, read by PathIO."""
    model_dir = model[0]
    folder = tmp_path / "folder"
    tumor = {"type": "Feature", "id": "0d3f5a4e-2b1c-4c1e-9a57-1f2e3d4c5b6a",
             "geometry": shapely.geometry.mapping(TUMOR),
             "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}}
    for name, d in images["images"].items():
        write_geojson_project(folder, name[:-4], d["image"], d["clicked"], pixel_size_um=PX, extra_features=[tumor])
    seg = ("segment", folder, "--model", model_dir, "--no-progress")
    out_dir = folder / "pointnuc-geojson"
    counts = reported(ok(pointnuc(*seg)))
    files = sorted(out_dir.glob("*.geojson"))
    assert [f.name for f in files] == [n.replace(".tif", ".geojson") for n in NAMES]
    assert [len(json.loads(f.read_text())["features"]) for f in files] == [counts[n] for n in NAMES]
    read_back_geojson(files)
    ok(pointnuc(*seg, "--objects", "cell"))
    for f in files:
        feats = json.loads(f.read_text())["features"]
        assert feats and all(ft["properties"]["objectType"] == "cell" for ft in feats)
        assert all(box(0, 0, W, H).covers(shapely.geometry.shape(ft["geometry"])) for ft in feats)
    read_back_geojson(files)
    ok(pointnuc(*seg, "--objects", "cell", "--within", "Tumor"))
    read_back_geojson(sorted(out_dir.glob("*.geojson")) + sorted((folder / "pointnuc-results").rglob("*.geojson")))
