"""QuPath objects as plain data, and how pointnuc reads a user's annotations from them.

Both project kinds (GeoJSON folder, paquo) turn their objects into :class:`QuPathObject`
and share :func:`summarise`, so they read points and regions by the same rules:

- points: the Points annotations (``MultiPoint``/``Point``) of the point class;
- outlines: the area annotations of the point class (each polygon a nucleus);
- regions: the area annotations (``Polygon``/``MultiPolygon``, rectangles included) of the
  region class; ``region_class=None`` means QuPath's built-in ``Region*`` class;
- background: the area annotations and the points of the background class;
- deleted detections: pointnuc's objects of its last write (:mod:`pointnuc.io.written`) that
  are no longer in the project, except those holding a point or an outline's centre of the
  point class (the user deleted a wrong outline and marked the nucleus: not background);
- other classes' points are counted, not used;
- points less than :data:`EDGE_TOLERANCE_PX` outside the image (a click on its very edge,
  which QuPath allows) are moved onto its last pixel; points further out are an error;
- pointnuc's own objects are those carrying the measurement :data:`POINTNUC_MARKER`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from shapely.geometry import GeometryCollection, MultiPoint, MultiPolygon, Point, Polygon
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from pointnuc.errors import InputError, TrainingError
from pointnuc.io.base import DEFAULT_BACKGROUND_CLASS, POINTNUC_MARKER, ImageAnnotations, ImageRef
from pointnuc.io.written import Present, WrittenObject, centre, deleted_since

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


def _area_parts(geom: BaseGeometry) -> list[Polygon]:
    """The polygons of an area annotation (an area drawn with lines keeps its area parts; invalid ones are repaired)."""
    import shapely

    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    return [g for g in shapely.get_parts(geom) if isinstance(g, Polygon) and not g.is_empty and g.area > 0]


def _on_image(pts: np.ndarray, image: ImageRef, cls: str, source: str) -> np.ndarray:
    """Points moved onto the image's edge pixels when within :data:`EDGE_TOLERANCE_PX` outside it; an InputError further out."""
    if not len(pts):
        return pts
    size = np.array([image.width, image.height], float)
    tol = EDGE_TOLERANCE_PX
    far = np.any((pts < -tol) | (pts >= size + tol), axis=1)
    if far.any():
        x, y = pts[np.argmax(far)]
        where = f" in {source}" if source else ""
        raise InputError(
            f"{int(far.sum())} {cls!r} point(s) of image {image.name!r}{where} lie outside its "
            f"{image.width}x{image.height} pixels (first at x={x:g}, y={y:g}); are the annotations from another image?"
        )
    edge = np.any((pts < 0) | (pts >= size), axis=1)
    if edge.any():  # a click on the image's very edge: onto its edge pixels
        pts = np.where(pts < 0, 0.0, np.where(pts >= size, size - _INSIDE_EDGE_PX, pts))
        log.info("%s: %d %r point(s) less than %g px outside the image moved onto its edge",
                 image.name, int(edge.sum()), cls, tol)
    return pts


def summarise(
    objects: Iterable[QuPathObject],
    image: ImageRef,
    *,
    point_class: str = "Nucleus",
    region_class: str | None = None,
    background_class: str | None = DEFAULT_BACKGROUND_CLASS,
    source: str = "",
    n_pointnuc_objects: int | None = None,
    written: Sequence[WrittenObject] | None = None,
    present: Sequence[Present] | None = None,
) -> ImageAnnotations:
    """Every mark pointnuc needs from one image's objects (see the module doc).

    Points within :data:`EDGE_TOLERANCE_PX` of the image's border, outside it, are moved
    onto the edge pixels; points further out are an :class:`InputError` (``source`` names
    the file). ``n_pointnuc_objects`` overrides the count of marked objects among ``objects``.
    ``written``: what pointnuc last wrote into the image (:func:`pointnuc.io.written.read_written`);
    ``present``: pointnuc's objects in the project now (default: those among ``objects``).
    ``background_class=None`` reads no background marks.
    """
    region_class = DEFAULT_REGION_CLASS if region_class is None else region_class
    points: list[np.ndarray] = []
    bg_points: list[np.ndarray] = []
    regions: list[BaseGeometry] = []
    outlines: list[Polygon] = []
    bg_areas: list[Polygon] = []
    others: dict[str, int] = {}
    marked: list[Present] = []
    n_marked = 0
    for obj in objects:
        if obj.is_pointnuc:
            n_marked += 1
            if obj.geometry is not None and not obj.geometry.is_empty:
                marked.append((obj.id, *centre(obj.nucleus_geometry or obj.geometry)))
        if obj.object_type != "annotation" or obj.geometry is None or obj.geometry.is_empty:
            continue
        geom = obj.geometry
        if isinstance(geom, (Point, MultiPoint)):
            xy = _point_coords(geom)
            if obj.class_name == point_class:
                points.append(xy)
            elif background_class is not None and obj.class_name == background_class:
                bg_points.append(xy)
            else:
                key = obj.class_name if obj.class_name is not None else "Unclassified"
                others[key] = others.get(key, 0) + len(xy)
        elif obj.class_name == region_class:
            if isinstance(geom, GeometryCollection):  # e.g. an area drawn with lines: keep its area parts
                parts = [g for g in geom.geoms if isinstance(g, (Polygon, MultiPolygon)) and not g.is_empty]
                geom = unary_union(parts) if parts else None
            if isinstance(geom, (Polygon, MultiPolygon)):
                regions.append(geom)
        elif obj.class_name == point_class:
            outlines += _area_parts(geom)
        elif background_class is not None and obj.class_name == background_class:
            bg_areas += _area_parts(geom)
    pts = _on_image(np.concatenate(points) if points else np.zeros((0, 2), float), image, point_class, source)
    bg_pts = _on_image(np.concatenate(bg_points) if bg_points else np.zeros((0, 2), float), image,
                       str(background_class), source)
    ann = ImageAnnotations(
        points_xy=pts.astype(np.float64),
        regions=tuple(regions),
        other_point_counts=dict(sorted(others.items())),
        n_pointnuc_objects=n_marked if n_pointnuc_objects is None else n_pointnuc_objects,
        outlines=tuple(outlines),
        background_areas=tuple(bg_areas),
        background_points_xy=bg_pts.astype(np.float64),
    )
    deleted = deleted_since(written, marked if present is None else present, image_name=image.name)
    if deleted:  # a deleted detection where the user marked a nucleus is a wrong outline, not background
        import shapely

        nuclei = shapely.points(ann.nucleus_points_xy)
        deleted = [d for d in deleted if not (len(nuclei) and shapely.covers(d, nuclei).any())]
    return replace(ann, deleted=tuple(deleted))


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
