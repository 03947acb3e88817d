"""``pointnuc evaluate``: score pointnuc's output against ground-truth label images."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("evaluate", short_help="Score pointnuc's results against ground-truth label images.")
@click.argument("predictions", type=click.Path(path_type=Path))
@click.argument("truth", type=click.Path(path_type=Path))
@click.option("--radius", "radius_px", type=click.FloatRange(min=0, min_open=True), default=11.0, show_default=True,
              help="Detection match radius in pixels (paper: 11 at 40x, 8 at 20x).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def evaluate_cmd(predictions: Path, truth: Path, radius_px: float, as_json: bool) -> None:
    """Score PREDICTIONS (a pointnuc GeoJSON file, or a folder of NAME.geojson) against
    TRUTH (an instance label image, or a folder of NAME_label.png / NAME.tif; 0 = background).

    Prints pixel accuracy and F1, object Dice and AJI (Kumar; and as the paper's code
    computed it) averaged over images, and detection P/R/F1/μd/σd pooled over images.
    """
    from pointnuc.evaluate import evaluate

    ev = evaluate(predictions, truth, radius_px=radius_px)
    if as_json:
        click.echo(json.dumps({"per_image": ev.per_image, "segmentation": ev.segmentation, "detection": ev.detection}, indent=1))
        return
    click.echo(f"{'image':36s} {'n_true':>6s} {'n_pred':>6s} {'Acc':>6s} {'F1':>6s} {'Dice':>6s} {'AJI':>6s}")
    for name, s in ev.per_image.items():
        click.echo(f"{name[:36]:36s} {s['n_true']:6.0f} {s['n_pred']:6.0f} {s['acc']:6.4f} {s['F1']:6.4f} "
                   f"{s['dice_obj']:6.4f} {s['aji']:6.4f}")
    m = ev.segmentation
    click.echo(f"{'mean':36s} {'':6s} {'':6s} {m['acc']:6.4f} {m['F1']:6.4f} {m['dice_obj']:6.4f} {m['aji']:6.4f}"
               f"   (AJI as the paper's code: {m['aji_authors']:.4f})")
    d = ev.detection
    click.echo(f"detection (pooled, r={radius_px:g} px): P {d['P']:.4f} R {d['R']:.4f} F1 {d['F1']:.4f} "
               f"mu_d {d['mu_d']:.2f} sigma_d {d['sigma_d']:.2f}")
