"""Output folders: created when new, refused when they already hold something (unless overwriting)."""

from __future__ import annotations

from pathlib import Path

from pointnuc.errors import InputError, OutputExistsError


def prepare_output_dir(path: Path, overwrite: bool = False) -> Path:
    """Create ``path`` as an output folder and return it.

    An existing non-empty folder is an :class:`OutputExistsError` unless ``overwrite``;
    with ``overwrite`` its files are left in place and replaced one by one as they are
    written (nothing is deleted up front). A file at ``path`` is always an error.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"output {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {path} already exists and is not empty; pass --overwrite or choose another")
    path.mkdir(parents=True, exist_ok=True)
    return path
