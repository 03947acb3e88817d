"""``pointnuc train`` refuses bad input with one line and a non-zero exit, writing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from synth import label_points, render_nuclei, write_geojson_project

from pointnuc.cli import main


def _project(tmp_path: Path, n_points: int = 12, pixel_size: float | None = 0.5) -> Path:
    img, lab = render_nuclei((128, 128), 20, radius=5.0, seed=3)
    pts = label_points(lab)[:n_points]
    return write_geojson_project(tmp_path / "proj", "img", img, pts, pixel_size_um=pixel_size)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _train(*args: str):
    return CliRunner().invoke(main, ["train", *args, "--profile", "tiny", "--no-progress"])


def _one_error_line(res, message: str) -> None:
    assert res.exit_code not in (0, None), res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pointnuc: error:"), res.stderr
    assert message in lines[0], lines[0]


@pytest.mark.parametrize(
    "label, n_points, pixel_size, extra, message",
    [
        ("no points of the class", 12, 0.5, ["--point-class", "Tumor"], "no 'Tumor' points"),
        ("points of another class", 12, 0.5, ["--point-class", "Tumor"], "has points of 'Nucleus' (12): pass --point-class"),
        ("too few points", 4, 0.5, [], "only 4 'Nucleus' points"),
        ("no pixel size", 12, None, [], "has no pixel size; pass --pixel-size"),
        ("unknown setting", 12, 0.5, ["--set", "detection.nonsense=3"], "unknown setting detection.nonsense"),
        ("setting of the wrong type", 12, 0.5, ["--set", "detection.epochs=2.5"], "detection.epochs must be a whole number"),
        ("setting out of range", 12, 0.5, ["--set", "segmentation.batch_size=0"], "batch_size >= 1"),
        ("unknown schedule", 12, 0.5, ["--set", "detection.lr_schedule=step"], "detection.lr_schedule must be one of constant, cosine"),
        ("resume without out", 12, 0.5, ["--resume"], "--resume needs --out"),
    ],
)
def test_bad_input(tmp_path: Path, label: str, n_points: int, pixel_size: float | None, extra: list[str], message: str) -> None:
    proj = _project(tmp_path, n_points, pixel_size)
    before = _listing(tmp_path)
    res = _train(str(proj), "--out", str(tmp_path / "model"), *extra) if "--resume" not in extra else _train(str(proj), *extra)
    _one_error_line(res, message)
    assert _listing(tmp_path) == before, label


def test_existing_output_and_resume_of_another_configuration(tmp_path: Path) -> None:
    proj = _project(tmp_path)
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    _one_error_line(_train(str(proj), "--out", str(out)), "pass --overwrite")
    assert (out / "keep.txt").read_text() == "user file"
    # --overwrite deletes the folder: never one that is not a pointnuc model folder
    _one_error_line(_train(str(proj), "--out", str(out), "--overwrite"), "is not one; choose another --out")
    assert (out / "keep.txt").read_text() == "user file"
    _one_error_line(_train(str(proj), "--out", str(out), "--resume"), "holds no interrupted pointnuc training")
    # a model description of another configuration: --resume must refuse it
    from pointnuc.config import profile_config
    from pointnuc.models.bundle import ModelInfo, save_info

    save_info(out, ModelInfo(config=profile_config("tiny", seed=99)))
    _one_error_line(_train(str(proj), "--out", str(out), "--resume"), "another configuration")
    assert (out / "keep.txt").is_file()


def test_pixel_size_option_rescues_an_uncalibrated_image(tmp_path: Path) -> None:
    proj = _project(tmp_path, pixel_size=None)
    res = CliRunner().invoke(main, ["inspect", str(proj), "--json", "--pixel-size", "0.5"])
    assert res.exit_code == 0, res.output
    assert '"pixel_size_um": 0.5' in res.output


def test_a_full_disk_is_one_line_not_a_traceback(tmp_path: Path, monkeypatch) -> None:
    import errno

    import pointnuc.pipeline

    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model"))

    monkeypatch.setattr(pointnuc.pipeline, "train_project", full)
    res = _train(str(_project(tmp_path)), "--out", str(tmp_path / "model"))
    _one_error_line(res, f"No space left on device: {tmp_path / 'model'}")
