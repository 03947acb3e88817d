"""``pointnuc segment``: every nucleus of the project's images, back into QuPath."""

from __future__ import annotations

from pathlib import Path

import click

from pointnuc.cli.options import device_option, pixel_size_option, project_argument


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
@click.option("--redo", is_flag=True, help="Segment again images that already have a result from this model.")
@click.option("--dry-run", is_flag=True, help="Only report what would be done.")
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs).")
def segment_cmd(project: Path, model_dir: Path | None, images: tuple[str, ...], within: str | None, object_type: str,
                cell_expansion: float | None, class_name: str, pixel_size: float | None, device: str,
                batch_size: int | None, shard: str | None, tta: bool, merge: bool, redo: bool, dry_run: bool,
                no_progress: bool) -> None:
    """Segment every nucleus in PROJECT's images and write them back for QuPath.

    Objects pointnuc wrote before (in the same area) are replaced; your own annotations
    are never touched, and a backup is kept. An interrupted run continues with the
    images not yet done when you run the same command again.

    \b
    QuPath project: close it in QuPath first (QuPath would save over the new objects),
    then reopen it to review the nuclei. Folder of images: the nuclei go to
    pointnuc-geojson/NAME.geojson; drag that file onto the image in QuPath.
    """
    from pointnuc.errors import InputError
    from pointnuc.io.base import CELL_EXPANSION_UM, open_project
    from pointnuc.pipeline import merge_results, newest_model_dir, plan_segmentation, segment_project

    if cell_expansion is not None and object_type != "cell":
        raise InputError("--cell-expansion sets how far cells reach; add --objects cell, or leave it out for detections")
    expansion = CELL_EXPANSION_UM if cell_expansion is None else cell_expansion
    proj = open_project(project, pixel_size_um=pixel_size)
    model_dir = model_dir or newest_model_dir(proj)
    from pointnuc.models.bundle import load_info

    info = load_info(model_dir)
    shard_kn = _parse_shard(shard)
    if merge:
        s = merge_results(proj, model_dir, object_type=object_type, class_name=class_name, within_class=within, tta=tta,
                          cell_expansion_um=expansion)
        click.echo(f"Merged {sum(s.nuclei.values())} nuclei from {len(s.nuclei)} image(s) into {proj.root}")
        for p in s.written:
            click.echo(f"  wrote {p}")
        return
    plans = plan_segmentation(proj, model_dir, image_names=images, within_class=within, shard=shard_kn, redo=redo,
                              tta=tta)
    if dry_run:
        click.echo(f"Model {model_dir} (works at {info.pixel_size_um:g} µm/px)")
        for p in plans:
            im = p.image
            px = pixel_size or im.pixel_size_um
            what = "skip (done)" if p.done else "segment"
            area = "whole image" if p.region is None else f"within {within} ({p.region.area:.0f} px²)"
            px_txt = f"{px:g} µm/px" if px else "NO PIXEL SIZE (pass --pixel-size)"
            click.echo(f"  {what:12s} {im.name}  {im.width}x{im.height} px, {px_txt}, {area}")
        click.echo(f"{sum(not p.done for p in plans)} image(s) to segment, {sum(p.done for p in plans)} already done.")
        return
    s = segment_project(proj, model_dir, image_names=images, within_class=within, device=device,
                        pixel_size_um=pixel_size, object_type=object_type, class_name=class_name, shard=shard_kn,
                        redo=redo, batch_size=batch_size, progress=not no_progress, tta=tta, cell_expansion_um=expansion)
    click.echo(f"Model: {model_dir}")
    for name, n in s.nuclei.items():
        t = s.seconds.get(name)
        click.echo(f"  {name}: {n} nuclei" + (f" in {t:.1f} s" if t is not None else " (done earlier)"))
    click.echo(f"Per-image results: {s.results_dir}")
    for p in s.written:
        click.echo(f"Wrote {p}")
    if shard_kn:
        click.echo(f"Shard {shard} done; when all shards are done run: "
                   f"pointnuc segment {project} --model {model_dir} --merge{' --tta' if tta else ''}")
    elif s.written and getattr(proj, "kind", "") == "qupath":
        click.echo("In QuPath: reopen the project to review the nuclei.")
    elif s.written:
        click.echo("In QuPath: open the image and drag its file above onto it (or File > Import objects from file).")
    if s.failed:
        for name, why in s.failed.items():
            click.echo(f"pointnuc: error: {name}: {why}", err=True)
        raise SystemExit(1)
