"""A "project" that needs no QuPath: a folder of images with QuPath GeoJSON exports beside them.

Layout (only the folder's top level is read)::

    FOLDER/
      slide1.svs                      an image (tif tiff svs ndpi scn bif qptiff btf png jpg jpeg bmp)
      slide1.geojson                  its objects: File > Export objects as GeoJSON in QuPath
      pointnuc-geojson/slide1.geojson what pointnuc writes (File > Import objects, or drag & drop)

The export of image ``NAME.EXT`` is the first of these that exists: ``NAME.EXT.geojson``,
``NAME.geojson``, ``NAME.EXT.featurecollection.geojson``, ``NAME.featurecollection.geojson``
(QuPath's file chooser proposes ``NAME.geojson``; for ``x.ome.tif`` also ``x.geojson``). An image without an export has no
annotations (fine for ``segment``). GeoJSON files that match no image are reported
in the log. The image's QuPath name is its file name.

pointnuc never writes into the user's exports: its objects go to
``<output_dir or FOLDER>/pointnuc-geojson/NAME.geojson``, replacing that file (the previous
one is kept as ``NAME.geojson.bak``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from shapely.geometry.base import BaseGeometry

from pointnuc.errors import InputError
from pointnuc.fileio import backup_file
from pointnuc.geometry import object_area
from pointnuc.io.base import (
    DEFAULT_BACKGROUND_CLASS,
    DEFAULT_WRITE,
    ImageAnnotations,
    ImageRef,
    NucleusObject,
    PointMark,
    WriteOptions,
)
from pointnuc.io.geojson import (
    feature_is_suggestion,
    merge_features,
    nuclei_features,
    point_features,
    read_features,
    read_objects,
    write_features,
)
from pointnuc.io.objects import QuPathObject, summarise
from pointnuc.io.records import image_pixels
from pointnuc.io.slide import IMAGE_SUFFIXES, open_slide
from pointnuc.io.written import WrittenObject, read_written, record_written

log = logging.getLogger(__name__)

OUTPUT_FOLDER = "pointnuc-geojson"


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def find_images(folder: Path) -> list[Path]:
    """Image files at the top level of ``folder``, sorted by name."""
    try:
        entries = list(folder.iterdir())
    except OSError as err:
        raise InputError(f"cannot list the folder {folder}: {err.strerror or err}") from None
    return sorted(
        (p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def export_candidates(image_name: str) -> list[str]:
    """File names that may hold the export of ``image_name``, in order of preference."""
    stem = _stem(image_name)
    stems = [stem, stem[:-4]] if stem.lower().endswith(".ome") else [stem]  # QuPath strips ".ome.tif" whole
    return (
        [f"{image_name}.geojson"] + [f"{s}.geojson" for s in stems]
        + [f"{image_name}.featurecollection.geojson"] + [f"{s}.featurecollection.geojson" for s in stems]
    )


def _written(feature: dict) -> WrittenObject:
    """A Feature pointnuc writes as the record of :mod:`pointnuc.io.written` keeps it (a cell by its nucleus)."""
    return WrittenObject(feature.get("id"), feature.get("nucleusGeometry") or feature["geometry"])


class GeoJSONFolderProject:
    """Images + QuPath GeoJSON exports in one folder (see the module doc)."""

    kind = "geojson-folder"

    def __init__(self, folder: Path, *, output_dir: Path | None = None, pixel_size_um: float | None = None) -> None:
        self.root = Path(folder)
        self.pixel_size_um = pixel_size_um  #: overrides every image's pixel size when given
        self.output_dir = Path(output_dir) if output_dir is not None else self.root
        self._images = find_images(self.root)
        geojsons = {p.name for p in self.root.glob("*.geojson") if p.is_file()}
        if not self._images:
            what = "GeoJSON files but no images" if geojsons else "no images and no QuPath project"
            raise InputError(
                f"{self.root} holds {what}; give a QuPath project (project.qpproj) or a folder of images "
                f"({', '.join(s[1:] for s in IMAGE_SUFFIXES[:6])}, ...) with their GeoJSON exports"
            )
        stems: dict[str, list[str]] = {}
        for p in self._images:
            stems.setdefault(_stem(p.name), []).append(p.name)
        self._exports: dict[str, Path | None] = {}
        used: set[str] = set()
        for p in self._images:
            found = None
            for cand in export_candidates(p.name):
                if cand in geojsons:
                    if not cand.startswith(p.name) and len(stems[_stem(p.name)]) > 1:
                        raise InputError(
                            f"{cand} in {self.root} could belong to {' or '.join(stems[_stem(p.name)])}; "
                            f"rename it to <image file name>.geojson"
                        )
                    found = self.root / cand
                    break
            self._exports[p.name] = found
            used.update(c for c in export_candidates(p.name) if c in geojsons)
        for orphan in sorted(geojsons - used):
            log.warning("%s matches no image in %s and is ignored", orphan, self.root)
        self._refs: list[ImageRef] | None = None

    # ------------------------------------------------------------------ reading

    def images(self) -> list[ImageRef]:
        """All images (sorted by file name), with size and pixel size read from the files."""
        if self._refs is None:
            refs = []
            for p in self._images:
                with open_slide(p, pixel_size_um=self.pixel_size_um) as s:
                    refs.append(ImageRef(name=p.name, path=p, width=s.width, height=s.height,
                                         pixel_size_um=s.pixel_size_um))
            self._refs = refs
        return list(self._refs)

    def export_path(self, image: ImageRef) -> Path | None:
        """The user's GeoJSON export for this image, if any."""
        return self._exports.get(image.name)

    def output_path(self, image_name: str) -> Path:
        """Where pointnuc writes this image's objects."""
        stem = _stem(image_name)
        clash = sum(_stem(p.name) == stem for p in self._images) > 1
        return self.output_dir / OUTPUT_FOLDER / f"{image_name if clash else stem}.geojson"

    def annotations(
        self, image: ImageRef, point_class: str = "Nucleus", region_class: str | None = None,
        background_class: str | None = DEFAULT_BACKGROUND_CLASS,
    ) -> ImageAnnotations:
        """The marks of the image's export (:func:`~pointnuc.io.objects.summarise`).

        ``n_pointnuc_objects`` counts pointnuc's objects in pointnuc's own output file for
        the image when there is one, else in the user's export (objects imported into QuPath
        and exported again). Deleted detections: those pointnuc last wrote that the export
        lacks, once it holds any of them (:mod:`pointnuc.io.written`).
        """
        export = self.export_path(image)
        objects = read_objects(export) if export is not None else []
        out = self.output_path(image.name)
        n_marked = sum(o.is_pointnuc for o in read_objects(out)) if out.is_file() else None
        return summarise(objects, image, point_class=point_class, region_class=region_class,
                         background_class=background_class, source=export.name if export else "",
                         n_pointnuc_objects=n_marked, written=read_written(self.root, image.name))

    # ------------------------------------------------------------------ writing

    def write_nuclei(
        self,
        results: dict[str, Sequence[NucleusObject]],
        *,
        options: WriteOptions = DEFAULT_WRITE,
        replace_within: dict[str, BaseGeometry | None] | None = None,
    ) -> list[Path]:
        """Write each image's nuclei to ``pointnuc-geojson/NAME.geojson`` (see the module doc).

        Earlier pointnuc objects in that file are replaced inside ``replace_within[name]``
        (centroid inside; None = the whole image) and kept outside it.
        """
        refs = {r.name: r for r in self.images()}
        unknown = [n for n in results if n not in refs]
        if unknown:
            raise InputError(f"no image named {unknown[0]!r} in {self.root}")
        written = []
        for name, nuclei in results.items():
            ref = refs[name]
            path = self.output_path(name)
            area = (replace_within or {}).get(name)
            with image_pixels(ref) as pixels:
                new = nuclei_features(nuclei, options=options, pixel_size_um=ref.pixel_size_um,
                                      clip_to=object_area(ref.width, ref.height, area), pixels=pixels)
            previous = read_features(path) if path.is_file() else []
            feats = merge_features(previous, new, area, path)
            if path.is_file():  # the backup is written as atomically as the file: a full disk never truncates it
                backup_file(path, path.with_name(path.name + ".bak"))
            write_features(path, feats)
            record_written(self.root, name, [_written(f) for f in new], area)
            log.info("%s: wrote %d objects to %s (File > Import objects in QuPath)", name, len(feats), path)
            written.append(path)
        return written

    def annotation_objects(self, image: ImageRef) -> list[QuPathObject]:
        """The annotations of the image's export (the user's objects; pointnuc's own file is not read)."""
        export = self.export_path(image)
        return [o for o in read_objects(export) if o.object_type == "annotation"] if export is not None else []

    def write_suggestions(self, points: Mapping[str, Sequence[PointMark]], *, class_name: str) -> list[Path]:
        """Write the suggestions into pointnuc's file of each image (``pointnuc-geojson/NAME.geojson``, with its
        ``.bak``), replacing the unanswered suggestions of ``class_name`` there; the user's export is never written."""
        refs = {r.name for r in self.images()}
        unknown = [n for n in points if n not in refs]
        if unknown:
            raise InputError(f"no image named {unknown[0]!r} in {self.root}")
        written = []
        for name, marks in points.items():
            path = self.output_path(name)
            previous = read_features(path) if path.is_file() else []
            kept = [f for f in previous if not feature_is_suggestion(f, class_name)]
            if path.is_file():
                backup_file(path, path.with_name(path.name + ".bak"))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_features(path, kept + point_features(marks, class_name))
            log.info("%s: wrote %d suggestions to %s (File > Import objects in QuPath)", name, len(marks), path)
            written.append(path)
        return written
