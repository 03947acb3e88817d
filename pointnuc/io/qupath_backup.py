"""pointnuc's backups of a QuPath project, made before every write (plain files, no QuPath).

Before writing, project.qpproj (and QuPath's files beside it), each touched ``data/N/`` folder
and every other image's ``data/N/server.json`` (which re-rooting the image paths rewrites) are
copied to ``pointnuc-backup/<UTC timestamp>/`` with a manifest; a failed or interrupted write
is undone by copying them back. After a successful write only the newest
:data:`BACKUPS_PER_IMAGE` backups of each image are kept.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
from pathlib import Path

BACKUP_FOLDER = "pointnuc-backup"
#: pointnuc keeps this many of its own backups per image; older ones are deleted after a successful write
BACKUPS_PER_IMAGE = 3
BACKUP_MANIFEST = "pointnuc-backup.json"  #: what a backup folder holds (written by pointnuc)
_BACKUP_STAMP = re.compile(r"\d{8}T\d{6}\.\d{6}Z")  #: the names of pointnuc's backup folders
SERVER_JSON = "server.json"  #: per-image file QuPath rewrites when image paths are updated
#: files beside project.qpproj that QuPath writes when it saves (restored or removed with the backup)
QPPROJ_SIDE_FILES = (".backup", ".tmp")


def backup_project(qpproj: Path, folder: Path, names: list[str], entry_dirs: list[Path], all_dirs: list[Path]) -> Path:
    """Copy ``qpproj`` (and QuPath's files beside it), the ``entry_dirs`` whole, and every other
    entry's server.json to a new timestamped folder in ``folder``; returns that folder.

    ``names``: the image names of ``entry_dirs``, recorded in the manifest.
    """
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    dest = folder / stamp
    dest.mkdir(parents=True, exist_ok=False)
    try:
        shutil.copy2(qpproj, dest / qpproj.name)
        side = [s for s in QPPROJ_SIDE_FILES if qpproj.with_name(qpproj.name + s).is_file()]
        for s in side:
            shutil.copy2(qpproj.with_name(qpproj.name + s), dest / (qpproj.name + s))
        for d in entry_dirs:
            if d.is_dir():
                shutil.copytree(d, dest / "data" / d.name)
        for d in all_dirs:
            if d not in entry_dirs and (d / SERVER_JSON).is_file():
                (dest / "data" / d.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(d / SERVER_JSON, dest / "data" / d.name / SERVER_JSON)
        manifest = {
            "pointnuc_backup": 1,
            "project": qpproj.name,
            "images": [{"name": n, "entry": d.name, "had_folder": d.is_dir()} for n, d in zip(names, entry_dirs)],
            "side_files": side,
        }
        (dest / BACKUP_MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # nothing was changed yet: no half backup left
        raise
    return dest


def restore_project(qpproj: Path, backup: Path, entry_dirs: list[Path], all_dirs: list[Path]) -> None:
    """Put back what :func:`backup_project` copied (the project as it was before the write)."""
    manifest = json.loads((backup / BACKUP_MANIFEST).read_text(encoding="utf-8"))
    shutil.copy2(backup / qpproj.name, qpproj)
    for s in QPPROJ_SIDE_FILES:  # QuPath's own backup of project.qpproj, and its half-saved .tmp
        src, dst = backup / (qpproj.name + s), qpproj.with_name(qpproj.name + s)
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


def prune_backups(folder: Path, qpproj_name: str, keep: int = BACKUPS_PER_IMAGE) -> list[Path]:
    """Delete pointnuc's backups in ``folder`` beyond the newest ``keep`` of each image; returns those deleted.

    Only folders pointnuc made (a timestamp name and ``qpproj_name`` inside) are considered;
    a backup is kept while it is among the newest ``keep`` of any image it holds.
    """
    if not folder.is_dir():
        return []
    ours = sorted(d for d in folder.iterdir() if d.is_dir() and _BACKUP_STAMP.fullmatch(d.name)
                  and (d / qpproj_name).is_file())
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
