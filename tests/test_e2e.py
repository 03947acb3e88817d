"""The whole pipeline through the CLI on a tiny synthetic GeoJSON project.

Two 192x192 images at 0.5 µm/px with dark nuclei on a pink background; the user
"clicked" a third of the nuclei. ``pointnuc train`` then ``pointnuc segment`` must
find the nuclei it was never shown, checked against the synthetic truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pointnuc.cli import main
from pointnuc.evaluate import evaluate
from synth import label_points, render_nuclei, write_geojson_project

NAMES = ("synth-a", "synth-b")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("e2e")
    proj = root / "project"
    truth = root / "truth"
    truth.mkdir()
    from PIL import Image

    for i, name in enumerate(NAMES):
        img, lab = render_nuclei((192, 192), 45, radius=5.5, seed=10 + i, min_gap=1.2)
        pts = label_points(lab)
        rng = np.random.default_rng(i)
        clicked = pts[rng.choice(len(pts), len(pts) // 3, replace=False)]
        write_geojson_project(proj, name, img, clicked, pixel_size_um=0.5)
        Image.fromarray(lab.astype(np.uint16)).save(truth / f"{name}_label.png")
    model = root / "model"
    runner = CliRunner()
    res = runner.invoke(
        main,
        ["train", str(proj), "--profile", "tiny", "--out", str(model), "--no-progress",
         "--set", "data.pixel_size_um=0.5", "--set", "detection.epochs=6", "--set", "segmentation.epochs=6",
         "--set", "data.patches_per_image=8"],
    )
    assert res.exit_code == 0, res.output
    return proj, model, truth


def test_train_leaves_a_complete_model_folder(trained: tuple[Path, Path, Path]) -> None:
    _, model, _ = trained
    meta = json.loads((model / "pointnuc-model.json").read_text())
    assert meta["format_version"] == 1 and meta["pixel_size_um"] == 0.5
    assert meta["config"]["encoder"] == "tiny"
    assert {"detection_prob"} <= set(meta["thresholds"])
    assert (model / "detector.pt").is_file() and (model / "segmenter.pt").is_file()
    assert sorted(p.name for p in (model / "points").glob("*.json"))


def test_segment_finds_the_nuclei_and_rerun_replaces(trained: tuple[Path, Path, Path]) -> None:
    proj, model, truth = trained
    runner = CliRunner()
    res = runner.invoke(main, ["segment", str(proj), "--model", str(model), "--no-progress"])
    assert res.exit_code == 0, res.output
    out = proj / "pointnuc-geojson"
    files = sorted(out.glob("*.geojson"))
    assert len(files) == 2
    # score against the synthetic truth: every nucleus, not only the clicked third
    ev = evaluate(out, truth, radius_px=5.5)
    assert ev.detection["F1"] > 0.8, ev.detection
    assert ev.segmentation["F1"] > 0.75, ev.segmentation
    # a second run (--redo) replaces pointnuc's objects instead of adding to them
    n_first = {f.name: len(json.loads(f.read_text())["features"]) for f in files}
    res = runner.invoke(main, ["segment", str(proj), "--model", str(model), "--redo", "--no-progress"])
    assert res.exit_code == 0, res.output
    n_second = {f.name: len(json.loads(f.read_text())["features"]) for f in files}
    assert n_second == n_first
    # the user's own exports are untouched
    for name in NAMES:
        feats = json.loads((proj / f"{name}.geojson").read_text())["features"]
        assert [f["geometry"]["type"] for f in feats] == ["MultiPoint"]
