"""A QuPath project (``project.qpproj``) through paquo — the only module that imports paquo.

paquo starts QuPath's JVM when ``paquo.projects`` is imported, so the import happens here,
lazily, and a missing QuPath becomes one :class:`QuPathNotFoundError` line (see
``docs/PAQUO.md`` for the paquo 0.9 / QuPath 0.6 behaviour this module relies on).

Reading never changes the project: it opens in mode ``"r"`` without
``update_image_paths`` (which would rewrite ``data/N/server.json``); the image files of a
moved project are found by re-rooting their URIs from the old project folder (the
``"uri"`` field of project.qpproj) to the current one, as paquo's ``try_relative`` does.

Writing: a backup of project.qpproj, of each touched ``data/N/`` and of every image's
``data/N/server.json`` goes to ``pointnuc-backup/<UTC timestamp>/`` first; the project is opened ``"r+"``, its image
paths re-rooted, pointnuc's own detections (the ``pointnuc score`` measurement) inside the
area are discarded, the new ones added under ``hierarchy.no_autoflush()``, and the project
is saved only when everything succeeded. On any failure the backup is copied back.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from shapely.geometry.base import BaseGeometry

from pointnuc.errors import InputError, QuPathNotFoundError
from pointnuc.geometry import object_area
from pointnuc.io.base import CELL_EXPANSION_UM, POINTNUC_MARKER, ImageAnnotations, ImageRef, NucleusObject
from pointnuc.io.geojson import class_color, inside, nucleus_records
from pointnuc.io.objects import QuPathObject, summarise
from pointnuc.io.slide import open_slide

log = logging.getLogger(__name__)

BACKUP_FOLDER = "pointnuc-backup"
SERVER_JSON = "server.json"  #: per-image file QuPath rewrites when image paths are updated
QUPATH_NOT_FOUND = (
    "QuPath was not found (paquo looks at $PAQUO_QUPATH_DIR, qupath_dir in .paquo.toml, then folders named "
    "QuPath* in /opt, /Applications, /usr/local, C:/Program Files, ~/AppData/Local and ~); point PAQUO_QUPATH_DIR "
    "to your QuPath 0.6 folder, or instead give pointnuc a folder of the images with their QuPath GeoJSON exports "
    "(File > Export objects as GeoJSON), which needs no QuPath"
)


def load_paquo() -> tuple[Any, Any]:
    """paquo's ``QuPathProject`` and ``QuPathPathClass``, or QuPathNotFoundError."""
    try:
        from paquo.classes import QuPathPathClass
        from paquo.projects import QuPathProject
    except ImportError as err:
        if "paquo" in str(err) and "qupath" not in str(err).lower():
            raise QuPathNotFoundError(f"paquo is not installed ({err}); `pip install paquo`, or use a GeoJSON folder") from None
        raise QuPathNotFoundError(QUPATH_NOT_FOUND) from None
    except Exception as err:  # ValueError (none found), FileNotFoundError (incompatible), JVM start errors
        log.debug("paquo could not start QuPath: %s: %s", err.__class__.__name__, err)
        raise QuPathNotFoundError(QUPATH_NOT_FOUND) from None
    return QuPathProject, QuPathPathClass


def uri_to_path(uri: str) -> Path:
    """A ``file:`` URI (as QuPath writes them) as a local path."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        raise InputError(f"image URI {uri} is not a local file; pointnuc reads local images only")
    p = url2pathname(unquote(parsed.path)) if parsed.path else unquote(uri)
    if len(p) > 2 and p[0] == "/" and p[2] == ":":  # file:/C:/... on Windows
        p = p[1:]
    return Path(p)


def read_qpproj(path: Path) -> dict[str, Any]:
    """project.qpproj as JSON (no QuPath needed); a damaged file is an InputError."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"QuPath project file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not a readable QuPath project (not JSON: {err}); is it damaged?") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{path} is not a QuPath project file (no image list)")
    return data


def _calibration_um(entry: dict[str, Any]) -> float | None:
    try:
        cal = entry["serverBuilder"]["metadata"]["pixelCalibration"]["pixelWidth"]
    except (KeyError, TypeError):
        return None
    unit = str(cal.get("unit", ""))
    value = cal.get("value")
    if not isinstance(value, (int, float)) or value <= 0:
        return None
    if unit in ("µm", "um", "μm", "microns", "micron"):
        return float(value)
    return None  # "px": uncalibrated


class QuPathProjectFile:
    """A ``.qpproj`` project read and written through paquo (see the module doc)."""

    kind = "qupath"

    def __init__(
        self,
        qpproj: Path,
        *,
        output_dir: Path | None = None,
        pixel_size_um: float | None = None,
        paquo: tuple[Any, Any] | None = None,
    ) -> None:
        qpproj = Path(qpproj)
        self.qpproj = qpproj / "project.qpproj" if qpproj.is_dir() else qpproj
        self.root = self.qpproj.parent
        self.output_dir = Path(output_dir) if output_dir is not None else self.root
        self.pixel_size_um = pixel_size_um
        self.meta = read_qpproj(self.qpproj)  # a damaged file fails clearly even without QuPath
        self._Project, self._PathClass = paquo if paquo is not None else load_paquo()
        self._reader: Any = None
        self._refs: list[ImageRef] | None = None

    # ------------------------------------------------------------------ reading

    def _open_read(self) -> Any:
        if self._reader is None:
            try:
                self._reader = self._Project(self.qpproj, mode="r")
            except (FileNotFoundError, ValueError, OSError) as err:
                raise InputError(f"paquo cannot open {self.qpproj}: {err}") from None
        return self._reader

    def _previous_root(self) -> Path | None:
        uri = self.meta.get("uri")
        if not isinstance(uri, str):
            return None
        try:
            return uri_to_path(uri).parent
        except InputError:
            return None

    def _locate(self, name: str, uri: str) -> Path:
        path = uri_to_path(uri)
        if path.is_file():
            return path
        prev = self._previous_root()
        if prev is not None:
            try:
                moved = self.root / path.relative_to(prev)
            except ValueError:
                moved = None
            if moved is not None and moved.is_file():
                return moved
        raise InputError(
            f"the image file of {name!r} is missing ({path}); put it back, or open the project in QuPath and "
            f"fix the image paths when asked"
        )

    def _entries(self) -> list[Any]:
        return list(self._open_read().images)

    def _entry(self, name: str) -> Any:
        for e in self._entries():
            if e.image_name == name:
                return e
        raise InputError(f"no image named {name!r} in {self.qpproj}")

    def images(self) -> list[ImageRef]:
        """The project's images in project order; missing image files are an InputError."""
        if self._refs is None:
            by_id = {str(e.get("entryID")): e for e in self.meta["images"] if isinstance(e, dict)}
            refs = []
            for e in self._entries():
                path = self._locate(e.image_name, e.uri)
                px = self.pixel_size_um
                if px is None:
                    px = _calibration_um(by_id.get(str(e.entry_id), {}))
                if px is None:
                    with open_slide(path) as s:
                        px = s.pixel_size_um
                refs.append(ImageRef(name=e.image_name, path=path, width=int(e.width), height=int(e.height),
                                     pixel_size_um=px))
            self._refs = refs
        return list(self._refs)

    def annotations(
        self, image: ImageRef, point_class: str = "Nucleus", region_class: str | None = None
    ) -> ImageAnnotations:
        """Points and regions from the image's annotations; pointnuc's detections are counted."""
        h = self._entry(image.name).hierarchy
        objects = []
        for a in h.annotations:
            pc = a.path_class
            objects.append(QuPathObject("annotation", a.roi, pc.name if pc is not None else None,
                                        dict(a.measurements)))
        n_marked = sum(1 for d in h.detections if POINTNUC_MARKER in d.measurements)
        return summarise(objects, image, point_class=point_class, region_class=region_class,
                         source=str(self.qpproj), n_pointnuc_objects=n_marked)

    # ------------------------------------------------------------------ writing

    def _backup(self, entry_dirs: list[Path], all_dirs: list[Path]) -> Path:
        """Copy project.qpproj, the ``entry_dirs`` whole, and every other entry's server.json
        (which re-rooting the image paths rewrites) to a new timestamped backup folder."""
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        dest = self.output_dir / BACKUP_FOLDER / stamp
        dest.mkdir(parents=True, exist_ok=False)
        shutil.copy2(self.qpproj, dest / self.qpproj.name)
        for d in entry_dirs:
            if d.is_dir():
                shutil.copytree(d, dest / "data" / d.name)
        for d in all_dirs:
            if d not in entry_dirs and (d / SERVER_JSON).is_file():
                (dest / "data" / d.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(d / SERVER_JSON, dest / "data" / d.name / SERVER_JSON)
        return dest

    def _restore(self, backup: Path, entry_dirs: list[Path], all_dirs: list[Path]) -> None:
        """Put back what :meth:`_backup` copied (the project as it was before the write)."""
        shutil.copy2(backup / self.qpproj.name, self.qpproj)
        for d in entry_dirs:
            src = backup / "data" / d.name
            if src.is_dir():
                shutil.rmtree(d, ignore_errors=True)
                shutil.copytree(src, d)
        for d in all_dirs:
            if d in entry_dirs:
                continue
            src = backup / "data" / d.name / SERVER_JSON
            if src.is_file():
                shutil.copy2(src, d / SERVER_JSON)
            elif (d / SERVER_JSON).is_file():  # written by the failed attempt
                (d / SERVER_JSON).unlink()

    def write_nuclei(
        self,
        results: dict[str, Sequence[NucleusObject]],
        *,
        object_type: str = "detection",
        class_name: str = "Nucleus",
        replace_within: dict[str, BaseGeometry | None] | None = None,
        cell_expansion_um: float = CELL_EXPANSION_UM,
    ) -> list[Path]:
        """Add the nuclei as detections (or cells) to each image's hierarchy, replacing pointnuc's own.

        Returns the ``data.qpdata`` files written. On failure the project is restored.
        """
        if ":" in class_name or "\n" in class_name:
            raise InputError(f"class name {class_name!r} cannot contain ':' (QuPath's derived classes are not supported)")
        refs = {r.name: r for r in self.images()}
        unknown = [n for n in results if n not in refs]
        if unknown:
            raise InputError(f"no image named {unknown[0]!r} in {self.qpproj}")
        entries = {e.image_name: e for e in self._entries()}
        dirs = [Path(entries[n].entry_path) for n in results]
        all_dirs = [Path(e.entry_path) for e in entries.values()]
        records = {
            n: nucleus_records(nuc, object_type=object_type, pixel_size_um=refs[n].pixel_size_um,
                               cell_expansion_um=cell_expansion_um,
                               clip_to=object_area(refs[n].width, refs[n].height, (replace_within or {}).get(n)))
            for n, nuc in results.items()
        }
        self._reader = None  # reopen for reading afterwards
        backup = self._backup(dirs, all_dirs)
        written: list[Path] = []
        try:
            qp = self._Project(self.qpproj, mode="r+")
            qp.update_image_paths(try_relative=True)  # before any hierarchy is touched
            path_class = self._PathClass(class_name, color=class_color(class_name))
            by_name = {e.image_name: e for e in qp.images}
            for name, recs in records.items():
                entry = by_name[name]
                if not entry.is_readable():  # paquo would skip saving it silently
                    raise InputError(f"QuPath cannot find the image file of {name!r} ({entry.uri}); nothing was written")
                h = entry.hierarchy
                area = (replace_within or {}).get(name)
                # d.roi converts Java -> shapely (slow): only when an area limits the replacement
                old = [d for d in h.detections
                       if POINTNUC_MARKER in d.measurements and (area is None or inside(d.roi, area))]
                with h.no_autoflush():
                    for d in old:
                        h.detections.discard(d)
                    for geom, nucleus, meas in recs:
                        if nucleus is not None:
                            h.add_cell(roi=geom, path_class=path_class, measurements=meas, nucleus_roi=nucleus)
                        else:
                            h.add_detection(roi=geom, path_class=path_class, measurements=meas)
                log.info("%s: replaced %d pointnuc objects with %d", name, len(old), len(recs))
                written.append(Path(entry.entry_path) / "data.qpdata")
            qp.save()
        except BaseException:
            self._restore(backup, dirs, all_dirs)
            log.error("writing to %s failed; the project was restored from %s", self.qpproj, backup)
            raise
        finally:
            self._refs = None
        return written
