"""QuPath I/O: projects (paquo) and QuPath GeoJSON folders behind one interface."""

from pointnuc.io.base import ImageAnnotations, ImageRef, NucleusObject, Project, open_project

__all__ = ["ImageAnnotations", "ImageRef", "NucleusObject", "Project", "open_project"]
