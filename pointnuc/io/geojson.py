"""QuPath-compatible GeoJSON, read and written without Java.

Reading accepts the three layouts QuPath 0.6 writes (a bare Feature, a bare array of
Features, a FeatureCollection) and older QuPath variants (string classification,
``colorRGB``, measurement lists).

Writing reproduces QuPath 0.6.0's own export text (``PathIO.exportObjectsAsGeoJSON``):

- keys ``type, id, geometry, nucleusGeometry (cells), properties``; inside properties
  ``objectType, classification, measurements``; classification always ``{"name", "color"}``
  (QuPath refuses a classification object without a colour);
- compact JSON with ``", "`` inside number arrays (``[44, 218]``, ``[255, 228, 22]``) and
  ``","`` elsewhere; coordinates rounded to 2 decimals, integers without ``.0``;
- measurements rounded to 32-bit floats as QuPath stores them (0.93 -> 0.9300000071525574);
  raw UTF-8 ``µ``;
- random UUID4 ids; only valid polygons (QuPath rejects a whole file for one bad polygon).

pointnuc's objects carry the measurement ``"pointnuc score"`` (:data:`POINTNUC_MARKER`) and
QuPath's shape measurements under QuPath's names: with a pixel size in µm (``Area µm^2``,
``Length µm``; cells ``Nucleus: Area µm^2``, ``Cell: Area µm^2``, ...), without one in pixels.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import Polygon, mapping, shape
from shapely.geometry.base import BaseGeometry

from pointnuc import fileio
from pointnuc.errors import InputError
from pointnuc.io.base import DEFAULT_WRITE, POINTNUC_MARKER, SUGGESTION_MARKER, NucleusObject, WriteOptions
from pointnuc.io.objects import QuPathObject
from pointnuc.io.records import class_color, float32, inside, nucleus_records
from pointnuc.measurements import RegionReader

# --------------------------------------------------------------------------- reading


def read_features(path: Path) -> list[dict[str, Any]]:
    """The Features of a QuPath GeoJSON file, whatever its top-level layout."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"GeoJSON file not found: {path}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text, so not a QuPath GeoJSON export") from None
    except OSError as err:
        raise InputError(f"cannot read {path}: {err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); is the file truncated?") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    elif isinstance(data, list):
        feats = data
    else:
        feats = None
    if not isinstance(feats, list) or not all(isinstance(f, dict) and f.get("type") == "Feature" for f in feats):
        raise InputError(
            f"{path} is not a QuPath GeoJSON export (expected a Feature, an array of Features or a FeatureCollection)"
        )
    return feats


def _classification(props: dict[str, Any]) -> str | None:
    c = props.get("classification")
    if c is None:
        return None
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        if isinstance(c.get("name"), str):
            return c["name"]
        if isinstance(c.get("names"), list):  # multi-class: "A: B"
            return ": ".join(map(str, c["names"]))
    return None


def _measurements(props: dict[str, Any]) -> dict[str, float]:
    m = props.get("measurements")
    out: dict[str, float] = {}
    items: Iterable[tuple[Any, Any]]
    if isinstance(m, dict):
        items = m.items()
    elif isinstance(m, list):  # QuPath <= 0.3: [{"name": ..., "value": ...}]
        items = ((d.get("name"), d.get("value")) for d in m if isinstance(d, dict))
    else:
        return out
    for k, v in items:
        if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(k, str) and v in ("NaN", None):
            out[k] = math.nan
    return out


def _shape(geom: Any, path: Path, i: int) -> BaseGeometry:
    try:
        return shape(geom)
    except Exception as err:  # noqa: BLE001 - shapely raises many kinds for a malformed geometry
        raise InputError(f"{path}: feature {i} has an unreadable geometry ({err})") from None


def feature_to_object(feature: dict[str, Any], path: Path = Path("<geojson>"), index: int = 0) -> QuPathObject:
    """One GeoJSON Feature as a :class:`QuPathObject`."""
    props = feature.get("properties") or {}
    if not isinstance(props, dict):
        raise InputError(f"{path}: feature {index} has properties that are not an object")
    if not isinstance(feature.get("geometry"), dict):
        raise InputError(f"{path}: feature {index} has no geometry")
    geom = _shape(feature["geometry"], path, index)
    nucleus = feature.get("nucleusGeometry", props.get("nucleusGeometry"))
    obj_type = props.get("objectType")
    if not isinstance(obj_type, str):
        obj_type = "cell" if props.get("isCell") else "annotation"  # QuPath's importer default
    return QuPathObject(
        object_type=obj_type,
        geometry=geom,
        class_name=_classification(props),
        measurements=_measurements(props),
        nucleus_geometry=_shape(nucleus, path, index) if isinstance(nucleus, dict) else None,
        name=props.get("name") if isinstance(props.get("name"), str) else None,
        id=feature.get("id") if isinstance(feature.get("id"), str) else None,
    )


def read_objects(path: Path) -> list[QuPathObject]:
    """All objects of a QuPath GeoJSON file."""
    path = Path(path)
    return [feature_to_object(f, path, i) for i, f in enumerate(read_features(path))]


def read_nuclei(path: Path) -> list[NucleusObject]:
    """pointnuc's own objects of a GeoJSON file (those with the marker), as NucleusObjects.

    For cells the nucleus geometry is returned. Other objects are ignored.
    """
    out = []
    for obj in read_objects(path):
        if not obj.is_pointnuc:
            continue
        poly = obj.nucleus_geometry if obj.nucleus_geometry is not None else obj.geometry
        meas = {k: v for k, v in obj.measurements.items() if k != POINTNUC_MARKER}
        out.append(NucleusObject(polygon=poly, score=obj.measurements[POINTNUC_MARKER], measurements=meas))
    return out


# --------------------------------------------------------------------------- writing


def _num(v: float) -> str:
    """A coordinate: at most 2 decimals, integers without '.0'."""
    r = round(float(v), 2)
    if r == int(r):
        return str(int(r))
    return repr(r)


_WHOLE = re.compile(r"\.0(?=[,\]])")  # a whole number's ".0" in json's float text


def _positions(c: Sequence[Sequence[float]]) -> str:
    """A list of [x, y] positions as :func:`_num` writes each value, through numpy and json's C encoder:
    values rounded to 2 decimals, whole ones without ``.0`` (the coordinates are most of a file's text)."""
    try:
        x = np.asarray(c, dtype=float)
    except (ValueError, TypeError):  # ragged
        x = np.zeros(0)
    a = np.round(x, 2) + 0.0  # + 0.0: no "-0"
    with np.errstate(invalid="ignore"):
        near_half = np.abs(x * 100 - np.floor(x * 100) - 0.5) < 1e-6  # where numpy's rounding may differ from round()
    if near_half.any():
        a[near_half] = [round(float(v), 2) + 0.0 for v in x[near_half]]
    if a.ndim != 2 or not np.isfinite(a).all() or (np.abs(a) >= 1e15).any():  # float text would use an exponent
        return "[" + ",".join(_coords(x) for x in c) + "]"
    text = json.dumps(a.tolist(), separators=(", ", ":")).replace("], [", "],[")
    return _WHOLE.sub("", text)


def _coords(c: Any) -> str:
    if isinstance(c, (list, tuple)) and c and isinstance(c[0], (int, float)):
        return "[" + ", ".join(_num(v) for v in c) + "]"
    if isinstance(c, (list, tuple)) and c and isinstance(c[0], (list, tuple)) and c[0] and isinstance(c[0][0], (int, float)):
        return _positions(c)
    return "[" + ",".join(_coords(x) for x in c) + "]"


_STR_CACHE: dict[str, str] = {}


def _str(k: str) -> str:
    """A JSON string (raw UTF-8), memoised: keys and class names repeat in every feature."""
    out = _STR_CACHE.get(k)
    if out is None:
        out = json.dumps(k, ensure_ascii=False)
        if len(_STR_CACHE) < 10000:
            _STR_CACHE[k] = out
    return out


def _value(v: Any) -> str:
    if isinstance(v, float):
        if math.isfinite(v):
            return repr(v)  # shortest round-trip form, as Gson writes doubles
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")  # as Gson writes them
    if isinstance(v, str):
        return _str(v)
    if isinstance(v, dict):
        if all(type(x) is float or type(x) is int for x in v.values()):  # measurements: json's C encoder, same text
            return json.dumps(v, ensure_ascii=False, separators=(",", ":"))
        return "{" + ",".join(_str(k) + ":" + _value(x) for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        if v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return "[" + ", ".join(_value(x) for x in v) + "]"
        return "[" + ",".join(_value(x) for x in v) + "]"
    return json.dumps(v, ensure_ascii=False)


def _geometry_text(geom: dict[str, Any]) -> str:
    return '{"type":' + json.dumps(geom["type"]) + ',"coordinates":' + _coords(geom["coordinates"]) + "}"


def feature_text(feature: dict[str, Any]) -> str:
    """One Feature in QuPath's text form (keys in QuPath's order)."""
    parts = ['"type":"Feature"']
    if "id" in feature:
        parts.append('"id":' + json.dumps(feature["id"]))
    for key in ("geometry", "nucleusGeometry"):
        if feature.get(key) is not None:
            g = feature[key]
            parts.append(f'"{key}":' + (_geometry_text(g) if "coordinates" in g else _value(g)))
    props = feature.get("properties") or {}
    order = ["objectType", "name", "color", "classification", "isLocked", "measurements", "metadata"]
    keys = [k for k in order if k in props] + [k for k in props if k not in order]
    parts.append('"properties":' + "{" + ",".join(_str(k) + ":" + _value(props[k]) for k in keys) + "}")
    return "{" + ",".join(parts) + "}"


def dumps_features(features: Sequence[dict[str, Any]], layout: str = "collection") -> str:
    """Features as QuPath writes them: ``collection`` (the GUI default) or ``array``."""
    body = "[" + ",".join(feature_text(f) for f in features) + "]"
    if layout == "array":
        return body
    if layout != "collection":
        raise ValueError(f"unknown layout {layout!r}")
    return '{"type":"FeatureCollection","features":' + body + "}"


def _geometry_dict(geom: BaseGeometry) -> dict[str, Any]:
    if isinstance(geom, Polygon):  # most of what is written: its rings' coordinates straight from shapely's arrays
        rings = [geom.exterior, *geom.interiors]
        return {"type": "Polygon", "coordinates": [shapely.get_coordinates(r).tolist() for r in rings]}
    g = mapping(geom)
    return {"type": g["type"], "coordinates": _listify(g["coordinates"])}


def _listify(c: Any) -> Any:
    if isinstance(c, (list, tuple)) and c and isinstance(c[0], (int, float)):
        return [float(v) for v in c]
    return [_listify(x) for x in c]


def nuclei_features(
    nuclei: Sequence[NucleusObject],
    *,
    options: WriteOptions = DEFAULT_WRITE,
    pixel_size_um: float | None = None,
    color: tuple[int, int, int] | None = None,
    clip_to: BaseGeometry | None = None,
    pixels: RegionReader | None = None,
    measured: bool = True,
) -> list[dict[str, Any]]:
    """QuPath Features for pointnuc's nuclei (see :func:`~pointnuc.io.records.nucleus_records`, which
    measures stains when given the image's ``pixels``, and nothing with ``measured=False``), each with a new
    UUID4, of type and class ``options`` says (``color``: the class colour, QuPath's by default)."""
    rgb = list(color if color is not None else class_color(options.class_name))
    feats = []
    for geom, nucleus, meas in nucleus_records(nuclei, options=options, pixel_size_um=pixel_size_um, clip_to=clip_to,
                                               pixels=pixels, measured=measured):
        f: dict[str, Any] = {"type": "Feature", "id": str(uuid.uuid4()), "geometry": _geometry_dict(geom)}
        if nucleus is not None:
            f["nucleusGeometry"] = _geometry_dict(nucleus)
        f["properties"] = {
            "objectType": options.object_type,
            "classification": {"name": options.class_name, "color": rgb},
            "measurements": meas,
        }
        feats.append(f)
    return feats


def write_features(path: Path, features: Sequence[dict[str, Any]], layout: str = "collection") -> Path:
    """Write Features in QuPath's text form (atomically)."""
    fileio.write_text_atomic(Path(path), dumps_features(features, layout))
    return Path(path)


def write_nuclei_file(
    path: Path,
    nuclei: Sequence[NucleusObject],
    *,
    options: WriteOptions = DEFAULT_WRITE,
    pixel_size_um: float | None = None,
    color: tuple[int, int, int] | None = None,
    clip_to: BaseGeometry | None = None,
    measured: bool = True,
) -> Path:
    """Write nuclei as a QuPath FeatureCollection (File > Import objects reads it); ``measured``: with QuPath's
    shape measurements."""
    feats = nuclei_features(nuclei, options=options, pixel_size_um=pixel_size_um, color=color, clip_to=clip_to,
                            measured=measured)
    return write_features(path, feats)


def point_features(points: Sequence[tuple[float, float, dict[str, float]]], class_name: str) -> list[dict[str, Any]]:
    """Point annotations of ``class_name`` (each its own, so each can be reclassified on its own in QuPath),
    with their measurements as QuPath stores them (32-bit floats)."""
    rgb = list(class_color(class_name))
    return [
        {"type": "Feature", "id": str(uuid.uuid4()),
         "geometry": {"type": "Point", "coordinates": [float(round(x, 2)), float(round(y, 2))]},
         "properties": {"objectType": "annotation", "classification": {"name": class_name, "color": rgb},
                        "measurements": {k: float32(v) for k, v in meas.items()}}}
        for x, y, meas in points
    ]


def feature_is_suggestion(feature: dict[str, Any], class_name: str) -> bool:
    """Whether a raw Feature is one of pointnuc's suggestions still in ``class_name`` (not yet answered)."""
    props = feature.get("properties") or {}
    m = props.get("measurements")
    return isinstance(m, dict) and SUGGESTION_MARKER in m and _classification(props) == class_name


def feature_is_pointnuc(feature: dict[str, Any]) -> bool:
    """Whether a raw Feature was written by pointnuc."""
    m = (feature.get("properties") or {}).get("measurements")
    return isinstance(m, dict) and POINTNUC_MARKER in m


def merge_features(
    previous: Iterable[dict[str, Any]], new: Sequence[dict[str, Any]], area: BaseGeometry | None, source: Path
) -> list[dict[str, Any]]:
    """Earlier Features minus pointnuc's own inside ``area``, then the new ones."""
    kept = []
    for i, f in enumerate(previous):
        if feature_is_pointnuc(f):
            if area is None:  # the whole image: every earlier pointnuc object goes
                continue
            obj = feature_to_object(f, source, i)
            if inside(obj.nucleus_geometry or obj.geometry, area):  # a cell goes with its nucleus
                continue
        kept.append(f)
    return kept + list(new)
