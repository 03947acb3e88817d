"""QuPath's shape measurements of pointnuc's outlines, under QuPath's own names.

What QuPath 0.6.0's *Add shape features* (``ObjectMeasurements.addShapeMeasurements``) would
write for the same outlines: area, perimeter (``Length``) and circularity, in µm with a pixel
size and in px without; a cell's with ``Nucleus: `` / ``Cell: `` prefixes and the area ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

#: measurement names as QuPath 0.6.0 gives them (``ObjectMeasurements.addShapeMeasurements``, i.e.
#: *Add shape features*, and the StarDist/InstanSeg extensions): a detection's plain, a cell's with
#: ``Nucleus: `` / ``Cell: `` prefixes (tests/test_qupath_names.py checks them against QuPath itself)
NUCLEUS_PREFIX, CELL_PREFIX = "Nucleus: ", "Cell: "
AREA_RATIO = "Nucleus/Cell area ratio"


def shape_names(pixel_size_um: float | None) -> tuple[str, str, str]:
    """QuPath's names for area, perimeter and circularity: in µm with a pixel size, else in px."""
    unit = "µm" if pixel_size_um else "px"
    return f"Area {unit}^2", f"Length {unit}", "Circularity"


def is_shape_measurement(name: str) -> bool:
    """Whether ``name`` is one of the shape measurements pointnuc computes itself (any unit, any
    prefix, and the names of earlier pointnuc versions): these are recomputed, never carried over."""
    base = name.removeprefix(NUCLEUS_PREFIX).removeprefix(CELL_PREFIX)
    if name == AREA_RATIO or base == "Circularity":
        return True
    quantity, _, unit = base.partition(" ")
    return quantity in ("Area", "Length", "Perimeter") and unit in ("µm", "µm^2", "px", "px^2")


def _shape_columns(polygons: np.ndarray, pixel_size_um: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area, perimeter (µm² / µm with a pixel size, else px² / px) and circularity 4πA/P² of polygons."""
    area = shapely.area(polygons)
    perim = shapely.length(polygons)
    with np.errstate(divide="ignore", invalid="ignore"):
        circ = np.where(perim > 0, 4.0 * math.pi * area / (perim * perim), 0.0)
    if pixel_size_um:
        s = float(pixel_size_um)
        area, perim = area * s * s, perim * s
    return area, perim, circ


def measurements_many(polygons: np.ndarray, pixel_size_um: float | None) -> list[dict[str, float]]:
    """QuPath's shape measurements of detection polygons (full-resolution px coordinates), one dict each.

    With a pixel size: ``Area µm^2``, ``Length µm`` (the perimeter); without: ``Area px^2``,
    ``Length px``. Always ``Circularity`` = 4πA/P² (1 for a circle; unit-free).
    """
    keys = shape_names(pixel_size_um)
    cols = _shape_columns(np.asarray(polygons, dtype=object), pixel_size_um)
    return [dict(zip(keys, row)) for row in zip(*(c.tolist() for c in cols))]


def cell_measurements(cells: Sequence[BaseGeometry], nuclei: Sequence[BaseGeometry],
                      pixel_size_um: float | None) -> list[dict[str, float]]:
    """QuPath's shape measurements of cells: ``Nucleus: Area µm^2``, ``Nucleus: Length µm``,
    ``Nucleus: Circularity``, the same for ``Cell: ``, and ``Nucleus/Cell area ratio`` (at most 1),
    in QuPath's order; px units without a pixel size."""
    names = shape_names(pixel_size_um)
    keys = [NUCLEUS_PREFIX + k for k in names] + [CELL_PREFIX + k for k in names] + [AREA_RATIO]
    nuc = _shape_columns(np.asarray(list(nuclei), dtype=object), pixel_size_um)
    cell = _shape_columns(np.asarray(list(cells), dtype=object), pixel_size_um)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(cell[0] > 0, np.minimum(nuc[0] / cell[0], 1.0), 0.0)
    return [dict(zip(keys, row)) for row in zip(*(c.tolist() for c in (*nuc, *cell, ratio)))]
