"""One writer per project at a time: a lock file in the project folder.

``with project_lock(project.root, "segment"):`` holds ``ROOT/.pointnuc.lock`` for the
block; a second pointnuc run that wants to write into the same project is refused with
:class:`ProjectBusyError`, which names the holder (command, pid, host, start time).

The lock is the operating system's (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on
that file, so it ends with its process however that ends (an exception, Ctrl-C, a kill):
a lock file left behind by a killed run is stale by construction, and the next run takes
it over (and says so). On a file system without working locks (some network mounts) the
file itself is the lock (``O_EXCL``): a holder on this host whose process is gone is stale;
one on another host is trusted until the user deletes the file, as the message says.

``shared=True`` (``--shard`` runs of a cluster job array, which never write into the
project and write disjoint kept results) admits any number of shared holders together and
refuses only an exclusive one; on Windows and without OS locks it is exclusive too.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pointnuc.errors import PointnucError

log = logging.getLogger(__name__)

LOCK_NAME = ".pointnuc.lock"
#: errors of a file system that has no (working) advisory locks
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


class ProjectBusyError(PointnucError):
    """Another pointnuc run is writing into the same project."""

    exit_code = 4


def _holder(command: str) -> dict[str, Any]:
    return {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}


def _read_holders(path: Path) -> list[dict[str, Any]]:
    """The holders a lock file names, one JSON object per line (unreadable lines skipped)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            h = json.loads(line)
            if isinstance(h, dict):
                out.append(h)
    return out


def _describe(holders: list[dict[str, Any]]) -> str:
    if not holders:
        return "another pointnuc run"
    h = holders[-1]
    return (f"`pointnuc {h.get('command', '?')}` (pid {h.get('pid', '?')} on {h.get('host', '?')}, "
            f"since {h.get('started', '?')})")


def _busy(root: Path, path: Path, holders: list[dict[str, Any]], hint: str = "") -> ProjectBusyError:
    return ProjectBusyError(
        f"{root} is in use by {_describe(holders)}; wait for it to finish (or stop it) and run again{hint}"
    )


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (POSIX; on Windows assume it does)."""
    if sys.platform == "win32":
        return True  # os.kill(pid, 0) would send it Ctrl-C there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_holder(fd: int, holder: dict[str, Any], append: bool) -> None:
    if not append:
        os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_END)
    os.write(fd, (json.dumps(holder) + "\n").encode())


@contextlib.contextmanager
def project_lock(root: Path, command: str, *, shared: bool = False) -> Iterator[Path]:
    """Hold the project's lock for the block (see the module doc); yields the lock file's path."""
    root = Path(root)
    path = root / LOCK_NAME
    holder = _holder(command)
    try:
        fd = _os_lock(root, path, holder, shared)
    except _NoLocks:
        with _file_lock(root, path, holder):
            yield path
        return
    try:
        yield path
    finally:
        _os_unlock(fd, path)


class _NoLocks(Exception):
    """The file system refuses advisory locks."""


def _lock_fd(fd: int, shared: bool) -> None:
    """Lock ``fd`` without waiting: BlockingIOError when held, _NoLocks when not supported."""
    try:
        if sys.platform == "win32":
            import msvcrt

            # a byte far beyond the holder lines: Windows locks are mandatory, and others must read those
            os.lseek(fd, 1 << 30, os.SEEK_SET)
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            except OSError as err:
                raise BlockingIOError(errno.EAGAIN, str(err)) from None
        else:
            import fcntl

            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError as err:
        if err.errno in _NO_LOCKS:
            raise _NoLocks() from None
        raise


def _os_lock(root: Path, path: Path, holder: dict[str, Any], shared: bool) -> int:
    shared = shared and sys.platform != "win32"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_fd(fd, shared)
        except BlockingIOError:
            os.close(fd)
            raise _busy(root, path, _read_holders(path)) from None
        except _NoLocks:
            if os.fstat(fd).st_size == 0:  # (just created by the open above) the file lock must not find it
                with contextlib.suppress(OSError):
                    os.unlink(path)
            os.close(fd)
            raise
        except BaseException:
            os.close(fd)
            raise
        # a holder that was releasing may have removed the file between our open and lock:
        # then we locked a file nobody else will see; start again with the current one
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    if not shared:
        left = _read_holders(path)
        if left:  # nobody holds the OS lock, yet the file names someone: a run that was killed
            log.info("a previous run (%s) ended without releasing %s; taking it over", _describe(left), path)
    _write_holder(fd, holder, append=shared)
    return fd


def _os_unlock(fd: int, path: Path) -> None:
    # the file goes only when nobody else holds it (a shared holder may still): an exclusive
    # lock, which we already hold or get now without waiting, says so
    try:
        _lock_fd(fd, shared=False)
        sole = True
    except (_NoLocks, OSError):
        sole = False
    if sole and sys.platform != "win32":
        with contextlib.suppress(OSError):
            os.unlink(path)  # before the lock ends: a run that opened it meanwhile sees it gone and retries
    os.close(fd)  # releases the OS lock
    if sole and sys.platform == "win32":
        with contextlib.suppress(OSError):
            os.unlink(path)  # (an open file cannot be removed there; fails harmlessly if another run has it)


@contextlib.contextmanager
def _file_lock(root: Path, path: Path, holder: dict[str, Any]) -> Iterator[None]:
    """The lock file itself as the lock (``O_EXCL``), for file systems without OS locks."""
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            holders = _read_holders(path)
            h = holders[-1] if holders else {}
            stale = h.get("host") == holder["host"] and isinstance(h.get("pid"), int) and not _alive(h["pid"])
            if attempt == 0 and stale:
                log.info("a previous run (%s) ended without releasing %s; taking it over", _describe(holders), path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            raise _busy(root, path, holders, f" (if no such run is going on, delete {path})") from None
    else:  # pragma: no cover - the stale file came back in between
        raise _busy(root, path, _read_holders(path))
    try:
        try:
            _write_holder(fd, holder, append=False)
        finally:
            os.close(fd)
        yield
    finally:
        with contextlib.suppress(OSError):
            if any(h.get("pid") == holder["pid"] and h.get("host") == holder["host"] for h in _read_holders(path)):
                os.unlink(path)
