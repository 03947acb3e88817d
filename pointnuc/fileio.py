"""Writing files so that a crash, a full disk or Ctrl-C never leaves half of one.

Every file pointnuc writes or replaces (GeoJSON results and their backups, the model
description, weights, checkpoints) goes through :func:`atomic_write`: the bytes go to a
temporary file beside the target, are forced to the disk (``fsync``), and only then take
the target's name in one step (``os.replace``). A failure at any point leaves the old file
(or none) and no temporary file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _tmp_name(path: Path) -> Path:
    # the process id keeps two processes writing the same file (e.g. shards) off each other's temporary file
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Replace ``path`` with what ``write(binary file)`` writes, all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, interrupted: no half-written temporary file left beside the target
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8), all or nothing."""
    data = text.encode("utf-8")

    def write(f: BinaryIO) -> None:
        f.write(data)

    return atomic_write(path, write)


def backup_file(src: Path, dest: Path) -> Path:
    """Make ``dest`` a copy of ``src`` (contents and times), all or nothing.

    A copy, not a hard link: the backup must not change when the original is later
    edited in place.
    """
    src, dest = Path(src), Path(dest)

    def copy(f: BinaryIO) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f)

    atomic_write(dest, copy)
    try:
        shutil.copystat(src, dest)  # the backup shows when the replaced file was written
    except OSError:
        pass
    return dest


def sha256_file(path: Path) -> str:
    """The SHA-256 digest of a file, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
