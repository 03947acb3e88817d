"""Kept results of ``pointnuc segment``: one image's nuclei and the record of how they were made.

A kept result is reused only when everything that changes its nuclei is unchanged
(:class:`ResultKey`); :func:`reuse_problem` says in words why one is not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from shapely.geometry.base import BaseGeometry

import pointnuc
from pointnuc.io.base import Project
from pointnuc.io.paths import safe_file_name
from pointnuc.models.layout import MODEL_JSON, SEGMENTER_WEIGHTS, ModelLayout

RESULTS_FOLDER = "pointnuc-results"
#: what a kept result holds and how it is made: bump it when either changes, and older kept results are recomputed
RESULT_FORMAT = 4  # 3: sub-pixel outlines, and a minimum nucleus area; 4: outlines "auto"
#: an image's file is recognised by its size and this many evenly spread chunks of this many bytes
SAMPLE_CHUNKS, SAMPLE_BYTES = 8, 32 * 1024


@dataclass(frozen=True)
class ResultKey:
    """Everything that changes one image's nuclei: a kept result is reused only when its key equals the run's.

    A kept result holds the nuclei only (full-resolution outlines, score, measurements at the
    pixel size). How they are written is applied on every write and is not part of the key:
    ``--objects``, ``--cell-expansion`` and ``--class`` change what goes into the project, not
    the nuclei, so changing them rewrites from the kept result without recomputing. Not in the
    key either: the device, batch and tile size (tiled prediction equals untiled to < 1e-5; CPU
    and GPU differ by rounding only). The image's file is recognised by its size and sampled
    bytes; when its modification time changed too, by a digest of all of it (:func:`reuse_problem`).
    """

    image: str  #: the image's name in the project
    width: int
    height: int
    file_size: int
    file_sample: str  #: digest of the file's size and sampled bytes
    pixel_size_um: float  #: of the image's full resolution, as this run uses it (override or file)
    model: str  #: digest of the model's description (config, thresholds) and segmenter weights
    within: str | None  #: digest of the --within area, None for the whole image
    tta: bool
    min_area_um2: float = 0.0  #: ``--min-area``: no nucleus under it was kept
    format: int = RESULT_FORMAT
    pointnuc: str = field(default_factory=lambda: pointnuc.__version__)


def results_dir(project: Project, model_dir: Path, tta: bool = False) -> Path:
    """Per-image results of one model on one project (resume state and shard output).

    Keyed by the model folder's name and a digest of its description, so a model
    retrained into the same folder never reuses the old model's results, and by the
    test-time augmentation, so ``--tta`` never reuses (or is mistaken for) a plain run.
    Each result inside is checked against its own record before reuse (:class:`ResultKey`).
    """
    meta = ModelLayout(Path(model_dir)).meta
    digest = hashlib.sha1(meta.read_bytes()).hexdigest()[:8] if meta.is_file() else "unknown"
    return project.root / RESULTS_FOLDER / f"{Path(model_dir).resolve().name}-{digest}{'-tta' if tta else ''}"


def model_digest(model_dir: Path) -> str:
    """Digest of what the model computes with: its description (config, thresholds) and segmenter weights.

    A description that records its weights' SHA-256 (checked when the network is loaded) stands for
    them; only an older folder without checksums has its weights read here.
    """
    import json

    meta = Path(model_dir) / MODEL_JSON
    names = [MODEL_JSON]
    try:
        if not isinstance(json.loads(meta.read_text(encoding="utf-8")).get("weights_sha256"), dict):
            names.append(SEGMENTER_WEIGHTS)
    except (OSError, ValueError, AttributeError):
        names.append(SEGMENTER_WEIGHTS)
    h = hashlib.sha1()
    found = False
    for name in names:
        f = Path(model_dir) / name
        if f.is_file():
            found = True
            h.update(name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16] if found else "unknown"


def file_sample(path: Path) -> tuple[int, int, str]:
    """(size, modification time in ns, digest of the size and sampled bytes) of a file: cheap on any size."""
    st = Path(path).stat()
    h = hashlib.sha1(str(st.st_size).encode())
    with open(path, "rb") as f:
        if st.st_size <= SAMPLE_CHUNKS * SAMPLE_BYTES:
            h.update(f.read())
        else:
            for off in np.linspace(0, st.st_size - SAMPLE_BYTES, SAMPLE_CHUNKS).astype(np.int64):
                f.seek(int(off))
                h.update(f.read(SAMPLE_BYTES))
    return st.st_size, st.st_mtime_ns, h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """Digest of a whole file."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def region_digest(region: BaseGeometry | None) -> str | None:
    """Digest of a --within area (None for the whole image)."""
    return None if region is None else hashlib.sha1(region.wkb).hexdigest()[:8]


def result_file(out_dir: Path, image_name: str, region: BaseGeometry | None) -> Path:
    """Where one image's result is kept: its name made safe for any file system, then ``~`` and a
    digest of the exact name, so that two images never share one (``slide a.tif`` and ``slide_a.tif``,
    or names differing in case on macOS/Windows); for an area (``--within``) the area's digest too,
    so a result is never reused for another area."""
    stem = f"{safe_file_name(image_name)}~{hashlib.sha1(image_name.encode('utf-8')).hexdigest()[:10]}"
    area = region_digest(region)
    return out_dir / (f"{stem}.geojson" if area is None else f"{stem}.within-{area}.geojson")


def record_file(result: Path) -> Path:
    """The record of how a kept result was made, beside it (``.json`` for ``.geojson``)."""
    return result.with_suffix(".json")


def read_record(result: Path) -> dict | None:
    """A kept result's record, None when there is none (or it cannot be read: the result is then not trusted)."""
    f = record_file(result)
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("key"), dict) else None


def reuse_problem(record: dict | None, key: ResultKey, path: Path) -> str | None:
    """Why a kept result made as ``record`` says may not stand for ``key`` (the image file at ``path``),
    in words for the user; None when it may be reused."""
    if record is None:
        return "no record of how the kept result was made"
    old = record["key"]
    new = asdict(key)
    if old.get("image") != key.image:
        return f"the kept result is another image's ({old.get('image')!r})"
    if old.get("format") != key.format or old.get("pointnuc") != key.pointnuc:
        return f"made by pointnuc {old.get('pointnuc')} (now {key.pointnuc})"
    if old.get("model") != key.model:
        return "the model changed"
    if old.get("pixel_size_um") != key.pixel_size_um:
        was = old.get("pixel_size_um")
        was_txt = f"{was:g}" if isinstance(was, (int, float)) else str(was)
        return f"pixel size changed {was_txt} -> {key.pixel_size_um:g} µm/px"
    if old.get("within") != key.within:
        return "the --within area changed"
    if old.get("tta") != key.tta:
        return "--tta changed"
    if old.get("min_area_um2") != key.min_area_um2:
        return f"--min-area changed {old.get('min_area_um2')} -> {key.min_area_um2:g} µm²"
    if any(old.get(k) != new[k] for k in ("width", "height", "file_size", "file_sample")):
        return "the image file changed"
    file_info = record.get("file") or {}
    if file_info.get("mtime_ns") != path.stat().st_mtime_ns and file_info.get("sha1") != file_digest(path):
        return "the image file changed"
    if any(old.get(k) != v for k, v in new.items()):  # a field a later pointnuc added
        return "the kept result was made differently"
    return None
