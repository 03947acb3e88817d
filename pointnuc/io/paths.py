"""Output paths: file names made safe, output folders created when new and refused when they already hold something."""

from __future__ import annotations

from pathlib import Path

from pointnuc.errors import InputError, OutputExistsError


def safe_file_name(name: str, max_chars: int = 80) -> str:
    """``name`` as a file name any file system takes: letters, digits and ``-_.`` kept, anything else ``_``,
    at most ``max_chars`` characters (names that differ only there can collide: add a digest where it matters)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:max_chars]


def check_output_dir(path: Path, *, overwrite: bool = False, hint: str = "pass --overwrite or choose another") -> Path:
    """``path`` if it may become an output folder; changes nothing.

    A file at ``path`` is an :class:`InputError`; an existing non-empty folder is an
    :class:`OutputExistsError` (its message ends with ``hint``) unless ``overwrite``.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"output {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {path} already exists and is not empty; {hint}")
    return path


def prepare_output_dir(path: Path, overwrite: bool = False) -> Path:
    """Create ``path`` as an output folder and return it (refused as :func:`check_output_dir` says).

    With ``overwrite`` an existing folder's files are left in place and replaced one by one
    as they are written (nothing is deleted up front).
    """
    path = check_output_dir(path, overwrite=overwrite)
    path.mkdir(parents=True, exist_ok=True)
    return path
