"""What both writers share: pointnuc's nuclei as records ready to write, class colours, ownership.

:mod:`pointnuc.io.geojson` turns the records into QuPath GeoJSON Features,
:mod:`pointnuc.io.qupath` into objects of a QuPath hierarchy (through paquo); both give each
class the colour QuPath shows for it, and both replace earlier objects by the same rule
(:func:`inside`). So the two never import each other.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from pointnuc.deconvolution import Stains
from pointnuc.errors import PointnucError
from pointnuc.geometry import clip_polygons, expand_cells, valid_polygon
from pointnuc.io.base import DEFAULT_WRITE, POINTNUC_MARKER, ImageRef, NucleusObject, WriteOptions
from pointnuc.measurements import RegionReader, is_computed_measurement, measure

#: one written object: geometry, the nucleus geometry of a cell (None for a detection), measurements
Record = tuple[BaseGeometry, BaseGeometry | None, dict[str, float]]

log = logging.getLogger(__name__)

#: colours QuPath 0.6 shows for these classes (built-ins, and the one it derives for "Nucleus")
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "Nucleus": (255, 228, 22),
    "Tumor": (200, 0, 0),
    "Stroma": (150, 200, 150),
    "Immune cells": (160, 90, 160),
    "Necrosis": (50, 50, 50),
    "Other": (255, 200, 0),
    "Region*": (0, 0, 180),
    "Ignore*": (180, 180, 180),
    "Positive": (200, 50, 50),
    "Negative": (112, 112, 225),
}


def class_color(name: str) -> tuple[int, int, int]:
    """The colour written for a class: QuPath's for known classes, else a stable colour from the name."""
    if name in CLASS_COLORS:
        return CLASS_COLORS[name]
    h = 0
    for ch in name:  # Java's String.hashCode, for a colour that does not change between runs
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    return (64 + (h >> 16) % 192, 64 + (h >> 8) % 192, 64 + h % 192)


def float32(value: float) -> float:
    """A value as QuPath stores measurements (32-bit float), back as a Python float."""
    return float(np.float32(value))


def _rounded_polygon(poly: BaseGeometry) -> BaseGeometry | None:
    """Round to the 2 decimals that will be written, and make sure the result is still valid."""
    p = valid_polygon(poly)
    if p is None:
        return None
    rounded = shapely.transform(p, lambda xy: np.round(xy, 2))
    return rounded if rounded.is_valid and not rounded.is_empty else valid_polygon(rounded)


def rounded_polygons(polys: Sequence[BaseGeometry | None]) -> list[BaseGeometry | None]:
    """:func:`_rounded_polygon` of each, the valid polygons (nearly all) rounded in one call to shapely."""
    arr = np.asarray([p if p is not None else shapely.Polygon() for p in polys], dtype=object)
    if len(arr) == 0:
        return []
    plain = (shapely.get_type_id(arr) == 3) & shapely.is_valid(arr) & ~shapely.is_empty(arr) & (shapely.area(arr) > 0)
    out: list[BaseGeometry | None] = [None] * len(arr)
    rounded = shapely.transform(arr[plain], lambda xy: np.round(xy, 2))
    good = shapely.is_valid(rounded) & ~shapely.is_empty(rounded)
    for i, r, g in zip(np.flatnonzero(plain).tolist(), rounded, good):
        out[i] = r if g else valid_polygon(r)
    for j in np.flatnonzero(~plain).tolist():
        p = polys[j]
        if p is not None:
            out[j] = _rounded_polygon(p)
    return out


def nucleus_records(
    nuclei: Sequence[NucleusObject],
    *,
    options: WriteOptions = DEFAULT_WRITE,
    pixel_size_um: float | None = None,
    clip_to: BaseGeometry | None = None,
    pixels: RegionReader | None = None,
    stains: Stains | None = None,
    measured: bool = True,
) -> list[Record]:
    """(geometry, nucleus geometry or None, measurements) per nucleus, ready to write.

    ``clip_to`` is the area every object must stay inside (:func:`pointnuc.geometry.object_area`:
    the image, and the ``--within`` region where given): nuclei are cut to it, cells end at it.
    Outlines are rounded to 0.01 px and made valid; empty ones are dropped.
    ``options.object_type="cell"``: the geometry is the nucleus grown by ``options.cell_expansion_um``
    (as 4 px per µm when the pixel size is unknown), limited by its neighbours; the nucleus is the
    nucleus geometry. (``options.class_name`` is the writer's business.)

    Measurements, all as 32-bit floats: those QuPath's own cell detection makes, under its names and
    in its order (:mod:`pointnuc.measurements`): shape (``Nucleus: Area``, ``Nucleus: Perimeter``,
    ...; a cell's also ``Cell: ...`` and ``Nucleus/Cell area ratio``) of the outlines written, and
    with ``pixels`` (the image) the stains' optical densities (``Nucleus: Hematoxylin OD mean``, ...,
    a cell's also ``Cell: ...`` and ``Cytoplasm: ...``; ``stains``: QuPath's H&E default unless
    given); then the nucleus' other measurements, and the marker ``pointnuc score``. ``measured=False``: none of
    QuPath's (a kept result: every write into a project measures what it writes).
    """
    cell = options.object_type == "cell"
    polys = [n.polygon for n in nuclei]
    if clip_to is not None:
        polys = clip_polygons([p if p is not None else shapely.Polygon() for p in polys], clip_to)
    kept = [(n, poly) for n, poly in zip(nuclei, rounded_polygons(polys)) if poly is not None]
    if not kept:
        return []
    nuc = [p for _, p in kept]
    if cell:
        dist_px = options.cell_expansion_um / (pixel_size_um if pixel_size_um else 0.25)
        cells = rounded_polygons(expand_cells(nuc, dist_px, within=clip_to))
        geoms = [c if c is not None and c.covers(p) else p for c, p in zip(cells, nuc)]
        computed = measure(nuc, geoms, pixel_size_um=pixel_size_um, pixels=pixels, stains=stains) if measured else None
    else:
        geoms = nuc
        computed = measure(nuc, pixel_size_um=pixel_size_um, pixels=pixels, stains=stains) if measured else None
    if computed is None:
        computed = [{} for _ in nuc]
    out = []
    for (n, poly), geom, meas in zip(kept, geoms, computed):
        # computed measurements are always those of the outlines written here (cut, rounded)
        meas.update({k: v for k, v in n.measurements.items()
                     if k != POINTNUC_MARKER and not is_computed_measurement(k)})
        meas[POINTNUC_MARKER] = float(n.score)
        # NaN stays, as QuPath keeps it (a cell without cytoplasm pixels: its Cytoplasm stains), so that
        # every object carries the same measurements; nothing else is non-finite
        meas = {k: float32(v) for k, v in meas.items() if v is not None and not math.isinf(float(v))}
        out.append((geom, poly if cell else None, meas))
    return out


@contextmanager
def image_pixels(image: ImageRef) -> Iterator[RegionReader | None]:
    """The image's pixels for the stain measurements of :func:`nucleus_records`, or None (the shape
    measurements only, with a warning) when the image cannot be opened."""
    from pointnuc.io.slide import open_slide

    try:
        slide = open_slide(image.path, pixel_size_um=image.pixel_size_um)
    except (PointnucError, OSError) as err:
        log.warning("%s: no stain measurements, the image cannot be read: %s", image.name, err)
        slide = None
    if slide is None:
        yield None
        return
    with slide:
        yield slide


def inside(geom: BaseGeometry, area: BaseGeometry | None) -> bool:
    """Ownership rule for replacing earlier results: an object belongs to an area when its
    centroid (representative point for odd shapes) lies in it; None = everywhere. Pass a cell's
    *nucleus*: new nuclei are owned by theirs, so a cell whose outline's centroid lies on the
    other side of the area's edge from its nucleus's would otherwise stay beside the new one."""
    if area is None:
        return True
    pt = geom.centroid if not geom.is_empty else None
    if pt is None or pt.is_empty or not geom.contains(pt):
        pt = geom.representative_point()
    return bool(area.covers(pt))
