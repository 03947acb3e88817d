"""Progress: bars on a terminal, plain log lines (no carriage returns) in a log."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synth import render_nuclei, write_geojson_project

from pointnuc.progress import LogProgress, overall_progress, progress_bar


def test_log_progress_lines_say_count_share_and_time_left(caplog) -> None:
    bar = LogProgress(total=10, desc="stage", unit="batch", every_s=0.0)
    with caplog.at_level(logging.INFO, logger="pointnuc"):
        for _ in range(4):
            bar.update(1)
        bar.set_postfix(loss="0.3100")
        bar.update(1)
        bar.close()
        bar.close()  # once only
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("stage: 1/10 batch (10 %)") and "left" in lines[0]
    assert lines[4].startswith("stage: 5/10 batch (50 %)") and lines[4].endswith("loss=0.3100")
    assert len(lines) == 6 and all("\r" not in s for s in lines)


def test_not_a_terminal_gives_log_lines_and_disabled_gives_nothing(capsys) -> None:
    assert isinstance(progress_bar(3, "x", "tile"), LogProgress)  # pytest's stderr is not a terminal
    off = progress_bar(3, "x", "tile", enabled=False)
    off.update(3)
    off.close()
    assert capsys.readouterr().err == ""


def _tiny_project(tmp_path: Path) -> Path:
    from synth import label_points

    proj = tmp_path / "project"
    for i, name in enumerate(("a", "b")):
        img, lab = render_nuclei((160, 160), 30, radius=5.5, seed=i, min_gap=1.2)
        pts = label_points(lab)
        write_geojson_project(proj, name, img, pts[np.arange(0, len(pts), 3)], pixel_size_um=0.5)
    return proj


def test_training_into_a_log_has_no_carriage_returns(tmp_path: Path) -> None:
    """A real `pointnuc train` with progress on, its stderr a pipe as in a cluster job's log."""
    proj = _tiny_project(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "pointnuc", "train", str(proj), "--profile", "tiny", "--out", str(tmp_path / "m"),
         "--set", "data.pixel_size_um=0.5", "--set", "detection.epochs=2", "--set", "segmentation.epochs=2"],
        capture_output=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    err = r.stderr.decode()
    assert "\r" not in err
    # one progress for the whole training: overall share and time left, the stage named, a line as each ends
    lines = [ln for ln in err.splitlines() if "training: " in ln]
    assert any(re.search(r"training: \d+/\d+ batch \(\d+ %\).*stage=detector-round0 done", ln) for ln in lines)
    assert any("stage=segmenter-crf done" in ln for ln in lines)
    assert lines[-1].split("training: ")[1].startswith(tuple(f"{n}/{n} batch (100 %)" for n in range(1, 1000)))
    assert not any(re.search(r"(detector|segmenter)[\w-]*: \d+/\d+ batch", ln) for ln in err.splitlines())


class _Bars:
    """tqdm bars made while stderr poses as a terminal (written to a buffer)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import tqdm.auto

        self.made: list = []
        made, real = self.made, tqdm.auto.tqdm

        class Recorded(real):  # type: ignore[misc, valid-type]
            def __init__(self, *a, **k) -> None:
                k["file"] = io.StringIO()
                super().__init__(*a, **k)
                made.append(self)

        monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)


def test_overall_progress_is_one_bar_whose_total_follows_the_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    bars = _Bars(monkeypatch)
    with overall_progress([("a", 10), ("b", 20), ("c", 5)], "training", "batch") as overall:
        assert overall is not None and overall.total == 35
        stage = progress_bar(12, "a", "batch")  # the stage's own count replaces the estimate
        assert overall.total == 37
        for _ in range(12):
            stage.update(1)
        stage.set_postfix(loss="0.5")
        stage.close()
        progress_bar(3, "c", "batch").update(3)  # b was done before a resume: no longer expected
        assert overall.total == 15 and overall.done == 15
        other = progress_bar(4, "slide", "tile")  # other work keeps its own bar
    assert len(bars.made) == 2 and bars.made[1] is other
    bar = bars.made[0]
    assert bar.n == bar.total == 15 and "stage=" in str(bar.postfix)


def test_training_on_a_terminal_shows_one_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real (tiny) training with stderr posing as a terminal: one bar, from 0 to its total."""
    from pointnuc.config import profile_config
    from pointnuc.io import open_project
    from pointnuc.train.run import train_project

    proj = _tiny_project(tmp_path)
    bars = _Bars(monkeypatch)
    config = profile_config("tiny", **{"data.pixel_size_um": 0.5, "detection.epochs": 2, "segmentation.epochs": 2})
    train_project(open_project(proj), tmp_path / "m", config, device="cpu", offline=True)
    assert len(bars.made) == 1
    assert bars.made[0].n == bars.made[0].total > 0
