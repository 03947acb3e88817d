"""paquo's side of a QuPath project — the only module that imports paquo.

It runs in the QuPath child process (:mod:`pointnuc.io.qupath_process` starts it and calls
:func:`serve`; see ``docs/PAQUO.md``): :func:`load_paquo` starts QuPath's JVM there,
:class:`PaquoSession` makes every call pointnuc needs on plain data in and out.

Reading never changes the project: mode ``"r"`` without ``update_image_paths`` (which would
rewrite ``data/N/server.json``). Writing (the parent has made a backup first,
:mod:`pointnuc.io.qupath_backup`): the project is opened ``"r+"``, its image paths re-rooted,
pointnuc's own detections (the ``pointnuc score`` measurement) inside the area discarded, the
new ones added under ``hierarchy.no_autoflush()``, and the project saved only when everything
succeeded.
"""

from __future__ import annotations

import logging
import os
import queue
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shapely.geometry.base import BaseGeometry

from pointnuc.errors import InputError, PointnucError, QuPathNotFoundError
from pointnuc.io.base import POINTNUC_MARKER, SUGGESTION_MARKER
from pointnuc.io.qupath_process import read_frames, send_frame
from pointnuc.io.records import Record, inside

log = logging.getLogger(__name__)

QPDATA = "data.qpdata"  #: the file of an image's objects, in its entry folder data/N/
QUPATH_NOT_FOUND = (
    "QuPath was not found (paquo looks at $PAQUO_QUPATH_DIR, qupath_dir in .paquo.toml, then folders named "
    "QuPath* in /opt, /Applications, /usr/local, C:/Program Files, ~/AppData/Local and ~); point PAQUO_QUPATH_DIR "
    "to your QuPath 0.6 folder, or instead give pointnuc a folder of the images with their QuPath GeoJSON exports "
    "(File > Export objects as GeoJSON), which needs no QuPath"
)


def load_paquo(extra_java_opts: Sequence[str] = ()) -> tuple[Any, Any]:
    """paquo's ``QuPathProject`` and ``QuPathPathClass`` (this starts the JVM), or QuPathNotFoundError.

    Only the QuPath child process calls it. QuPath's console log is set to WARN (paquo sets
    DEBUG) and sent to stderr; ``extra_java_opts`` are added to the user's paquo ``java_opts``.
    """
    try:
        import paquo
    except ImportError as err:
        raise QuPathNotFoundError(f"paquo is not installed ({err}); `pip install paquo`, or use a GeoJSON folder") from None
    try:
        if extra_java_opts:
            opts = paquo.settings.java_opts
            opts = shlex.split(opts) if isinstance(opts, str) else list(opts)
            paquo.settings.set("java_opts", [*opts, *extra_java_opts])
        from paquo.classes import QuPathPathClass
        from paquo.java import LogManager
        from paquo.projects import QuPathProject
    except Exception as err:  # noqa: BLE001 - ValueError (none found), FileNotFoundError (incompatible), JVM errors
        log.debug("paquo could not start QuPath: %s: %s", err.__class__.__name__, err)
        raise QuPathNotFoundError(QUPATH_NOT_FOUND) from None
    if LogManager is not None:
        LogManager.setWarn()
    from paquo.java import System

    System.setOut(System.err)  # QuPath's console log (logback writes to System.out) never on stdout
    return QuPathProject, QuPathPathClass


def _java_message(err: BaseException) -> str:
    """A Java exception (through jpype) as one short line."""
    text = str(err).strip().splitlines()
    first = text[0] if text else err.__class__.__name__
    return first if len(first) <= 300 else first[:297] + "..."


def _owner_roi(obj: Any) -> BaseGeometry:
    """The outline that decides which area an object belongs to: a cell's nucleus, else its ROI.

    paquo wraps every object of ``hierarchy.detections`` as a plain detection, cells too, so the
    cell is recognised on the Java side (``PathCellObject.getNucleusROI``).
    """
    java = getattr(obj, "java_object", None)
    if java is not None and hasattr(java, "getNucleusROI") and java.getNucleusROI() is not None:
        from paquo.pathobjects import QuPathPathCellObject

        return QuPathPathCellObject(java).nucleus_roi
    return obj.roi


def _object_id(obj: Any) -> str | None:
    """A QuPath object's id (its UUID, kept through GeoJSON export and import); None when unknown."""
    java = getattr(obj, "java_object", None)
    if java is None or not hasattr(java, "getID"):
        return None
    return str(java.getID())


def _id_and_centre(obj: Any) -> tuple[str | None, float, float]:
    """(id, x, y of the centre of its nucleus or ROI) of a detection; Java's centroid, no shapely conversion."""
    java = getattr(obj, "java_object", None)
    if java is not None:
        nucleus = java.getNucleusROI() if hasattr(java, "getNucleusROI") else None
        roi = nucleus if nucleus is not None else java.getROI()
        return _object_id(obj), float(roi.getCentroidX()), float(roi.getCentroidY())
    c = _owner_roi(obj).centroid
    return None, float(c.x), float(c.y)


class PaquoSession:
    """Every call pointnuc makes into paquo, on plain data in and out.

    Runs in the QuPath child process (:func:`serve`); the tests run it in-process on a
    stand-in for paquo (:class:`InProcess`).
    """

    def __init__(self, qpproj: Path, paquo: tuple[Any, Any]) -> None:
        self.qpproj = Path(qpproj)
        self._Project, self._PathClass = paquo
        self._reader: Any = None

    def _read(self) -> Any:
        if self._reader is None:
            try:
                self._reader = self._Project(self.qpproj, mode="r")
            except Exception as err:  # noqa: BLE001 - Java exceptions too: QuPath could not load it
                raise InputError(f"QuPath cannot open {self.qpproj} as a project ({_java_message(err)})") from None
        return self._reader

    def _hierarchy(self, entry: Any, name: str) -> Any:
        try:
            return entry.hierarchy
        except Exception as err:  # noqa: BLE001 - Java exceptions of a damaged data.qpdata
            raise InputError(
                f"QuPath cannot read the objects of image {name!r} ({Path(entry.entry_path) / QPDATA}: "
                f"{_java_message(err)}); the file is damaged: restore it from a backup"
            ) from None

    def entries(self) -> list[dict[str, Any]]:
        """The images of the project: name, uri, entry id and folder, width, height."""
        return [
            {"name": e.image_name, "uri": e.uri, "entry_id": str(e.entry_id), "entry_path": str(e.entry_path),
             "width": int(e.width), "height": int(e.height)}
            for e in self._read().images
        ]

    def objects(
        self, name: str
    ) -> tuple[list[tuple[BaseGeometry, str | None, dict[str, float]]], list[tuple[str | None, float, float]]]:
        """(annotations as (roi, class name, measurements), pointnuc's detections as (id, centre x, y)) of one image."""
        entry = next((e for e in self._read().images if e.image_name == name), None)
        if entry is None:
            raise InputError(f"no image named {name!r} in {self.qpproj}")
        h = self._hierarchy(entry, name)
        anns = []
        for a in h.annotations:
            pc = a.path_class
            anns.append((a.roi, pc.name if pc is not None else None, dict(a.measurements)))
        # d.roi would convert Java -> shapely (slow): the ids and Java's centroids are enough
        marked = [_id_and_centre(d) for d in h.detections if POINTNUC_MARKER in d.measurements]
        return anns, marked

    def write(
        self,
        records: dict[str, list[Record]],
        class_name: str,
        color: tuple[int, int, int],
        replace_within: dict[str, BaseGeometry | None],
    ) -> list[tuple[str, int, int, list[str | None]]]:
        """Replace pointnuc's objects of each image by ``records`` and save; (data.qpdata, removed, added,
        the added objects' ids) per image.

        The caller keeps the backup: a failure here leaves the project to be restored.
        """
        self._reader = None  # the files change: read them again afterwards
        qp = self._Project(self.qpproj, mode="r+")
        qp.update_image_paths(try_relative=True)  # before any hierarchy is touched
        path_class = self._PathClass(class_name, color=color)
        by_name = {e.image_name: e for e in qp.images}
        done = []
        for name, recs in records.items():
            entry = by_name[name]
            if not entry.is_readable():  # paquo would skip saving it silently
                raise InputError(f"QuPath cannot find the image file of {name!r} ({entry.uri}); nothing was written")
            h = self._hierarchy(entry, name)
            area = replace_within.get(name)
            # d.roi converts Java -> shapely (slow): only when an area limits the replacement
            old = [d for d in h.detections
                   if POINTNUC_MARKER in d.measurements and (area is None or inside(_owner_roi(d), area))]
            ids: list[str | None] = []
            with h.no_autoflush():
                for d in old:
                    h.detections.discard(d)
                for geom, nucleus, meas in recs:
                    if nucleus is not None:
                        added = h.add_cell(roi=geom, path_class=path_class, measurements=meas, nucleus_roi=nucleus)
                    else:
                        added = h.add_detection(roi=geom, path_class=path_class, measurements=meas)
                    ids.append(_object_id(added))
            done.append((str(Path(entry.entry_path) / QPDATA), len(old), len(recs), ids))
        qp.save()
        return done


    def write_points(
        self, points: dict[str, list[tuple[float, float, dict[str, float]]]], class_name: str, color: tuple[int, int, int],
    ) -> list[tuple[str, int, int]]:
        """Replace each image's annotations of ``class_name`` that carry :data:`SUGGESTION_MARKER` by one Point
        annotation per ``(x, y, measurements)`` and save; (data.qpdata, removed, added) per image."""
        from shapely.geometry import Point

        self._reader = None
        qp = self._Project(self.qpproj, mode="r+")
        qp.update_image_paths(try_relative=True)
        path_class = self._PathClass(class_name, color=color)
        by_name = {e.image_name: e for e in qp.images}
        done = []
        for name, marks in points.items():
            entry = by_name[name]
            if not entry.is_readable():
                raise InputError(f"QuPath cannot find the image file of {name!r} ({entry.uri}); nothing was written")
            h = self._hierarchy(entry, name)
            old = [a for a in h.annotations if SUGGESTION_MARKER in a.measurements
                   and a.path_class is not None and a.path_class.name == class_name]
            with h.no_autoflush():
                for a in old:
                    h.annotations.discard(a)
                for x, y, meas in marks:
                    h.add_annotation(roi=Point(x, y), path_class=path_class, measurements=meas)
            done.append((str(Path(entry.entry_path) / QPDATA), len(old), len(marks)))
        qp.save()
        return done


class InProcess:
    """A :class:`PaquoSession` called directly (for a stand-in of paquo in tests: no JVM involved)."""

    def __init__(self, qpproj: Path, paquo: tuple[Any, Any]) -> None:
        self.session = PaquoSession(qpproj, paquo)

    def call(self, op: str, what: str, **kwargs: Any) -> Any:
        return getattr(self.session, op)(**kwargs)

    def close(self) -> None:
        pass


def _die_with_parent(parent: int) -> None:
    """Linux: be killed when the parent dies (even by SIGKILL), so a JVM stuck in a loop never outlives it."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


def serve(qpproj: Path, idle_exit_s: float, error_dir: str, parent: int) -> None:
    """The child's loop: start QuPath, then answer ``(op, kwargs)`` frames from stdin until EOF or idle.

    Replies on the original stdout: ``("ready",)``, ``("ok", result)``, ``("error", class, message)``
    for a :class:`PointnucError`, ``("bug", traceback)``, or ``("bye",)`` when leaving idle.
    """
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # QuPath logs to System.out: into the log pipe, never into the replies
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it kills this process when it must
    _die_with_parent(parent)
    # -Xrs: the JVM leaves SIGINT/SIGTERM alone (no shutdown hooks racing a save); crash reports not in the cwd
    java_opts = ["-Xrs", f"-XX:ErrorFile={error_dir}/hs_err_pid%p.log"]
    try:
        session = PaquoSession(qpproj, load_paquo(java_opts))
    except PointnucError as err:
        send_frame(replies, ("error", type(err).__name__, str(err)))
        os._exit(0)
    send_frame(replies, ("ready",))
    requests: queue.Queue[Any] = queue.Queue()
    threading.Thread(target=read_frames, args=(sys.stdin.buffer, requests), daemon=True).start()
    while True:
        try:
            request = requests.get(timeout=idle_exit_s)
        except queue.Empty:
            # never sent after taking a request: the parent sends it again to a new process
            send_frame(replies, ("bye",))
            os._exit(0)
        if request is None:  # the parent closed the pipe (or left)
            os._exit(0)
        op, kwargs = request
        reply: tuple[Any, ...]
        try:
            reply = ("ok", getattr(session, op)(**kwargs))
        except PointnucError as err:
            reply = ("error", type(err).__name__, str(err))
        except Exception:  # noqa: BLE001 - any other failure goes back to the parent with its traceback
            reply = ("bug", traceback.format_exc())
        send_frame(replies, reply)
