"""What a minimum nucleus size does to pointnuc's output on MoNuSeg "MO" test images.

Reads ``pointnuc segment``'s GeoJSON results (e.g. of ``benchmarks/mo_project.py``'s test folder),
drops the objects under each size, and scores what is left against the label images, as
``pointnuc evaluate`` does: Kumar AJI, Dice_obj, pixel F1 (means over images) and detection
precision / recall / F1 (pooled, 11 px). A size filter after segmentation is exactly what a
minimum size in pointnuc would do, so no image is segmented again here.

    .venv/bin/python benchmarks/min_size.py /tmp/mo/test/pointnuc-geojson ../shared/data/monuseg/train \\
        --pixel-size 0.25 --sizes 0 5 10 15 20 25 30
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

import numpy as np
import shapely

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage1 import machine_line

from pointnuc.evaluate import evaluate
from pointnuc.io.geojson import (
    feature_to_object,
    read_features,
    write_features,
)


def filtered(src: Path, dest: Path, min_um2: float, px: float) -> tuple[int, int]:
    """Copies of every result file in ``src`` without the objects under ``min_um2``; (kept, dropped)."""
    kept = dropped = 0
    for f in sorted(src.glob("*.geojson")):
        feats = read_features(f)
        areas = np.array([shapely.area(feature_to_object(ft, f, i).geometry) * px * px for i, ft in enumerate(feats)])
        keep = [ft for ft, a in zip(feats, areas) if a >= min_um2]
        kept, dropped = kept + len(keep), dropped + len(feats) - len(keep)
        write_features(dest / f.name, keep)
    return kept, dropped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, help="folder of pointnuc's NAME.geojson results")
    ap.add_argument("truth", type=Path, help="folder of NAME_label.png instance label images")
    ap.add_argument("--pixel-size", type=float, default=0.25, help="µm per pixel of the results' coordinates")
    ap.add_argument("--sizes", type=float, nargs="+", default=[0, 5, 10, 15, 20, 25, 30], help="minimum areas, µm²")
    ap.add_argument("--out", type=Path, default=None, help="write the table as markdown here too")
    args = ap.parse_args(argv)
    import torch

    lines = [
        f"- command: `{' '.join(['python', 'benchmarks/min_size.py', *(argv if argv is not None else sys.argv[1:])])}`",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; machine: {machine_line(torch.device('cpu'))}",
        "",
        "| minimum area µm² | objects | dropped | AJI (Kumar) | Dice_obj | pixel F1 | det. P | det. R | det. F1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            dest = Path(tmp) / f"min{size:g}"
            dest.mkdir()
            kept, dropped = filtered(args.results, dest, size, args.pixel_size)
            ev = evaluate(dest, args.truth)
            s, d = ev.segmentation, ev.detection
            lines.append(f"| {size:g} | {kept} | {dropped} | {s['aji']:.4f} | {s['dice_obj']:.4f} | {s['F1']:.4f} | "
                         f"{d['P']:.4f} | {d['R']:.4f} | {d['F1']:.4f} |")
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
