"""Segmenting a project: which images to do (:func:`plan_segmentation`), each one segmented and kept
(:func:`segment_project`), ``--shard``; :mod:`pointnuc.infer.merge` writes kept results into the project."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shapely.geometry.base import BaseGeometry

from pointnuc.config import MIN_NUCLEUS_AREA_UM2
from pointnuc.errors import InputError
from pointnuc.infer.results import (
    ResultKey,
    file_digest,
    file_sample,
    model_digest,
    read_record,
    record_file,
    region_digest,
    result_file,
    results_dir,
    reuse_problem,
)
from pointnuc.io.base import DEFAULT_WRITE, ImageRef, NucleusObject, Project, WriteOptions
from pointnuc.models.layout import MODEL_JSON

if TYPE_CHECKING:
    import torch

    from pointnuc.infer.images import ImageWorkers
    from pointnuc.infer.wsi import SlideResult
    from pointnuc.models.bundle import ModelInfo

log = logging.getLogger(__name__)

#: an image is enlarged at most this much, or shrunk at most this much, to the model's pixel size; beyond
#: that its nuclei are a pixel or two wide (or the tiles are counted in thousands): a typo'd pixel size
MAX_ENLARGEMENT = 4.0
MAX_REDUCTION = 16.0


@dataclass
class ImagePlan:
    """One image ``pointnuc segment`` will process, and what it will do with it."""

    image: ImageRef
    region: BaseGeometry | None  #: full-res shapely geometry to segment within, None = whole image
    result: Path  #: where its result is kept
    pixel_size_um: float | None  #: override or the image's; None: the run stops before any work
    key: ResultKey | None  #: what its result depends on (None without a pixel size)
    reuse: bool = False  #: the kept result was made with this very key: no need to segment
    why: str = ""  #: why a kept result is not reused (recomputed), "" when there is none
    n_kept: int | None = None  #: nuclei in the kept result that is reused
    error: str = ""  #: why this image cannot be segmented (its file's pixel size is out of proportion)

    @property
    def done(self) -> bool:
        """A current result is kept (it is reused, not segmented again)."""
        return self.reuse

    def action(self, write: bool) -> str:
        """What the run does with this image, in words (the dry run prints it)."""
        if self.error:
            return f"fail ({self.error})"
        if self.reuse:
            return "write kept result" if write else "nothing (kept result is current)"
        return f"recompute ({self.why})" if self.why else "segment"


@dataclass
class SegmentSummary:
    """What ``pointnuc segment`` reports at the end."""

    model_dir: Path
    results_dir: Path
    nuclei: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  #: kept results reused
    recomputed: dict[str, str] = field(default_factory=dict)  #: image -> why its kept result was not reused
    tiles: dict[str, tuple[int, int]] = field(default_factory=dict)  #: image -> (tiles looked at, tiles of the area)
    failed: dict[str, str] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    images_at_once: int = 1  #: images segmented side by side (:func:`images_at_once`)
    wall_seconds: float = 0.0  #: the whole loop over the images: segmenting, keeping and writing (not loading the model)
    workers_seconds: float = 0.0  #: starting the worker processes the images went to (0: none), before the loop


def shard_filter(names: Sequence[str], shard: tuple[int, int] | None) -> list[str]:
    """The image names shard K of N handles (1-based K), by position in project order."""
    if shard is None:
        return list(names)
    k, n = shard
    if not (n >= 1 and 1 <= k <= n):
        raise InputError(f"--shard {k}/{n}: need 1 <= K <= N")
    return [name for i, name in enumerate(names) if i % n == k - 1]


def _model_pixel_size(model_dir: Path) -> float | None:
    """The model's working pixel size from its description, None when it cannot be read (loading it says why)."""
    try:
        value = json.loads((Path(model_dir) / MODEL_JSON).read_text(encoding="utf-8")).get("pixel_size_um")
        return float(value) if value else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def scale_problem(image: ImageRef, px: float, model_px: float) -> str | None:
    """Why an image cannot be segmented at pixel size ``px`` by a model working at ``model_px``: it would be
    enlarged or shrunk out of all proportion (a typo'd or wrong pixel size); None when it can."""
    factor = px / model_px  # > 1: the image is enlarged
    if factor <= MAX_ENLARGEMENT and 1 / factor <= MAX_REDUCTION:
        return None
    w, h = round(image.width * factor), round(image.height * factor)
    how = f"enlarged {factor:.3g}x" if factor > 1 else f"shrunk {1 / factor:.3g}x"
    return (f"image {image.name!r} at {px:g} µm/px would be {how} to the model's {model_px:g} µm/px "
            f"({image.width} x {image.height} px become {w:,} x {h:,}); nuclei cannot be segmented at that scale: "
            "check the pixel size (--pixel-size; 0.25 for 40x, 0.5 for 20x)")


def plan_segmentation(
    project: Project,
    model_dir: Path,
    *,
    image_names: Sequence[str] = (),
    within_class: str | None = None,
    shard: tuple[int, int] | None = None,
    redo: bool = False,
    tta: bool = False,
    pixel_size_um: float | None = None,
    min_area_um2: float = MIN_NUCLEUS_AREA_UM2,
) -> list[ImagePlan]:
    """Which images (and areas) to segment, and for each whether its kept result is reused or why not.

    The one planning function of ``segment``, its ``--dry-run`` and ``--merge``. Unknown names,
    an empty --within class, and an implausible ``pixel_size_um`` (override), or one out of all
    proportion to the model's (:func:`scale_problem`), are errors; an image whose own pixel size
    is out of proportion gets ``error`` (the run fails it and goes on with the others).
    """
    from shapely.ops import unary_union

    from pointnuc.errors import PixelSizeError
    from pointnuc.io.slide import checked_pixel_size

    if pixel_size_um is not None:
        pixel_size_um = checked_pixel_size(pixel_size_um)
    images = project.images()
    by_name = {im.name: im for im in images}
    missing = [n for n in image_names if n not in by_name]
    if missing:
        raise InputError(f"no image named {missing[0]!r} in the project (see `pointnuc inspect`)")
    names = list(image_names) if image_names else [im.name for im in images]
    names = shard_filter(names, shard)
    out_dir = results_dir(project, model_dir, tta)
    digest = model_digest(model_dir)
    model_px = _model_pixel_size(model_dir)
    plans = []
    any_region = False
    for name in names:
        image = by_name[name]
        region = None
        if within_class:
            ann = project.annotations(image, region_class=within_class)
            if not ann.regions:
                continue
            region = unary_union(list(ann.regions))
            any_region = True
        px = pixel_size_um if pixel_size_um is not None else image.pixel_size_um
        plan = ImagePlan(image=image, region=region, result=result_file(out_dir, name, region),
                         pixel_size_um=None if px is None else float(px), key=None)
        problem = scale_problem(image, float(px), model_px) if px is not None and model_px else None
        if problem and pixel_size_um is not None:
            raise PixelSizeError(problem)  # the --pixel-size given is wrong for every image
        if problem:
            plan.error = problem
            plans.append(plan)
            continue
        if px is not None:
            try:
                size, _, sample = file_sample(image.path)
            except OSError:  # segmenting it reports the unreadable file
                size, sample = -1, ""
            plan.key = ResultKey(image=name, width=image.width, height=image.height, file_size=size,
                                 file_sample=sample, pixel_size_um=float(px), model=digest,
                                 within=region_digest(region), tta=tta, min_area_um2=float(min_area_um2))
        if plan.result.is_file():
            if redo:
                plan.why = "--redo"
            elif plan.key is None:
                plan.why = "no pixel size"
            else:
                record = read_record(plan.result)
                try:
                    problem = reuse_problem(record, plan.key, image.path)
                except OSError:
                    problem = "the image file cannot be read"
                if problem is None:
                    plan.reuse, plan.n_kept = True, (record or {}).get("nuclei")
                else:
                    plan.why = problem
        plans.append(plan)
    if within_class and not any_region:
        raise InputError(f"no {within_class!r} annotations in the selected images; draw one in QuPath or drop --within")
    return plans


def keep_result(plan: ImagePlan, nuclei: Sequence[NucleusObject], *, seconds: float, tiles: tuple[int, int],
                device: str) -> None:
    """Keep one image's nuclei and the record of how they were made (the record last: a result
    without one, e.g. after a crash between the two, is never reused)."""
    from pointnuc.fileio import write_text_atomic
    from pointnuc.geometry import object_area
    from pointnuc.io.geojson import write_nuclei_file

    assert plan.key is not None and plan.pixel_size_um is not None
    record_file(plan.result).unlink(missing_ok=True)
    # nuclei only, as detections, unmeasured: how they are written into the project, and QuPath's measurements of
    # what is written, are made on each write
    write_nuclei_file(plan.result, nuclei, pixel_size_um=plan.pixel_size_um,
                      clip_to=object_area(plan.image.width, plan.image.height, plan.region), measured=False)
    st = plan.image.path.stat()
    record = {
        "key": asdict(plan.key),
        "file": {"path": str(plan.image.path), "mtime_ns": st.st_mtime_ns, "sha1": file_digest(plan.image.path)},
        "nuclei": len(nuclei),
        "tiles": list(tiles),
        "seconds": round(seconds, 2),
        "device": device,
        "python": platform.python_version(),
        "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    write_text_atomic(record_file(plan.result), json.dumps(record, indent=1))


def segment_project(
    project: Project,
    model_dir: Path,
    *,
    image_names: Sequence[str] = (),
    within_class: str | None = None,
    device: str = "auto",
    pixel_size_um: float | None = None,
    write_options: WriteOptions = DEFAULT_WRITE,
    shard: tuple[int, int] | None = None,
    write: bool = True,
    redo: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    tta: bool = False,
    min_area_um2: float = MIN_NUCLEUS_AREA_UM2,
) -> SegmentSummary:
    """Segment the planned images; per-image results are kept so a re-run continues.

    A kept result is reused only when it was made with everything that changes it unchanged
    (:class:`ResultKey`); otherwise it is recomputed and ``summary.recomputed`` says why. With
    ``write`` (no shard), each image's nuclei go into the project as soon as it is done,
    replacing pointnuc's earlier objects in that area only, as ``write_options`` says (detections
    or cells, class, cell expansion). The project is locked for the
    run (:mod:`pointnuc.io.lock`): a second writer is refused; ``--shard`` runs share the lock.
    """
    from pointnuc.io.lock import project_lock

    with project_lock(project.root, "segment", shared=shard is not None):
        return _segment_locked(
            project, model_dir, image_names=image_names, within_class=within_class, device=device,
            pixel_size_um=pixel_size_um, write_options=write_options, shard=shard, write=write,
            redo=redo, batch_size=batch_size, progress=progress, tta=tta, min_area_um2=min_area_um2,
        )


def _segment_locked(
    project: Project, model_dir: Path, *, image_names: Sequence[str], within_class: str | None, device: str,
    pixel_size_um: float | None, write_options: WriteOptions, shard: tuple[int, int] | None, write: bool,
    redo: bool, batch_size: int | None, progress: bool, tta: bool, min_area_um2: float,
) -> SegmentSummary:
    from pointnuc.io.geojson import read_nuclei
    from pointnuc.io.slide import pixel_size_or_error

    plans = plan_segmentation(project, model_dir, image_names=image_names, within_class=within_class, shard=shard,
                              redo=redo, tta=tta, pixel_size_um=pixel_size_um, min_area_um2=min_area_um2)
    # every image's pixel size before any work, so a missing one stops the run with nothing half-done
    for p in plans:
        if not p.reuse and not p.error:
            pixel_size_or_error(p.image, pixel_size_um)
    out_dir = results_dir(project, model_dir, tta)
    summary = SegmentSummary(model_dir=Path(model_dir), results_dir=out_dir)
    for p in plans:
        if p.error:
            summary.failed[p.image.name] = p.error
            log.error("%s: %s", p.image.name, p.error)
    plans = [p for p in plans if not p.error]
    todo = [p for p in plans if not p.reuse]
    net: torch.nn.Module | None = None
    info: ModelInfo | None = None
    dev: torch.device | None = None
    workers: ImageWorkers | None = None
    if todo:
        import torch

        from pointnuc.infer.images import PROCESS_MIN_IMAGES, ImageWorkers, images_at_once
        from pointnuc.infer.polygons import preload
        from pointnuc.models.bundle import load_info, load_network
        from pointnuc.models.net import fuse_batchnorm
        from pointnuc.train.fit import resolve_device

        info = load_info(model_dir)
        dev = resolve_device(device)
        # loaded here also when worker processes segment: a damaged model is refused in one line, before any work
        net = load_network(model_dir, "segmenter", info)
        summary.images_at_once = n = images_at_once(todo, info, dev)
        if n > 1 and len(todo) >= PROCESS_MIN_IMAGES:
            net = None
            workers = ImageWorkers(model_dir, n, max(1, torch.get_num_threads() // n))
            summary.workers_seconds = workers.start_seconds
        else:
            net = fuse_batchnorm(net).to(dev)  # (this copy only segments)
            preload(info.config.segmentation.instance_method)  # (start-up, not the first image's time)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    done: Iterator[SlideResult | None] = iter(())
    if todo:
        assert info is not None and dev is not None
        from pointnuc.infer.images import segment_images

        done = segment_images(todo, net, info, dev, batch_size=batch_size, progress=progress, tta=tta,
                              summary=summary, min_area_um2=min_area_um2, workers=workers)
    try:
        for plan in plans:
            name = plan.image.name
            if plan.reuse:
                summary.skipped.append(name)
                nuclei = read_nuclei(plan.result)
            else:
                if plan.why:
                    log.info("%s: segmenting again: %s", name, plan.why)
                    summary.recomputed[name] = plan.why
                res = next(done)  # (the images to do, in the plans' order)
                if res is None:
                    continue
                nuclei = res.nuclei
            summary.nuclei[name] = len(nuclei)
            if write and shard is None:
                summary.written += project.write_nuclei(
                    {name: nuclei}, options=write_options, replace_within={name: plan.region},
                )
    finally:
        getattr(done, "close", lambda: None)()  # (stops the images still being segmented beside)
        if workers is not None:
            workers.close()
    summary.wall_seconds = time.perf_counter() - t0
    return summary
