"""Bad inputs and faults while reading and training: each gives its own image's pixels at the
right scale, a resumable run, or one clear line (docs/BAD-INPUT.md, "Reading and training").

Tiny synthetic files only; the one training here (interrupted, then resumed) takes seconds.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import logging
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Self

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image
from shapely.geometry import box
from synth import label_points, points_feature, render_nuclei, write_geojson_project
from synth_slide import direct_and_zarr_reads

from pointnuc.cli import main
from pointnuc.errors import ImageReadError, InputError, ModelFormatError
from pointnuc.io.base import ImageRef, NucleusObject
from pointnuc.io.slide import open_slide

REPO = Path(__file__).resolve().parents[1]


def _he(shape: tuple[int, int] = (96, 128), seed: int = 3) -> np.ndarray:
    return render_nuclei(shape, 12, radius=5.0, seed=seed)[0]


def _project(tmp_path: Path, image: np.ndarray | None = None, n_points: int = 12) -> Path:
    img, lab = render_nuclei((128, 128), 20, radius=5.0, seed=3)
    pts = label_points(lab)[:n_points]
    return write_geojson_project(tmp_path / "proj", "img", img if image is None else image, pts, pixel_size_um=0.5)


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# --------------------------------------------------------------------------- 4. bit depths and colour


def test_full_scale_rule_by_hand() -> None:
    from pointnuc.io.pixels import full_scale

    never = lambda: pytest.fail("the data maximum is not needed")
    assert full_scale(np.uint8, never) == 255
    assert full_scale(np.uint16, never, bits=16, max_value=1023) == 1023  # the file's maximum first
    assert full_scale(np.uint16, never, bits=12) == 4095  # BitsPerSample 12 in 16-bit samples
    assert full_scale(np.uint16, lambda: 3500.0, bits=16) == 4095  # says 16, holds 12
    assert full_scale(np.uint16, lambda: 16000.0, bits=16) == 16383  # 14 bits
    assert full_scale(np.uint16, lambda: 56000.0) == 65535
    assert full_scale(np.uint16, lambda: 200.0) == 255  # 8-bit values in 16-bit samples
    assert full_scale(np.float32, lambda: 0.9) == 1.0 and full_scale(np.float32, lambda: 200.0) == 255


@pytest.mark.parametrize("kind", ["16-bit TIFF", "12-bit in 16-bit TIFF", "BitsPerSample 12 TIFF",
                                  "MaxSampleValue 1023 TIFF", "tiled 12-bit pyramid", "12-bit in 16-bit PNG"])
def test_wide_samples_are_read_at_their_real_depth(tmp_path: Path, kind: str) -> None:
    """Before: 12 bits in 16-bit samples came back almost black (0 nuclei found), a 16-bit PNG's
    colours as Pillow's high byte."""
    import imagecodecs

    rgb = _he()
    x = rgb.astype(np.uint32)
    path = tmp_path / ("img.png" if "PNG" in kind else "img.tif")
    if kind == "16-bit TIFF":
        data, full = (x * 257).astype(np.uint16), 65535
        tifffile.imwrite(path, data, photometric="rgb")
    elif kind == "BitsPerSample 12 TIFF":
        data, full = ((x * 4095 + 127) // 255).astype(np.uint16), 4095
        tifffile.imwrite(path, data, photometric="rgb", bitspersample=12)
    elif kind == "MaxSampleValue 1023 TIFF":
        data, full = ((x * 1023 + 127) // 255).astype(np.uint16), 1023
        tifffile.imwrite(path, data, photometric="rgb", extratags=[(281, "H", 3, (1023,) * 3)])
    elif kind == "tiled 12-bit pyramid":
        rgb = np.repeat(np.repeat(rgb, 2, 0), 2, 1)
        data, full = ((rgb.astype(np.uint32) * 4095 + 127) // 255).astype(np.uint16), 4095
        with tifffile.TiffWriter(path) as tw:
            tw.write(data, tile=(64, 64), subifds=1, photometric="rgb", compression="zlib")
            tw.write(data[::2, ::2], tile=(64, 64), subfiletype=1, photometric="rgb", compression="zlib")
    else:
        data, full = ((x * 4095 + 127) // 255).astype(np.uint16), 4095  # a camera's 12 bits, the file says 16
        if kind.endswith("PNG"):
            path.write_bytes(imagecodecs.png_encode(data))
        else:
            tifffile.imwrite(path, data, photometric="rgb")
    with open_slide(path) as s:
        got = s.read_region(0, 0, s.width, s.height)
    expected = np.round(data.astype(float) * 255 / full)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(float) - expected).max() <= 1, kind
    assert np.abs(got.astype(float) - rgb).max() <= 1, kind  # the original colours


@pytest.mark.parametrize("kind, message", [
    ("greyscale TIFF", "a greyscale image (1 channel)"),
    ("16-bit greyscale PNG", "a greyscale image (1 channel)"),
    ("5-channel TIFF", "a stack of 5 grey channels (e.g. fluorescence)"),
    ("CMYK TIFF", "a CMYK image"),
])
def test_images_other_than_rgb_brightfield_are_refused_in_one_line(tmp_path: Path, kind: str, message: str) -> None:
    """Before: a greyscale TIFF was read as grey RGB (319 nuclei against 281 for the RGB original)
    and a 16-bit greyscale PNG as white (0 nuclei), without a word."""
    rgb = _he((128, 128))
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    if kind == "16-bit greyscale PNG":
        path = tmp_path / "proj" / "img.png"
        path.parent.mkdir()
        Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    else:
        path = tmp_path / "proj" / "img.tif"
        path.parent.mkdir()
        if kind == "greyscale TIFF":
            tifffile.imwrite(path, grey)
        elif kind == "5-channel TIFF":
            tifffile.imwrite(path, np.dstack([grey] * 5), photometric="minisblack", planarconfig="contig")
        else:
            tifffile.imwrite(path, np.dstack([grey] * 4), photometric="separated")
    with open_slide(path) as s:
        with pytest.raises(ImageReadError, match="pointnuc reads RGB brightfield"):
            s.read_region(0, 0, 16, 16)
        assert message in (s.problem() or "")
    pts = label_points(render_nuclei((128, 128), 20, radius=5.0, seed=3)[1])[:12]
    (path.parent / "img.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [points_feature(pts)]}))
    res = CliRunner().invoke(main, ["train", str(path.parent), "--profile", "tiny", "--no-progress", "--pixel-size", "0.5",
                                    "--out", str(tmp_path / "model")])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    [line] = _lines(res.stderr)
    assert line.startswith("pointnuc: error:") and message in line and "pointnuc reads RGB brightfield" in line
    assert not (tmp_path / "model").exists()


def test_rgba_and_palette_images_are_read_as_rgb(tmp_path: Path) -> None:
    rgb = _he()
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(tmp_path / "a.png")
    Image.fromarray(rgb).quantize(64).save(tmp_path / "p.png")
    for name in ("a.png", "p.png"):
        with open_slide(tmp_path / name) as s:
            assert s.problem() is None
            got = s.read_region(0, 0, s.width, s.height)
        assert got.shape == rgb.shape and np.abs(got.astype(int) - rgb).mean() < 8, name


# --------------------------------------------------------------------------- 5. damaged weights


def _model(tmp_path: Path) -> Path:
    from pointnuc.config import profile_config
    from pointnuc.models.bundle import ModelInfo, ModelLayout, save_info, save_weights
    from pointnuc.models.net import UNet

    model = tmp_path / "model"
    layout = ModelLayout(model)
    save_weights(layout.detector, UNet(1, "tiny"))
    save_weights(layout.segmenter, UNet(2, "tiny"))
    norm = {"mean": [70.0, 20.0, -10.0], "std": [12.0, 8.0, 6.0], "stain": [0.5, 0.1, 0.3, 0.1]}
    save_info(model, ModelInfo(config=profile_config("tiny", **{"data.pixel_size_um": 0.5}), norm_reference=norm))
    return model


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2  # inside the tensor data, not the zip directory: torch.load does not notice
    data[i : i + 8] = bytes(b ^ 0xFF for b in data[i : i + 8])
    path.write_bytes(bytes(data))


def test_damaged_weights_are_refused_naming_the_file(tmp_path: Path) -> None:
    """Before: a segmenter.pt with flipped bytes loaded without complaint, and segment wrote 0
    nuclei over the previous output."""
    from pointnuc.models.bundle import load_info, load_network

    model = _model(tmp_path)
    meta = json.loads((model / "pointnuc-model.json").read_text())
    assert set(meta["weights_sha256"]) == {"detector.pt", "segmenter.pt"}
    load_network(model, "segmenter")  # intact: loads
    _flip_bytes(model / "segmenter.pt")
    with pytest.raises(ModelFormatError, match=r"segmenter\.pt is damaged: its SHA-256 differs"):
        load_network(model, "segmenter")
    load_network(model, "detector", load_info(model))  # the other file is still fine
    # through the CLI: one line, and nothing written into the project
    proj = _project(tmp_path)
    before = sorted(p.name for p in proj.iterdir())
    res = CliRunner().invoke(main, ["segment", str(proj), "--model", str(model), "--no-progress"])
    assert res.exit_code == 2, res.output
    [line] = _lines(res.stderr)
    assert line.startswith("pointnuc: error:") and "segmenter.pt is damaged" in line
    assert sorted(p.name for p in proj.iterdir()) == before


def test_truncated_weights_are_refused(tmp_path: Path) -> None:
    from pointnuc.models.bundle import load_network

    model = _model(tmp_path)
    seg = model / "segmenter.pt"
    seg.write_bytes(seg.read_bytes()[:1000])
    with pytest.raises(ModelFormatError, match="segmenter.pt"):
        load_network(model, "segmenter")


def test_older_model_folder_without_checksums_loads_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pointnuc.models.bundle import load_network

    model = _model(tmp_path)
    meta_path = model / "pointnuc-model.json"
    meta = json.loads(meta_path.read_text())
    del meta["weights_sha256"]
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="pointnuc"):
        load_network(model, "segmenter")
    assert "segmenter.pt has no recorded checksum (an older model folder)" in caplog.text


# --------------------------------------------------------------------------- 7. a full disk while writing


class _FullDisk:
    """A file opened for writing on a disk with ``left`` bytes free: a write beyond them writes
    what fits and fails with ENOSPC, as a real full disk does."""

    def __init__(self, f: Any, state: dict[str, int]) -> None:
        self._f, self._state = f, state

    def write(self, data: Any) -> int:
        b = bytes(data) if not isinstance(data, str) else data
        left = self._state["left"]
        if len(b) > left:
            self._f.write(b[:left])
            self._state["left"] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._state["left"] = left - len(b)
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _disk_full(monkeypatch: pytest.MonkeyPatch, root: Path, left: int) -> None:
    """From now on, files written under ``root`` share ``left`` free bytes."""
    real_open = builtins.open
    state = {"left": left}

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and str(file).startswith(str(root)):
            return _FullDisk(f, state)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", False)  # copies go through write(), as on other systems


def test_a_full_disk_leaves_the_output_and_its_backup_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the output survived, but a truncated, invalid ``.bak`` was left beside it."""
    from pointnuc.io.geojson import read_features
    from pointnuc.io.geojson_project import GeoJSONFolderProject

    folder = tmp_path / "proj"
    folder.mkdir()
    Image.fromarray(_he((256, 256))).save(folder / "img.png")
    project = GeoJSONFolderProject(folder)
    first = [NucleusObject(box(x, y, x + 6, y + 5), 0.9) for x in range(4, 240, 12) for y in range(4, 240, 12)]
    [out] = project.write_nuclei({"img.png": first})
    previous = out.read_bytes()
    bak = out.with_name(out.name + ".bak")
    assert not bak.exists()  # no earlier backup
    _disk_full(monkeypatch, tmp_path, left=len(previous) // 2)
    with pytest.raises(OSError) as err:
        project.write_nuclei({"img.png": first[:10]})
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC
    assert out.read_bytes() == previous
    assert not bak.exists() or bak.read_bytes() == previous
    assert sorted(p.name for p in out.parent.iterdir()) in (["img.geojson"], ["img.geojson", "img.geojson.bak"])
    assert len(read_features(out)) == len(first)
    # with room again, the backup is the previous file and the output the new one
    project.write_nuclei({"img.png": first[:10]})
    assert bak.read_bytes() == previous and len(read_features(out)) == 10


def test_atomic_writes_on_a_full_disk_keep_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pointnuc.fileio import write_text_atomic
    from pointnuc.models.bundle import save_weights

    text, weights = tmp_path / "a.json", tmp_path / "w.pt"
    write_text_atomic(text, "old" * 1000)
    save_weights(weights, torch.nn.Linear(50, 50))
    old = weights.read_bytes()
    _disk_full(monkeypatch, tmp_path, left=100)
    with pytest.raises(OSError):
        write_text_atomic(text, "new" * 1000)
    with pytest.raises(OSError):
        save_weights(weights, torch.nn.Linear(50, 50))
    monkeypatch.undo()
    assert text.read_text() == "old" * 1000 and weights.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "w.pt"]


# --------------------------------------------------------------------------- 8. interrupt and resume; 11. checkpoints


def test_fit_checkpoints_after_its_first_epoch_however_short(tmp_path: Path) -> None:
    """Before: at most one checkpoint per 20 s, so a run stopped within its first 20 s had
    nothing to resume from."""
    import torch

    from pointnuc.config import DataConfig
    from pointnuc.models.net import build_network
    from pointnuc.train.data import PatchDataset
    from pointnuc.train.fit import FitSettings, checkpoint_due, fit
    from pointnuc.train.losses import weighted_mse
    from pointnuc.train.samples import TrainingImage

    # the rule by hand: first and last epoch always; between, when the last save cost <= 10 % of the time since
    assert checkpoint_due(1, 1, 9, since_save_s=0.01, save_s=None)
    assert checkpoint_due(4, 4, 9, since_save_s=0.01, save_s=5.0)  # first epoch of a resumed fit
    assert checkpoint_due(9, 1, 9, since_save_s=0.0, save_s=5.0)
    assert checkpoint_due(2, 1, 9, since_save_s=10.0, save_s=1.0) and not checkpoint_due(2, 1, 9, 9.0, 1.0)
    assert not checkpoint_due(1, 1, 9, since_save_s=5.0, save_s=None, interval_s=20.0)

    img = _he((64, 64))
    sample = TrainingImage(name="a", image_name="a", image=img, points=np.array([[20.0, 20.0]]),
                           holdout=np.zeros((0, 2)), valid=np.ones((64, 64), bool))
    ds = PatchDataset([sample], [np.zeros((1, 64, 64), np.float32)], DataConfig(patch_size=48, crop_size=32,
                      patches_per_image=4), seed=0)
    seen: list[int] = []

    def hook(epoch: int, model: torch.nn.Module) -> None:
        ckpt = tmp_path / "toy.pt"
        seen.append(torch.load(ckpt, weights_only=False)["epoch"] if ckpt.is_file() else 0)

    fit(build_network(1, "tiny"), ds, weighted_mse, FitSettings(epochs=3, lr=1e-3, batch_size=4, seed=0), device="cpu",
        checkpoint_dir=tmp_path, stage_name="toy", resume=False, progress=False, num_workers=0,
        on_epoch_end=hook)
    assert seen[:2] == [0, 1]  # the hook runs before its epoch's save: epoch 1 was saved before epoch 2 ended


def test_resume_command_keeps_the_options_and_drops_overwrite() -> None:
    from pointnuc.cli.train import resume_command

    opts = {"project": Path("my project"), "out": Path("old"), "profile": "quick", "variant": None,
            "point_class": "Tumor nuclei", "region_class": None, "pixel_size": 0.25, "device": "auto",
            "weights": None, "seed": 0, "settings": ("detection.epochs=5", "data.holdout_fraction=0.1"),
            "resume": False, "overwrite": True, "keep_checkpoints": False, "no_progress": True}
    cmd = resume_command(opts, Path("models/run 1"))
    assert shlex.split(cmd) == [
        "pointnuc", "train", "my project", "--out", "models/run 1", "--profile", "quick", "--point-class",
        "Tumor nuclei", "--pixel-size", "0.25", "--set", "detection.epochs=5", "--set", "data.holdout_fraction=0.1",
        "--no-progress", "--resume",
    ]


def test_interrupted_training_prints_a_command_that_resumes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: Ctrl-C said "re-run the same command", which (without --out) started a new
    dated folder from scratch, and (with --out) was refused because the folder existed."""
    import pointnuc.train.fit as fit_module

    proj = _project(tmp_path)
    real_save = fit_module._save_atomic

    def save_then_interrupt(obj: dict, path: Path) -> None:
        real_save(obj, path)
        if path.name == "segmenter.pt" and obj["epoch"] == 1:
            raise KeyboardInterrupt  # Ctrl-C in stage 2, just after its first checkpoint

    monkeypatch.setattr(fit_module, "_save_atomic", save_then_interrupt)
    args = ["train", str(proj), "--profile", "tiny", "--set", "data.pixel_size_um=0.5", "--keep-checkpoints",
            "--no-progress"]
    res = CliRunner().invoke(main, args)  # no --out: a new dated folder
    monkeypatch.undo()
    assert res.exit_code == 130, res.output
    [model] = list((proj / "pointnuc-models").iterdir())
    line = _lines(res.stderr)[-1]
    prefix = "pointnuc: interrupted; to continue where training stopped, run: "
    assert line.startswith(prefix), res.stderr
    cmd = shlex.split(line[len(prefix):])
    assert cmd == ["pointnuc", "train", str(proj), "--out", str(model), "--profile", "tiny",
                   "--set", "data.pixel_size_um=0.5", "--keep-checkpoints", "--no-progress", "--resume"]
    assert not (model / "segmenter.pt").exists()

    res = CliRunner().invoke(main, cmd[1:])
    assert res.exit_code == 0, res.output
    log = (model / "train.log").read_text()
    resumed = log[log.rindex("profile 'tiny'"):]  # the second run's lines
    for stage, done in (("detector-round0", 3), ("detector-round1", 3), ("segmenter", 1)):
        assert f"{stage}: resuming after epoch {done}" in resumed, stage
        assert f"{stage} epoch {done}/" not in resumed, stage  # not trained again
    assert "segmenter epoch 2/3" in resumed and "segmenter-crf epoch 1/1" in resumed
    meta = json.loads((model / "pointnuc-model.json").read_text())
    assert meta["provenance"]["finished"] and len(meta["provenance"]["resumed"]) == 1
    assert (model / "segmenter.pt").is_file() and (model / "checkpoints").is_dir()  # --keep-checkpoints kept them
    # a finished run is not resumed again
    res = CliRunner().invoke(main, cmd[1:])
    assert res.exit_code == 2 and "has finished" in _lines(res.stderr)[0]


def test_resume_of_an_empty_folder_starts_and_of_changed_points_is_refused(tmp_path: Path) -> None:
    from pointnuc.config import profile_config
    from pointnuc.io import open_project
    from pointnuc.models.bundle import ModelInfo, save_info
    from pointnuc.models.layout import check_model_dir
    from pointnuc.pipeline import train_project

    empty = tmp_path / "empty"
    empty.mkdir()
    check_model_dir(empty, overwrite=False, resume=True)  # interrupted before anything was written: allowed
    check_model_dir(tmp_path / "missing", overwrite=False, resume=True)
    proj = _project(tmp_path)
    config = profile_config("tiny", **{"data.pixel_size_um": 0.5})
    out = tmp_path / "model"
    save_info(out, ModelInfo(config=config, provenance={"images": {"img.tif": 11}, "point_class": "Nucleus"}))
    with pytest.raises(Exception, match="the project's points changed since the interrupted run"):
        train_project(open_project(proj), out, config, device="cpu", resume=True, progress=False)


# --------------------------------------------------------------------------- 9. truncated TIFF


def _truncated_tiff_project(tmp_path: Path) -> Path:
    img, lab = render_nuclei((256, 256), 60, radius=5.0, seed=3)
    proj = write_geojson_project(tmp_path / "proj", "img", img, label_points(lab)[:20], pixel_size_um=0.5)
    tif = proj / "img.tif"
    # zlib strips, as many tools write them: before, zarr's event loop printed ~58 tracebacks for these
    tifffile.imwrite(tif, img, photometric="rgb", rowsperstrip=8, compression="zlib",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    tif.write_bytes(tif.read_bytes()[: tif.stat().st_size * 2 // 3])
    return proj


def test_truncated_tiff_is_one_line_in_train_and_found_by_inspect(tmp_path: Path) -> None:
    """Before: train printed the error and then about 58 lines of asyncio "exception was never
    retrieved" tracebacks; inspect reported the file as fine."""
    proj = _truncated_tiff_project(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "pointnuc", "train", str(proj), "--profile", "tiny", "--no-progress",
         "--out", str(tmp_path / "model")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert res.returncode == 2, res.stderr
    assert _lines(res.stderr) == [_lines(res.stderr)[0]], res.stderr
    assert "truncated" in res.stderr and "img.tif" in res.stderr
    res = CliRunner().invoke(main, ["inspect", str(proj)])
    assert res.exit_code == 2
    assert "UNUSABLE: the file is truncated" in res.stdout
    [line] = _lines(res.stderr)
    assert line.startswith("pointnuc: error: 1 of 1 image(s) cannot be used: img.tif (the file is truncated")
    report = json.loads(CliRunner().invoke(main, ["inspect", str(proj), "--json"]).stdout)
    assert "truncated" in report["images"][0]["problem"]


@pytest.mark.parametrize("compression", [None, "zlib", "jpeg"])
def test_strips_read_directly_equal_zarr_reads(tmp_path: Path, compression: str | None) -> None:
    rgb = np.repeat(np.repeat(np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8), 4, 0), 4, 1)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, rgb[:157, :199], photometric="rgb", rowsperstrip=16, compression=compression)
    with open_slide(path) as s:
        backend = s._backend
        assert backend.tiles[0] is not None, "the plain stripped layout is read directly"
        assert s.problem() is None
        boxes = [(0, 0, 199, 157, 1.0), (5, 30, 100, 40, 1.0), (-10, 140, 60, 30, 1.0), (3, 7, 190, 150, 2.5)]
        direct, via_zarr = direct_and_zarr_reads(s, boxes)
    for a, b in zip(direct, via_zarr):
        assert np.array_equal(a, b)


def test_inspect_marks_a_truncated_png_and_a_missing_image(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    png = proj / "b.png"
    Image.fromarray(_he()).save(png)
    png.write_bytes(png.read_bytes()[:-200])
    res = CliRunner().invoke(main, ["inspect", str(proj), "--json"])
    assert res.exit_code == 2
    report = json.loads(res.stdout)
    problems = {im["name"]: im["problem"] for im in report["images"]}
    assert problems["img.tif"] is None and "truncated" in problems["b.png"]
    from pointnuc.cli.inspect import image_problem

    assert "image file not found" in (image_problem(tmp_path / "moved.tif") or "")  # a QuPath image moved away


# --------------------------------------------------------------------------- 12. points on the image's edge


def _points_feature_at(xy: list[tuple[float, float]]) -> dict:
    return points_feature(np.array(xy, float))


def test_points_within_a_pixel_of_the_edge_are_clamped_others_refused() -> None:
    """Before: one point at x = 1000.4 on a 1000-px-wide image blocked inspect and train."""
    from pointnuc.io.geojson import feature_to_object
    from pointnuc.io.objects import summarise

    image = ImageRef("img.tif", Path("img.tif"), 1000, 800, 0.25)
    edge = [(1000.4, 10.0), (-0.6, 799.9), (500.0, 800.0), (999.5, 5.0)]
    ann = summarise([feature_to_object(_points_feature_at(edge))], image)
    xy = ann.points_xy
    assert (xy[:, 0] >= 0).all() and (xy[:, 0] < 1000).all() and (xy[:, 1] >= 0).all() and (xy[:, 1] < 800).all()
    assert xy[0, 0] == pytest.approx(1000, abs=0.01) and xy[1, 0] == 0 and xy[2, 1] == pytest.approx(800, abs=0.01)
    assert tuple(xy[3]) == (999.5, 5.0)  # inside: unchanged
    for far in [(1001.0, 10.0), (-1.5, 10.0), (10.0, 802.0)]:
        with pytest.raises(InputError, match="lie outside its 1000x800 pixels"):
            summarise([feature_to_object(_points_feature_at([*edge, far]))], image)


def test_a_click_on_the_edge_does_not_block_inspect(tmp_path: Path) -> None:
    img, lab = render_nuclei((128, 128), 20, radius=5.0, seed=3)
    pts = np.vstack([label_points(lab)[:12], [[128.4, 60.0]]])
    proj = write_geojson_project(tmp_path / "proj", "img", img, pts, pixel_size_um=0.5)
    res = CliRunner().invoke(main, ["inspect", str(proj), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["images"][0]["points"]["Nucleus"] == 13
