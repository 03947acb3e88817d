"""QuPath I/O: projects (paquo) and QuPath GeoJSON folders behind one interface.

:func:`open_project` lives here, above both implementations, so that :mod:`pointnuc.io.base`
(the interface they implement) imports neither of them.
"""

from __future__ import annotations

from pathlib import Path

from pointnuc.io.base import ImageAnnotations, ImageRef, NucleusObject, Project, WriteOptions

__all__ = ["ImageAnnotations", "ImageRef", "NucleusObject", "Project", "WriteOptions", "open_project"]


def open_project(path: Path, *, output_dir: Path | None = None, pixel_size_um: float | None = None) -> Project:
    """Open PROJECT: a ``.qpproj`` (or its folder) via paquo, or a GeoJSON image folder.

    ``output_dir``: where pointnuc's GeoJSON / backups go (default: the project folder).
    ``pixel_size_um``: overrides every image's pixel size.
    """
    from pointnuc.errors import InputError

    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"project not found: {path}")
    if path.is_file():
        if path.suffix.lower() == ".qpproj":
            from pointnuc.io.qupath_project import QuPathProjectFile

            return QuPathProjectFile(path, output_dir=output_dir, pixel_size_um=pixel_size_um)
        raise InputError(f"{path} is a file; give a QuPath project (project.qpproj or its folder) or a folder of images")
    if (path / "project.qpproj").is_file():
        from pointnuc.io.qupath_project import QuPathProjectFile

        return QuPathProjectFile(path / "project.qpproj", output_dir=output_dir, pixel_size_um=pixel_size_um)
    from pointnuc.io.geojson_project import GeoJSONFolderProject

    return GeoJSONFolderProject(path, output_dir=output_dir, pixel_size_um=pixel_size_um)
