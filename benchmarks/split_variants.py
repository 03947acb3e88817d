"""How much does the split of touching nuclei cost? Other splits of the same nucleus map (issue #4).

Takes a trained segmenter (and the stage-1 detector) and scores, on the 14 MO test images at
full resolution, instance splits of the *same* flip-TTA probability map:

- the default: h-maxima of the distance map (``instances_from_probability``), for several h;
- high-confidence cores (P >= t_hi) as markers inside the mask at a lower threshold;
- the stage-1 detector's points as markers (watershed of the negated detector probability);
- every true nucleus centre as a marker (an upper bound for any point-marker split);
- an oracle that splits the predicted mask by the true instances (an upper bound for any
  split of this mask; pixels outside every true nucleus form components of their own).

The last two look at the test labels: they are bounds, not methods.

    .venv/bin/python benchmarks/split_variants.py --segmenter S2/segmenter.pt --detector S1/detector.pt \
        --detection-threshold 0.15 --detection-min-area 9.5 --out split.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage1 import machine_line, mo_samples
from stage2 import METRICS, upsample

from pointnuc.config import profile_config
from pointnuc.infer.instances import _remove_small, fill_small_holes, instances_from_probability
from pointnuc.infer.predict import nucleus_probability
from pointnuc.metrics import mean_scores, segmentation_scores
from pointnuc.models.net import build_network
from pointnuc.train.detect import detect, predict_probabilities

EIGHT = np.ones((3, 3), bool)


def marker_watershed(mask: np.ndarray, markers: np.ndarray, surface: np.ndarray) -> np.ndarray:
    """Watershed of ``surface`` inside ``mask`` from labelled ``markers``; unreached components keep a label."""
    from skimage.segmentation import watershed

    lab = watershed(surface, markers * mask, mask=mask, connectivity=1)
    rest, _ = ndi.label(mask & (lab == 0), structure=EIGHT)
    return np.where(lab == 0, np.where(rest > 0, rest + lab.max(), 0), lab)


def point_markers(shape: tuple[int, int], rc: np.ndarray) -> np.ndarray:
    """One 3x3 marker per point (row, col), numbered 1..n."""
    mk = np.zeros(shape, np.int32)
    r = np.clip(rc[:, 0].astype(int), 0, shape[0] - 1)
    c = np.clip(rc[:, 1].astype(int), 0, shape[1] - 1)
    mk[r, c] = np.arange(1, len(r) + 1)
    return ndi.grey_dilation(mk, size=3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segmenter", type=Path, required=True, help="segmenter.pt of a quick-profile stage-2 run")
    ap.add_argument("--detector", type=Path, required=True, help="detector.pt of the stage-1 run that fed it")
    ap.add_argument("--detection-threshold", type=float, required=True)
    ap.add_argument("--detection-min-area", type=float, required=True, help="working pixels")
    ap.add_argument("--profile", default="quick", choices=["quick", "paper"])
    ap.add_argument("--cache", type=Path, default=None, help="npz of the probability maps (written if missing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = profile_config(args.profile)
    t0 = time.time()
    _, _, test, gts, _, scale, _ = mo_samples(cfg, 0)
    seg_cfg = cfg.segmentation
    ma = seg_cfg.min_area_um2 / cfg.data.pixel_size_um**2 * scale**2  # full-resolution pixels
    h_default = cfg.data.px(seg_cfg.watershed_h_um) * scale
    if args.cache and args.cache.is_file():
        z = np.load(args.cache)
        dprob, sprob = [z[f"d{i}"] for i in range(len(test))], [z[f"s{i}"] for i in range(len(test))]
    else:
        nets = {}
        for name, path, out in (("det", args.detector, 1), ("seg", args.segmenter, 2)):
            nets[name] = build_network(out, cfg.encoder, pretrained=False)
            nets[name].load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            nets[name].eval()
        dprob = predict_probabilities(nets["det"], [s for s, _ in test], "cpu")
        sprob = [nucleus_probability(nets["seg"], s.image, tta=True) for s, _ in test]
        if args.cache:
            np.savez(args.cache, **{f"d{i}": p for i, p in enumerate(dprob)}, **{f"s{i}": p for i, p in enumerate(sprob)})

    rows: dict[str, list[dict]] = {}
    for (s, gt), dp, sp in zip(test, dprob, sprob):
        P = upsample(sp, gt.shape)
        D = upsample(dp, gt.shape)
        mask = fill_small_holes(P >= 0.5, 4 * ma)
        det_rc = s.to_full_res(detect(dp, None, args.detection_threshold, args.detection_min_area))[:, ::-1] - 0.5
        gt_rc = gts[s.name][:, ::-1] - 0.5
        variants: dict[str, Callable[[], np.ndarray]] = {}
        for h in (0.5, 1, 2, 4):
            tag = " (default)" if h == h_default else ""
            variants[f"h-maxima of the distance, h = {h:g} px{tag}"] = (
                lambda h=h: instances_from_probability(P, threshold=0.5, min_area_px=ma, method="watershed", h_px=h))
        for lo, hi in ((0.5, 0.7), (0.5, 0.9), (0.4, 0.7), (0.3, 0.7)):
            def cores(lo=lo, hi=hi):
                m = fill_small_holes(P >= lo, 4 * ma)
                mk = _remove_small(ndi.label(ndi.gaussian_filter(P, 1.0) >= hi, structure=EIGHT)[0], ma / 2)
                return marker_watershed(m, mk, -ndi.gaussian_filter(ndi.distance_transform_edt(m), 1.0))
            variants[f"cores P >= {hi} as markers, mask P >= {lo}"] = cores
        variants["stage-1 detections as markers"] = lambda: marker_watershed(mask, point_markers(mask.shape, det_rc), -D)
        variants["bound: every true centre as a marker"] = lambda: marker_watershed(mask, point_markers(mask.shape, gt_rc), -D)

        def oracle():
            inside = np.where(mask & (gt > 0), gt, 0)
            rest, _ = ndi.label(mask & (gt == 0), structure=EIGHT)
            return np.where(inside > 0, inside, np.where(rest > 0, rest + gt.max(), 0))
        variants["bound: the mask split by the true instances"] = oracle
        for name, fn in variants.items():
            rows.setdefault(name, []).append(segmentation_scores(gt, _remove_small(fn().astype(np.int64), ma)))
        print(s.name, flush=True)

    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M+00:00")
    lines = [
        "# Splitting touching nuclei: variants on one probability map",
        "",
        f"- command: `{' '.join(['python', 'benchmarks/split_variants.py', *(argv if argv is not None else sys.argv[1:])])}`",
        f"- date: {stamp}; machine: {machine_line(torch.device('cpu'))}; {time.time() - t0:.0f} s",
        (f"- the 14 MO test images at full resolution, flip TTA, threshold 0.5 unless a row says otherwise; "
        f"instances under {ma:.0f} px dropped; the default h is {h_default:g} px (full resolution)"),
        "",
        "| split | Acc | F1 | Dice_obj | AJI (Kumar) | AJI (authors' code) |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in rows.items():
        m = mean_scores(v)
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
