"""The one interface the pipeline sees for a QuPath project.

Two implementations: :mod:`pointnuc.io.geojson_project` (a folder of images with
QuPath GeoJSON exports beside them, pure Python) and :mod:`pointnuc.io.qupath_project`
(a ``.qpproj`` through paquo, run in a child process by :mod:`pointnuc.io.qupath`, the only
module that imports paquo). :func:`pointnuc.io.open_project` picks one; this module imports
neither.

Coordinates are always QuPath's: full-resolution pixels, origin at the top-left
corner of the top-left pixel, x = column, y = row; pixel (r, c) has its centre at
(c + 0.5, r + 0.5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from shapely.geometry.base import BaseGeometry

from pointnuc.errors import InputError

if TYPE_CHECKING:
    from pointnuc.io.objects import QuPathObject

#: one point annotation to write: x, y (full-resolution QuPath coordinates) and its measurements
PointMark = tuple[float, float, dict[str, float]]

#: Measurement name that marks an object as written by pointnuc (QuPath shows it as a column).
POINTNUC_MARKER = "pointnuc score"
#: Measurement that marks a point annotation as a ``pointnuc suggest`` question (its value: the suggestion's rank)
SUGGESTION_MARKER = "pointnuc suggestion"
#: default growth of a nucleus into its cell (µm) for object_type="cell", as QuPath's cell expansion
CELL_EXPANSION_UM = 2.0
#: default class of the user's background marks (areas and points that say "no nucleus here")
DEFAULT_BACKGROUND_CLASS = "Background"
#: what pointnuc writes each nucleus as: a detection (its outline), or a cell (outline grown, nucleus inside)
OBJECT_TYPES = ("detection", "cell")


@dataclass(frozen=True)
class ImageRef:
    """One image of a project."""

    name: str  #: QuPath's image name (usually the file name), unique in the project
    path: Path  #: the pixel file on disk
    width: int  #: full-resolution width in pixels
    height: int
    pixel_size_um: float | None  #: µm per pixel at full resolution, None when unknown


def _no_points() -> np.ndarray:
    return np.zeros((0, 2), np.float64)


@dataclass(frozen=True)
class ImageAnnotations:
    """What a user drew on one image, as pointnuc needs it.

    Every mark is supervision (:func:`pointnuc.io.objects.summarise` reads them): points and
    outlines of the point class are nuclei; areas and points of the background class, and
    pointnuc's detections the user deleted since the last ``segment``, are background.
    """

    points_xy: np.ndarray  #: (N, 2) float64, QuPath x/y of the points of the chosen class
    regions: tuple[BaseGeometry, ...] = ()  #: training/processing regions (area annotations of the region class)
    other_point_counts: dict[str, int] = field(default_factory=dict)  #: points of other classes (ignored)
    n_pointnuc_objects: int = 0  #: objects an earlier pointnuc run wrote
    outlines: tuple[BaseGeometry, ...] = ()  #: nucleus outlines: area annotations (Polygons) of the point class
    background_areas: tuple[BaseGeometry, ...] = ()  #: area annotations of the background class: no nucleus inside
    background_points_xy: np.ndarray = field(default_factory=_no_points)  #: points of the background class
    deleted: tuple[BaseGeometry, ...] = ()  #: outlines of pointnuc detections the user deleted since the last segment

    @property
    def outline_centroids_xy(self) -> np.ndarray:
        """(K, 2) x/y of the outlines' centres (a point inside each, its centroid when that lies inside)."""
        out = []
        for g in self.outlines:
            c = g.centroid
            out.append((c.x, c.y) if g.contains(c) else tuple(g.representative_point().coords[0]))
        return np.asarray(out, np.float64).reshape(-1, 2)

    @property
    def nucleus_points_xy(self) -> np.ndarray:
        """The points that stand for nuclei: the clicked points, then the outlines' centres."""
        return np.concatenate([self.points_xy, self.outline_centroids_xy]) if self.outlines else self.points_xy

    @property
    def has_background_marks(self) -> bool:
        """Any background area, background point or deleted detection."""
        return bool(self.background_areas or self.deleted or len(self.background_points_xy))

    def mark_counts(self) -> dict[str, int]:
        """How many marks of each kind (what ``pointnuc inspect`` shows)."""
        return {"points": len(self.points_xy), "outlines": len(self.outlines),
                "background_areas": len(self.background_areas), "background_points": len(self.background_points_xy),
                "deleted_detections": len(self.deleted)}


@dataclass(frozen=True)
class NucleusObject:
    """One nucleus to write back, in full-resolution QuPath coordinates."""

    polygon: BaseGeometry  #: a valid shapely Polygon
    score: float  #: mean nucleus probability, in [0, 1]
    measurements: dict[str, float] = field(default_factory=dict)  #: extra measurements (Area µm^2, ...)


@dataclass(frozen=True)
class WriteOptions:
    """How nuclei are written into a project (``pointnuc segment --objects --class --cell-expansion``)."""

    object_type: str = "detection"  #: ``"detection"`` (the nucleus outline) or ``"cell"``
    class_name: str = "Nucleus"  #: QuPath class of the written objects
    #: how far each nucleus grows into its cell (µm), for ``object_type="cell"``
    cell_expansion_um: float = CELL_EXPANSION_UM

    def __post_init__(self) -> None:
        if self.object_type not in OBJECT_TYPES:
            raise InputError(f"object type must be one of {', '.join(OBJECT_TYPES)}, not {self.object_type!r}")
        if not self.cell_expansion_um >= 0:
            raise InputError(f"cell expansion must be 0 µm or more, not {self.cell_expansion_um!r}")


#: what every writer does unless told otherwise: detections of class ``Nucleus``
DEFAULT_WRITE = WriteOptions()


class Project(Protocol):
    """A QuPath project as pointnuc reads and writes it."""

    root: Path  #: folder of the project (where models and backups go by default)
    kind: str  #: ``"qupath"`` (a .qpproj) or ``"geojson-folder"``, as ``inspect`` reports it

    def images(self) -> list[ImageRef]:
        """All images of the project, in project order."""
        ...

    def annotations(
        self, image: ImageRef, point_class: str = "Nucleus", region_class: str | None = None,
        background_class: str | None = DEFAULT_BACKGROUND_CLASS,
    ) -> ImageAnnotations:
        """The marks on ``image``: points and outlines of ``point_class``, regions of ``region_class``,
        areas and points of ``background_class`` (None: none read), and pointnuc's deleted detections."""
        ...

    def write_nuclei(
        self,
        results: dict[str, Sequence[NucleusObject]],
        *,
        options: WriteOptions = DEFAULT_WRITE,
        replace_within: dict[str, BaseGeometry | None] | None = None,
    ) -> list[Path]:
        """Write nuclei per image name as ``options`` says, replacing pointnuc's own earlier objects.

        ``replace_within[name]``: only earlier pointnuc objects inside this area are
        replaced (None = the whole image). User objects are never touched. Keeps a
        backup of what is replaced; returns the files written.
        """
        ...

    def annotation_objects(self, image: ImageRef) -> list[QuPathObject]:
        """Every annotation the user's project holds for ``image`` (points, areas), as plain objects."""
        ...

    def write_suggestions(self, points: Mapping[str, Sequence[PointMark]], *, class_name: str) -> list[Path]:
        """Write point annotations of ``class_name`` per image name, replacing the earlier ones of that class
        that carry :data:`SUGGESTION_MARKER` (pointnuc's own questions) and nothing else; keeps a backup."""
        ...
