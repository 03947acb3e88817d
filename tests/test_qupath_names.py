"""pointnuc's measurements carry QuPath 0.6.0's names (and values) for the shapes it measures.

QuPath 0.6.0 has two namings, both checked here against the real thing (``qupath``-marked tests):

- *Add shape features* (``qupath.lib.analysis.features.ObjectMeasurements.addShapeMeasurements``,
  also what the StarDist and InstanSeg extensions write): a detection's ``Area µm^2``,
  ``Length µm`` (the perimeter), ``Circularity``, ...; a cell's ``Nucleus: Area µm^2``,
  ``Cell: Area µm^2``, ..., ``Nucleus/Cell area ratio``; ``px`` units without a pixel size.
  pointnuc uses these names, and its values equal QuPath's for the same outlines.
- The built-in cell detection (``qupath.imagej.detect.cells.WatershedCellDetection``): the same
  ``Nucleus: `` / ``Cell: `` prefixes and ``Nucleus/Cell area ratio``, but no unit in the names
  (``Nucleus: Area``, in µm² when the image has a pixel size) and ``Perimeter`` for the perimeter.

Before, a cell carried its nucleus' measurements under a detection's names (``Area µm^2`` holding
the nucleus area) and no measurement of the cell itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import shapely
from shapely.geometry import Point, box

from pointnuc.io.base import POINTNUC_MARKER, NucleusObject, WriteOptions
from pointnuc.io.records import nucleus_records

DETECTION_NAMES = {0.5: ["Area µm^2", "Length µm", "Circularity"], None: ["Area px^2", "Length px", "Circularity"]}
CELL_NAMES = {
    0.5: ["Nucleus: Area µm^2", "Nucleus: Length µm", "Nucleus: Circularity",
          "Cell: Area µm^2", "Cell: Length µm", "Cell: Circularity", "Nucleus/Cell area ratio"],
    None: ["Nucleus: Area px^2", "Nucleus: Length px", "Nucleus: Circularity",
           "Cell: Area px^2", "Cell: Length px", "Cell: Circularity", "Nucleus/Cell area ratio"],
}
#: the shape measurements of QuPath 0.6.0's own cell detection (seen through tests/qupath_kit.py)
WATERSHED_SHAPE_NAMES = ["Nucleus: Area", "Nucleus: Perimeter", "Nucleus: Circularity",
                         "Cell: Area", "Cell: Perimeter", "Cell: Circularity", "Nucleus/Cell area ratio"]


def _nuclei() -> list[NucleusObject]:
    return [NucleusObject(Point(20, 20).buffer(5, quad_segs=3), 0.9), NucleusObject(box(27, 15, 35, 24), 0.8),
            NucleusObject(box(0, 40, 6, 47), 0.7)]


@pytest.mark.parametrize("px", [0.5, None])
def test_measurement_names(px: float | None) -> None:
    [det, *_] = nucleus_records(_nuclei(), pixel_size_um=px)
    assert list(det[2]) == DETECTION_NAMES[px] + [POINTNUC_MARKER]
    [cell, *_] = nucleus_records(_nuclei(), options=WriteOptions("cell"), pixel_size_um=px)
    assert list(cell[2]) == CELL_NAMES[px] + [POINTNUC_MARKER]
    m = cell[2]
    s2 = (px or 1.0) ** 2
    assert m[CELL_NAMES[px][0]] == pytest.approx(cell[1].area * s2, rel=1e-6)  # the nucleus'
    assert m[CELL_NAMES[px][3]] == pytest.approx(cell[0].area * s2, rel=1e-6)  # the cell's
    assert m["Nucleus/Cell area ratio"] == pytest.approx(cell[1].area / cell[0].area, rel=1e-6)


def test_shape_measurements_are_recomputed_not_carried_over() -> None:
    """A kept result read back (earlier pointnuc names, or a cell's read back to write a detection)
    brings its shape measurements along: those of the outline written replace them; others stay."""
    old = {"Area µm^2": 1.0, "Perimeter µm": 2.0, "Circularity": 3.0, "Nucleus: Area µm^2": 4.0,
           "Cell: Length µm": 5.0, "Nucleus/Cell area ratio": 0.5, "Hematoxylin OD mean": 0.25}
    n = NucleusObject(box(0, 0, 10, 10), 0.9, old)
    [(_, _, det)] = nucleus_records([n], pixel_size_um=0.5)
    assert list(det) == DETECTION_NAMES[0.5] + ["Hematoxylin OD mean", POINTNUC_MARKER]
    assert det["Area µm^2"] == 25.0
    [(_, _, cell)] = nucleus_records([n], options=WriteOptions("cell"), pixel_size_um=0.5)
    assert list(cell) == CELL_NAMES[0.5] + ["Hematoxylin OD mean", POINTNUC_MARKER]
    assert cell["Nucleus: Area µm^2"] == 25.0


# --------------------------------------------------------------------------- against QuPath itself


@pytest.mark.qupath
@pytest.mark.parametrize("px", [0.5, None])
def test_names_and_values_are_qupaths_shape_features(qupath_dir: Path, tmp_path: Path, px: float | None) -> None:
    from qupath_kit import kit

    from pointnuc.geometry import object_area

    ours, objects = [], []
    for object_type in ("detection", "cell"):
        for geom, nucleus, meas in nucleus_records(_nuclei(), options=WriteOptions(object_type), pixel_size_um=px,
                                                   clip_to=object_area(64, 64)):
            ours.append(meas)
            objects.append({"type": object_type, "wkb": shapely.to_wkb(geom, hex=True),
                            "nucleus_wkb": None if nucleus is None else shapely.to_wkb(nucleus, hex=True)})
    spec = tmp_path / "objects.json"
    spec.write_text(json.dumps({"pixel_size_um": px, "objects": objects}))
    theirs = kit("shape-measurements", spec)["objects"]
    for mine, qupath, obj in zip(ours, theirs, objects):
        mine = {k: v for k, v in mine.items() if k != POINTNUC_MARKER}
        assert set(mine) <= set(qupath), (obj["type"], sorted(set(mine) - set(qupath)))
        names = DETECTION_NAMES[px] if obj["type"] == "detection" else CELL_NAMES[px]
        assert list(mine) == names == [k for k in qupath if k in mine]  # QuPath's order too
        for k, v in mine.items():  # both float32, of the same outlines: equal to float32 precision
            assert v == pytest.approx(qupath[k], rel=1e-6), k


@pytest.mark.qupath
def test_qupaths_own_cell_detection(qupath_dir: Path, tmp_path: Path) -> None:
    """QuPath's cell detection through the kit: its measurement names (the prefixes pointnuc shares),
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
    # pointnuc's cell names are these with QuPath's shape-feature units (and Length for Perimeter)
    for ours in CELL_NAMES[0.5]:
        base = ours.replace(" µm^2", "").replace(" µm", "").replace("Length", "Perimeter")
        assert base in names, ours
    image = box(0, 0, res["width"], res["height"])
    for c in res["cells"]:
        assert c["type"] == "cell" and c["valid"] and c["nucleus_valid"]
        cell = shapely.from_wkb(bytes.fromhex(c["wkb"]))
        assert image.covers(cell)
        assert c["measurements"]["Cell: Area"] == pytest.approx(cell.area * 0.25, rel=0.05)  # µm², unit not named
