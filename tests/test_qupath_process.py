"""How pointnuc runs QuPath's JVM, and how it stops (issue #24 items 2-8, issue #29 item 8).

pointnuc never starts QuPath's JVM in its own process: a child process does all paquo work
(``pointnuc.io.qupath_process``). Tests marked ``qupath`` drive a real QuPath 0.6.0, assembled once per
session from ``../shared/qupath-0.6.0`` into ``.qupath/`` (skipped without it); their projects
are built by paquo in a subprocess, never in this process. The others run everywhere: the
stand-in for paquo of ``test_io_qupath.py``, the CLI's messages, and real signals on
GeoJSON-folder projects.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared_dir
from shapely.geometry import box
from test_io_qupath import fake_project  # noqa: F401  (the stand-in project fixture)

from pointnuc.errors import InputError, Interrupted
from pointnuc.io.base import NucleusObject
from pointnuc.io.qupath_backup import BACKUP_FOLDER, BACKUPS_PER_IMAGE
from pointnuc.io.qupath_project import QPDATA_END, QuPathProjectFile, check_qpdata, relocated

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
TINY = ["--profile", "tiny", "--no-progress", "--set", "data.pixel_size_um=0.5", "--set", "detection.epochs=40",
        "--set", "segmentation.epochs=2", "--set", "data.patches_per_image=4"]


def _resume(project: Path, model: Path) -> str:
    """The resume command pointnuc prints for a TINY training (options in `train --help` order)."""
    sets = " ".join(f"--set {v}" for v in TINY[4::2])
    return f"pointnuc train {project} --out {model} --profile tiny {sets} --no-progress --resume"


# --------------------------------------------------------------------------- helpers


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a project but pointnuc's own folders (backups, kept results)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not {BACKUP_FOLDER, "pointnuc-results"} & set(p.parts)}


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            **extra}


def _pointnuc(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pointnuc", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """pointnuc in its own process group (as a shell runs it), output to files (never a full pipe)."""
    return subprocess.Popen([sys.executable, "-m", "pointnuc", *args], cwd=cwd, env=env, start_new_session=True,
                            stdout=open(cwd / "stdout.txt", "w"), stderr=open(cwd / "stderr.txt", "w"))


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "pointnuc ended before the signal could be sent"
        assert time.monotonic() < end, "pointnuc did not get there in time"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, cwd: Path) -> tuple[int, str]:
    rc = proc.wait(timeout=120)
    return rc, (cwd / "stderr.txt").read_text()


def _qupath_children(project: Path) -> list[str]:
    """Command lines of QuPath child processes still running for ``project`` (Linux)."""
    found = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmd.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "pointnuc.io.qupath import serve" in text and str(project) in text:
            found.append(text)
    return found


def _assert_clean_stop(stderr: str, line: str, cwd: Path) -> None:
    """One line about the stop, last; no traceback; no JVM crash report in the working folder."""
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1] == line, stderr
    assert sum("stopped by" in ln or "interrupted" in ln for ln in lines) == 1, stderr
    assert not list(cwd.glob("hs_err_pid*.log"))


def _untrained_model(folder: Path) -> Path:
    """A model folder `segment` accepts (an untrained tiny network: the tests need work, not nuclei)."""
    from pointnuc.config import profile_config
    from pointnuc.models.bundle import ModelInfo, ModelLayout, save_info, save_weights
    from pointnuc.models.net import build_network

    config = profile_config("tiny", **{"data.pixel_size_um": 0.5})
    save_weights(ModelLayout(folder).segmenter, build_network(2, config.encoder, pretrained=False))
    save_info(folder, ModelInfo(config=config))  # after the weights: it records their checksum
    return folder


def _geojson_project(folder: Path, size: int, n: int = 2) -> Path:
    """``n`` images of ``size`` px a side (a 128 px synthetic tile repeated), a third of one tile's nuclei clicked."""
    from synth import label_points, render_nuclei, write_geojson_project

    for i in range(n):
        tile, lab = render_nuclei((128, 128), 20, radius=5.5, seed=20 + i, min_gap=1.2)
        reps = -(-size // 128)
        img = np.tile(tile, (reps, reps, 1))[:size, :size]
        write_geojson_project(folder, f"img-{i}", img, label_points(lab)[::3], pixel_size_um=0.5)
    return folder


# --------------------------------------------------------------------------- without QuPath


def test_a_json_file_that_is_not_a_project_is_one_line(tmp_path: Path) -> None:
    # #6: valid JSON with an image list, but not QuPath's (QuPath 0.6 threw a NullPointerException)
    from pointnuc.cli import main

    (tmp_path / "project.qpproj").write_text('{"images": []}')
    res = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "is not a QuPath project file" in res.stderr
    assert "createTimestamp" in res.stderr


def test_an_incomplete_qpdata_is_refused_before_qupath_reads_it(tmp_path: Path) -> None:
    # #4: QuPath ends data.qpdata with the serialised string "EOF"; reading one without it loops for ever
    magic = b"\xac\xed\x00\x05"
    (tmp_path / "data.qpdata").write_bytes(magic + b"w\x15\x00\x13Data file version 1" + QPDATA_END)
    check_qpdata(tmp_path, "a.tif")  # complete
    (tmp_path / "data.qpdata").write_bytes(magic + b"w\x15\x00\x13Data file vers")
    with pytest.raises(InputError, match=r"objects of image 'a.tif' cannot be read: .*data.qpdata is incomplete"):
        check_qpdata(tmp_path, "a.tif")
    (tmp_path / "data.qpdata").write_bytes(b"")
    with pytest.raises(InputError, match="incomplete"):
        check_qpdata(tmp_path, "a.tif")
    (tmp_path / "data.qpdata").write_text('{"annotations": []}')  # not QuPath's format: QuPath judges it
    check_qpdata(tmp_path, "a.tif")
    check_qpdata(tmp_path / "none", "a.tif")  # an image without objects yet


def test_images_in_a_sibling_folder_of_a_moved_project_are_found(shared: Path, tmp_path: Path) -> None:
    # #5: project/ and images/ moved together; QuPath relativises against the old project folder
    from test_io_qupath import FAKE

    fx = shared / "fixtures" / "qupath-0.6.0" / "points-project"
    old = "/elsewhere/study"
    (tmp_path / "images").mkdir()
    for f in (fx / "images").iterdir():
        (tmp_path / "images" / f.name).symlink_to(f)
    meta = json.loads((fx / "project.qpproj").read_text())
    meta["uri"] = f"file:{old}/project/project.qpproj"
    for e in meta["images"]:
        e["serverBuilder"]["uri"] = f"file:{old}/images/{e['imageName']}"
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "project.qpproj").write_text(json.dumps(meta))
    before = _snapshot(tmp_path / "project")
    images = QuPathProjectFile(tmp_path / "project", paquo=FAKE).images()
    assert [im.path for im in images] == [tmp_path / "images" / e["imageName"] for e in meta["images"]]
    assert _snapshot(tmp_path / "project") == before  # reading changed nothing
    assert relocated(Path("/a/p/../images/x.tif"), Path("/a/p"), Path("/b/p")) == Path("/b/images/x.tif")
    assert relocated(Path("/a/images/x.tif"), None, Path("/b/p")) is None


def test_backups_keep_the_newest_few_per_image(fake_project: Path) -> None:  # noqa: F811
    # #8: pointnuc-backup/ grew by one folder per write, without limit
    from test_io_qupath import A7, B0, FAKE

    backups = fake_project / BACKUP_FOLDER
    (backups / "my-notes").mkdir(parents=True)  # not pointnuc's: never touched
    proj = QuPathProjectFile(fake_project, paquo=FAKE)
    made = []
    for i, name in enumerate([A7, A7, B0, A7, A7, B0, A7]):
        before = set(backups.iterdir())
        proj.write_nuclei({name: [NucleusObject(box(10 + i, 10, 20 + i, 20), 0.9)]})
        made += [(name, p) for p in set(backups.iterdir()) - before]
    kept = sorted(p.name for p in backups.iterdir())
    newest = [p.name for name in (A7, B0) for _, p in sorted(m for m in made if m[0] == name)[-BACKUPS_PER_IMAGE:]]
    assert kept == sorted(newest + ["my-notes"])
    assert len(kept) == BACKUPS_PER_IMAGE + 2 + 1


def test_dataloader_workers_are_not_forked_from_a_process_running_a_jvm(monkeypatch) -> None:
    # #2: a DataLoader worker forked from a process that runs QuPath's JVM hung on a lock
    from pointnuc.train.batches import loader_start_method

    monkeypatch.setitem(sys.modules, "jpype", SimpleNamespace(isJVMStarted=lambda: False))
    assert loader_start_method() is None
    monkeypatch.setitem(sys.modules, "jpype", SimpleNamespace(isJVMStarted=lambda: True))
    assert loader_start_method() == "spawn"


@POSIX
def test_a_signal_is_one_line_with_the_exact_resume_command(tmp_path: Path, monkeypatch) -> None:
    # #29.8: "re-run the same command" was wrong with --out (refused) and without it (a new folder)
    from pointnuc import pipeline
    from pointnuc.cli import main

    proj = _geojson_project(tmp_path / "my project", 64, n=1)
    seen = {}

    def train_until_signal(project, out, config, **kw):
        out.mkdir(parents=True)
        (out / "pointnuc-model.json").write_text("{}")
        seen["out"] = out
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, through pointnuc's handler
        time.sleep(5)
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr(pipeline, "train_project", train_until_signal)
    res = CliRunner().invoke(main, ["train", str(proj), "--profile", "tiny", "--set", "seed=3", "--overwrite"])
    assert res.exit_code == 143, res.output
    out = seen["out"]
    assert out.parent == proj / "pointnuc-models"  # the dated folder this run made
    assert res.stderr == (f"pointnuc: stopped by SIGTERM; to continue where training stopped, run: pointnuc train "
                          f"'{proj}' --out '{out}' --profile tiny --set seed=3 --resume\n")
    res = CliRunner().invoke(main, ["train", str(proj), "--out", str(tmp_path / "m2"), "--profile", "tiny"])
    assert res.exit_code == 143
    assert res.stderr.endswith(f" --out {tmp_path / 'm2'} --profile tiny --resume\n")

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "segment_project", interrupted)
    model = _untrained_model(tmp_path / "model")
    res = CliRunner().invoke(main, ["segment", str(proj), "--model", str(model)])
    assert res.exit_code == 130
    assert res.stderr == ("pointnuc: interrupted; the images finished so far are kept: run the same command again "
                          "to continue\n")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the command


@POSIX
def test_ctrl_c_in_train_on_a_geojson_project(tmp_path: Path) -> None:
    # #3 without QuPath: Ctrl-C reaches the whole process group (DataLoader workers too)
    proj = _geojson_project(tmp_path / "project", 128)
    model = tmp_path / "model"
    proc = _start(["train", str(proj), "--out", str(model), *TINY], tmp_path, _env())
    _wait_for(lambda: (model / "pointnuc-model.json").is_file(), proc)
    os.killpg(proc.pid, signal.SIGINT)
    rc, err = _finish(proc, tmp_path)
    assert rc == 130
    _assert_clean_stop(err, f"pointnuc: interrupted; to continue where training stopped, run: {_resume(proj, model)}",
                       tmp_path)


@POSIX
def test_sigterm_in_segment_on_a_geojson_project(tmp_path: Path) -> None:
    # #3 without QuPath: SIGTERM (as `kill PID`) ends in one line and 143, nothing half-written
    proj = _geojson_project(tmp_path / "project", 1024)
    model = _untrained_model(tmp_path / "model")
    proc = _start(["segment", str(proj), "--model", str(model), "--no-progress"], tmp_path, _env())
    _wait_for(lambda: (proj / "pointnuc-results").is_dir(), proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc, tmp_path)
    assert rc == 143, err
    _assert_clean_stop(err, "pointnuc: stopped by SIGTERM; the images finished so far are kept: run the same command "
                            "again to continue", tmp_path)
    assert all(line.startswith("pointnuc: ") for line in err.splitlines()), err  # pointnuc's lines only
    assert not list(proj.rglob("*.tmp"))
    for f in proj.rglob("pointnuc-*/**/*.geojson"):  # whatever was finished is whole
        assert json.loads(f.read_text())["type"] == "FeatureCollection"


# --------------------------------------------------------------------------- with a real QuPath

_BUILD = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import numpy as np
from shapely.geometry import MultiPoint
from paquo.classes import QuPathPathClass
from paquo.projects import QuPathProject
from synth import label_points, render_nuclei, write_tiff

project, images = Path(sys.argv[2]), Path(sys.argv[3])
images.mkdir(parents=True, exist_ok=True)
with QuPathProject(project, mode="x") as qp:
    nucleus = QuPathPathClass("Nucleus", color=(255, 228, 22))
    for i in range(2):
        img, lab = render_nuclei((192, 192), 45, radius=5.5, seed=10 + i, min_gap=1.2)
        pts = label_points(lab)
        clicked = pts[np.random.default_rng(i).choice(len(pts), len(pts) // 3, replace=False)]
        write_tiff(images / f"synth-{i}.tif", img, 0.5)
        entry = qp.add_image(images / f"synth-{i}.tif")
        entry.hierarchy.add_annotation(MultiPoint([tuple(p) for p in clicked]), path_class=nucleus)
"""


@pytest.fixture(scope="session")
def qupath_env() -> dict[str, str]:
    """The environment for subprocesses, with PAQUO_QUPATH_DIR at a QuPath 0.6.0 assembled from ../shared."""
    script = shared_dir() / "qupath-0.6.0" / "assemble.sh"
    if not script.is_file():
        pytest.skip(f"no QuPath 0.6.0 to assemble: {script} is missing")
    r = subprocess.run(["bash", str(script), str(REPO / ".qupath")], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHON": sys.executable})
    if r.returncode != 0:
        pytest.skip(f"QuPath 0.6.0 could not be assembled: {r.stderr.strip()[-300:]}")
    qupath_dir = r.stdout.strip().splitlines()[-1].split("=", 1)[1]
    return _env(PAQUO_QUPATH_DIR=qupath_dir)


def _build(project: Path, images: Path, env: dict[str, str]) -> Path:
    r = subprocess.run([sys.executable, "-c", _BUILD, str(TESTS), str(project), str(images)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return project


@pytest.fixture(scope="session")
def qupath_base(qupath_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real QuPath project of two 192x192 images with 15 clicked points each (copied by each test)."""
    root = tmp_path_factory.mktemp("qupath-base")
    return _build(root / "project", root / "images", qupath_env)


@pytest.fixture
def qp_project(qupath_base: Path, tmp_path: Path) -> Path:
    """A copy of the base project (its image URIs still lead to the base's images)."""
    return Path(shutil.copytree(qupath_base, tmp_path / "project"))


@pytest.mark.qupath
def test_reading_runs_qupath_in_a_child_and_stdout_is_pointnuc_s(qp_project: Path, qupath_env, tmp_path: Path) -> None:
    # #2: no JVM in pointnuc's own process (nothing unsafe to fork); #7: QuPath's log never on stdout
    script = ("import json, sys; from pointnuc.io import open_project; p = open_project(sys.argv[1]); "
              "n = [len(p.annotations(im).points_xy) for im in p.images()]; jp = sys.modules.get('jpype'); "
              "print(json.dumps({'points': n, 'jvm': bool(jp and jp.isJVMStarted())}))")
    r = subprocess.run([sys.executable, "-c", script, str(qp_project)], env=qupath_env, capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"points": [15, 15], "jvm": False}
    before = _snapshot(qp_project)
    r = _pointnuc(["inspect", str(qp_project), "--json"], tmp_path, qupath_env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # nothing but pointnuc's JSON
    assert [im["points"] for im in report["images"]] == [{"Nucleus": 15}, {"Nucleus": 15}]
    assert "[DEBUG]" not in r.stdout + r.stderr and r.stderr == ""
    assert _snapshot(qp_project) == before
    assert not _qupath_children(qp_project)


_CHILD_LIFE = r"""
import json, os, signal, sys, time
from pointnuc.errors import QuPathError
from pointnuc.io.qupath_process import QuPathProcess

q = QuPathProcess(sys.argv[1], idle_exit_s=1.5)
name = q.call("entries", what="the image list")[0]["name"]
first = q._proc.pid
time.sleep(3.5)  # the child leaves when idle ...
anns, _ = q.call("objects", what="the objects", name=name)  # ... and a new one takes the next call
second = q._proc.pid
os.kill(second, signal.SIGKILL)  # a child that dies is one clear error, and the next call starts another
try:
    q.call("objects", what="the objects of one image", name=name)
    died = ""
except QuPathError as err:
    died = str(err)
anns2, _ = q.call("objects", what="the objects", name=name)
print(json.dumps({"restarted": second != first, "points": [len(a[0].geoms) for a in (anns[0], anns2[0])],
                  "died": died}))
"""


@pytest.mark.qupath
def test_the_qupath_child_leaves_when_idle_and_a_dead_one_is_replaced(qp_project: Path, qupath_env,
                                                                      tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _CHILD_LIFE, str(qp_project)], env=qupath_env, capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["restarted"] and out["points"] == [15, 15]
    assert out["died"].startswith("QuPath stopped unexpectedly (exit status -9) during the objects of one image")
    assert not _qupath_children(qp_project)


@pytest.mark.qupath
def test_a_damaged_qpdata_is_one_clear_error_in_bounded_time(qp_project: Path, qupath_env, tmp_path: Path) -> None:
    # #4: QuPath logged "Reached end of file unexpectedly" to stdout without end (5.6 GB in 10 min)
    qpdata = qp_project / "data" / "1" / "data.qpdata"
    whole = qpdata.read_bytes()
    for damaged, expect in ((whole[: len(whole) // 2], "is incomplete"),  # cut short: refused before QuPath reads it
                            (whole[: int(len(whole) * 0.3)] + QPDATA_END, "logged 'Reached end of file")):  # QuPath loops
        qpdata.write_bytes(damaged)
        before = _snapshot(qp_project)
        t0 = time.monotonic()
        with open(tmp_path / "out.txt", "w") as out:  # (a file: the old behaviour filled pipes by the gigabyte)
            r = subprocess.run([sys.executable, "-m", "pointnuc", "inspect", str(qp_project)], env=qupath_env,
                               cwd=tmp_path, stdout=out, stderr=subprocess.PIPE, text=True, timeout=90)
        assert time.monotonic() - t0 < 60
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "'synth-0.tif'" in r.stderr and expect in r.stderr, r.stderr
        assert (tmp_path / "out.txt").stat().st_size == 0
        assert _snapshot(qp_project) == before
        assert not _qupath_children(qp_project)


@pytest.mark.qupath
def test_a_project_moved_with_its_sibling_images_folder(qupath_env, tmp_path: Path) -> None:
    # #5: refused as "image file missing" although QuPath (and paquo's relative lookup) finds them
    _build(tmp_path / "old" / "project", tmp_path / "old" / "images", qupath_env)
    (tmp_path / "old").rename(tmp_path / "new")
    proj = tmp_path / "new" / "project"
    before = _snapshot(proj)
    r = _pointnuc(["inspect", str(proj), "--json"], tmp_path, qupath_env)
    assert r.returncode == 0, r.stderr
    assert [im["path"] for im in json.loads(r.stdout)["images"]] == [
        str(tmp_path / "new" / "images" / f"synth-{i}.tif") for i in range(2)]
    assert _snapshot(proj) == before  # reading changed nothing
    script = ("import sys; from shapely.geometry import box; from pointnuc.io import open_project, NucleusObject; "
              "p = open_project(sys.argv[1]); im = p.images()[1]; "
              "p.write_nuclei({im.name: [NucleusObject(box(5, 5, 15, 15), 0.9)]}); "
              "print(open_project(sys.argv[1]).annotations(im).n_pointnuc_objects)")
    r = subprocess.run([sys.executable, "-c", script, str(proj)], env=qupath_env, capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr


@pytest.mark.qupath
def test_not_a_project_for_qupath_is_one_line(qupath_env, tmp_path: Path) -> None:
    # #6 with QuPath present: its Java traceback became one line
    for text, expect in (('{"images": []}', "is not a QuPath project file"),
                         ('{"createTimestamp": 1, "modifyTimestamp": 1, "images": []}', "QuPath cannot open")):
        (tmp_path / "project.qpproj").write_text(text)
        r = _pointnuc(["inspect", str(tmp_path)], tmp_path, qupath_env)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and expect in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


@pytest.mark.qupath
@POSIX
def test_sigterm_in_train_on_a_qpproj(qp_project: Path, qupath_env, tmp_path: Path) -> None:
    # #3: SIGTERM during train was ignored or crashed the JVM (hs_err_pid*.log in the working folder)
    model = tmp_path / "model"
    before = _snapshot(qp_project)
    proc = _start(["train", str(qp_project), "--out", str(model), *TINY], tmp_path, qupath_env)
    _wait_for(lambda: (model / "pointnuc-model.json").is_file(), proc)
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc, tmp_path)
    assert rc == 143, err
    _assert_clean_stop(err, f"pointnuc: stopped by SIGTERM; to continue where training stopped, run: "
                            f"{_resume(qp_project, model)}", tmp_path)
    assert _snapshot(qp_project) == before
    assert not _qupath_children(qp_project)


@pytest.mark.qupath
@POSIX
def test_ctrl_c_while_writing_into_a_qpproj_restores_it(qp_project: Path, qupath_env, tmp_path: Path) -> None:
    # #3: Ctrl-C during segment ended in SIGSEGV; the project must be as before (or as completed)
    from pointnuc.infer.results import results_dir
    from pointnuc.io.geojson import write_nuclei_file

    model = _untrained_model(tmp_path / "model")
    # a kept, current result (segment --shard 1/1 keeps it with its record and writes nothing), then
    # enough nuclei in it for a write of a few seconds
    r = _pointnuc(["segment", str(qp_project), "--model", str(model), "--shard", "1/1", "--no-progress"], tmp_path,
                  qupath_env)
    assert r.returncode == 0, r.stderr
    [kept] = list(results_dir(SimpleNamespace(root=qp_project), model).glob("synth-0.tif*.geojson"))
    xy = np.random.default_rng(0).uniform(2, 180, size=(20000, 2))
    write_nuclei_file(kept, [NucleusObject(box(x, y, x + 4, y + 3), 0.8) for x, y in xy], pixel_size_um=0.5)
    before = _snapshot(qp_project)
    proc = _start(["segment", str(qp_project), "--model", str(model), "--merge"], tmp_path, qupath_env)
    _wait_for(lambda: (qp_project / BACKUP_FOLDER).is_dir() and any((qp_project / BACKUP_FOLDER).iterdir()), proc)
    time.sleep(0.3)  # the QuPath child is adding the objects
    os.killpg(proc.pid, signal.SIGINT)  # as the terminal's Ctrl-C
    rc, err = _finish(proc, tmp_path)
    assert rc == 130, err
    _assert_clean_stop(err, "pointnuc: interrupted; the images finished so far are kept: run the same command again "
                            "to continue", tmp_path)
    assert all(line.startswith("pointnuc: ") for line in err.splitlines()), err  # pointnuc's lines only
    after = _snapshot(qp_project)
    if after != before:  # (a fast machine: the write was done when the signal came) then it is complete
        assert sorted(after) == sorted(before)  # no stray files
        r = _pointnuc(["inspect", str(qp_project), "--json"], tmp_path, qupath_env)
        assert json.loads(r.stdout)["images"][0]["n_pointnuc_objects"] == len(xy)
    assert not _qupath_children(qp_project)


def test_interrupted_is_a_keyboard_interrupt() -> None:
    # cleanup code (DataLoader, executors, the QuPath write's restore) treats SIGTERM as Ctrl-C
    err = Interrupted(signal.SIGTERM)
    assert isinstance(err, KeyboardInterrupt) and err.signum == signal.SIGTERM
