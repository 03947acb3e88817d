"""QuPath objects as plain data, and how pointnuc reads a user's annotations from them.

Both project kinds (GeoJSON folder, paquo) turn their objects into :class:`QuPathObject`
and share :func:`summarise`, so they read points and regions by the same rules:

- points: the Points annotations (``MultiPoint``/``Point``) of the point class;
- regions: the area annotations (``Polygon``/``MultiPolygon``, rectangles included) of the
  region class; ``region_class=None`` means QuPath's built-in ``Region*`` class;
- other classes' points are counted, not used;
- points less than :data:`EDGE_TOLERANCE_PX` outside the image (a click on its very edge,
  which QuPath allows) are moved onto its last pixel; points further out are an error;
- pointnuc's own objects are those carrying the measurement :data:`POINTNUC_MARKER`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from shapely.geometry import GeometryCollection, MultiPoint, MultiPolygon, Point, Polygon
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from pointnuc.errors import InputError, TrainingError
from pointnuc.io.base import POINTNUC_MARKER, ImageAnnotations, ImageRef

#: region class used when none is given: QuPath's built-in class for regions of interest
DEFAULT_REGION_CLASS = "Region*"
#: points at most this far (px) outside the image are clamped onto its edge pixels
EDGE_TOLERANCE_PX = 1.0
#: where a clamped point lands inside the far edge (the image spans [0, width) in QuPath coordinates)
_INSIDE_EDGE_PX = 1e-3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuPathObject:
    """One QuPath object: its type, shape, class and measurements."""

    object_type: str  #: annotation | detection | cell | tile | ...
    geometry: BaseGeometry  #: full-resolution pixel coordinates
    class_name: str | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    nucleus_geometry: BaseGeometry | None = None  #: cells only
    name: str | None = None
    id: str | None = None

    @property
    def is_pointnuc(self) -> bool:
        """Written by pointnuc (carries the marker measurement)."""
        return POINTNUC_MARKER in self.measurements


def _point_coords(geom: BaseGeometry) -> np.ndarray:
    if isinstance(geom, Point):
        return np.array([[geom.x, geom.y]], float)
    return np.array([[p.x, p.y] for p in geom.geoms], float).reshape(-1, 2)


def summarise(
    objects: Iterable[QuPathObject],
    image: ImageRef,
    *,
    point_class: str = "Nucleus",
    region_class: str | None = None,
    source: str = "",
    n_pointnuc_objects: int | None = None,
) -> ImageAnnotations:
    """The points, regions and counts pointnuc needs from one image's objects.

    Points within :data:`EDGE_TOLERANCE_PX` of the image's border, outside it, are moved
    onto the edge pixels; points further out are an :class:`InputError` (``source`` names
    the file). ``n_pointnuc_objects`` overrides the count of marked objects among ``objects``.
    """
    region_class = DEFAULT_REGION_CLASS if region_class is None else region_class
    points: list[np.ndarray] = []
    regions: list[BaseGeometry] = []
    others: dict[str, int] = {}
    n_marked = 0
    for obj in objects:
        if obj.is_pointnuc:
            n_marked += 1
        if obj.object_type != "annotation" or obj.geometry is None or obj.geometry.is_empty:
            continue
        geom = obj.geometry
        if isinstance(geom, (Point, MultiPoint)):
            xy = _point_coords(geom)
            if obj.class_name == point_class:
                points.append(xy)
            else:
                key = obj.class_name if obj.class_name is not None else "Unclassified"
                others[key] = others.get(key, 0) + len(xy)
        elif obj.class_name == region_class:
            if isinstance(geom, GeometryCollection):  # e.g. an area drawn with lines: keep its area parts
                parts = [g for g in geom.geoms if isinstance(g, (Polygon, MultiPolygon)) and not g.is_empty]
                geom = unary_union(parts) if parts else None
            if isinstance(geom, (Polygon, MultiPolygon)):
                regions.append(geom)
    pts = np.concatenate(points) if points else np.zeros((0, 2), float)
    if len(pts):
        size = np.array([image.width, image.height], float)
        tol = EDGE_TOLERANCE_PX
        far = np.any((pts < -tol) | (pts >= size + tol), axis=1)
        if far.any():
            x, y = pts[np.argmax(far)]
            where = f" in {source}" if source else ""
            raise InputError(
                f"{int(far.sum())} {point_class!r} point(s) of image {image.name!r}{where} lie outside its "
                f"{image.width}x{image.height} pixels (first at x={x:g}, y={y:g}); are the annotations from another image?"
            )
        edge = np.any((pts < 0) | (pts >= size), axis=1)
        if edge.any():  # a click on the image's very edge: onto its edge pixels
            pts = np.where(pts < 0, 0.0, np.where(pts >= size, size - _INSIDE_EDGE_PX, pts))
            log.info("%s: %d %r point(s) less than %g px outside the image moved onto its edge",
                     image.name, int(edge.sum()), point_class, tol)
    return ImageAnnotations(
        points_xy=pts.astype(np.float64),
        regions=tuple(regions),
        other_point_counts=dict(sorted(others.items())),
        n_pointnuc_objects=n_marked if n_pointnuc_objects is None else n_pointnuc_objects,
    )


def require_points(annotations: ImageAnnotations, image: ImageRef, point_class: str = "Nucleus") -> np.ndarray:
    """The image's points, or a TrainingError saying how to add some."""
    if len(annotations.points_xy) == 0:
        hint = ""
        if annotations.other_point_counts:
            found = ", ".join(f"{k!r} ({v})" for k, v in annotations.other_point_counts.items())
            hint = f"; it has points of {found} - pass --point-class to use them"
        raise TrainingError(
            f"image {image.name!r} has no {point_class!r} points; click some nuclei with the Points tool in class "
            f"{point_class!r}{hint}"
        )
    return annotations.points_xy
