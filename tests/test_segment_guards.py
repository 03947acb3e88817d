"""``pointnuc segment`` never answers "0 nuclei" for tissue it did not look at, never runs at an absurd
scale, and never lets two runs write into one project.

Sparse tissue (fat: white cells, thin pink septa, a few nuclei), small images and crops at the tissue's
edge are looked at; a typo'd ``--pixel-size`` is refused in one line; a second writer is refused in one
line, and a lock left by a killed run is taken over. The segmenter is the deterministic stand-in of
tests/test_wsi.py (a nucleus is what is dark), so a nucleus missed here was never looked at.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from synth import write_tiff
from test_wsi import DarknessNet

from pointnuc.cli import main
from pointnuc.config import profile_config
from pointnuc.models.bundle import ModelInfo

PX = 0.25  # the images' µm/px; the model works at 0.5


def _info() -> ModelInfo:
    return ModelInfo(config=profile_config("tiny", **{"data.pixel_size_um": 0.5}), norm_reference=None)


def fat_tile(size: int = 512, *, seed: int = 0, n_nuclei: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Adipose tissue at 0.25 µm/px: white fat cells, pink septa 1-3 px thin between them, and a few dark
    elliptic nuclei (about 9 x 5 µm) on the septa; (RGB image, (n, 2) x/y of the nuclei)."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, size, (10, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    d = np.sort(np.stack([np.hypot(yy - y, xx - x) for y, x in seeds]), axis=0)
    septa = (d[1] - d[0]) < 2.0  # the cells' boundaries
    img = np.full((size, size, 3), 246.0)
    img[septa] = (225, 160, 200)
    ys, xs = np.nonzero(septa[20:-20, 20:-20])
    centres: list[tuple[float, float]] = []
    for i in rng.permutation(len(ys)):
        cx, cy = xs[i] + 20, ys[i] + 20
        if all(np.hypot(cx - x, cy - y) > 40 for x, y in centres):
            img[(yy - cy) ** 2 + ((xx - cx) / 1.8) ** 2 <= 81] = (90, 55, 140)
            centres.append((cx + 0.5, cy + 0.5))
        if len(centres) == n_nuclei:
            break
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), np.array(centres)


def _segment(path: Path, pixel_size_um: float = PX):
    from pointnuc.infer.wsi import segment_slide
    from pointnuc.io.slide import open_slide

    with open_slide(path, pixel_size_um=pixel_size_um) as slide:
        return segment_slide(slide, DarknessNet(), _info(), tile_size=256, progress=False)


def _found(res, centres: np.ndarray, tol: float = 4.0) -> int:
    """How many of ``centres`` have a found nucleus within ``tol`` px."""
    import shapely

    if not res.nuclei:
        return 0
    got = shapely.get_coordinates(shapely.centroid(np.array([n.polygon for n in res.nuclei], dtype=object)))
    d = np.hypot(*(got[:, None, :] - centres[None, :, :]).transpose(2, 0, 1))
    return int((d.min(0) < tol).sum())


# --------------------------------------------------------------------------- sparse tissue, small images


def test_nuclei_in_a_tile_of_fat_are_found(tmp_path: Path) -> None:
    """A 512 x 512 tile of fat: 6 clearly visible nuclei, all found (was: an empty tissue mask, 0 nuclei)."""
    img, centres = fat_tile()
    write_tiff(tmp_path / "fat.tif", img, PX)
    res = _segment(tmp_path / "fat.tif")
    assert res.n_tiles == res.n_tiles_total >= 1
    assert _found(res, centres) == len(centres) == 6


def _block_mean(img: np.ndarray, k: int) -> np.ndarray:
    """The image averaged over k x k blocks: what a pyramid level or thumbnail holds."""
    h, w = img.shape[0] // k * k, img.shape[1] // k * k
    return img[:h, :w].reshape(h // k, k, w // k, k, 3).mean((1, 3)).round().astype(np.uint8)


@pytest.mark.parametrize("thumb_ds", [16, 48])  # 4 µm thumbnail pixels (a 20k px slide), 12 µm (a 100k px slide)
def test_tissue_mask_keeps_fat_on_a_large_slide_and_drops_its_glass(thumb_ds: int) -> None:
    """A large slide: fat on the left, glass (with noise and dust) on the right. The plan covers every
    nucleus of the fat, however coarse the thumbnail, and still leaves out most of the glass."""
    from pointnuc.infer.slide_tiles import plan_slide

    fat, c = fat_tile(seed=1)
    n = 4
    side = 512 * n
    img = np.empty((side, 2 * side, 3), np.uint8)
    img[:, :side] = np.tile(fat, (n, n, 1))
    rng = np.random.default_rng(0)
    img[:, side:] = np.clip(244 + rng.normal(0, 2, (side, side, 3)), 0, 255).astype(np.uint8)
    for y, x in rng.integers(0, side - 4, (30, 2)):  # dust: 1 µm specks on the glass
        img[y : y + 4, side + x : side + x + 4] = 120
    centres = np.concatenate([c + (512 * i, 512 * j) for i in range(n) for j in range(n)])

    class Big:
        width, height, pixel_size_um = 2 * side, side, PX

    plan = plan_slide(Big(), _info(), tile_size=256, thumbnail=(_block_mean(img, thumb_ds), float(thumb_ds)))
    assert len(plan.grid) > 16  # large enough for the tissue mask to apply
    ds = plan.downsample
    cores = [((t.core.x0 + plan.origin[1]) * ds, (t.core.y0 + plan.origin[0]) * ds,
              (t.core.x1 + plan.origin[1]) * ds, (t.core.y1 + plan.origin[0]) * ds) for t in plan.tiles]
    covered = [any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in cores) for x, y in centres]
    assert all(covered), f"{len(centres) - sum(covered)} of {len(centres)} nuclei in tiles left out"
    glass_tiles = [c for c in cores if c[0] >= side + 64]  # beyond the tissue mask's margin
    all_glass = [t for t in plan.grid if (t.core.x0 + plan.origin[1]) * ds >= side + 64]
    assert len(glass_tiles) < 0.2 * len(all_glass)


def test_small_images_and_crops_are_looked_at_whole(tmp_path: Path) -> None:
    """100 x 100 and 150 x 150 px crops at 0.25 µm/px (was: dropped whole by the tissue mask's minimum area)."""
    from synth import render_nuclei

    big, labels = render_nuclei((300, 300), 40, radius=7, seed=4)
    for size in (100, 150):
        crop = np.s_[75 : 75 + size, 75 : 75 + size]
        write_tiff(tmp_path / f"c{size}.tif", big[crop], PX)
        res = _segment(tmp_path / f"c{size}.tif")
        assert res.n_tiles == res.n_tiles_total >= 1
        whole = [i for i in np.unique(labels[crop]) if i and (labels[crop] == i).sum() == (labels == i).sum()]
        assert res.n_nuclei >= len(whole) >= 3


def test_real_crops_are_looked_at_whole(shared: Path, tmp_path: Path) -> None:
    """MoNuSeg crops of dense tissue (0.25 µm/px): 100 and 150 px crops gave 0 nuclei, 200 px gave 12."""
    from PIL import Image

    from pointnuc.infer.tissue import tissue_mask
    from pointnuc.io.slide import open_slide, read_thumbnail

    src = shared / "data" / "monuseg" / "train" / "TCGA-18-5592-01Z-00-DX1.png"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    full = np.asarray(Image.open(src).convert("RGB"))
    for size in (100, 150, 200):
        write_tiff(tmp_path / f"m{size}.tif", full[:size, :size], PX)
        with open_slide(tmp_path / f"m{size}.tif") as slide:
            thumb, tds = read_thumbnail(slide, pixel_size_um=PX)
        assert tissue_mask(thumb, downsample=tds, pixel_size_um=PX).all()  # no glass here: all tissue
        res = _segment(tmp_path / f"m{size}.tif")
        assert res.n_tiles == res.n_tiles_total and res.n_nuclei > 0


def _stand_in_model(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model folder whose segmenter is replaced by the deterministic stand-in when loaded."""
    from pointnuc.models import bundle
    from pointnuc.models.net import UNet

    bundle.save_info(folder, _info())
    bundle.save_weights(bundle.ModelLayout(folder).segmenter, UNet(2, "tiny"))
    monkeypatch.setattr(bundle, "load_network", lambda *a, **k: DarknessNet())
    return folder


def test_an_image_where_nothing_was_looked_at_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    model = _stand_in_model(tmp_path / "model", monkeypatch)
    proj = tmp_path / "p"
    proj.mkdir()
    Image.fromarray(np.full((3200, 3200, 3), 245, np.uint8)).save(proj / "glass.png", dpi=(25400 / PX, 25400 / PX))
    img, _ = fat_tile()
    write_tiff(proj / "fat.tif", img, PX)
    res = CliRunner().invoke(main, ["segment", str(proj), "--model", str(model), "--no-progress"])
    assert res.exit_code == 0, res.output
    lines = {ln.split(":")[0].strip(): ln for ln in res.output.splitlines() if ln.startswith("  ")}
    assert "0 nuclei" in lines["glass.png"] and "no tissue found: nothing was looked at" in lines["glass.png"]
    assert "6 nuclei" in lines["fat.tif"] and "nothing was looked at" not in lines["fat.tif"]


# --------------------------------------------------------------------------- pixel size


def _project(tmp_path: Path, pixel_size_um: float | None = 0.5) -> Path:
    from synth import render_nuclei, write_geojson_project

    img, _ = render_nuclei((200, 200), 10, radius=5, seed=1)
    return write_geojson_project(tmp_path / "p", "a", img, np.zeros((0, 2)), pixel_size_um=pixel_size_um)


def test_a_typo_d_pixel_size_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--pixel-size 25 (the file reader's limit is 20 µm/px) and 4 (8x enlarged for a 0.5 µm/px model) stop
    before any work, the dry run too (was: 17,100 tiles planned for a 1000 x 1000 image, 10 silent minutes)."""
    from pointnuc.errors import PixelSizeError
    from pointnuc.io import open_project
    from pointnuc.pipeline import plan_segmentation

    model = _stand_in_model(tmp_path / "model", monkeypatch)
    proj = _project(tmp_path, pixel_size_um=None)
    for args in (["--pixel-size", "25", "--dry-run"], ["--pixel-size", "4", "--dry-run"], ["--pixel-size", "0.01"],
                 ["--pixel-size", "25"]):
        res = CliRunner().invoke(main, ["segment", str(proj), "--model", str(model), "--no-progress", *args])
        assert res.exit_code == 2, res.output
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output, res.output
    with pytest.raises(PixelSizeError, match=r"--pixel-size 25: a pixel size is more than 0 and at most 20 µm"):
        plan_segmentation(open_project(proj), model, pixel_size_um=25.0)
    with pytest.raises(PixelSizeError, match=r"'a.tif' at 4 µm/px would be enlarged 8x to the model's 0.5 µm/px "
                                             r"\(200 x 200 px become 1,600 x 1,600\)"):
        plan_segmentation(open_project(proj), model, pixel_size_um=4.0)
    assert not (proj / "pointnuc-geojson").exists() and not (proj / "pointnuc-results").exists()
    # plausible ones go through
    res = CliRunner().invoke(main, ["segment", str(proj), "--model", str(model), "--no-progress", "--pixel-size", "0.25"])
    assert res.exit_code == 0, res.output
    # an image whose own file says 4 µm/px (an overview scan) fails alone; the others are segmented
    from synth import render_nuclei

    write_tiff(proj / "overview.tif", render_nuclei((50, 50), 2, radius=3, seed=2)[0], 4.0)
    write_tiff(proj / "b.tif", render_nuclei((100, 100), 5, radius=5, seed=3)[0], 0.5)
    res = CliRunner().invoke(main, ["segment", str(proj), "--model", str(model), "--no-progress", "--dry-run"])
    assert res.exit_code == 0 and "  fail (image 'overview.tif' at 4 µm/px would be enlarged 8x" in res.output, res.output
    assert "1 that cannot be segmented" in res.output
    res = CliRunner().invoke(main, ["segment", str(proj), "--model", str(model), "--no-progress", "--image", "b.tif",
                                    "--image", "overview.tif"])
    assert res.exit_code == 1 and "b.tif: 5 nuclei" in res.output, res.output
    assert "pointnuc: error: overview.tif: image 'overview.tif' at 4 µm/px would be enlarged 8x" in res.stderr
    assert not (proj / "pointnuc-geojson" / "overview.geojson").exists()


def test_a_user_error_fails_one_image_and_a_bug_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """errors.py's policy, image by image: a PointnucError (or a full disk) fails that image and the others are
    segmented; anything else is a bug and stops the run with its traceback (it was caught as "failed")."""
    import errno

    from synth import render_nuclei

    from pointnuc.errors import ImageReadError
    from pointnuc.infer import wsi
    from pointnuc.io import open_project
    from pointnuc.pipeline import segment_project

    model = _stand_in_model(tmp_path / "model", monkeypatch)
    proj = _project(tmp_path)
    write_tiff(proj / "b.tif", render_nuclei((100, 100), 5, radius=5, seed=3)[0], 0.5)
    real = wsi.segment_slide

    def failing_on_a(error: BaseException):
        def segment_slide(slide, *args, **kwargs):
            if Path(slide.path).name == "a.tif":
                raise error
            return real(slide, *args, **kwargs)
        return segment_slide

    for error in (ImageReadError("cannot read pixels of a.tif"), OSError(errno.ENOSPC, "No space left on device")):
        monkeypatch.setattr(wsi, "segment_slide", failing_on_a(error))
        s = segment_project(open_project(proj), model, progress=False, redo=True)
        assert list(s.failed) == ["a.tif"] and str(error) in s.failed["a.tif"]
        assert s.nuclei["b.tif"] == 5 and "a.tif" not in s.nuclei
    monkeypatch.setattr(wsi, "segment_slide", failing_on_a(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError, match="a bug"):
        segment_project(open_project(proj), model, progress=False, redo=True)
    res = CliRunner().invoke(main, ["segment", str(proj), "--model", str(model), "--no-progress", "--redo"])
    assert isinstance(res.exception, ZeroDivisionError), res.output  # not "a.tif failed", exit 1
    monkeypatch.setattr(wsi, "segment_slide", failing_on_a(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError, match="Input/output error"):  # not an OS error of the user's kind
        segment_project(open_project(proj), model, progress=False, redo=True)


# --------------------------------------------------------------------------- one writer at a time

_HOLD = """
import sys, time
from pathlib import Path
from pointnuc.io.lock import project_lock
with project_lock(Path(sys.argv[1]), "segment", shared=sys.argv[2] == "shared"):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(root: Path, mode: str = "exclusive") -> subprocess.Popen:
    """Another process that holds the project's lock until killed."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(root), mode], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


@pytest.mark.skipif(sys.platform == "win32", reason="kills with SIGKILL")
def test_a_second_writer_is_refused_and_a_killed_run_s_lock_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pointnuc.io import open_project
    from pointnuc.io.lock import LOCK_NAME, ProjectBusyError, project_lock
    from pointnuc.pipeline import merge_results, segment_project

    model = _stand_in_model(tmp_path / "model", monkeypatch)
    proj = _project(tmp_path)
    other = _holder(proj)
    try:
        with pytest.raises(ProjectBusyError, match=rf"is in use by `pointnuc segment` \(pid {other.pid} on "):
            segment_project(open_project(proj), model, progress=False)
        with pytest.raises(ProjectBusyError):
            merge_results(open_project(proj), model)
        with pytest.raises(ProjectBusyError):  # a shard waits for no exclusive holder either
            segment_project(open_project(proj), model, shard=(1, 2), progress=False)
        res = CliRunner().invoke(main, ["segment", str(proj), "--model", str(model), "--no-progress"])
        assert res.exit_code == 4 and res.stderr.count("\n") == 1 and "wait for it to finish" in res.stderr, res.output
        assert not (proj / "pointnuc-results").exists() and not (proj / "pointnuc-geojson").exists()
    finally:
        other.send_signal(signal.SIGKILL)  # no clean-up: its lock file stays behind
        other.wait()
    assert (proj / LOCK_NAME).is_file()
    s = segment_project(open_project(proj), model, progress=False)  # the dead run's lock is taken over
    assert s.nuclei["a.tif"] > 0 and s.written
    assert not (proj / LOCK_NAME).exists()  # released, and removed, on the way out
    with pytest.raises(RuntimeError), project_lock(proj, "segment"):
        raise RuntimeError("a failing run releases the lock too")
    assert not (proj / LOCK_NAME).exists()


@pytest.mark.skipif(sys.platform == "win32", reason="shared locks are POSIX only")
def test_shard_runs_share_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards of a job array run together; a run that writes into the project waits for none of them."""
    from pointnuc.io import open_project
    from pointnuc.io.lock import LOCK_NAME, ProjectBusyError, project_lock
    from pointnuc.pipeline import segment_project

    model = _stand_in_model(tmp_path / "model", monkeypatch)
    proj = _project(tmp_path)
    other = _holder(proj, "shared")
    try:
        s = segment_project(open_project(proj), model, shard=(1, 1), progress=False)
        assert s.nuclei["a.tif"] > 0 and not s.written
        with pytest.raises(ProjectBusyError):
            segment_project(open_project(proj), model, progress=False)
        assert (proj / LOCK_NAME).is_file()  # the other shard still holds it
    finally:
        other.kill()
        other.wait()
    with project_lock(proj, "segment"):
        pass


def test_without_os_locks_the_lock_file_is_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without advisory locks: the lock file with pid and host decides; a dead holder's is stale."""
    import socket

    from pointnuc.io import lock

    def no_locks(fd: int, shared: bool) -> None:
        raise lock._NoLocks()

    monkeypatch.setattr(lock, "_lock_fd", no_locks)
    root = tmp_path
    with lock.project_lock(root, "segment") as path:  # no lock file yet
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not (root / lock.LOCK_NAME).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    (root / lock.LOCK_NAME).write_text(json.dumps({"command": "segment", "pid": dead.pid, "host": host}) + "\n")
    with lock.project_lock(root, "segment") as path:  # stale: taken over
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(lock.ProjectBusyError, match=rf"pid {os.getpid()} on {host}"):
            with lock.project_lock(root, "segment"):
                pass
    assert not (root / lock.LOCK_NAME).exists()
    (root / lock.LOCK_NAME).write_text(json.dumps({"command": "train", "pid": 1, "host": "elsewhere"}) + "\n")
    with pytest.raises(lock.ProjectBusyError, match=r"pid 1 on elsewhere.*delete .*\.pointnuc\.lock"):
        with lock.project_lock(root, "segment"):
            pass


def test_lock_and_kept_results_work_through_the_project_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any project kind (here a stand-in with QuPath's kind): the lock is held while nuclei are written into
    the project, and a kept result is reused only for the same pixel size."""
    from pointnuc.io.base import ImageAnnotations, ImageRef
    from pointnuc.io.lock import ProjectBusyError, project_lock
    from pointnuc.pipeline import segment_project

    model = _stand_in_model(tmp_path / "model", monkeypatch)
    img, _centres = fat_tile()
    write_tiff(tmp_path / "fat.tif", img, PX)

    class StandInProject:
        kind = "qupath"
        root = tmp_path / "qp"

        def __init__(self) -> None:
            self.root.mkdir(exist_ok=True)
            self.writes: list[tuple[str, int, bool]] = []

        def images(self) -> list[ImageRef]:
            return [ImageRef("fat", tmp_path / "fat.tif", 512, 512, PX)]

        def annotations(self, image, point_class="Nucleus", region_class=None) -> ImageAnnotations:
            return ImageAnnotations(points_xy=np.zeros((0, 2)))

        def write_nuclei(self, results, **kw) -> list[Path]:
            try:
                with project_lock(self.root, "segment"):
                    locked = False
            except ProjectBusyError:
                locked = True
            self.writes += [(name, len(n), locked) for name, n in results.items()]
            return [self.root / "project.qpproj"]

    proj = StandInProject()
    s = segment_project(proj, model, progress=False)
    assert proj.writes == [("fat", 6, True)] and s.seconds
    s = segment_project(proj, model, progress=False)
    assert s.skipped == ["fat"] and proj.writes[-1] == ("fat", 6, True)
    s = segment_project(proj, model, progress=False, pixel_size_um=0.3)
    assert s.recomputed == {"fat": "pixel size changed 0.25 -> 0.3 µm/px"}
