"""Sub-pixel outlines against the pixel staircase they replaced, on MoNuSeg "MO" test images (issue #27).

Segments each image once per tracing with the same model and thresholds (``outline="pixels"``: the
working-resolution label image's corners, simplified by 0.75 working px, pointnuc's tracing until
session 19; ``outline="subpixel"``: the threshold's iso-line of the probability, today's default) and
scores both against the full-resolution ground truth:

- Kumar AJI, Dice_obj and pixel F1 (means over images), detection F1 (pooled, 11 px), as
  ``pointnuc evaluate`` computes them;
- the boundary distance of matched nuclei (IoU > 0.5 with a true nucleus): the mean symmetric distance
  between the two outlines (each sampled every 0.25 px, distance to the other outline), and their
  95th-percentile Hausdorff distance, in µm, averaged over matched pairs. The true outlines are the
  label image's pixel boundaries at full resolution, so 0 is out of reach (about 0.03 µm of staircase);
- the median number of vertices of an outline, and the post-processing busy seconds per image.

``--working-pixel-size 0.5`` runs a model trained at 0.25 µm/px at 0.5 µm/px instead (its images are
resampled there, as a 0.5 µm/px model's would be): the coarser grid, where the staircase was 2 full-res
px a step. The network then sees nuclei at half the size it was trained on, so its scores drop; what
matters is the difference between the two tracings at the same resolution.

    .venv/bin/python benchmarks/outlines.py /work/bench/mo/model /work/bench/mo/test ../shared/data/monuseg/train \\
        [--working-pixel-size 0.5] [--images 2] [--out benchmarks/results/outlines.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import shapely

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage1 import machine_line

from pointnuc.evaluate import evaluate, polygons_to_labels
from pointnuc.geometry import labels_to_polygons

OUTLINES = ("pixels", "subpixel")


def boundary_distances(pred: list, truth_lab: np.ndarray, px: float, step: float = 0.25) -> list[tuple[float, float]]:
    """(mean symmetric distance, 95th-percentile Hausdorff) in µm of each predicted outline matched (IoU > 0.5)
    to a true nucleus of ``truth_lab`` (full-res px)."""
    if not pred:
        return []
    pred_lab = polygons_to_labels(pred, truth_lab.shape)  # outline k -> label k + 1
    n = len(pred) + 1
    inter = np.bincount((truth_lab.astype(np.int64) * n + pred_lab).ravel(),
                        minlength=(int(truth_lab.max()) + 1) * n).reshape(-1, n)
    union = inter.sum(1)[:, None] + inter.sum(0)[None, :] - inter
    iou = inter / np.maximum(union, 1)
    iou[0, :] = iou[:, 0] = 0.0
    truth_polys = labels_to_polygons(truth_lab)
    out = []
    for gi, pj in zip(*np.nonzero(iou > 0.5)):  # IoU > 0.5: at most one pair per nucleus either way
        a = pred[pj - 1].exterior
        b = truth_polys[int(gi)].exterior
        da = shapely.distance(shapely.points(shapely.get_coordinates(shapely.segmentize(a, step))), b)
        db = shapely.distance(shapely.points(shapely.get_coordinates(shapely.segmentize(b, step))), a)
        both = np.concatenate((da, db))
        out.append((0.5 * (da.mean() + db.mean()) * px, float(np.percentile(both, 95)) * px))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="model folder from `pointnuc train`")
    ap.add_argument("images", type=Path, help="folder of test images (e.g. benchmarks/mo_project.py's test/)")
    ap.add_argument("truth", type=Path, help="folder of NAME_label.png instance label images")
    ap.add_argument("--working-pixel-size", type=float, default=None,
                    help="run the model at this µm/px instead of its own (e.g. 0.5 for a 0.25 µm/px model)")
    ap.add_argument("--min-area", type=float, default=0.0, help="µm²; 0 keeps every object (as min_size.py's 0 row)")
    ap.add_argument("--images-limit", "--n", dest="limit", type=int, default=None, help="only the first N images")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="write the table as markdown here too")
    args = ap.parse_args(argv)
    import torch

    from pointnuc.geometry import object_area
    from pointnuc.infer.wsi import SegmentSettings, SlideSegmenter
    from pointnuc.io.geojson import write_nuclei_file
    from pointnuc.io.slide import open_slide
    from pointnuc.models.bundle import load_info, load_network

    info = load_info(args.model)
    net = load_network(args.model, "segmenter", info)
    if args.working_pixel_size is not None:
        info = dataclasses.replace(info, config=info.config.replace(**{"data.pixel_size_um": args.working_pixel_size}))
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".tif", ".tiff", ".png") and "_label" not in p.name)
    files = files[: args.limit] if args.limit else files
    if not files:
        raise SystemExit(f"no images in {args.images}")
    from PIL import Image

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for outline in OUTLINES:
            dest = Path(tmp) / outline
            dest.mkdir()
            settings = SegmentSettings(device=args.device, outline=outline, min_area_um2=args.min_area, progress=False)
            seg = SlideSegmenter(net, info, settings)
            dists: list[tuple[float, float]] = []
            n_vertices: list[int] = []
            post_s, n_obj = [], 0
            for f in files:
                with open_slide(f) as slide:
                    px = float(slide.pixel_size_um)  # type: ignore[arg-type]
                    res = seg.run(slide, name=f.stem)
                    w, h = slide.width, slide.height
                post_s.append(res.timings["post"])
                polys = [n.polygon for n in res.nuclei]
                n_obj += len(polys)
                n_vertices += [len(p.exterior.coords) - 1 for p in polys]
                write_nuclei_file(dest / f"{f.stem}.geojson", res.nuclei, pixel_size_um=px, clip_to=object_area(w, h))
                truth = np.asarray(Image.open(args.truth / f"{f.stem}_label.png")).astype(np.int32)
                dists += boundary_distances(polys, truth, px)
            ev = evaluate(dest, args.truth)
            d = np.array(dists).reshape(-1, 2)
            rows[outline] = (ev, d, n_obj, float(np.median(n_vertices)) if n_vertices else 0.0, float(np.mean(post_s)))
            print(outline, ev.segmentation, flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    lines = [
        f"- command: `{' '.join(['python', 'benchmarks/outlines.py', *(argv if argv is not None else sys.argv[1:])])}`",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; commit {commit}; machine: {machine_line(torch.device(args.device))}",
        (f"- model: {args.model} (trained at {load_info(args.model).pixel_size_um:g} µm/px), run at {info.pixel_size_um:g} µm/px; "
        f"{len(files)} image(s); minimum area {args.min_area:g} µm²"),
        "",
        ("| outlines | objects | AJI (Kumar) | Dice_obj | pixel F1 | det. F1 | matched | boundary distance µm | HD95 µm "
        "| median vertices | post s/image |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for outline, (ev, d, n_obj, nv, ps) in rows.items():
        s, det = ev.segmentation, ev.detection
        mean_d = f"{d[:, 0].mean():.3f}" if len(d) else "-"
        hd = f"{d[:, 1].mean():.3f}" if len(d) else "-"
        lines.append(f"| {outline} | {n_obj} | {s['aji']:.4f} | {s['dice_obj']:.4f} | {s['F1']:.4f} | {det['F1']:.4f} | "
                     f"{len(d)} | {mean_d} | {hd} | {nv:.0f} | {ps:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
