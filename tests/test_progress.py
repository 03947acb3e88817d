"""Progress: bars on a terminal, plain log lines (no carriage returns) in a log."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
from synth import render_nuclei, write_geojson_project

from pointnuc.progress import LogProgress, progress_bar


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


def test_training_into_a_log_has_no_carriage_returns(tmp_path: Path) -> None:
    """A real `pointnuc train` with progress on, its stderr a pipe as in a cluster job's log."""
    proj = tmp_path / "project"
    for i, name in enumerate(("a", "b")):
        img, lab = render_nuclei((160, 160), 30, radius=5.5, seed=i, min_gap=1.2)
        from synth import label_points

        pts = label_points(lab)
        write_geojson_project(proj, name, img, pts[np.arange(0, len(pts), 3)], pixel_size_um=0.5)
    r = subprocess.run(
        [sys.executable, "-m", "pointnuc", "train", str(proj), "--profile", "tiny", "--out", str(tmp_path / "m"),
         "--set", "data.pixel_size_um=0.5", "--set", "detection.epochs=2", "--set", "segmentation.epochs=2"],
        capture_output=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    err = r.stderr.decode()
    assert "\r" not in err
    assert "batch (100 %)" in err  # each stage's progress ends with a plain line
