"""``pointnuc segment``: every nucleus of the project's images, back into QuPath."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from pointnuc.cli.options import device_option, pixel_size_option, project_argument
from pointnuc.config import MIN_NUCLEUS_AREA_UM2

if TYPE_CHECKING:
    from pointnuc.pipeline import SegmentSummary


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        k, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter("use K/N, e.g. 2/8", param_hint="--shard") from None
    return k, n


@click.command("segment", short_help="Segment every nucleus and write the outlines back for QuPath.")
@project_argument
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model folder from `pointnuc train` [default: the newest model of this project].")
@click.option("--image", "images", multiple=True, metavar="NAME", help="Only this image (repeatable).")
@click.option("--within", "within", default=None, metavar="CLASS",
              help="Only inside annotations of this QuPath class (e.g. a tumour region you drew).")
@click.option("--objects", "object_type", type=click.Choice(["detection", "cell"]), default="detection",
              show_default=True, help="Write nuclei as QuPath detections, or as cells with a nucleus geometry.")
@click.option("--cell-expansion", "cell_expansion", type=click.FloatRange(min=0.0, max=50.0), default=None, metavar="UM",
              help="With --objects cell: how far each cell reaches beyond its nucleus, in µm, limited by its "
                   "neighbours (as QuPath's 'Cell expansion') [default: 2].")
@click.option("--class", "class_name", default="Nucleus", show_default=True, help="QuPath class of the written objects.")
@click.option("--min-area", "min_area", type=click.FloatRange(min=0.0), default=MIN_NUCLEUS_AREA_UM2, show_default=True,
              metavar="UM2",
              help="Write no nucleus smaller than this, in µm² (0: keep every object). The default drops fragments "
                   "such as bits of stroma: on MoNuSeg test images it raised detection precision from .83 to .87 at "
                   "no cost in AJI; 10 µm² already loses real small nuclei at 40x. Every image needs a pixel size "
                   "(the file's or --pixel-size), so the minimum is always in µm².")
@pixel_size_option
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Tiles per network batch [default: by device].")
@click.option("--tta", is_flag=True,
              help="Average the network over the four flips of each tile: slightly better outlines (MoNuSeg test "
                   "images: AJI +.002 to +.005) for 4x the network time. Its results are kept apart from those without it.")
@click.option("--shard", default=None, metavar="K/N",
              help="Process only the K-th of N equal shares of the images (cluster job arrays); results are kept "
              "per image and written into the project by a final `pointnuc segment PROJECT --merge`.")
@click.option("--merge", is_flag=True,
              help="Write all kept per-image results (e.g. from --shard runs; add --tta if they ran with it) into the project.")
@click.option("--redo", is_flag=True, help="Segment again images that already have a current result from this model.")
@click.option("--dry-run", is_flag=True,
              help="Only say what the run would do with each image (segment; segment again, and why; write its kept "
                   "result) and change nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs).")
def segment_cmd(project: Path, model_dir: Path | None, images: tuple[str, ...], within: str | None, object_type: str,
                cell_expansion: float | None, class_name: str, min_area: float, pixel_size: float | None, device: str,
                batch_size: int | None, shard: str | None, tta: bool, merge: bool, redo: bool, dry_run: bool,
                no_progress: bool) -> None:
    """Segment every nucleus in PROJECT's images and write them back for QuPath.

    Objects pointnuc wrote before (in the same area) are replaced; your own annotations
    are never touched, and a backup is kept. An interrupted run continues with the
    images not yet done when you run the same command again. A kept result is reused
    only when it was made with the same model, image, pixel size, area, --tta and --min-area
    (--objects, --cell-expansion and --class only change how it is written); otherwise
    the image is segmented again and the summary says why. One run at a time writes
    into a project; a second is refused.

    \b
    QuPath project: close it in QuPath first (QuPath would save over the new objects),
    then reopen it to review the nuclei. Folder of images: the nuclei go to
    pointnuc-geojson/NAME.geojson; drag that file onto the image in QuPath.
    """
    from pointnuc.errors import InputError
    from pointnuc.io import WriteOptions, open_project
    from pointnuc.io.base import CELL_EXPANSION_UM
    from pointnuc.pipeline import merge_results, newest_model_dir, plan_segmentation, segment_project

    if cell_expansion is not None and object_type != "cell":
        raise InputError("--cell-expansion sets how far cells reach; add --objects cell, or leave it out for detections")
    write_options = WriteOptions(object_type=object_type, class_name=class_name,
                                 cell_expansion_um=CELL_EXPANSION_UM if cell_expansion is None else cell_expansion)
    proj = open_project(project, pixel_size_um=pixel_size)
    model_dir = model_dir or newest_model_dir(proj)
    from pointnuc.models.bundle import load_info

    info = load_info(model_dir)
    shard_kn = _parse_shard(shard)
    if merge:
        s = merge_results(proj, model_dir, write_options=write_options, within_class=within, tta=tta,
                          min_area_um2=min_area)
        click.echo(f"Merged {sum(s.nuclei.values())} nuclei from {len(s.nuclei)} image(s) into {proj.root}")
        for path in s.written:
            click.echo(f"  wrote {path}")
        _fail_if_any(s.failed)
        return
    if dry_run:
        # the very plan the run would follow (segment_project plans with the same call): what it does, and why
        plans = plan_segmentation(proj, model_dir, image_names=images, within_class=within, shard=shard_kn, redo=redo,
                                  tta=tta, pixel_size_um=pixel_size, min_area_um2=min_area)
        writes = shard_kn is None
        click.echo(f"Model {model_dir} (works at {info.pixel_size_um:g} µm/px)")
        for p in plans:
            im = p.image
            area = "whole image" if p.region is None else f"within {within} ({p.region.area:.0f} px²)"
            px_txt = f"{p.pixel_size_um:g} µm/px" if p.pixel_size_um else "NO PIXEL SIZE (pass --pixel-size)"
            kept = f", {p.n_kept} nuclei" if p.reuse and p.n_kept is not None else ""
            click.echo(f"  {p.action(writes)}{kept}: {im.name}  {im.width}x{im.height} px, {px_txt}, {area}")
        n_seg = sum(not p.reuse and not p.error for p in plans)
        n_kept = sum(p.reuse for p in plans)
        kept_txt = (f"{n_kept} written from kept results" if writes else f"{n_kept} with a current kept result (nothing to do)")
        n_bad = sum(bool(p.error) for p in plans)
        bad_txt = f", {n_bad} that cannot be segmented" if n_bad else ""
        click.echo(f"{n_seg} image(s) to segment ({sum(bool(p.why) for p in plans)} of them again), {kept_txt}{bad_txt}.")
        return
    s = segment_project(proj, model_dir, image_names=images, within_class=within, device=device,
                        pixel_size_um=pixel_size, write_options=write_options, shard=shard_kn,
                        redo=redo, batch_size=batch_size, progress=not no_progress, tta=tta, min_area_um2=min_area)
    click.echo(f"Model: {model_dir}")
    for name, n in s.nuclei.items():
        click.echo(f"  {name}: {n} nuclei{_how(s, name, within is not None)}")
    n_done = len(s.seconds)
    if n_done:
        at_once = f", {s.images_at_once} at a time" if s.images_at_once > 1 else ""
        if s.workers_seconds:
            at_once += f" in worker processes started in {s.workers_seconds:.1f} s before"
        click.echo(f"Segmented {n_done} image(s) in {s.wall_seconds:.1f} s ({s.wall_seconds / n_done:.2f} s an image, "
                   f"writing included{at_once})")
    click.echo(f"Per-image results: {s.results_dir}")
    for path in s.written:
        click.echo(f"Wrote {path}")
    if shard_kn:
        click.echo(f"Shard {shard} done; when all shards are done run: "
                   f"pointnuc segment {project} --model {model_dir} --merge{' --tta' if tta else ''}")
    elif s.written and proj.kind == "qupath":
        click.echo("In QuPath: reopen the project to review the nuclei.")
    elif s.written:
        click.echo("In QuPath: open the image and drag its file above onto it (or File > Import objects from file).")
    _fail_if_any(s.failed)


def _how(s: SegmentSummary, name: str, within: bool) -> str:
    """How an image's nuclei came about, for its summary line."""
    t = s.seconds.get(name)
    if t is None:
        return " (done earlier)"
    out = f" in {t:.1f} s"
    if name in s.recomputed:
        out += f" (recomputed: {s.recomputed[name]})"
    looked, total = s.tiles.get(name, (1, 1))
    if looked == 0:
        out += "; no tissue found: nothing was looked at"
    elif looked < total:
        rest = "glass or outside the area" if within else "glass"
        out += f" ({looked} of {total} tiles looked at; the rest is {rest})"
    return out


def _fail_if_any(failed: dict[str, str]) -> None:
    if failed:
        for name, why in failed.items():
            click.echo(f"pointnuc: error: {name}: {why}", err=True)
        raise SystemExit(1)
