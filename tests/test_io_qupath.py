"""The paquo path: a small stand-in for paquo's documented API, QuPath-not-found, real QuPath.

The stand-in mimics the paquo 0.9 calls pointnuc makes (``QuPathProject(path, mode)``,
``.images`` entries with ``image_name``, ``uri``, ``width``, ``height``, ``entry_id``,
``entry_path``, ``hierarchy``; ``hierarchy.annotations`` / ``.detections`` with ``.roi``,
``.path_class.name``, ``.measurements``; ``add_detection``, ``add_cell``,
``no_autoflush``, ``update_image_paths(try_relative=True)``, ``save``). It reads the real
fixture's project.qpproj (image list, absolute URIs of another machine) and keeps each
hierarchy as JSON in ``data/N/data.qpdata``, so saving, backups and restores are real files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import shapely
from click.testing import CliRunner
from shapely import wkt
from shapely.geometry import box, shape

from pointnuc.errors import InputError
from pointnuc.io import NucleusObject, WriteOptions, open_project
from pointnuc.io.base import POINTNUC_MARKER
from pointnuc.io.qupath_project import QuPathProjectFile, uri_to_path

# --------------------------------------------------------------------------- the stand-in


class FakePathClass:
    def __init__(self, name: str, color=None, parent=None) -> None:
        self.name = name
        self.color = color


class FakeObject:
    def __init__(self, roi, path_class=None, measurements=None, nucleus_roi=None) -> None:
        self.roi = roi
        self.path_class = path_class
        self.measurements = dict(measurements or {})
        self.nucleus_roi = nucleus_roi


class FakeProxy(list):
    def discard(self, x) -> None:
        self[:] = [o for o in self if o is not x]


class FakeHierarchy:
    fail_after: int | None = None  # raise on the n-th add (tests the restore)

    def __init__(self, data: dict, readonly: bool) -> None:
        self.readonly = readonly
        self.autoflush = True
        self.adds = 0

        def obj(d):
            pc = FakePathClass(d["class"]) if d.get("class") else None
            nuc = wkt.loads(d["nucleus"]) if d.get("nucleus") else None
            return FakeObject(wkt.loads(d["roi"]), pc, d.get("measurements"), nuc)

        self.annotations = FakeProxy(obj(d) for d in data.get("annotations", []))
        self.detections = FakeProxy(obj(d) for d in data.get("detections", []))

    @contextmanager
    def no_autoflush(self):
        self.autoflush = False
        try:
            yield self
        finally:
            self.autoflush = True

    def _add(self, o: FakeObject) -> FakeObject:
        if self.readonly:
            raise OSError("project in readonly mode")
        assert not self.autoflush, "adds must happen under no_autoflush()"
        self.adds += 1
        if FakeHierarchy.fail_after is not None and self.adds > FakeHierarchy.fail_after:
            raise RuntimeError("simulated Java failure")
        self.detections.append(o)
        return o

    def add_detection(self, roi, path_class=None, measurements=None):
        return self._add(FakeObject(roi, path_class, measurements))

    def add_cell(self, roi, path_class=None, measurements=None, *, nucleus_roi):
        return self._add(FakeObject(roi, path_class, measurements, nucleus_roi))

    def add_annotation(self, roi, path_class=None, measurements=None):
        o = self._add(FakeObject(roi, path_class, measurements))
        self.detections.discard(o)
        self.annotations.append(o)
        return o

    def to_json(self) -> dict:
        def d(o):
            return {"roi": o.roi.wkt, "class": o.path_class.name if o.path_class else None,
                    "measurements": o.measurements, "nucleus": o.nucleus_roi.wkt if o.nucleus_roi else None}

        return {"annotations": [d(o) for o in self.annotations], "detections": [d(o) for o in self.detections]}


class FakeEntry:
    def __init__(self, project: FakeProject, meta: dict) -> None:
        self._project = project
        self.entry_id = str(meta["entryID"])
        self.image_name = meta["imageName"]
        self.uri = meta["serverBuilder"]["uri"]
        md = meta["serverBuilder"]["metadata"]
        self.width, self.height = md["width"], md["height"]
        self.entry_path = project.root / "data" / self.entry_id
        self._hierarchy: FakeHierarchy | None = None

    def is_readable(self) -> bool:
        return uri_to_path(self.uri).is_file()

    @property
    def hierarchy(self) -> FakeHierarchy:
        if self._hierarchy is None:
            self._project.touched = True
            data = json.loads((self.entry_path / "data.qpdata").read_text())
            self._hierarchy = FakeHierarchy(data, readonly=self._project.mode == "r")
        return self._hierarchy


class FakeProject:
    opened: list[tuple[str, str]] = []

    def __init__(self, path, mode="r") -> None:
        p = Path(path)
        if p.suffix != ".qpproj":
            p = p / "project.qpproj"
        if not p.is_file():
            raise FileNotFoundError(p)
        self.path, self.mode, self.root, self.touched = p, mode, p.parent, False
        FakeProject.opened.append((str(p), mode))
        meta = json.loads(p.read_text())
        self.images = [FakeEntry(self, m) for m in meta["images"]]
        self._prev_uri = meta["uri"]

    def update_image_paths(self, *, try_relative: bool = False) -> None:
        assert try_relative and not self.touched, "update image paths before touching any hierarchy"
        prev = uri_to_path(self._prev_uri).parent
        if prev == self.root:  # the project did not move: nothing to do (as paquo)
            return
        for e in self.images:
            old = uri_to_path(e.uri)
            new = self.root / old.relative_to(prev) if old.is_relative_to(prev) else old
            if new.is_file():
                e.uri = new.as_uri()
                (e.entry_path / "server.json").write_text(json.dumps({"uri": e.uri}))  # as QuPath does

    def is_readable(self) -> dict[str, bool]:
        return {e.uri: e.is_readable() for e in self.images}

    def save(self) -> None:
        if self.mode == "r":
            raise OSError("project in readonly mode")
        for e in self.images:
            if e._hierarchy is not None:
                (e.entry_path / "data.qpdata").write_text(json.dumps(e._hierarchy.to_json()))
        meta = json.loads(self.path.read_text())
        meta["uri"] = self.path.as_uri()
        for m, e in zip(meta["images"], self.images):
            m["serverBuilder"]["uri"] = e.uri
        self.path.write_text(json.dumps(meta, indent=2))


FAKE = (FakeProject, FakePathClass)
A7, B0 = "TCGA-A7-A13E-01Z-00-DX1.tif", "TCGA-B0-5711-01Z-00-DX1.tif"


@pytest.fixture
def fake_project(shared: Path, tmp_path: Path) -> Path:
    """A copy of the fixture project whose data.qpdata are the stand-in's JSON of the same objects."""
    fx = shared / "fixtures" / "qupath-0.6.0"
    root = tmp_path / "points-project"
    (root / "images").mkdir(parents=True)
    for f in (fx / "points-project" / "images").iterdir():
        (root / "images" / f.name).symlink_to(f)
    shutil.copy(fx / "points-project" / "project.qpproj", root / "project.qpproj")
    for n, stem in ((1, A7[:-4]), (2, B0[:-4])):
        feats = json.loads((fx / "points-project.geojson" / f"{stem}.featurecollection.geojson").read_text())["features"]
        ann = [{"roi": shape(f["geometry"]).wkt, "class": f["properties"]["classification"]["name"]} for f in feats]
        (root / "data" / str(n)).mkdir(parents=True)
        (root / "data" / str(n) / "data.qpdata").write_text(json.dumps({"annotations": ann, "detections": []}))
        (root / "data" / str(n) / "server.json").write_text("{}")
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and "pointnuc-backup" not in p.parts}


# --------------------------------------------------------------------------- tests with the stand-in


def test_reading_through_paquo_api_matches_expected(shared: Path, fake_project: Path):
    before = _snapshot(fake_project)
    proj = QuPathProjectFile(fake_project / "project.qpproj", paquo=FAKE)
    expected = json.loads((shared / "fixtures/qupath-0.6.0/expected.json").read_text(encoding="utf-8"))
    images = proj.images()
    assert [im.name for im in images] == [A7, B0]
    for im, exp in zip(images, expected["images"]):
        # the project moved: images found by re-rooting the old absolute URIs
        assert im.path == fake_project / exp["file"]
        assert (im.width, im.height, im.pixel_size_um) == (1000, 1000, 0.25)
        ann = proj.annotations(im)
        assert sorted(map(tuple, ann.points_xy.tolist())) == sorted(map(tuple, exp["nucleus_points_xy"]))
        assert len(ann.regions) == sum(o["roi"] == "RectangleROI" for o in exp["other_annotations"])
    assert proj.annotations(images[1]).other_point_counts == {"Other": 5}
    assert _snapshot(fake_project) == before  # reading changes nothing
    assert all(mode == "r" for _, mode in FakeProject.opened if _.startswith(str(fake_project)))


def test_writing_replaces_marked_detections_and_keeps_backup(fake_project: Path):
    proj = QuPathProjectFile(fake_project, paquo=FAKE)
    nuclei = [NucleusObject(box(10, 10, 20, 20), 0.9), NucleusObject(box(700, 700, 712, 710), 0.8)]
    written = proj.write_nuclei({A7: nuclei})
    assert written == [fake_project / "data" / "1" / "data.qpdata"]
    data = json.loads(written[0].read_text())
    assert len(data["detections"]) == 2 and len(data["annotations"]) == 1
    m = data["detections"][0]["measurements"]
    assert m[POINTNUC_MARKER] == pytest.approx(0.9) and m["Nucleus: Area"] == pytest.approx(100 * 0.0625)
    assert data["detections"][0]["class"] == "Nucleus"
    backups = list((fake_project / "pointnuc-backup").iterdir())
    assert len(backups) == 1 and (backups[0] / "project.qpproj").is_file()
    assert (backups[0] / "data" / "1" / "data.qpdata").is_file()
    # a user's own detection is never touched; a re-run within an area replaces only there
    data["detections"].append({"roi": box(5, 5, 8, 8).wkt, "class": "Tumor", "measurements": {}, "nucleus": None})
    written[0].write_text(json.dumps(data))
    proj.write_nuclei({A7: [NucleusObject(box(30, 30, 40, 40), 0.7)]}, replace_within={A7: box(0, 0, 100, 100)})
    dets = json.loads(written[0].read_text())["detections"]
    assert sorted(round(d["measurements"].get(POINTNUC_MARKER, -1), 3) for d in dets) == [-1, 0.7, 0.8]
    assert proj.annotations(proj.images()[0]).n_pointnuc_objects == 2
    # cells carry their nucleus
    proj.write_nuclei({B0: [NucleusObject(box(100, 100, 110, 110), 0.5)]}, options=WriteOptions("cell"))
    [cell] = json.loads((fake_project / "data/2/data.qpdata").read_text())["detections"]
    assert wkt.loads(cell["roi"]).covers(wkt.loads(cell["nucleus"]))


def test_failed_write_restores_project(fake_project: Path, monkeypatch):
    proj = QuPathProjectFile(fake_project, paquo=FAKE)
    proj.write_nuclei({A7: [NucleusObject(box(10, 10, 20, 20), 0.9)]})
    before = _snapshot(fake_project)
    monkeypatch.setattr(FakeHierarchy, "fail_after", 1)
    with pytest.raises(RuntimeError, match="simulated"):
        proj.write_nuclei({A7: [NucleusObject(box(1, 1, 5, 5), 0.5), NucleusObject(box(50, 50, 60, 60), 0.5)]})
    assert _snapshot(fake_project) == before
    # paquo skips saving an entry whose image it cannot reach: pointnuc refuses instead
    monkeypatch.setattr(FakeHierarchy, "fail_after", None)
    monkeypatch.setattr(FakeEntry, "is_readable", lambda self: False)
    with pytest.raises(InputError, match="nothing was written"):
        proj.write_nuclei({A7: [NucleusObject(box(1, 1, 5, 5), 0.5)]})
    assert _snapshot(fake_project) == before


def test_cli_inspect_through_paquo_path(fake_project: Path, monkeypatch):
    import pointnuc.io.qupath_project as q
    from pointnuc.cli import main

    monkeypatch.setattr(q, "QuPathProcess", lambda qpproj: q.InProcess(qpproj, FAKE))
    res = CliRunner().invoke(main, ["inspect", str(fake_project / "project.qpproj"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["kind"] == "qupath"
    assert [im["points"] for im in report["images"]] == [{"Nucleus": 31}, {"Nucleus": 34, "Other": 5}]


def test_missing_image_files_are_one_clear_error(fake_project: Path, monkeypatch):
    import pointnuc.io.qupath_project as q
    from pointnuc.cli import main

    shutil.rmtree(fake_project / "images")
    proj = QuPathProjectFile(fake_project, paquo=FAKE)
    with pytest.raises(InputError, match="image file of 'TCGA-A7-A13E-01Z-00-DX1.tif' is missing"):
        proj.images()
    before = _snapshot(fake_project)
    monkeypatch.setattr(q, "QuPathProcess", lambda qpproj: q.InProcess(qpproj, FAKE))
    res = CliRunner().invoke(main, ["inspect", str(fake_project)])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "is missing" in res.stderr
    assert _snapshot(fake_project) == before


def test_qpproj_not_json_fails_before_paquo(tmp_path: Path):
    p = tmp_path / "project.qpproj"
    p.write_text("<xml/>")
    with pytest.raises(InputError, match="not JSON"):
        QuPathProjectFile(p, paquo=FAKE)
    p.write_text('{"version": "0.6.0"}')
    with pytest.raises(InputError, match="no image list"):
        open_project(tmp_path)


def test_uri_to_path():
    assert uri_to_path("file:/home/a%20b/x.tif") == Path("/home/a b/x.tif")
    assert uri_to_path("file:///data/x.svs") == Path("/data/x.svs")
    with pytest.raises(InputError, match="not a local file"):
        uri_to_path("https://example.org/x.svs")


# --------------------------------------------------------------------------- real paquo / QuPath
# Always in child processes: importing paquo.projects starts a JVM that cannot be stopped or restarted.


def _env_without_qupath(tmp_path: Path) -> dict[str, str]:
    """An environment in which paquo finds no QuPath: no PAQUO_QUPATH_DIR, an empty home (no
    ``~/QuPath*``, no user .paquo.toml)."""
    import os

    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAQUO_")}
    root = str(Path(__file__).resolve().parents[1])
    env.update(HOME=str(home), PYTHONPATH=root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    return env


def test_without_qupath_a_qpproj_gives_qupath_not_found(shared: Path, tmp_path: Path):
    env = _env_without_qupath(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import paquo.projects"], capture_output=True, timeout=120, env=env,
                           cwd=tmp_path)
    if probe.returncode == 0:
        pytest.skip("paquo finds a QuPath installation in a default folder even without PAQUO_QUPATH_DIR")
    work = shutil.copytree(shared / "fixtures/qupath-0.6.0/points-project", tmp_path / "points-project")
    code = (
        "import sys\n"
        "from pointnuc.errors import QuPathNotFoundError\n"
        "from pointnuc.io import open_project\n"
        "try:\n"
        f"    open_project({str(work)!r})\n"
        "except QuPathNotFoundError as err:\n"
        "    print(err)\n"
        "else:\n"
        "    sys.exit('no error')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    msg = r.stdout.strip()
    assert "PAQUO_QUPATH_DIR" in msg and "GeoJSON" in msg and "\n" not in msg
    res = subprocess.run([sys.executable, "-m", "pointnuc", "inspect", str(work / "project.qpproj")], capture_output=True,
                         text=True, timeout=120, env=env, cwd=tmp_path)
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "QuPath was not found" in res.stderr, res.stderr


@pytest.mark.qupath
def test_real_qupath_reads_and_writes(shared: Path, tmp_path: Path, qupath_dir: Path):
    from qupath_kit import kit, python_with_qupath

    work = shutil.copytree(shared / "fixtures/qupath-0.6.0/points-project", tmp_path / "points-project")
    expected = json.loads((shared / "fixtures/qupath-0.6.0/expected.json").read_text(encoding="utf-8"))
    got = python_with_qupath(f"""
from shapely.geometry import box
from pointnuc.io import NucleusObject, open_project
proj = open_project({str(work)!r})
images = proj.images()
out = {{"images": [{{"name": im.name, "pixel_size_um": im.pixel_size_um,
                     "points": sorted(map(list, proj.annotations(im).points_xy.tolist()))}} for im in images]}}
name = images[0].name
proj.write_nuclei({{name: [NucleusObject(box(10, 10, 20, 20), 0.9)]}})
proj.write_nuclei({{name: [NucleusObject(box(10, 10, 20, 20), 0.9), NucleusObject(box(40, 40, 50, 52), 0.8)]}})
out["n_pointnuc_objects"] = open_project({str(work)!r}).annotations(images[0]).n_pointnuc_objects
answer(out)
""")
    for im, exp in zip(got["images"], expected["images"]):
        assert im["points"] == sorted(map(list, exp["nucleus_points_xy"]))
        assert im["pixel_size_um"] == pytest.approx(0.25)
    assert got["n_pointnuc_objects"] == 2
    # what QuPath itself now holds: the second write replaced the first; the user's objects are as they were
    dump = kit("dump-project", work)["images"]
    dets = [o for o in dump[0]["objects"] if o["type"] == "detection"]
    assert sorted(shapely.from_wkb(bytes.fromhex(o["wkb"])).bounds for o in dets) == [(10, 10, 20, 20), (40, 40, 50, 52)]
    assert all(o["valid"] and o["class"] == "Nucleus" and POINTNUC_MARKER in o["measurements"] for o in dets)
    assert sorted((o["type"], o["class"]) for o in dump[0]["objects"] if o["type"] != "detection") == [
        ("annotation", "Nucleus")]
    assert sorted((o["type"], o["class"]) for o in dump[1]["objects"]) == [
        ("annotation", "Nucleus"), ("annotation", "Other"), ("annotation", "Region*")]


def test_failed_first_write_of_a_moved_project_restores_every_image_folder(fake_project: Path, monkeypatch):
    # the first write re-roots every image path, which rewrites data/N/server.json of all images,
    # also those not written to: a failure must put those back too
    before = _snapshot(fake_project)
    proj = QuPathProjectFile(fake_project, paquo=FAKE)
    monkeypatch.setattr(FakeHierarchy, "fail_after", 1)
    with pytest.raises(RuntimeError, match="simulated"):
        proj.write_nuclei({A7: [NucleusObject(box(1, 1, 5, 5), 0.5), NucleusObject(box(50, 50, 60, 60), 0.5)]})
    assert _snapshot(fake_project) == before


@pytest.mark.qupath
def test_real_qupath_replaces_a_cell_with_its_nucleus_inside_the_region(shared: Path, tmp_path: Path, qupath_dir: Path):
    """`--objects cell` then `--within R`: the cell whose nucleus lies in R is replaced even when its
    outline's centroid lies beyond R's edge (it stayed, beside a new detection of the same nucleus)."""
    from qupath_kit import kit, python_with_qupath

    work = shutil.copytree(shared / "fixtures/qupath-0.6.0/points-project", tmp_path / "points-project")
    python_with_qupath(f"""
from shapely.geometry import box
from pointnuc.io import NucleusObject, WriteOptions, open_project
proj = open_project({str(work)!r})
name = proj.images()[0].name
nuclei = [NucleusObject(box(10, 40, 13, 46), 0.9), NucleusObject(box(16, 40, 21, 46), 0.8)]
proj.write_nuclei({{name: nuclei}}, options=WriteOptions("cell", cell_expansion_um=1.0))
proj.write_nuclei({{name: nuclei}}, replace_within={{name: box(0, 0, 19.5, 100)}})
answer({{}})
""")
    dump = kit("dump-project", work)["images"][0]["objects"]
    mine = [o for o in dump if POINTNUC_MARKER in o.get("measurements", {})]
    assert sorted(o["type"] for o in mine) == ["detection", "detection"]  # each nucleus once, no cell left
