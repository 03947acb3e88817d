"""A QuPath project (``project.qpproj``) as pointnuc's :class:`~pointnuc.io.base.Project`.

QuPath's own classes (through paquo, :mod:`pointnuc.io.qupath`) run in a child process
(:class:`~pointnuc.io.qupath_process.QuPathProcess`); this module, in pointnuc's process, reads
the plain files itself (project.qpproj is JSON, ``data.qpdata`` is checked before QuPath reads
it) and keeps the backups (:mod:`pointnuc.io.qupath_backup`). See ``docs/PAQUO.md``.

Reading never changes the project; the image files of a moved project are found as QuPath
does, by the path of each image relative to the project's previous folder (the ``"uri"`` of
project.qpproj), also when it leads out of the project folder (``../images``). A
``data.qpdata`` that lacks QuPath's end marker (truncated) is refused before QuPath reads it.

Writing: a backup first; the child replaces pointnuc's own objects and saves only when
everything succeeded; on any failure or interruption the child is killed and the backup
copied back.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from shapely.geometry.base import BaseGeometry

from pointnuc.errors import InputError
from pointnuc.geometry import object_area
from pointnuc.io.base import (
    DEFAULT_BACKGROUND_CLASS,
    DEFAULT_WRITE,
    ImageAnnotations,
    ImageRef,
    NucleusObject,
    PointMark,
    WriteOptions,
)
from pointnuc.io.objects import QuPathObject, summarise
from pointnuc.io.qupath import QPDATA, InProcess
from pointnuc.io.qupath_backup import BACKUP_FOLDER, backup_project, prune_backups, restore_project
from pointnuc.io.qupath_process import QuPathProcess
from pointnuc.io.records import class_color, image_pixels, nucleus_records
from pointnuc.io.slide import open_slide
from pointnuc.io.written import WrittenObject, read_written, record_written

log = logging.getLogger(__name__)

#: QuPath ends every data.qpdata with the Java-serialised string "EOF"; a file cut short lacks it,
#: and QuPath 0.6 then logs "Reached end of file unexpectedly" in an endless loop
QPDATA_END = b"t\x00\x03EOF"
JAVA_SERIAL_MAGIC = b"\xac\xed\x00\x05"  #: how data.qpdata (a Java object stream) begins


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
    """project.qpproj as JSON (no QuPath needed); a damaged or foreign file is an InputError."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"QuPath project file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not a readable QuPath project (not JSON: {err}); is it damaged?") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{path} is not a QuPath project file (no image list)")
    # QuPath 0.6 reads both as numbers and fails with a NullPointerException without them
    missing = [k for k in ("createTimestamp", "modifyTimestamp") if not isinstance(data.get(k), (int, float))]
    if missing or not all(isinstance(e, dict) for e in data["images"]):
        what = f"no {' or '.join(missing)}" if missing else "an image entry that is not an object"
        raise InputError(f"{path} is not a QuPath project file (valid JSON, but {what}); give the project.qpproj "
                         f"QuPath wrote")
    return data


def _check_class_name(class_name: str) -> None:
    """QuPath's derived classes (``A: B``) are not supported: one line for such a name."""
    if ":" in class_name or "\n" in class_name:
        raise InputError(f"class name {class_name!r} cannot contain ':' (QuPath's derived classes are not supported)")


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


def relocated(path: Path, previous_root: Path | None, root: Path) -> Path | None:
    """Where ``path`` is now if the project moved from ``previous_root`` to ``root`` with its images.

    As QuPath and paquo (``try_relative``): the path relative to the old project folder,
    computed on the names alone (``../images/x.tif`` for a sibling folder), resolved
    against the new one and normalised. None when there is no previous folder or no
    relative path (another drive).
    """
    if previous_root is None:
        return None
    try:
        rel = os.path.relpath(path, previous_root)
    except ValueError:
        return None
    return Path(os.path.normpath(os.path.join(os.path.abspath(root), rel)))


def check_qpdata(entry_dir: Path, name: str) -> None:
    """Refuse an image's ``data.qpdata`` that was cut short, before QuPath reads it (it would loop)."""
    f = Path(entry_dir) / QPDATA
    try:
        size = f.stat().st_size
    except FileNotFoundError:
        return  # an image without objects yet
    with open(f, "rb") as fh:
        start = fh.read(len(JAVA_SERIAL_MAGIC))
        fh.seek(max(size - len(QPDATA_END), 0))
        end = fh.read()
    # only QuPath's Java-serialised format is checked (a file in another format is QuPath's to judge)
    if len(start) < len(JAVA_SERIAL_MAGIC) or (start == JAVA_SERIAL_MAGIC and end != QPDATA_END):
        raise InputError(
            f"the objects of image {name!r} cannot be read: {f} is incomplete ({size} bytes, without the end "
            f"QuPath writes; a copy or save was cut short); restore it from a backup (QuPath's, or "
            f"{BACKUP_FOLDER}/ beside the project); nothing was changed"
        )


class QuPathProjectFile:
    """A ``.qpproj`` project read and written through paquo in a child process (see the module doc).

    ``paquo``: a stand-in for ``(QuPathProject, QuPathPathClass)``, called in this process (tests).
    """

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
        self._qupath: InProcess | QuPathProcess = (
            InProcess(self.qpproj, paquo) if paquo is not None else QuPathProcess(self.qpproj)
        )
        self._entries: list[dict[str, Any]] | None = None
        self._refs: list[ImageRef] | None = None
        self._image_entries()  # starts QuPath: a missing one fails here, with one clear line

    def close(self) -> None:
        """Stop QuPath's process now (it also leaves when idle, and at exit)."""
        self._qupath.close()

    # ------------------------------------------------------------------ reading

    def _image_entries(self) -> list[dict[str, Any]]:
        if self._entries is None:
            self._entries = self._qupath.call("entries", what=f"the project {self.qpproj}")
        return self._entries

    def _entry(self, name: str) -> dict[str, Any]:
        for e in self._image_entries():
            if e["name"] == name:
                return e
        raise InputError(f"no image named {name!r} in {self.qpproj}")

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
        moved = relocated(path, self._previous_root(), self.root)
        if moved is not None and moved.is_file():
            return moved
        raise InputError(
            f"the image file of {name!r} is missing ({path}); put it back, or open the project in QuPath and "
            f"fix the image paths when asked"
        )

    def images(self) -> list[ImageRef]:
        """The project's images in project order; missing image files are an InputError."""
        if self._refs is None:
            by_id = {str(e.get("entryID")): e for e in self.meta["images"] if isinstance(e, dict)}
            refs = []
            for e in self._image_entries():
                path = self._locate(e["name"], e["uri"])
                px = self.pixel_size_um
                if px is None:
                    px = _calibration_um(by_id.get(e["entry_id"], {}))
                if px is None:
                    with open_slide(path) as s:
                        px = s.pixel_size_um
                refs.append(ImageRef(name=e["name"], path=path, width=e["width"], height=e["height"], pixel_size_um=px))
            self._refs = refs
        return list(self._refs)

    def annotations(
        self, image: ImageRef, point_class: str = "Nucleus", region_class: str | None = None,
        background_class: str | None = DEFAULT_BACKGROUND_CLASS,
    ) -> ImageAnnotations:
        """The marks of the image's annotations (:func:`~pointnuc.io.objects.summarise`); pointnuc's
        detections are counted, and those it last wrote that are gone are the deleted ones."""
        entry = self._entry(image.name)
        check_qpdata(Path(entry["entry_path"]), image.name)
        anns, marked = self._qupath.call(
            "objects", what=f"the objects of image {image.name!r} ({Path(entry['entry_path']) / QPDATA})",
            name=image.name,
        )
        objects = [QuPathObject("annotation", roi, cls, meas) for roi, cls, meas in anns]
        return summarise(objects, image, point_class=point_class, region_class=region_class,
                         background_class=background_class, source=str(self.qpproj), n_pointnuc_objects=len(marked),
                         written=read_written(self.root, image.name), present=marked)

    def annotation_objects(self, image: ImageRef) -> list[QuPathObject]:
        """Every annotation of the image's hierarchy (points, areas) as plain objects."""
        entry = self._entry(image.name)
        check_qpdata(Path(entry["entry_path"]), image.name)
        anns, _ = self._qupath.call(
            "objects", what=f"the objects of image {image.name!r} ({Path(entry['entry_path']) / QPDATA})",
            name=image.name,
        )
        return [QuPathObject("annotation", roi, cls, meas) for roi, cls, meas in anns]

    # ------------------------------------------------------------------ writing

    def _write_with_backup(self, names: list[str], op: str, **kwargs: Any) -> list[Any]:
        """The child's ``op`` on ``names``' data files, after a backup of them that is restored on any
        failure or interruption (each file is checked whole first); what the child answers."""
        entries = {e["name"]: e for e in self._image_entries()}
        dirs = [Path(entries[n]["entry_path"]) for n in names]
        all_dirs = [Path(e["entry_path"]) for e in entries.values()]
        for n, d in zip(names, dirs):
            check_qpdata(d, n)
        backup = backup_project(self.qpproj, self.output_dir / BACKUP_FOLDER, names, dirs, all_dirs)
        try:
            done: list[Any] = self._qupath.call(op, what=f"writing to {self.qpproj}", **kwargs)
        except BaseException as err:
            restore_project(self.qpproj, backup, dirs, all_dirs)
            # an interruption is reported by the CLI in one line; other failures say what happened here
            (log.debug if isinstance(err, KeyboardInterrupt) else log.error)(
                "writing to %s failed; the project was restored from %s", self.qpproj, backup)
            raise
        finally:
            self._refs = None
            self._entries = None
        return done

    def write_suggestions(self, points: Mapping[str, Sequence[PointMark]], *, class_name: str) -> list[Path]:
        """Point annotations of ``class_name`` per image, replacing that class's unanswered suggestions only.

        As :meth:`write_nuclei`: a backup first, restored on any failure or interruption.
        """
        _check_class_name(class_name)
        entries = {e["name"]: e for e in self._image_entries()}
        unknown = [n for n in points if n not in entries]
        if unknown:
            raise InputError(f"no image named {unknown[0]!r} in {self.qpproj}")
        names = list(points)
        done = self._write_with_backup(
            names, "write_points", points={n: [(float(x), float(y), dict(m)) for x, y, m in points[n]] for n in names},
            class_name=class_name, color=class_color(class_name))
        for (_, removed, added), name in zip(done, names):
            log.info("%s: replaced %d pointnuc suggestions with %d", name, removed, added)
        prune_backups(self.output_dir / BACKUP_FOLDER, self.qpproj.name)
        return [Path(p) for p, _, _ in done]

    def write_nuclei(
        self,
        results: dict[str, Sequence[NucleusObject]],
        *,
        options: WriteOptions = DEFAULT_WRITE,
        replace_within: dict[str, BaseGeometry | None] | None = None,
    ) -> list[Path]:
        """Add the nuclei as detections (or cells) to each image's hierarchy, replacing pointnuc's own.

        Returns the ``data.qpdata`` files written. On failure or interruption the project is restored.
        """
        class_name = options.class_name
        _check_class_name(class_name)
        refs = {r.name: r for r in self.images()}
        unknown = [n for n in results if n not in refs]
        if unknown:
            raise InputError(f"no image named {unknown[0]!r} in {self.qpproj}")
        names = list(results)
        records = {}
        for n, nuc in results.items():
            with image_pixels(refs[n]) as pixels:
                records[n] = nucleus_records(
                    nuc, options=options, pixel_size_um=refs[n].pixel_size_um, pixels=pixels,
                    clip_to=object_area(refs[n].width, refs[n].height, (replace_within or {}).get(n)))
        done = self._write_with_backup(names, "write", records=records, class_name=class_name,
                                       color=class_color(class_name), replace_within=dict(replace_within or {}))
        for (path, removed, added, ids), name in zip(done, names):
            log.info("%s: replaced %d pointnuc objects with %d", name, removed, added)
            written = [WrittenObject.of(i, nucleus if nucleus is not None else geom)
                       for i, (geom, nucleus, _) in zip(ids, records[name])]
            record_written(self.root, name, written, (replace_within or {}).get(name))
        prune_backups(self.output_dir / BACKUP_FOLDER, self.qpproj.name)
        return [Path(p) for p, _, _, _ in done]
