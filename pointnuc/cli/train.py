"""``pointnuc train``: stage 1 (detector) then stage 2 (segmenter) from the project's points."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from pointnuc.cli.options import (
    background_class_option,
    device_option,
    pixel_size_option,
    point_class_option,
    project_argument,
    region_class_option,
)


def _parse_set(values: tuple[str, ...]) -> dict[str, object]:
    import json

    out: dict[str, object] = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


@click.command("train", short_help="Train a detector, then a segmenter, from the clicked points.")
@project_argument
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Model folder to create [default: PROJECT_FOLDER/pointnuc-models/DATE-PROFILE].")
@click.option("--profile", type=click.Choice(["auto", "paper", "quick", "cpu", "example", "tiny"]), default="auto", show_default=True,
              help="Training schedule. paper: the paper's (a GPU: ~9 min for 12 images on an H200; hours on a CPU); quick: a 2-core CPU in under an hour; "
              "cpu: quick's schedule with a compact network (several times faster to segment on a CPU, Kumar AJI about .03 lower on MoNuSeg); example: the README example; tiny: seconds, for trying the commands. auto: paper with a CUDA GPU, quick otherwise.")
@click.option("--variant", type=click.Choice(["GM", "ext-GM", "ST-nu", "ST-bg"]), default=None,
              help="Stage-1 label variant (paper Table I) [default: ST-bg].")
@point_class_option
@region_class_option
@background_class_option
@pixel_size_option
@device_option
@click.option("--weights", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="ImageNet weights file for the ResNet encoder [default: torchvision's file in torch's cache, "
                   "downloaded there once (45-85 MB) when missing; random initialisation when that fails].")
@click.option("--offline", is_flag=True,
              help="Never download the encoder's ImageNet weights: use --weights or torch's cache, else start at random.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (sampling, initialisation, order).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Change any configuration field, e.g. --set detection.epochs=40 --set data.pixel_size_um=0.5.")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted run in --out from its last checkpoint (give the same options as it had).")
@click.option("--overwrite", is_flag=True, help="Replace the pointnuc model folder at --out (never a folder of other files).")
@click.option("--keep-checkpoints", is_flag=True,
              help="Keep the model folder's checkpoints/ when training finishes (removed by default: most of its size).")
@click.option("--from", "parent", type=click.Path(path_type=Path), default=None, metavar="MODEL",
              help="A correction round: start both stages from MODEL (its weights, colour reference and threshold) "
                   "and train a quarter of its schedule on all the current marks; --profile defaults to MODEL's.")
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs).")
def train_cmd(project: Path, out: Path | None, profile: str, variant: str | None, point_class: str,
              region_class: str | None, pixel_size: float | None, device: str, weights: Path | None, offline: bool, seed: int,
              settings: tuple[str, ...], resume: bool, overwrite: bool, keep_checkpoints: bool, parent: Path | None,
              no_progress: bool, background_class: str = "Background") -> None:
    """Train a nuclei detector, then a segmenter, from the points clicked in PROJECT.

    Besides Nucleus points it learns from every mark you make: Nucleus outlines (area
    annotations), Background areas and points (no nucleus there), and pointnuc detections
    you deleted since the last `pointnuc segment` (README: "What pointnuc learns from").

    PROJECT is a QuPath project (.qpproj or its folder) or a folder of images with
    QuPath GeoJSON exports. The model is saved as a self-describing folder that
    `pointnuc segment` uses (by default the newest one of the project).

    One point in five of each image is held back (--set data.holdout_fraction=0.2):
    never trained on, it chooses the detection threshold and the segmenter's
    checkpoint, so no outlines are needed.

    Interrupted (Ctrl-C), it prints the command that continues where it stopped:
    the same options with --out MODEL_FOLDER --resume.

    With --from MODEL (after answering `pointnuc suggest`'s questions or correcting
    its results) it is a correction round: a quarter of the epochs, starting from MODEL,
    which the new model's pointnuc-model.json names (its digest) as its parent.
    """
    from pointnuc.cli.stop import note_model_dir
    from pointnuc.config import profile_config
    from pointnuc.errors import InputError
    from pointnuc.io import open_project
    from pointnuc.pipeline import default_model_dir, train_project
    from pointnuc.train.correction import correction_config, load_parent
    from pointnuc.train.fit import resolve_device

    parent_model = load_parent(parent) if parent is not None else None
    if profile == "auto" and parent_model is None:  # with --from, "auto" is the parent's (its base configuration)
        profile = "paper" if resolve_device(device).type == "cuda" else "quick"
    overrides = _parse_set(settings)
    if variant:
        overrides["detection.variant"] = variant
    overrides["seed"] = seed
    try:
        if parent_model is not None:
            base = profile_config(profile) if profile != "auto" else None
            config = correction_config(parent_model, base, overrides)
        else:
            config = profile_config(profile, **overrides)
    except (TypeError, ValueError) as err:
        raise InputError(f"bad --set value: {err}") from None
    proj = open_project(project, pixel_size_um=pixel_size)
    if resume and out is None:
        raise InputError("--resume needs --out: the model folder of the interrupted run")
    out = out or default_model_dir(proj, config)
    options = {**click.get_current_context().params, "profile": profile}  # "auto" as it was resolved
    note_model_dir(out, resume_command(options, out))  # what the interrupt message tells the user to run
    summary = train_project(proj, out, config, device=device, point_class=point_class, region_class=region_class,
                            pixel_size_um=pixel_size, weights=weights, offline=offline, resume=resume, overwrite=overwrite,
                            progress=not no_progress, keep_checkpoints=keep_checkpoints, parent=parent_model,
                            background_class=background_class)
    minutes = summary.seconds / 60
    click.echo(
        (f"Correction round from {parent}.\n" if parent is not None else "")
        + f"Trained on {summary.n_images} image(s) from {summary.n_points} points; stage 1 found "
        f"{summary.n_detected} nuclei on the training images ({minutes:.1f} min on {summary.device}).\n"
        f"{summary.held_back_line}\n"
        f"Model: {summary.model_dir}\n"
        f"Report: {summary.model_dir / 'report'}\n"
        f"Next: pointnuc segment {project} --model {summary.model_dir}"
    )


def resume_command(options: Mapping[str, Any], model_dir: Path) -> str:
    """The shell command that continues an interrupted ``pointnuc train`` in ``model_dir``.

    ``options``: the command's parameters as click parsed them (``ctx.params``; give
    ``profile`` as it was resolved, since ``auto`` may resolve otherwise on another
    machine). Returns the same project and options, those left at their defaults left
    out, with ``--out model_dir --resume`` and without ``--overwrite``.
    """
    words = ["pointnuc", "train", str(options["project"]), "--out", str(model_dir)]
    for param in train_cmd.params:
        name = param.name
        if not isinstance(param, click.Option) or name in ("project", "out", "resume", "overwrite") or name not in options:
            continue
        value, flag = options[name], param.opts[0]
        if param.is_flag:
            if value:
                words.append(flag)
        elif param.multiple:
            for v in value or ():
                words += [flag, str(v)]
        elif value is not None and (value != param.default or name == "profile"):
            words += [flag, str(value)]
    words.append("--resume")
    return shlex.join(words)
