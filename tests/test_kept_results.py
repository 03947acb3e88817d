"""Kept results (``pointnuc-results/``) are each image's own, and are reused only when nothing that changes
them changed: otherwise the image is segmented again and the user is told why. The dry run says what the
run will do, from the same plan.

A tiny model trained for a few steps on two synthetic images whose names differ only in what a file name
may hold (``slide a.tif``, ``slide_a.tif``: once one kept file).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from synth import label_points, render_nuclei, write_geojson_project

from pointnuc.cli import main

#: two images whose sanitised names are the same, with different nuclei (and counts)
IMAGES = {"slide a": (30, 21), "slide_a": (50, 22)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(project, model, true nucleus centres per image file name)."""
    root = tmp_path_factory.mktemp("kept")
    proj = root / "project"
    centres = {}
    for name, (n, seed) in IMAGES.items():
        img, lab = render_nuclei((160, 160), n, radius=5.5, seed=seed, min_gap=1.2)
        centres[f"{name}.tif"] = pts = label_points(lab)
        write_geojson_project(proj, name, img, pts[:: 3], pixel_size_um=0.5)
    model = root / "model"
    res = CliRunner().invoke(
        main,
        ["train", str(proj), "--profile", "tiny", "--out", str(model), "--no-progress",
         "--set", "data.pixel_size_um=0.5", "--set", "detection.epochs=4", "--set", "segmentation.epochs=4",
         "--set", "data.patches_per_image=6"],
    )
    assert res.exit_code == 0, res.output
    return proj, model, centres


def _copy(proj: Path, dest: Path) -> Path:
    return Path(shutil.copytree(proj, dest, ignore=shutil.ignore_patterns("pointnuc-*")))


def _segment(proj: Path, model: Path, *args: str):
    res = CliRunner().invoke(main, ["segment", str(proj), "--model", str(model), "--no-progress", *args])
    assert res.exit_code == 0, res.output
    return res


def _lines(output: str) -> dict[str, str]:
    """The summary line of each image, by image name."""
    return {ln.strip().split(": ")[0]: ln.strip() for ln in output.splitlines() if ln.startswith("  ")}


def _features(proj: Path, stem: str) -> list[dict]:
    return json.loads((proj / "pointnuc-geojson" / f"{stem}.geojson").read_text())["features"]


def _centroids(feats: list[dict]) -> np.ndarray:
    from shapely.geometry import shape

    return np.array([shape(f["geometry"]).centroid.coords[0] for f in feats]).reshape(-1, 2)


def _share_near(found: np.ndarray, truth: np.ndarray, tol: float = 4.0) -> float:
    """Share of ``found`` within ``tol`` px of a true centre."""
    if not len(found):
        return 0.0
    d = np.hypot(*(found[:, None, :] - truth[None, :, :]).transpose(2, 0, 1))
    return float((d.min(1) < tol).mean())


def test_images_with_alike_names_keep_their_own_nuclei(trained, tmp_path: Path) -> None:
    """``slide a.tif`` and ``slide_a.tif``: the second run ("done earlier") wrote slide_a's outlines into
    ``slide a.geojson``. Now each keeps, and gets back, its own."""
    proj, model, centres = trained
    copy = _copy(proj, tmp_path / "p")
    _segment(copy, model)
    first = {stem: _features(copy, stem) for stem in IMAGES}
    res = _segment(copy, model)
    assert all("(done earlier)" in line for line in _lines(res.output).values()), res.output
    for stem in IMAGES:
        feats = _features(copy, stem)
        assert len(feats) == len(first[stem])
        own = _share_near(_centroids(feats), centres[f"{stem}.tif"])
        other = _share_near(_centroids(feats), centres[f"{'slide_a' if stem == 'slide a' else 'slide a'}.tif"])
        assert own > 0.8 and other < 0.3, (stem, own, other)
    kept = sorted((copy / "pointnuc-results").glob("model-*/*.geojson"))  # written/ holds the records of writes
    assert len(kept) == 2 and len({k.name for k in kept}) == 2
    # a kept result holds outlines and scores; QuPath's measurements are made of what each write writes (the
    # reused result above was written with them all the same)
    assert all(set(f["properties"]["measurements"]) == {"pointnuc score"} for k in kept for f in json.loads(k.read_text())["features"])
    assert all("Nucleus: Area" in f["properties"]["measurements"] for stem in IMAGES for f in _features(copy, stem))


def test_a_kept_result_of_another_image_is_never_reused(trained, tmp_path: Path) -> None:
    """A kept result (with its record) that lies where another image's belongs is recomputed, and so is one
    without a record of how it was made (e.g. from an older pointnuc)."""
    from pointnuc.infer.results import record_file
    from pointnuc.io import open_project
    from pointnuc.pipeline import plan_segmentation

    proj, model, centres = trained
    copy = _copy(proj, tmp_path / "p")
    _segment(copy, model, "--image", "slide a.tif")
    plans = {p.image.name: p for p in plan_segmentation(open_project(copy), model)}
    a, b = plans["slide a.tif"].result, plans["slide_a.tif"].result
    shutil.copy(a, b)
    shutil.copy(record_file(a), record_file(b))
    record_file(a).unlink()
    res = _segment(copy, model)
    lines = _lines(res.output)
    assert "recomputed: the kept result is another image's ('slide a.tif')" in lines["slide_a.tif"], res.output
    assert "recomputed: no record of how the kept result was made" in lines["slide a.tif"], res.output
    assert _share_near(_centroids(_features(copy, "slide_a")), centres["slide_a.tif"]) > 0.8


def test_another_pixel_size_is_segmented_again(trained, tmp_path: Path) -> None:
    """``--pixel-size 0.5`` then ``--pixel-size 0.25`` reused the 0.5 result (areas 4x off). Now the second
    run segments again, says why, and writes what a fresh run at 0.25 writes; the same size again reuses."""
    proj, model, _ = trained
    copy = _copy(proj, tmp_path / "p")
    _segment(copy, model, "--pixel-size", "0.5")
    res = _segment(copy, model, "--pixel-size", "0.25")
    for line in _lines(res.output).values():
        assert "(recomputed: pixel size changed 0.5 -> 0.25 µm/px)" in line, res.output
    fresh = _copy(proj, tmp_path / "fresh")
    _segment(fresh, model, "--pixel-size", "0.25")
    for stem in IMAGES:
        got, want = _features(copy, stem), _features(fresh, stem)
        areas = sorted(f["properties"]["measurements"]["Nucleus: Area"] for f in got)
        assert areas == sorted(f["properties"]["measurements"]["Nucleus: Area"] for f in want)
        from shapely.geometry import shape

        px_area = sorted(shape(f["geometry"]).area * 0.25**2 for f in got)  # µm² at 0.25 µm/px
        np.testing.assert_allclose(areas, px_area, rtol=0.02)
    res = _segment(copy, model, "--pixel-size", "0.25")
    assert all("(done earlier)" in line for line in _lines(res.output).values()), res.output


def test_a_changed_model_image_or_version_is_segmented_again(trained, tmp_path: Path, monkeypatch) -> None:
    import os

    import torch

    import pointnuc
    from pointnuc.models.bundle import ModelLayout, load_info, save_info

    proj, model, _ = trained
    copy = _copy(proj, tmp_path / "p")
    mine = Path(shutil.copytree(model, tmp_path / "model"))
    _segment(copy, mine)
    # new weights under the same settings (a training into the same folder: its description records their checksum)
    state = torch.load(ModelLayout(mine).segmenter, weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, ModelLayout(mine).segmenter)
    save_info(mine, load_info(mine))
    lines = _lines(_segment(copy, mine).output)
    # segmented again (a new description also means a new results folder, so no reason is needed)
    assert all("done earlier" not in line and line.endswith(" s") for line in lines.values()), lines
    # the image file replaced by another image under the same name
    other = copy / "slide_a.tif"
    shutil.copy(copy / "slide a.tif", other)
    lines = _lines(_segment(copy, mine).output)
    assert "(recomputed: the image file changed)" in lines["slide_a.tif"] and "(done earlier)" in lines["slide a.tif"]
    # the same file touched (copied without its time stamp): recognised by its content
    os.utime(other, ns=(other.stat().st_atime_ns, other.stat().st_mtime_ns + 10**10))
    lines = _lines(_segment(copy, mine).output)
    assert all("(done earlier)" in line for line in lines.values()), lines
    was = pointnuc.__version__
    monkeypatch.setattr(pointnuc, "__version__", "9.9.9")
    lines = _lines(_segment(copy, mine).output)
    assert all(f"(recomputed: made by pointnuc {was} (now 9.9.9))" in line for line in lines.values()), lines


def test_the_dry_run_says_what_the_run_will_do(trained, tmp_path: Path) -> None:
    """After a run, the dry run said "0 image(s) to segment (done)" while the run rewrote every image from
    its kept result. Now it says that, and names what would be segmented again and why."""
    proj, model, _ = trained
    copy = _copy(proj, tmp_path / "p")
    res = _segment(copy, model, "--dry-run")
    assert res.output.count("  segment: ") == 2 and "2 image(s) to segment" in res.output, res.output
    _segment(copy, model)
    res = _segment(copy, model, "--dry-run")
    assert res.output.count("  write kept result, ") == 2, res.output
    assert "0 image(s) to segment (0 of them again), 2 written from kept results." in res.output, res.output
    res = _segment(copy, model, "--dry-run", "--pixel-size", "0.25")
    assert res.output.count("  recompute (pixel size changed 0.5 -> 0.25 µm/px): ") == 2, res.output
    res = _segment(copy, model, "--dry-run", "--shard", "1/1")
    assert res.output.count("  nothing (kept result is current), ") == 2, res.output
    # the run does what its dry run said
    before = sorted(p.name for p in copy.rglob("*"))
    res = _segment(copy, model, "--dry-run", "--redo", "--image", "slide a.tif")
    assert "  recompute (--redo): slide a.tif" in res.output and sorted(p.name for p in copy.rglob("*")) == before
    lines = _lines(_segment(copy, model, "--redo", "--image", "slide a.tif").output)
    assert list(lines) == ["slide a.tif"] and "(recomputed: --redo)" in lines["slide a.tif"]


def test_merge_writes_only_current_kept_results(trained, tmp_path: Path) -> None:
    """Shards ran at one pixel size, the merge is asked for another: nothing stale is written, and the
    merge says which images and why, with a non-zero exit."""
    proj, model, _ = trained
    copy = _copy(proj, tmp_path / "p")
    _segment(copy, model, "--shard", "1/2")
    res = CliRunner().invoke(main, ["segment", str(copy), "--model", str(model), "--merge"])
    assert res.exit_code == 1 and "slide_a.tif: not merged: no kept result" in res.stderr, res.output
    assert (copy / "pointnuc-geojson" / "slide a.geojson").is_file()
    res = CliRunner().invoke(main, ["segment", str(copy), "--model", str(model), "--merge", "--pixel-size", "0.25"])
    assert res.exit_code != 0 and "slide a.tif: pixel size changed 0.5 -> 0.25 µm/px" in res.stderr, res.output
    _segment(copy, model, "--shard", "2/2", "--pixel-size", "0.25")
    res = CliRunner().invoke(main, ["segment", str(copy), "--model", str(model), "--merge", "--pixel-size", "0.25"])
    assert res.exit_code == 1 and "slide a.tif: not merged: pixel size changed 0.5 -> 0.25 µm/px" in res.stderr, res.output
    feats = _features(copy, "slide_a")
    assert feats and all(f["properties"]["measurements"]["Nucleus: Area"] < 60 for f in feats)  # r 5.5 px at 0.25 µm/px


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_small_images_side_by_side_give_what_one_at_a_time_gives(trained, tmp_path: Path, monkeypatch, caplog,
                                                                 processes: bool) -> None:
    """On the CPU, images that fit one window are segmented two at a time (each on half the threads, its own
    copy of the network), in threads or, from ``PROCESS_MIN_IMAGES`` images on, in worker processes: the very
    same nuclei and measurements, in the same files, as one at a time; the workers' log lines reach the user."""
    import torch

    from pointnuc.infer import images

    proj, model, _ = trained
    monkeypatch.setattr(images, "PROCESS_MIN_IMAGES", 2 if processes else 100)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        both = _copy(proj, tmp_path / "both")
        res = _segment(both, model, "--device", "cpu")
        assert "2 at a time" in res.output and torch.get_num_threads() == 2, res.output
        assert ("in worker processes" in res.output) == processes, res.output
        for name in IMAGES:  # (logged by segment_one, in a worker with processes)
            assert f"{name}.tif: 160 x 160 px at 0.5 µm/px, segmented at the model's" in caplog.text, caplog.text
        monkeypatch.setattr(images, "images_at_once", lambda *a: 1)
        one = _copy(proj, tmp_path / "one")
        res = _segment(one, model, "--device", "cpu")
        assert "at a time" not in res.output, res.output
    finally:
        torch.set_num_threads(threads)
    for stem in IMAGES:
        a, b = _features(both, stem), _features(one, stem)
        assert len(a) > 5 and [f["geometry"] for f in a] == [f["geometry"] for f in b]
        assert [f["properties"].get("measurements") for f in a] == [f["properties"].get("measurements") for f in b]


def test_an_image_failing_in_a_worker_process_is_reported_and_the_others_written(trained, tmp_path: Path,
                                                                                 monkeypatch, caplog) -> None:
    """In worker processes too, an image that cannot be read fails on its own: its error reaches the user, the
    run exits 1, and the other image is segmented and written."""
    import torch

    from pointnuc.infer import images

    proj, model, _ = trained
    monkeypatch.setattr(images, "PROCESS_MIN_IMAGES", 2)
    copy = _copy(proj, tmp_path / "p")
    (copy / "slide_a.tif").write_bytes((copy / "slide_a.tif").read_bytes()[:400])  # truncated
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = CliRunner().invoke(main, ["segment", str(copy), "--model", str(model), "--no-progress", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 1 and "in worker processes" in res.output, res.output
    assert "slide_a.tif" in res.stderr and "truncated" in res.stderr and "Traceback" not in res.output, res.stderr
    assert "slide_a.tif failed" in caplog.text  # (logged in the worker, logged again here)
    assert len(_features(copy, "slide a")) > 5 and not (copy / "pointnuc-geojson" / "slide_a.geojson").exists()
