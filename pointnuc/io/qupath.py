"""A QuPath project (``project.qpproj``) through paquo — the only module that imports paquo.

paquo runs QuPath's own Java classes in a JVM that starts when ``paquo.projects`` is imported
and cannot be stopped. pointnuc never starts it in the calling process (see ``docs/PAQUO.md``):

- a JVM in the process makes every later ``fork`` unsafe (a DataLoader worker forked from it
  hung on a lock), it takes over SIGINT/SIGTERM (a crash or an ignored signal, and
  ``hs_err_pid*.log`` files) and it writes QuPath's log to the process' stdout;
- so all paquo work runs in a child process, ``python -m pointnuc.io.qupath`` in its own
  session (the terminal's Ctrl-C reaches pointnuc only), started when a project is opened and
  leaving on its own after :data:`IDLE_EXIT_S` idle seconds (started again when needed). Its
  stdout is the pipe of replies; QuPath's console log (at WARN) goes to a second pipe the
  parent reads: WARN/ERROR lines are passed on to pointnuc's log after each call, and a
  message repeated without end (QuPath's reader loops on a damaged ``data.qpdata``) stops the
  child with an error naming the image. The two exchange plain data (dicts, shapely
  geometries) in pickled frames; an interrupted or failed call kills the child.

Reading never changes the project: mode ``"r"`` without ``update_image_paths`` (which would
rewrite ``data/N/server.json``); the image files of a moved project are found as QuPath
does, by the path of each image relative to the project's previous folder (the ``"uri"`` of
project.qpproj), also when it leads out of the project folder (``../images``). A
``data.qpdata`` that lacks QuPath's end marker (truncated) is refused before QuPath reads it.

Writing: a backup of project.qpproj, of each touched ``data/N/`` and of every image's
``data/N/server.json`` goes to ``pointnuc-backup/<UTC timestamp>/`` first; the child opens the
project ``"r+"``, re-roots its image paths, discards pointnuc's own detections (the ``pointnuc
score`` measurement) inside the area, adds the new ones under ``hierarchy.no_autoflush()`` and
saves only when everything succeeded. On any failure or interruption the child is killed and
the backup copied back. Of pointnuc's backups the newest :data:`BACKUPS_PER_IMAGE` per image
are kept.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import pickle
import queue
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
import weakref
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from shapely.geometry.base import BaseGeometry

from pointnuc import errors
from pointnuc.errors import InputError, PointnucError, QuPathError, QuPathNotFoundError
from pointnuc.geometry import object_area
from pointnuc.io.base import CELL_EXPANSION_UM, POINTNUC_MARKER, ImageAnnotations, ImageRef, NucleusObject
from pointnuc.io.geojson import class_color, inside, nucleus_records
from pointnuc.io.objects import QuPathObject, summarise
from pointnuc.io.slide import open_slide

log = logging.getLogger(__name__)

BACKUP_FOLDER = "pointnuc-backup"
#: pointnuc keeps this many of its own backups per image; older ones are deleted after a successful write
BACKUPS_PER_IMAGE = 3
BACKUP_MANIFEST = "pointnuc-backup.json"  #: what a backup folder holds (written by pointnuc)
_BACKUP_STAMP = re.compile(r"\d{8}T\d{6}\.\d{6}Z")  #: the names of pointnuc's backup folders
SERVER_JSON = "server.json"  #: per-image file QuPath rewrites when image paths are updated
QPDATA = "data.qpdata"
#: QuPath ends every data.qpdata with the Java-serialised string "EOF"; a file cut short lacks it,
#: and QuPath 0.6 then logs "Reached end of file unexpectedly" in an endless loop
QPDATA_END = b"t\x00\x03EOF"
JAVA_SERIAL_MAGIC = b"\xac\xed\x00\x05"  #: how data.qpdata (a Java object stream) begins
#: files beside project.qpproj that QuPath writes when it saves (restored or removed with the backup)
QPPROJ_SIDE_FILES = (".backup", ".tmp")
IDLE_EXIT_S = 60.0  #: the QuPath child leaves after this many idle seconds (restarted on the next call)
#: QuPath log lines repeated this many times in a row mean QuPath is stuck in a loop
LOG_REPEAT_LIMIT = 2000
LOG_PASSED_ON = 5  #: distinct QuPath WARN/ERROR messages passed on to pointnuc's log per call
QUPATH_NOT_FOUND = (
    "QuPath was not found (paquo looks at $PAQUO_QUPATH_DIR, qupath_dir in .paquo.toml, then folders named "
    "QuPath* in /opt, /Applications, /usr/local, C:/Program Files, ~/AppData/Local and ~); point PAQUO_QUPATH_DIR "
    "to your QuPath 0.6 folder, or instead give pointnuc a folder of the images with their QuPath GeoJSON exports "
    "(File > Export objects as GeoJSON), which needs no QuPath"
)


# =========================================================================== plain files (no QuPath)


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


# =========================================================================== the paquo side


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
    except Exception as err:  # ValueError (none found), FileNotFoundError (incompatible), JVM start errors
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
            except Exception as err:  # Java exceptions too: QuPath could not load it
                raise InputError(f"QuPath cannot open {self.qpproj} as a project ({_java_message(err)})") from None
        return self._reader

    def _hierarchy(self, entry: Any, name: str) -> Any:
        try:
            return entry.hierarchy
        except Exception as err:
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

    def objects(self, name: str) -> tuple[list[tuple[BaseGeometry, str | None, dict[str, float]]], int]:
        """(annotations as (roi, class name, measurements), number of pointnuc's detections) of one image."""
        entry = next((e for e in self._read().images if e.image_name == name), None)
        if entry is None:
            raise InputError(f"no image named {name!r} in {self.qpproj}")
        h = self._hierarchy(entry, name)
        anns = []
        for a in h.annotations:
            pc = a.path_class
            anns.append((a.roi, pc.name if pc is not None else None, dict(a.measurements)))
        # d.roi would convert Java -> shapely (slow): counting needs only the measurements
        n_marked = sum(1 for d in h.detections if POINTNUC_MARKER in d.measurements)
        return anns, n_marked

    def write(
        self,
        records: dict[str, list[tuple[BaseGeometry, BaseGeometry | None, dict[str, float]]]],
        class_name: str,
        color: tuple[int, int, int],
        replace_within: dict[str, BaseGeometry | None],
    ) -> list[tuple[str, int, int]]:
        """Replace pointnuc's objects of each image by ``records`` and save; (data.qpdata, removed, added) per image.

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
                   if POINTNUC_MARKER in d.measurements and (area is None or inside(d.roi, area))]
            with h.no_autoflush():
                for d in old:
                    h.detections.discard(d)
                for geom, nucleus, meas in recs:
                    if nucleus is not None:
                        h.add_cell(roi=geom, path_class=path_class, measurements=meas, nucleus_roi=nucleus)
                    else:
                        h.add_detection(roi=geom, path_class=path_class, measurements=meas)
            done.append((str(Path(entry.entry_path) / QPDATA), len(old), len(recs)))
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


# =========================================================================== the child process

_HEADER = struct.Struct("!Q")


def _send(fh: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(_HEADER.pack(len(data)) + data)
    fh.flush()


def _read_exact(fh: Any, n: int) -> bytes | None:
    data = fh.read(n)
    return data if data is not None and len(data) == n else None


def _receive(fh: Any) -> Any:
    """The next frame from the binary stream ``fh``; None at end of file."""
    head = _read_exact(fh, _HEADER.size)
    if head is None:
        return None
    body = _read_exact(fh, _HEADER.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def _frames(fh: Any, into: queue.Queue[Any]) -> None:
    """Put every frame read from ``fh`` into ``into``, then None (a thread: waiting on it stays interruptible)."""
    try:
        while (frame := _receive(fh)) is not None:
            into.put(frame)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError):
        pass
    into.put(None)


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
        _send(replies, ("error", type(err).__name__, str(err)))
        os._exit(0)
    _send(replies, ("ready",))
    requests: queue.Queue[Any] = queue.Queue()
    threading.Thread(target=_frames, args=(sys.stdin.buffer, requests), daemon=True).start()
    while True:
        try:
            request = requests.get(timeout=idle_exit_s)
        except queue.Empty:
            # never sent after taking a request: the parent sends it again to a new process
            _send(replies, ("bye",))
            os._exit(0)
        if request is None:  # the parent closed the pipe (or left)
            os._exit(0)
        op, kwargs = request
        try:
            reply = ("ok", getattr(session, op)(**kwargs))
        except PointnucError as err:
            reply = ("error", type(err).__name__, str(err))
        except Exception:
            reply = ("bug", traceback.format_exc())
        _send(replies, reply)


#: the child's command: imports this module (not ``-m``: one copy of it) from the parent's pointnuc
_CHILD = (
    "import sys; root = sys.argv[1]; sys.path.insert(0, root) if root not in sys.path else None; "
    "from pathlib import Path; from pointnuc.io.qupath import serve; "
    "serve(Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5]))"
)


# =========================================================================== the parent's side

_JAVA_LOG = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \[[^\]]*\] \[\s*(\w+)\s*\] (\S+) - (.*)$")


class _LogWatch:
    """Reads the child's log pipe; keeps QuPath's WARN/ERROR messages and notices endless repeats."""

    def __init__(self, stream: Any) -> None:
        self._lock = threading.Lock()
        self.messages: list[str] = []  # distinct WARN/ERROR messages since the last take()
        self._last = ""
        self.repeats = 0
        self.runaway: str | None = None
        threading.Thread(target=self._run, args=(stream,), name="pointnuc-qupath-log", daemon=True).start()

    def _run(self, stream: Any) -> None:
        try:
            for raw in iter(stream.readline, b""):
                self._line(raw.decode("utf-8", "replace").rstrip())
        except (OSError, ValueError):  # closed by close()
            pass

    def _line(self, line: str) -> None:
        m = _JAVA_LOG.match(line)
        key = line.split(" ", 1)[-1] if m else line  # without the timestamp
        with self._lock:
            self.repeats = self.repeats + 1 if key == self._last else 1
            self._last = key
            if self.repeats >= LOG_REPEAT_LIMIT and self.runaway is None:
                self.runaway = m.group(3) if m else line
            if self.repeats > 1:
                return
            if m and m.group(1).upper() in ("WARN", "WARNING", "ERROR"):
                if len(self.messages) < 100:
                    self.messages.append(m.group(3))
                return
        log.debug("QuPath: %s", line)  # stack traces, Python warnings

    def take(self) -> list[str]:
        """The messages collected since the last call, and a fresh start for repeat counting."""
        with self._lock:
            out, self.messages = self.messages, []
            self.runaway, self.repeats, self._last = None, 0, ""
        return out


def _stop(proc: subprocess.Popen[bytes], error_dir: str) -> None:
    """Kill the child (it has nothing to save when idle, and an interrupted write is restored) and
    remove its crash-report folder when empty."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait
        pass
    for fh in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if fh is not None:
                fh.close()
        except OSError:
            pass
    try:
        os.rmdir(error_dir)
    except OSError:
        pass


class QuPathProcess:
    """QuPath in a child process, called with :meth:`call` (see the module doc)."""

    def __init__(self, qpproj: Path, idle_exit_s: float = IDLE_EXIT_S) -> None:
        self.qpproj = Path(qpproj).resolve()
        self.idle_exit_s = idle_exit_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._replies: queue.Queue[Any] = queue.Queue()
        self._watch: _LogWatch | None = None
        self._error_dir = ""
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------ lifecycle

    def _start(self) -> None:
        self._error_dir = tempfile.mkdtemp(prefix="pointnuc-qupath-")
        root = str(Path(__file__).resolve().parents[2])  # the folder holding this pointnuc
        cmd = [sys.executable, "-c", _CHILD, root, str(self.qpproj), repr(self.idle_exit_s), self._error_dir,
               str(os.getpid())]
        # its own session / process group: the terminal's Ctrl-C goes to pointnuc, which stops the child itself
        group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if sys.platform == "win32" else \
            {"start_new_session": True}
        self._proc = proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **group,  # type: ignore[arg-type]
        )
        self._finalizer = weakref.finalize(self, _stop, proc, self._error_dir)
        self._replies = queue.Queue()
        threading.Thread(target=_frames, args=(proc.stdout, self._replies), name="pointnuc-qupath-replies",
                         daemon=True).start()
        self._watch = _LogWatch(proc.stderr)
        try:
            reply = self._reply("QuPath's start")
        except BaseException:
            self.close()
            raise
        if reply[0] != "ready":
            self.close()
            self._raise(reply, "QuPath's start")

    def close(self) -> None:
        """Stop the child (a later call starts a new one)."""
        if self._finalizer is not None:
            self._finalizer()
        self._proc = self._watch = self._finalizer = None

    # ------------------------------------------------------------------ calls

    def call(self, op: str, what: str, **kwargs: Any) -> Any:
        """Run ``PaquoSession.op(**kwargs)`` in the child; ``what`` names the work in error messages.

        Any interruption (Ctrl-C, SIGTERM, a watchdog error) kills the child before it propagates.
        """
        for _ in range(2):
            if self._proc is None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            try:
                try:
                    _send(self._proc.stdin, (op, kwargs))
                except BrokenPipeError:
                    pass  # the child left while idle: its ("bye",) is waiting
                reply = self._reply(what)
            except BaseException:
                self.close()
                raise
            if reply[0] == "bye":  # it left without taking the request: a new process gets it
                self.close()
                continue
            self._pass_on_messages()
            if reply[0] != "ok":
                if reply[0] == "bug":
                    self.close()
                self._raise(reply, what)
            return reply[1]
        raise QuPathError(f"QuPath left twice before {what} could start")  # pragma: no cover

    def _pass_on_messages(self) -> None:
        assert self._watch is not None
        msgs = list(dict.fromkeys(self._watch.take()))
        for m in msgs[:LOG_PASSED_ON]:
            log.warning("QuPath: %s", m)
        if len(msgs) > LOG_PASSED_ON:
            log.warning("QuPath: ... and %d other messages", len(msgs) - LOG_PASSED_ON)

    def _reply(self, what: str) -> tuple[Any, ...]:
        """Wait for the child's reply, watching its log; a stuck or dead child is a clear error."""
        assert self._watch is not None
        while True:
            try:
                reply = self._replies.get(timeout=0.25)
            except queue.Empty:
                reply = ()
            if reply is None:
                self._died(what)
            if reply:
                return reply
            runaway = self._watch.runaway
            if runaway is not None:
                for m in self._watch.take():
                    log.debug("QuPath: %s", m)
                raise InputError(
                    f"QuPath cannot read {what}: it logged {runaway!r} {LOG_REPEAT_LIMIT} times in a row and was "
                    f"stopped; the file is probably damaged: restore it from a backup"
                )

    def _died(self, what: str) -> None:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        crash = sorted(Path(self._error_dir).glob("hs_err_pid*.log"))
        msgs = self._watch.take() if self._watch is not None else []
        self.close()  # (a crash report keeps its folder)
        detail = f"; its last message: {msgs[-1]}" if msgs else ""
        report = f"; Java's crash report: {crash[0]}" if crash else ""
        raise QuPathError(f"QuPath stopped unexpectedly (exit status {code}) during {what}{detail}{report}")

    @staticmethod
    def _raise(reply: tuple[Any, ...], what: str) -> None:
        if reply[0] == "error":
            cls = getattr(errors, reply[1], None)
            if not (isinstance(cls, type) and issubclass(cls, PointnucError)):
                cls = InputError
            raise cls(reply[2])
        if reply[0] == "bug":
            raise QuPathError(f"QuPath failed during {what}; its traceback:\n{reply[1]}")
        raise QuPathError(f"unexpected reply from the QuPath process during {what}: {reply[0]!r}")


# =========================================================================== the project


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
        self, image: ImageRef, point_class: str = "Nucleus", region_class: str | None = None
    ) -> ImageAnnotations:
        """Points and regions from the image's annotations; pointnuc's detections are counted."""
        entry = self._entry(image.name)
        check_qpdata(Path(entry["entry_path"]), image.name)
        anns, n_marked = self._qupath.call(
            "objects", what=f"the objects of image {image.name!r} ({Path(entry['entry_path']) / QPDATA})",
            name=image.name,
        )
        objects = [QuPathObject("annotation", roi, cls, meas) for roi, cls, meas in anns]
        return summarise(objects, image, point_class=point_class, region_class=region_class,
                         source=str(self.qpproj), n_pointnuc_objects=n_marked)

    # ------------------------------------------------------------------ writing

    def _backup(self, names: list[str], entry_dirs: list[Path], all_dirs: list[Path]) -> Path:
        """Copy project.qpproj (and QuPath's files beside it), the ``entry_dirs`` whole, and every other
        entry's server.json (which re-rooting the image paths rewrites) to a new timestamped folder."""
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        dest = self.output_dir / BACKUP_FOLDER / stamp
        dest.mkdir(parents=True, exist_ok=False)
        try:
            shutil.copy2(self.qpproj, dest / self.qpproj.name)
            side = [s for s in QPPROJ_SIDE_FILES if self.qpproj.with_name(self.qpproj.name + s).is_file()]
            for s in side:
                shutil.copy2(self.qpproj.with_name(self.qpproj.name + s), dest / (self.qpproj.name + s))
            for d in entry_dirs:
                if d.is_dir():
                    shutil.copytree(d, dest / "data" / d.name)
            for d in all_dirs:
                if d not in entry_dirs and (d / SERVER_JSON).is_file():
                    (dest / "data" / d.name).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(d / SERVER_JSON, dest / "data" / d.name / SERVER_JSON)
            manifest = {
                "pointnuc_backup": 1,
                "project": self.qpproj.name,
                "images": [{"name": n, "entry": d.name, "had_folder": d.is_dir()} for n, d in zip(names, entry_dirs)],
                "side_files": side,
            }
            (dest / BACKUP_MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)  # nothing was changed yet: no half backup left
            raise
        return dest

    def _restore(self, backup: Path, entry_dirs: list[Path], all_dirs: list[Path]) -> None:
        """Put back what :meth:`_backup` copied (the project as it was before the write)."""
        manifest = json.loads((backup / BACKUP_MANIFEST).read_text(encoding="utf-8"))
        shutil.copy2(backup / self.qpproj.name, self.qpproj)
        for s in QPPROJ_SIDE_FILES:  # QuPath's own backup of project.qpproj, and its half-saved .tmp
            src, dst = backup / (self.qpproj.name + s), self.qpproj.with_name(self.qpproj.name + s)
            if s in manifest["side_files"]:
                shutil.copy2(src, dst)
            else:
                dst.unlink(missing_ok=True)
        had = {i["entry"]: i["had_folder"] for i in manifest["images"]}
        for d in entry_dirs:
            src = backup / "data" / d.name
            shutil.rmtree(d, ignore_errors=True)
            if had.get(d.name, True) and src.is_dir():
                shutil.copytree(src, d)
        for d in all_dirs:
            if d in entry_dirs:
                continue
            src = backup / "data" / d.name / SERVER_JSON
            if src.is_file():
                shutil.copy2(src, d / SERVER_JSON)
            elif (d / SERVER_JSON).is_file():  # written by the failed attempt
                (d / SERVER_JSON).unlink()

    def prune_backups(self, keep: int = BACKUPS_PER_IMAGE) -> list[Path]:
        """Delete pointnuc's backups beyond the newest ``keep`` of each image; returns those deleted.

        Only folders pointnuc made (a timestamp name and project.qpproj inside) are considered;
        a backup is kept while it is among the newest ``keep`` of any image it holds.
        """
        folder = self.output_dir / BACKUP_FOLDER
        if not folder.is_dir():
            return []
        ours = sorted(d for d in folder.iterdir() if d.is_dir() and _BACKUP_STAMP.fullmatch(d.name)
                      and (d / self.qpproj.name).is_file())
        seen: dict[str, int] = {}
        kept: set[Path] = set()
        for d in reversed(ours):  # newest first (the names are UTC timestamps)
            for image in _backup_images(d):
                seen[image] = seen.get(image, 0) + 1
                if seen[image] <= keep:
                    kept.add(d)
        removed = [d for d in ours if d not in kept]
        for d in removed:
            shutil.rmtree(d, ignore_errors=True)
        return removed

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

        Returns the ``data.qpdata`` files written. On failure or interruption the project is restored.
        """
        if ":" in class_name or "\n" in class_name:
            raise InputError(f"class name {class_name!r} cannot contain ':' (QuPath's derived classes are not supported)")
        refs = {r.name: r for r in self.images()}
        unknown = [n for n in results if n not in refs]
        if unknown:
            raise InputError(f"no image named {unknown[0]!r} in {self.qpproj}")
        entries = {e["name"]: e for e in self._image_entries()}
        names = list(results)
        dirs = [Path(entries[n]["entry_path"]) for n in names]
        all_dirs = [Path(e["entry_path"]) for e in entries.values()]
        for n, d in zip(names, dirs):
            check_qpdata(d, n)
        records = {
            n: nucleus_records(nuc, object_type=object_type, pixel_size_um=refs[n].pixel_size_um,
                               cell_expansion_um=cell_expansion_um,
                               clip_to=object_area(refs[n].width, refs[n].height, (replace_within or {}).get(n)))
            for n, nuc in results.items()
        }
        backup = self._backup(names, dirs, all_dirs)
        try:
            done = self._qupath.call(
                "write", what=f"writing to {self.qpproj}", records=records, class_name=class_name,
                color=class_color(class_name), replace_within=dict(replace_within or {}),
            )
        except BaseException as err:
            self._restore(backup, dirs, all_dirs)
            # an interruption is reported by the CLI in one line; other failures say what happened here
            (log.debug if isinstance(err, KeyboardInterrupt) else log.error)(
                "writing to %s failed; the project was restored from %s", self.qpproj, backup)
            raise
        finally:
            self._refs = None
            self._entries = None
        for (path, removed, added), name in zip(done, names):
            log.info("%s: replaced %d pointnuc objects with %d", name, removed, added)
        self.prune_backups()
        return [Path(p) for p, _, _ in done]


def _backup_images(backup: Path) -> list[str]:
    """The image entries (data/N folder names) a backup holds whole: from its manifest, else from its files."""
    manifest = backup / BACKUP_MANIFEST
    if manifest.is_file():
        try:
            return [str(i["entry"]) for i in json.loads(manifest.read_text(encoding="utf-8"))["images"]]
        except (ValueError, KeyError, TypeError):
            pass
    data = backup / "data"  # an older backup: whole folders hold more than server.json
    found = [d.name for d in sorted(data.iterdir()) if d.is_dir() and any(f.name != SERVER_JSON for f in d.iterdir())] \
        if data.is_dir() else []
    return found or [""]

