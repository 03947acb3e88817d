"""``pointnuc segment --merge``: the kept per-image results of a model (e.g. from ``--shard`` runs) written
into the project, as one write."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from shapely.geometry.base import BaseGeometry

from pointnuc.config import MIN_NUCLEUS_AREA_UM2
from pointnuc.errors import InputError
from pointnuc.infer.project import SegmentSummary, plan_segmentation
from pointnuc.infer.results import results_dir
from pointnuc.io.base import DEFAULT_WRITE, NucleusObject, Project, WriteOptions


def merge_results(
    project: Project, model_dir: Path, *, write_options: WriteOptions = DEFAULT_WRITE,
    within_class: str | None = None, tta: bool = False, min_area_um2: float = MIN_NUCLEUS_AREA_UM2,
) -> SegmentSummary:
    """Write every current per-image result of ``model_dir`` (e.g. from --shard runs, with ``tta`` as they
    ran) into the project. Images without one, or whose kept result no longer fits (another pixel size, a
    changed image or model), are not written and are listed in ``summary.failed`` with the reason."""
    from pointnuc.io.geojson import read_nuclei
    from pointnuc.io.lock import project_lock

    with project_lock(project.root, "segment --merge"):
        plans = plan_segmentation(project, model_dir, within_class=within_class, tta=tta, min_area_um2=min_area_um2)
        out_dir = results_dir(project, model_dir, tta)
        summary = SegmentSummary(model_dir=Path(model_dir), results_dir=out_dir)
        batch: dict[str, Sequence[NucleusObject]] = {}
        within: dict[str, BaseGeometry | None] = {}
        for plan in plans:
            name = plan.image.name
            if not plan.reuse:
                summary.failed[name] = f"not merged: {plan.error or plan.why or 'no kept result'}"
                continue
            batch[name] = read_nuclei(plan.result)
            within[name] = plan.region
            summary.nuclei[name] = len(batch[name])
        if not batch:
            why = "; ".join(f"{n}: {w.removeprefix('not merged: ')}" for n, w in list(summary.failed.items())[:3])
            raise InputError(f"no current results to merge in {out_dir} ({why}); "
                             f"run `pointnuc segment --shard K/N{' --tta' if tta else ''}` first")
        summary.written = project.write_nuclei(batch, options=write_options, replace_within=within)
    return summary
