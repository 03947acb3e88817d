"""What pointnuc last wrote into each image, so that the detections a user deleted since are known.

Every write of nuclei into a project (``pointnuc segment``, ``segment --merge``) updates one
record per image, ``PROJECT/pointnuc-results/written/<image>.json``: a GeoJSON FeatureCollection of
the pointnuc objects the image holds after that write, each with its object id and its
nucleus outline. A write limited to an area (``--within``) replaces the recorded objects inside
it (the ownership rule of :func:`pointnuc.io.records.inside`) and keeps the others, so the
record is always of the last write everywhere.

:func:`deleted_since` compares the record with the pointnuc objects the project holds now: a
recorded object is still there when an object with its id is (QuPath keeps ids, also through
GeoJSON export and import), or, for objects without ids, when a pointnuc object's centre lies
within :data:`MATCH_PX` of its centre. The others were deleted by the user: background marks.
When none of them is left, nothing is taken as deleted: the objects were cleared, or (GeoJSON
folders) never imported into QuPath and exported again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from pointnuc.fileio import write_text_atomic
from pointnuc.io.paths import safe_file_name
from pointnuc.io.records import inside

log = logging.getLogger(__name__)

WRITTEN_FOLDER = Path("pointnuc-results") / "written"  #: under the project's folder
RECORD_FORMAT = 1
#: an object without id is the recorded one when its centre lies this close (full-resolution px)
MATCH_PX = 0.5

#: a pointnuc object in the project now: its id (None when unknown) and the x/y of its (nucleus) centre
Present = tuple[str | None, float, float]


@dataclass(frozen=True)
class WrittenObject:
    """One object pointnuc wrote: its id in the project (None when unknown) and its nucleus outline, as the
    GeoJSON geometry it is recorded as (a shapely geometry only when one is asked for: a write records
    hundreds of objects and reads none of them)."""

    id: str | None
    geometry: Mapping[str, Any]  #: GeoJSON geometry, full-resolution QuPath x/y

    @classmethod
    def of(cls, id: str | None, outline: BaseGeometry) -> WrittenObject:
        return cls(id, mapping(outline))

    @cached_property
    def outline(self) -> BaseGeometry:
        return shape(self.geometry)


def record_path(root: Path, image_name: str) -> Path:
    """Where the record of what was written into ``image_name`` is kept (a safe name plus a digest of the exact one)."""
    stem = f"{safe_file_name(image_name)}~{hashlib.sha1(image_name.encode('utf-8')).hexdigest()[:10]}"
    # .json, not .geojson: a record, not objects to import into QuPath (no objectType, and they are in the project)
    return Path(root) / WRITTEN_FOLDER / f"{stem}.json"


def read_written(root: Path, image_name: str) -> list[WrittenObject] | None:
    """The objects last written into ``image_name``; None when there is no record (or it cannot be read)."""
    path = record_path(root, image_name)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("image") != image_name or doc.get("format") != RECORD_FORMAT:
            return None
        objects = [WrittenObject(f.get("id"), f["geometry"]) for f in doc["features"]]
        for o in objects:
            o.outline  # noqa: B018 (made here, where a broken record is caught)
        return objects
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("%s: the record of pointnuc's last write (%s) cannot be read (%s); deleted detections are not "
                    "used as background", image_name, path, err)
        return None


def record_written(root: Path, image_name: str, new: Sequence[WrittenObject], area: BaseGeometry | None) -> Path:
    """Record that ``new`` was written into ``image_name``, replacing the recorded objects inside ``area``
    (None: all of them). Returns the record's path."""
    kept = [] if area is None else [o for o in (read_written(root, image_name) or []) if not inside(o.outline, area)]
    feats = [{"type": "Feature", "id": o.id, "geometry": o.geometry, "properties": {}} for o in [*kept, *new]]
    doc = {"type": "FeatureCollection", "format": RECORD_FORMAT, "image": image_name, "features": feats}
    path = record_path(root, image_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(doc, separators=(",", ":")))
    return path


def centre(geom: BaseGeometry) -> tuple[float, float]:
    """An object's centre: its centroid (x, y)."""
    c = geom.centroid
    return float(c.x), float(c.y)


def deleted_since(written: Sequence[WrittenObject] | None, present: Sequence[Present], *, image_name: str = "") -> list[BaseGeometry]:
    """Outlines of the ``written`` objects missing from ``present`` (see the module doc); [] when none is present."""
    if not written:
        return []
    ids = {i for i, _, _ in present if i is not None}
    xy = np.asarray([(x, y) for _, x, y in present], float).reshape(-1, 2)
    tree = None
    if len(xy):
        from scipy.spatial import cKDTree

        tree = cKDTree(xy)
    missing: list[BaseGeometry] = []
    for o in written:
        if o.id is not None and o.id in ids:
            continue
        if tree is not None and np.isfinite(tree.query(centre(o.outline), distance_upper_bound=MATCH_PX)[0]):
            continue
        missing.append(o.outline)
    if len(missing) == len(written):
        log.info("%s: none of the %d objects pointnuc last wrote is in the project; not taken as deleted (cleared, "
                 "or not imported into QuPath)", image_name, len(written))
        return []
    return missing
