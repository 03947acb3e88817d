"""QuPath in a child process: the parent's side (no paquo here), and the frames both sides exchange.

paquo runs QuPath's own Java classes in a JVM that starts when ``paquo.projects`` is imported
and cannot be stopped. pointnuc never starts it in its own process (see ``docs/PAQUO.md``):
a JVM in the process makes every later ``fork`` unsafe (a DataLoader worker forked from it
hung on a lock), it takes over SIGINT/SIGTERM (a crash or an ignored signal, and
``hs_err_pid*.log`` files) and it writes QuPath's log to the process' stdout.

So :class:`QuPathProcess` runs :func:`pointnuc.io.qupath.serve` in a child process in its own
session (the terminal's Ctrl-C reaches pointnuc only), started when a project is opened and
leaving on its own after :data:`IDLE_EXIT_S` idle seconds (started again when needed). The
child's stdout is the pipe of replies; QuPath's console log (at WARN) goes to a second pipe
the parent reads: WARN/ERROR lines are passed on to pointnuc's log after each call, and a
message repeated without end (QuPath's reader loops on a damaged ``data.qpdata``) stops the
child with an error naming the image. The two exchange plain data (dicts, shapely
geometries) in pickled frames (:func:`send_frame`, :func:`read_frames`); an interrupted or
failed call kills the child.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import re
import struct
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

from pointnuc import errors
from pointnuc.errors import InputError, PointnucError, QuPathError

log = logging.getLogger(__name__)

IDLE_EXIT_S = 60.0  #: the QuPath child leaves after this many idle seconds (restarted on the next call)
#: QuPath log lines repeated this many times in a row mean QuPath is stuck in a loop
LOG_REPEAT_LIMIT = 2000
LOG_PASSED_ON = 5  #: distinct QuPath WARN/ERROR messages passed on to pointnuc's log per call


# =========================================================================== frames

_HEADER = struct.Struct("!Q")


def send_frame(fh: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(_HEADER.pack(len(data)) + data)
    fh.flush()


def _read_exact(fh: Any, n: int) -> bytes | None:
    data = fh.read(n)
    return data if data is not None and len(data) == n else None


def receive_frame(fh: Any) -> Any:
    """The next frame from the binary stream ``fh``; None at end of file."""
    head = _read_exact(fh, _HEADER.size)
    if head is None:
        return None
    body = _read_exact(fh, _HEADER.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def read_frames(fh: Any, into: queue.Queue[Any]) -> None:
    """Put every frame read from ``fh`` into ``into``, then None (a thread: waiting on it stays interruptible)."""
    try:
        while (frame := receive_frame(fh)) is not None:
            into.put(frame)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError):
        pass
    into.put(None)


#: the child's command: imports :mod:`pointnuc.io.qupath` (not ``-m``: one copy of it) from the parent's pointnuc
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
        pipe = subprocess.PIPE
        if sys.platform == "win32":
            proc = subprocess.Popen(cmd, stdin=pipe, stdout=pipe, stderr=pipe,
                                    creationflags=subprocess.CREATE_NEW_PROCESS_GROUP)
        else:
            proc = subprocess.Popen(cmd, stdin=pipe, stdout=pipe, stderr=pipe, start_new_session=True)
        self._proc = proc
        self._finalizer = weakref.finalize(self, _stop, proc, self._error_dir)
        self._replies = queue.Queue()
        threading.Thread(target=read_frames, args=(proc.stdout, self._replies), name="pointnuc-qupath-replies",
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
                    send_frame(self._proc.stdin, (op, kwargs))
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
