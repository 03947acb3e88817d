"""pipeline: which full-resolution boxes are trained on, and how points and regions land in them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pointnuc.config import profile_config
from pointnuc.io.base import ImageRef
from pointnuc.train.samples import _boxes_for_image


def _ref(w: int, h: int, um: float) -> ImageRef:
    return ImageRef(name="s", path=Path("s.tif"), width=w, height=h, pixel_size_um=um)


def test_large_slide_windows_have_the_margin_in_microns() -> None:
    # 0.25 µm/px slide, model at 0.5 µm/px: downsample 2; 25 µm margin = 100 slide px,
    # a cell of 1024 working px = 2048 slide px
    config = profile_config("tiny", **{"data.pixel_size_um": 0.5, "data.max_whole_image_px": 1000})
    assert config.data.region_margin_um == 25.0
    image = _ref(10000, 8000, 0.25)
    boxes = _boxes_for_image(image, (), np.array([[3000.0, 100.0]]), 2.0, config)
    x0, x1 = 2048 - 100, 2 * 2048 + 100  # the point's cell, x in [2048, 4096), plus the margin
    assert boxes == [(x0, 0, x1 - x0, 2048 + 100, None)]  # clipped at the top edge


def _region_feature(geom) -> dict:
    from shapely.geometry import mapping

    g = mapping(geom)
    return {"type": "Feature", "geometry": {"type": g["type"], "coordinates": g["coordinates"]},
            "properties": {"objectType": "annotation", "classification": {"name": "Region*", "color": [0, 0, 180]}}}


def _project_with_region(tmp_path: Path, pixel_size_um: float) -> Path:
    from shapely.geometry import box
    from synth import write_geojson_project

    region = box(10, 10, 30, 30).difference(box(14, 14, 20, 20))  # a square with a square hole
    img = np.full((40, 40, 3), 200, np.uint8)
    img[::3] = 90
    pts = np.array([[11.5 + 2 * i, 11.5] for i in range(9)] + [[11.5, 25.5], [25.5, 25.5], [16.5, 16.5]])
    return write_geojson_project(tmp_path / "p", "img", img, pts, pixel_size_um=pixel_size_um,
                                 extra_features=[_region_feature(region)])


def test_region_mask_takes_pixel_centres_and_holes(tmp_path: Path) -> None:
    from pointnuc.io import open_project
    from pointnuc.train.samples import load_training_images

    config = profile_config("tiny", **{"data.pixel_size_um": 0.5, "data.holdout_fraction": 0.0})
    # same resolution: the region's pixels are rows/cols 10..29 minus 14..19
    (s,), _, _ = load_training_images(open_project(_project_with_region(tmp_path, 0.5)), config)
    expect = np.zeros((20, 20), bool)
    expect[:, :] = True
    expect[4:10, 4:10] = False
    assert s.origin_xy == (10.0, 10.0) and s.scale == 1.0
    assert np.array_equal(s.valid, expect)
    assert len(s.points) == 11  # the point in the hole is not a training point


def test_region_mask_at_half_resolution(tmp_path: Path) -> None:
    from pointnuc.io import open_project
    from pointnuc.train.samples import load_training_images

    config = profile_config("tiny", **{"data.pixel_size_um": 0.5, "data.holdout_fraction": 0.0})
    # 0.25 µm/px image, downsample 2: working pixel c covers full-res [10 + 2c, 12 + 2c), centre 11 + 2c;
    # the hole [14, 20) holds the centres of c = 2, 3, 4
    (s,), _, _ = load_training_images(open_project(_project_with_region(tmp_path, 0.25)), config)
    expect = np.ones((10, 10), bool)
    expect[2:5, 2:5] = False
    assert s.scale == 2.0 and np.array_equal(s.valid, expect)


def test_segment_checks_every_pixel_size_before_any_work(tmp_path: Path) -> None:
    import pytest
    from synth import write_geojson_project

    from pointnuc.errors import PixelSizeError
    from pointnuc.infer.results import RESULTS_FOLDER
    from pointnuc.io import open_project
    from pointnuc.pipeline import segment_project

    img = np.full((16, 16, 3), 200, np.uint8)
    proj = write_geojson_project(tmp_path / "p", "a", img, np.zeros((0, 2)), pixel_size_um=0.5)
    write_geojson_project(proj, "b", img, np.zeros((0, 2)), pixel_size_um=None)
    with pytest.raises(PixelSizeError, match="'b.tif' has no pixel size; pass --pixel-size"):
        segment_project(open_project(proj), tmp_path / "no-model-needed-yet")
    assert not (proj / RESULTS_FOLDER).exists()


def test_overlapping_regions_never_train_on_a_held_back_point(tmp_path: Path) -> None:
    from shapely.geometry import box
    from synth import write_geojson_project

    from pointnuc.io import open_project
    from pointnuc.train.samples import load_training_images


    img = np.full((40, 40, 3), 200, np.uint8)
    img[::3] = 90
    pts = np.array([[8.5 + 2 * i, 8.5 + i] for i in range(12)])  # all in both regions
    regions = [_region_feature(box(0, 0, 32, 32)), _region_feature(box(6, 6, 40, 40))]
    proj = write_geojson_project(tmp_path / "p", "img", img, pts, pixel_size_um=0.5, extra_features=regions)
    config = profile_config("tiny", **{"data.pixel_size_um": 0.5, "data.holdout_fraction": 0.25})
    samples, _, _ = load_training_images(open_project(proj), config)
    assert len(samples) == 2
    full = [({tuple(p) for p in s.to_full_res(s.points)}, {tuple(p) for p in s.to_full_res(s.holdout)}) for s in samples]
    trained = full[0][0] | full[1][0]
    held = full[0][1] | full[1][1]
    assert len(held) == 3 and not trained & held and len(trained | held) == 12
    assert full[0] == full[1]  # the same split seen through both regions


def test_model_description_without_configuration_is_a_clear_error(tmp_path: Path) -> None:
    import json

    import pytest

    from pointnuc.errors import ModelFormatError
    from pointnuc.models.bundle import MODEL_JSON, load_info

    (tmp_path / MODEL_JSON).write_text(json.dumps({"format": "pointnuc-model", "format_version": 1}))
    with pytest.raises(ModelFormatError, match="no training configuration"):
        load_info(tmp_path)


def test_thresholds_and_colour_reference_are_typed_and_old_folders_still_load(tmp_path: Path) -> None:
    """pointnuc-model.json keeps its dict form; a folder that lacks stage-2 thresholds (older or unfinished)
    gets them as training derives them from its config, a damaged value is a clear error."""
    import json

    import pytest

    from pointnuc.errors import ModelFormatError
    from pointnuc.infer.wsi import instance_params
    from pointnuc.models.bundle import MODEL_JSON, ModelInfo, load_info, save_info
    from pointnuc.models.calibration import ColourReference, Thresholds

    config = profile_config("tiny", **{"data.pixel_size_um": 0.5})  # min area 1.25 µm² = 5 px², h 0.25 µm = 0.5 px
    ref = {"mean": [70.0, 20.0, -10.0], "std": [15.0, 10.0, 8.0], "stain": [0.35, 1.2, 0.32, 0.6]}
    save_info(tmp_path, ModelInfo(config=config, norm_reference=ColourReference.from_json(ref),
                                  thresholds=Thresholds.for_config(config, prob=0.4, detection_prob=0.15)))
    doc = json.loads((tmp_path / MODEL_JSON).read_text())
    assert doc["norm_reference"] == ref
    assert doc["thresholds"] == {"detection_prob": 0.15, "detection_min_area_px": 0.0, "prob": 0.4, "min_area_px": 5.0,
                                 "h_px": 0.5}
    info = load_info(tmp_path)
    assert info.thresholds == Thresholds(0.15, 0.0, 0.4, 5.0, 0.5) and info.norm_reference == ColourReference.from_json(ref)
    assert info.norm_reference["mean"] == ref["mean"] and dict(info.norm_reference) == ref  # what pointnuc.stain reads
    doc["thresholds"] = {"detection_prob": 0.2, "prob": 0.6}  # an older folder: no minimum area, no watershed depth
    del doc["norm_reference"]["stain"]
    (tmp_path / MODEL_JSON).write_text(json.dumps(doc))
    info = load_info(tmp_path)
    assert info.thresholds == Thresholds(detection_prob=0.2, prob=0.6, min_area_px=5.0, h_px=0.5)
    assert info.norm_reference is not None and info.norm_reference.get("stain") is None and len(info.norm_reference) == 2
    params = instance_params(info)
    assert (params.threshold, params.min_area_px, params.h_px) == (0.6, 5.0, 0.5)
    assert ModelInfo(config=config).thresholds == Thresholds.for_config(config)  # none given: as training derives them
    for bad in ({"thresholds": {"prob": "high"}}, {"norm_reference": {"mean": [1.0, 2.0]}}):
        (tmp_path / MODEL_JSON).write_text(json.dumps({**doc, **bad}))
        with pytest.raises(ModelFormatError, match="damaged"):
            load_info(tmp_path)
