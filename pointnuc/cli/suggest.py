"""``pointnuc suggest``: write the places where one answer helps the model most, as points to answer."""

from __future__ import annotations

from pathlib import Path

import click

from pointnuc.cli.options import (
    background_class_option,
    device_option,
    pixel_size_option,
    point_class_option,
    project_argument,
)


@click.command("suggest", short_help="Mark the places where one answer helps the model most.")
@project_argument
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model folder [default: the newest in PROJECT_FOLDER/pointnuc-models].")
@click.option("--n", "n", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many places to mark, spread over the images.")
@click.option("--class", "class_name", default="pointnuc suggestion", show_default=True,
              help="QuPath class of the suggestion points.")
@background_class_option
@point_class_option
@pixel_size_option
@device_option
def suggest_cmd(project: Path, model_dir: Path | None, n: int, class_name: str, background_class: str,
                point_class: str, pixel_size: float | None, device: str) -> None:
    """Run the model on PROJECT's images and mark the N places where it is least sure (detection
    probability near its threshold, flips that disagree, detector and segmenter that disagree),
    away from your marks, as point annotations of class "pointnuc suggestion".

    Answer each one in QuPath: reclassify the point to Nucleus (a nucleus is there) or to
    Background (none is), or delete the pointnuc detection it sits on; then
    `pointnuc train PROJECT --from MODEL`. A re-run replaces the unanswered suggestions only;
    `pointnuc inspect` counts the answered ones.
    """
    from pointnuc.io import open_project
    from pointnuc.pipeline import newest_model_dir
    from pointnuc.suggest import suggest_project

    proj = open_project(project, pixel_size_um=pixel_size)
    model_dir = model_dir or newest_model_dir(proj)
    summary = suggest_project(proj, model_dir, n=n, class_name=class_name, point_class=point_class,
                              background_class=background_class, device=device, pixel_size_um=pixel_size)
    per: dict[str, int] = {}
    for s in summary.suggestions:
        per[s.image] = per.get(s.image, 0) + 1
    click.echo(f"Marked {len(summary.suggestions)} place(s) as {class_name!r} on {len(per)} image(s) "
               f"({', '.join(f'{k}: {v}' for k, v in per.items()) or 'none'}).")
    for name, why in summary.skipped.items():
        click.echo(f"Not looked at: {name} ({why}).")
    click.echo(f"Record: {summary.record}\nAnswer them in QuPath (reclassify to {point_class} or {background_class}), "
               f"then: pointnuc train {project} --from {model_dir}")
