"""Options shared by several subcommands."""

from __future__ import annotations

from pathlib import Path

import click

project_argument = click.argument(
    "project", type=click.Path(path_type=Path, exists=False, file_okay=True, dir_okay=True)
)
point_class_option = click.option(
    "--point-class", default="Nucleus", show_default=True, help="QuPath class of the clicked nucleus points."
)
region_class_option = click.option(
    "--region-class",
    default=None,
    help='QuPath class of training-region annotations [default: "Region*"]. Where an image has '
    "none, the whole image (or windows around the points on a large slide) is used.",
)
background_class_option = click.option(
    "--background-class",
    default="Background",
    show_default=True,
    help="QuPath class of background marks: areas with no nucleus inside, points where there is none.",
)
pixel_size_option = click.option(
    "--pixel-size",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Pixel size in µm/px, for images that do not carry one (overrides the file's).",
)
device_option = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to run the networks; auto = CUDA GPU when present.",
)
