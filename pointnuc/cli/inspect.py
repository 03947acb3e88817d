"""``pointnuc inspect``: what pointnuc sees in a project, before training on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from pointnuc.cli.options import (
    background_class_option,
    pixel_size_option,
    point_class_option,
    project_argument,
    region_class_option,
)

#: the kinds of marks ``inspect`` counts, as :meth:`pointnuc.io.base.ImageAnnotations.mark_counts` names them
MARK_KINDS = ("points", "outlines", "background_areas", "background_points", "deleted_detections")


def inspect_project(
    project_path: Path,
    *,
    point_class: str = "Nucleus",
    region_class: str | None = None,
    pixel_size_um: float | None = None,
    background_class: str | None = "Background",
) -> dict[str, Any]:
    """Per image: name, size, pixel size, points per class, training regions, pointnuc objects,
    ``marks``: each kind of mark pointnuc learns from (:data:`MARK_KINDS`), and ``problem``: why
    its pixels cannot be used (:func:`image_problem`), or None. ``total_marks`` sums the marks."""
    from pointnuc.io import open_project

    project = open_project(project_path, pixel_size_um=pixel_size_um)
    images: list[dict[str, Any]] = []
    deleted_xy: dict[str, Any] = {}  # centres of deleted pointnuc detections: a suggestion answered by deleting
    for image in project.images():
        ann = project.annotations(image, point_class=point_class, region_class=region_class,
                                  background_class=background_class)
        problem = image_problem(image.path)
        if ann.deleted:
            deleted_xy[image.name] = [(g.centroid.x, g.centroid.y) for g in ann.deleted]
        points = {point_class: len(ann.points_xy), **{k: int(v) for k, v in ann.other_point_counts.items()}}
        images.append({
            "name": image.name,
            "path": str(image.path),
            "width": image.width,
            "height": image.height,
            "pixel_size_um": image.pixel_size_um,
            "points": points,
            "n_regions": len(ann.regions),
            "n_pointnuc_objects": ann.n_pointnuc_objects,
            "marks": ann.mark_counts(),
            "problem": problem,
        })
    from pointnuc.suggest import project_answers

    answers = project_answers(project, deleted_xy)  # the latest `pointnuc suggest`: answered and unanswered per image
    for im in images:
        im["suggestions"] = None if answers is None else dict(zip(("answered", "unanswered"), answers.get(im["name"], (0, 0))))
    return {
        "project": str(project_path),
        "kind": project.kind,
        "point_class": point_class,
        "region_class": region_class if region_class is not None else "Region*",
        "background_class": background_class,
        "images": images,
        "total_points": sum(im["points"][point_class] for im in images),
        "total_marks": {k: sum(im["marks"][k] for im in images) for k in MARK_KINDS},
    }


def image_problem(path: Path) -> str | None:
    """Why an image file cannot be used, from a cheap read check, or None.

    A missing or unreadable file, an image that is not RGB brightfield, a TIFF whose pixel
    data run past its end or whose last tile/strip does not decode (a truncated copy), an
    image Pillow cannot decode (:meth:`pointnuc.io.slide.Slide.problem`).
    """
    from pointnuc.errors import ImageReadError
    from pointnuc.io.slide import open_slide

    try:
        with open_slide(path) as slide:
            return slide.problem()
    except ImageReadError as err:
        return str(err)


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    pc = report["point_class"]
    rows = [("image", "size", "µm/px", f"{pc} pts", "other pts", "regions", "pointnuc objs", "pixels")]
    for im in report["images"]:
        other = ", ".join(f"{k}: {v}" for k, v in im["points"].items() if k != pc) or "-"
        px = f"{im['pixel_size_um']:.4g}" if im["pixel_size_um"] is not None else "unknown"
        rows.append((im["name"], f"{im['width']}x{im['height']}", px, str(im["points"][pc]), other,
                     str(im["n_regions"]), str(im["n_pointnuc_objects"]),
                     "ok" if im.get("problem") is None else f"UNUSABLE: {im['problem']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"{len(report['images'])} image(s), {report['total_points']} {pc!r} points in all "
                 f"({report['kind']}; regions: class {report['region_class']!r})")
    lines.append(format_marks(report))
    asked = [im["suggestions"] for im in report["images"] if im.get("suggestions") is not None]
    if asked:
        a, u = sum(s["answered"] for s in asked), sum(s["unanswered"] for s in asked)
        per = ", ".join(f"{im['name']}: {im['suggestions']['answered']}/{sum(im['suggestions'].values())}"
                        for im in report["images"] if im.get("suggestions") and sum(im["suggestions"].values()))
        lines.append(f"suggestions (pointnuc suggest): {a} answered, {u} unanswered ({per})")
    return "\n".join(lines)


def format_marks(report: dict[str, Any]) -> str:
    """The marks pointnuc learns from, per image and in all, as a table."""
    bg = report.get("background_class") or "-"
    head = ("marks", "points", "outlines", f"{bg} areas", f"{bg} points", "deleted detections")
    rows = [head] + [(im["name"], *(str(im["marks"][k]) for k in MARK_KINDS)) for im in report["images"]]
    rows.append(("all", *(str(report["total_marks"][k]) for k in MARK_KINDS)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@click.command("inspect", short_help="Show the images, pixel sizes, points and regions pointnuc finds.")
@project_argument
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
@point_class_option
@region_class_option
@background_class_option
@pixel_size_option
def inspect_cmd(project: Path, as_json: bool, point_class: str, region_class: str | None,
                pixel_size: float | None, background_class: str = "Background") -> None:
    """Show what pointnuc reads from PROJECT: per image its size, pixel size, points per
    class, training regions, the objects an earlier pointnuc run wrote, the marks it learns
    from (points, outlines, background areas and points, deleted detections), and whether its
    pixels can be used (a cheap read check: truncated or damaged files, images that are
    not RGB brightfield). Exits with status 2 when an image cannot be used.

    PROJECT is a QuPath project (.qpproj or its folder) or a folder of images with
    QuPath GeoJSON exports beside them (NAME.tif + NAME.geojson).
    """
    from pointnuc.errors import ImageReadError

    report = inspect_project(project, point_class=point_class, region_class=region_class, pixel_size_um=pixel_size,
                             background_class=background_class)
    click.echo(json.dumps(report, indent=1, ensure_ascii=False) if as_json else format_report(report))
    bad = [im for im in report["images"] if im["problem"] is not None]
    if bad:  # the report is printed whole, then the exit status says that something cannot be used
        raise ImageReadError(
            f"{len(bad)} of {len(report['images'])} image(s) cannot be used: {bad[0]['name']} ({bad[0]['problem']})"
            + (f" and {len(bad) - 1} more, see the report" if len(bad) > 1 else "")
        )
