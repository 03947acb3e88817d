"""pointnuc's measurements carry the names of QuPath 0.6.0's own cell detection.

QuPath 0.6.0 has two namings:

- its built-in cell detection (``qupath.imagej.detect.cells.WatershedCellDetection``): ``Nucleus: Area``,
  ``Nucleus: Perimeter``, ... (no unit in the name: µm with a pixel size, px without), stain
  intensities ``Nucleus: Hematoxylin OD mean``, ..., a cell's ``Cell: ...``, ``Cytoplasm: ...`` and
  ``Nucleus/Cell area ratio``. pointnuc uses these (since session 19), so that classifiers trained on
  QuPath's detections apply to pointnuc's; tests/test_measurements_qupath.py compares the values.
- *Add shape features* (``ObjectMeasurements.addShapeMeasurements``, the StarDist/InstanSeg
  extensions): ``Area µm^2``, ``Length µm``, ``Circularity``. pointnuc wrote these before; read back,
  they are dropped and recomputed, never carried over beside the new ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import shapely
from shapely.geometry import Point, box

from pointnuc.io.base import POINTNUC_MARKER, NucleusObject, WriteOptions
from pointnuc.io.records import nucleus_records

SHAPES = ["Area", "Perimeter", "Circularity", "Max caliper", "Min caliper", "Eccentricity"]
DETECTION_NAMES = [f"Nucleus: {k}" for k in SHAPES]
CELL_NAMES = DETECTION_NAMES + [f"Cell: {k}" for k in SHAPES] + ["Nucleus/Cell area ratio"]
#: the shape measurements of QuPath 0.6.0's own cell detection (seen through tests/qupath_kit.py)
WATERSHED_SHAPE_NAMES = CELL_NAMES


def _nuclei() -> list[NucleusObject]:
    return [NucleusObject(Point(20, 20).buffer(5, quad_segs=3), 0.9), NucleusObject(box(27, 15, 35, 24), 0.8),
            NucleusObject(box(0, 40, 6, 47), 0.7)]


@pytest.mark.parametrize("px", [0.5, None])
def test_measurement_names(px: float | None) -> None:
    """Without the image's pixels (kept results), the shape measurements only; same names with or without a pixel size."""
    [det, *_] = nucleus_records(_nuclei(), pixel_size_um=px)
    assert list(det[2]) == DETECTION_NAMES + [POINTNUC_MARKER]
    [cell, *_] = nucleus_records(_nuclei(), options=WriteOptions("cell"), pixel_size_um=px)
    assert list(cell[2]) == CELL_NAMES + [POINTNUC_MARKER]
    m = cell[2]
    s2 = (px or 1.0) ** 2
    assert m["Nucleus: Area"] == pytest.approx(cell[1].area * s2, rel=1e-6)  # the nucleus'
    assert m["Cell: Area"] == pytest.approx(cell[0].area * s2, rel=1e-6)  # the cell's
    assert m["Nucleus/Cell area ratio"] == pytest.approx(cell[1].area / cell[0].area, rel=1e-6)


def test_stain_measurements_with_the_image(tmp_path: Path) -> None:
    """With the image's pixels: QuPath's stain measurements, in its order after the shapes; a
    white image has zero optical density, a uniformly stained one that stain's density."""
    import numpy as np

    from pointnuc.deconvolution import HE_DEFAULT
    from pointnuc.measurements import measurement_names

    class Uniform:
        def __init__(self, rgb: tuple[int, int, int]) -> None:
            self.rgb = rgb

        def read_region(self, x: float, y: float, w: float, h: float, downsample: float = 1.0) -> np.ndarray:
            return np.full((round(h / downsample), round(w / downsample), 3), self.rgb, np.uint8)

    for object_type in ("detection", "cell"):
        [(_, _, m), *_] = nucleus_records(_nuclei(), options=WriteOptions(object_type), pixel_size_um=0.5,
                                          pixels=Uniform((255, 255, 255)))
        assert list(m) == measurement_names(cells=object_type == "cell") + [POINTNUC_MARKER]
        assert m["Nucleus: Hematoxylin OD mean"] == 0.0 and m["Nucleus: Eosin OD max"] == 0.0
    # pure hematoxylin of optical density 0.5: RGB = 255 * 10^(-0.5 * vector)
    rgb = tuple(round(255 * 10 ** (-0.5 * v)) for v in HE_DEFAULT.vectors[0])
    [(_, _, m), *_] = nucleus_records(_nuclei(), pixel_size_um=0.5, pixels=Uniform(rgb))  # type: ignore[arg-type]
    assert m["Nucleus: Hematoxylin OD mean"] == pytest.approx(0.5, abs=0.01)
    assert m["Nucleus: Eosin OD mean"] == pytest.approx(0.0, abs=0.01)
    assert m["Nucleus: Hematoxylin OD std dev"] == 0.0
    n_px = m["Nucleus: Hematoxylin OD sum"] / m["Nucleus: Hematoxylin OD mean"]
    assert n_px == pytest.approx(_nuclei()[0].polygon.area, rel=0.1)  # pixels whose centres are inside


def test_shape_measurements_are_recomputed_not_carried_over() -> None:
    """A kept result read back (earlier pointnuc names, or a cell's read back to write a detection)
    brings its measurements along: those pointnuc computes are replaced; others stay."""
    old = {"Area µm^2": 1.0, "Perimeter µm": 2.0, "Circularity": 3.0, "Nucleus: Area µm^2": 4.0,
           "Cell: Length µm": 5.0, "Nucleus/Cell area ratio": 0.5, "Nucleus: Hematoxylin OD mean": 0.25,
           "Cytoplasm: Eosin OD min": 0.1, "Cell: Max caliper": 9.0, "Tumor probability": 0.75}
    n = NucleusObject(box(0, 0, 10, 10), 0.9, old)
    [(_, _, det)] = nucleus_records([n], pixel_size_um=0.5)
    assert list(det) == DETECTION_NAMES + ["Tumor probability", POINTNUC_MARKER]
    assert det["Nucleus: Area"] == 25.0
    [(_, _, cell)] = nucleus_records([n], options=WriteOptions("cell"), pixel_size_um=0.5)
    assert list(cell) == CELL_NAMES + ["Tumor probability", POINTNUC_MARKER]
    assert cell["Nucleus: Area"] == 25.0


# --------------------------------------------------------------------------- against QuPath itself


@pytest.mark.qupath
def test_qupaths_own_cell_detection(qupath_dir: Path, tmp_path: Path) -> None:
    """QuPath's cell detection through the kit: its shape measurement names (pointnuc's),
    and its cells, which end at the image border as pointnuc's do."""
    from qupath_kit import WATERSHED_DEFAULTS, kit
    from synth import render_nuclei, write_tiff

    img, _ = render_nuclei((160, 192), 30, radius=5.5, seed=3)
    write_tiff(tmp_path / "cells.tif", img, 0.5)
    res = kit("watershed", tmp_path / "cells.tif")
    assert res["ok"] and res["pixel_size_um"] == 0.5 and (res["width"], res["height"]) == (192, 160)
    assert res["qupath_defaults"] == WATERSHED_DEFAULTS  # the kit runs QuPath's own defaults (the benchmark says so)
    assert len(res["cells"]) >= 20  # 30 rendered, a few merged or at the border
    names = list(res["cells"][0]["measurements"])
    assert [k for k in names if k in WATERSHED_SHAPE_NAMES] == WATERSHED_SHAPE_NAMES
    image = box(0, 0, res["width"], res["height"])
    for c in res["cells"]:
        assert c["type"] == "cell" and c["valid"] and c["nucleus_valid"]
        cell = shapely.from_wkb(bytes.fromhex(c["wkb"]))
        assert image.covers(cell)
        assert c["measurements"]["Cell: Area"] == pytest.approx(cell.area * 0.25, rel=0.05)  # µm², unit not named
