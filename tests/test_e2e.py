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
from synth import label_points, render_nuclei, write_geojson_project

from pointnuc.cli import main
from pointnuc.evaluate import evaluate

NAMES = ("synth-a", "synth-b")


def _synthetic_project(root: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(project, truth label folder, true centres per image): a third of the nuclei clicked."""
    from PIL import Image

    proj, truth = root / "project", root / "truth"
    truth.mkdir()
    centres = {}
    for i, name in enumerate(NAMES):
        img, lab = render_nuclei((192, 192), 45, radius=5.5, seed=10 + i, min_gap=1.2)
        centres[name] = pts = label_points(lab)
        clicked = pts[np.random.default_rng(i).choice(len(pts), len(pts) // 3, replace=False)]
        write_geojson_project(proj, name, img, clicked, pixel_size_um=0.5)
        Image.fromarray(lab.astype(np.uint16)).save(truth / f"{name}_label.png")
    return proj, truth, centres


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("e2e")
    proj, truth, _ = _synthetic_project(root)
    model = root / "model"
    runner = CliRunner()
    res = runner.invoke(
        main,
        ["train", str(proj), "--profile", "tiny", "--out", str(model), "--no-progress",
         "--set", "data.pixel_size_um=0.5", "--set", "detection.epochs=6", "--set", "segmentation.epochs=6",
         "--set", "data.patches_per_image=8"],
    )
    assert res.exit_code == 0, res.output
    assert "Held-back points: the model outlines " in res.output  # the one independent check, said at the end
    return proj, model, truth


def test_train_leaves_a_complete_model_folder(trained: tuple[Path, Path, Path]) -> None:
    _, model, _ = trained
    meta = json.loads((model / "pointnuc-model.json").read_text())
    assert meta["format_version"] == 1 and meta["pixel_size_um"] == 0.5
    assert meta["config"]["encoder"] == "tiny"
    assert meta["provenance"]["encoder_start"]["kind"] == "random"  # the model says how its encoder started
    assert {"detection_prob"} <= set(meta["thresholds"])
    ref = meta["norm_reference"]  # the colour target segment normalises every slide to
    assert len(ref["mean"]) == 3 and len(ref["std"]) == 3 and len(ref["stain"]) == 4
    assert meta["config"]["data"]["stain_normalise"] is True
    assert (model / "detector.pt").is_file() and (model / "segmenter.pt").is_file()
    assert set(meta["weights_sha256"]) == {"detector.pt", "segmenter.pt"}  # checked when loaded
    assert not (model / "checkpoints").exists()  # only needed to resume: dropped when the run finished
    assert sorted(p.name for p in (model / "points").glob("*.json"))
    assert "detector" in (model / "train.log").read_text()
    assert (model / "report" / "losses.png").is_file() and list((model / "report").glob("review_*.png"))
    held = json.loads((model / "report" / "metrics.json").read_text())["held_back"]
    assert held["total"] > 0 and 0 <= held["found"] <= held["total"]


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
    # flip test-time augmentation: the same model, still the nuclei of the synthetic truth; its results are
    # kept apart from the plain run's, so no --redo is needed and none is reused
    res = runner.invoke(main, ["segment", str(proj), "--model", str(model), "--tta", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "done earlier" not in res.output and "-tta" in res.output, res.output
    ev_tta = evaluate(out, truth, radius_px=5.5)
    assert ev_tta.detection["F1"] > 0.8, ev_tta.detection
    assert ev_tta.segmentation["F1"] > 0.75, ev_tta.segmentation
    # the user's own exports are untouched
    for name in NAMES:
        feats = json.loads((proj / f"{name}.geojson").read_text())["features"]
        assert [f["geometry"]["type"] for f in feats] == ["MultiPoint"]


def _fresh_copy(proj: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(proj, dest, ignore=shutil.ignore_patterns("pointnuc-*")))


def _segment(*args: str):
    return CliRunner().invoke(main, ["segment", *args, "--no-progress"])


def test_dry_run_writes_nothing(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    proj, model, _ = trained
    copy = _fresh_copy(proj, tmp_path / "p")
    before = sorted(p.name for p in copy.rglob("*"))
    res = _segment(str(copy), "--model", str(model), "--dry-run")
    assert res.exit_code == 0, res.output
    assert "2 image(s) to segment" in res.output and "synth-a.tif" in res.output
    assert sorted(p.name for p in copy.rglob("*")) == before


def test_shards_then_merge(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    proj, model, _ = trained
    copy = _fresh_copy(proj, tmp_path / "p")
    for k in (1, 2):
        res = _segment(str(copy), "--model", str(model), "--shard", f"{k}/2")
        assert res.exit_code == 0, res.output
        assert not (copy / "pointnuc-geojson").exists()  # shards never write into the project
    results = sorted(p.name for p in (copy / "pointnuc-results").rglob("*.geojson"))
    from pointnuc.infer.results import result_file

    assert results == sorted(result_file(Path(), f"{n}.tif", None).name for n in NAMES)
    assert all(r.startswith(("synth-a.tif~", "synth-b.tif~")) for r in results)
    res = _segment(str(copy), "--model", str(model), "--merge")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (copy / "pointnuc-geojson").glob("*.geojson")) == ["synth-a.geojson", "synth-b.geojson"]
    # a re-run continues: both images are done already
    res = _segment(str(copy), "--model", str(model))
    assert res.exit_code == 0 and res.output.count("(done earlier)") == 2, res.output
    # results with --tta are kept apart: none of these plain ones is merged as if it were one
    res = _segment(str(copy), "--model", str(model), "--merge", "--tta")
    assert res.exit_code != 0 and "--shard K/N --tta" in res.stderr, res.output


def test_within_a_region_keeps_objects_elsewhere(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    proj, model, _ = trained
    copy = _fresh_copy(proj, tmp_path / "p")
    res = _segment(str(copy), "--model", str(model), "--within", "Tumor")
    assert res.exit_code != 0 and "no 'Tumor' annotations" in res.stderr
    # draw a "Tumor" rectangle on the left half of synth-a
    ann = json.loads((copy / "synth-a.geojson").read_text())
    ann["features"].append({"type": "Feature", "id": "0d3f5a4e-2b1c-4c1e-9a57-1f2e3d4c5b6a",
                            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [0, 192], [96, 192], [96, 0], [0, 0]]]},
                            "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}})
    (copy / "synth-a.geojson").write_text(json.dumps(ann))
    res = _segment(str(copy), "--model", str(model), "--within", "Tumor")
    assert res.exit_code == 0, res.output
    feats = json.loads((copy / "pointnuc-geojson" / "synth-a.geojson").read_text())["features"]
    assert feats and not (copy / "pointnuc-geojson" / "synth-b.geojson").exists()
    from shapely.geometry import shape

    assert all(shape(f["geometry"]).centroid.x < 96 for f in feats)
    # the whole image afterwards: segmented anew, not the region's result reused for it
    res = _segment(str(copy), "--model", str(model), "--image", "synth-a.tif")
    assert res.exit_code == 0 and "(done earlier)" not in res.output, res.output
    feats = json.loads((copy / "pointnuc-geojson" / "synth-a.geojson").read_text())["features"]
    assert any(shape(f["geometry"]).centroid.x > 96 for f in feats)
    # and the region again: its own result, replacing only the objects inside it
    res = _segment(str(copy), "--model", str(model), "--within", "Tumor")
    assert res.exit_code == 0 and "(done earlier)" in res.output, res.output
    again = json.loads((copy / "pointnuc-geojson" / "synth-a.geojson").read_text())["features"]
    assert len(again) == len(feats)


def test_a_failing_slide_does_not_stop_the_others(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    proj, model, _ = trained
    copy = _fresh_copy(proj, tmp_path / "p")
    (copy / "synth-b.tif").write_bytes((copy / "synth-b.tif").read_bytes()[:400])  # truncated file
    res = _segment(str(copy), "--model", str(model), "--image", "synth-a.tif")
    assert res.exit_code == 0, res.output
    res = _segment(str(copy), "--model", str(model), "--redo")
    assert res.exit_code != 0
    assert (copy / "pointnuc-geojson" / "synth-a.geojson").is_file()
    assert "synth-b" in res.stderr and "Traceback" not in res.output


def test_damaged_model_folders(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import shutil

    proj, model, _ = trained
    bad = Path(shutil.copytree(model, tmp_path / "bad"))
    (bad / "segmenter.pt").write_bytes(b"not a torch file")
    res = _segment(str(proj), "--model", str(bad))
    # not the file its description recorded (checksum), whatever torch would make of it
    assert res.exit_code != 0 and "segmenter.pt is damaged: its SHA-256 differs" in res.stderr, res.output
    (bad / "pointnuc-model.json").write_text("{ damaged")
    res = _segment(str(proj), "--model", str(bad))
    assert res.exit_code != 0 and "is damaged" in res.stderr, res.output
    res = _segment(str(proj), "--model", str(tmp_path))
    assert res.exit_code != 0 and "not a pointnuc model folder" in res.stderr, res.output


def test_detector_at_a_coarser_pixel_size(tmp_path: Path) -> None:
    """``detection.pixel_size_um`` coarser than the segmenter's: stage 1 runs on resampled copies of the
    same regions and its points reach stage 2 at the segmenter's pixel size, in the right places."""
    from pointnuc.metrics import detection_counts, detection_scores

    proj, truth, centres = _synthetic_project(tmp_path)
    model = tmp_path / "model"
    res = CliRunner().invoke(
        main,
        ["train", str(proj), "--profile", "tiny", "--out", str(model), "--no-progress",
         "--set", "data.pixel_size_um=0.5", "--set", "detection.pixel_size_um=0.75",
         "--set", "detection.epochs=8", "--set", "segmentation.epochs=6", "--set", "data.patches_per_image=8"],
    )
    assert res.exit_code == 0, res.output
    meta = json.loads((model / "pointnuc-model.json").read_text())
    assert meta["pixel_size_um"] == 0.5 and meta["config"]["detection"]["pixel_size_um"] == 0.75
    # stage 1's points, saved at full resolution, sit on the true nuclei
    counts = []
    for name in NAMES:
        saved = json.loads((model / "points" / f"{name}.tif#0.json").read_text())["points_xy"]
        counts.append(detection_counts(np.asarray(saved).reshape(-1, 2), centres[name], 5.5))
    det = detection_scores(counts)  # measured: P 1.0, R .49, μ_d 0.5 px (8 epochs of a tiny net)
    assert det["P"] > 0.9 and det["mu_d"] < 1.5 and det["F1"] > 0.5, det
    # the segmenter learnt from them at 0.5 µm/px
    res = _segment(str(proj), "--model", str(model))
    assert res.exit_code == 0, res.output
    ev = evaluate(proj / "pointnuc-geojson", truth, radius_px=5.5)
    assert ev.detection["F1"] > 0.8, ev.detection  # measured: 1.0
    assert ev.segmentation["F1"] > 0.75, ev.segmentation  # measured: .854


def test_cells_reach_as_far_as_asked(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """``--objects cell --cell-expansion UM``: each cell holds its nucleus and reaches at most UM beyond it;
    a re-run with another expansion reuses the kept result and writes the new cells."""
    from shapely.geometry import shape

    proj, model, _ = trained
    copy = _fresh_copy(proj, tmp_path / "p")
    res = _segment(str(copy), "--model", str(model), "--cell-expansion", "3")
    assert res.exit_code != 0 and "add --objects cell" in res.stderr, res.output

    def cells() -> list[tuple]:
        feats = json.loads((copy / "pointnuc-geojson" / "synth-a.geojson").read_text())["features"]
        assert feats and all(f["properties"]["objectType"] == "cell" for f in feats)
        return [(shape(f["geometry"]), shape(f["nucleusGeometry"])) for f in feats]

    res = _segment(str(copy), "--model", str(model), "--objects", "cell")
    assert res.exit_code == 0, res.output
    default = cells()
    res = _segment(str(copy), "--model", str(model), "--objects", "cell", "--cell-expansion", "4")
    assert res.exit_code == 0 and res.output.count("(done earlier)") == 2, res.output
    wider = cells()
    assert len(wider) == len(default)
    for found, um in ((default, 2.0), (wider, 4.0)):
        reach_px = um / 0.5  # the synthetic images are at 0.5 µm/px
        for cell, nuc in found:
            assert cell.buffer(1e-6).covers(nuc)
            assert nuc.buffer(reach_px + 0.05).covers(cell)
        # most cells are not hemmed in on every side: they reach the full distance somewhere
        reached = [cell.hausdorff_distance(nuc) > reach_px - 0.5 for cell, nuc in found]
        assert sum(reached) > 0.5 * len(found)
    assert sum(c.area for c, _ in wider) > 1.3 * sum(c.area for c, _ in default)
