"""Stage-2 benchmark on MoNuSeg "MO" (Qu et al. 2020, Table III): points -> nucleus outlines.

Protocol (same data handling as ``benchmarks/stage1.py``, same seed -> same points): the 12
train images carry 10% of their nuclei as training points; the 4 val images carry 10% as
held-back points (and their masks, for the paper's protocol only). Stage 1 runs first
(or its detections are loaded from ``--stage1-cache``) and its detections on the train
and val images feed stage 2. ``--points gt`` gives the "GT points" row (all true points,
no stage 1). Scores on the 14 test images at full resolution (probabilities upsampled
bilinearly), averaged per image: Acc, pixel F1, Dice_obj, Kumar AJI and the AJI as the
authors' code computed it. Model selection never looks at the test images.

    nice -n 10 .venv/bin/python benchmarks/stage2.py --profile quick
    .venv/bin/python benchmarks/stage2.py --profile quick --images 2 --epochs 1 --points gt   # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PaperProtocol, Truth, rescaled_truth, train_supervised
from stage1 import FULL_RES_UM, load_image, machine_line, mo_samples, parse_set, shared_dir

from pointnuc.config import TrainConfig, profile_config
from pointnuc.infer.instances import instances_from_probability
from pointnuc.infer.predict import nucleus_probability
from pointnuc.labels.voronoi import BACKGROUND, NUCLEUS
from pointnuc.metrics import aji, mean_scores, segmentation_scores
from pointnuc.models.calibration import Thresholds
from pointnuc.models.layout import ModelLayout
from pointnuc.train.fit import resolve_device
from pointnuc.train.samples import TrainingImage, detection_samples, points_between
from pointnuc.train.segment import train_segmenter

PAPER_10 = {"acc": 0.8997, "F1": 0.7490, "dice_obj": 0.7033, "aji_authors": 0.5031}  # Table III, 10% points (authors' AJI)
PAPER_GT = {"acc": 0.9097, "F1": 0.7716, "dice_obj": 0.7242, "aji_authors": 0.5174}
QUPATH = {"acc": 0.8822, "F1": 0.7285, "dice_obj": 0.6685, "aji": 0.4525, "aji_authors": 0.4420}
METRICS = ("acc", "F1", "dice_obj", "aji", "aji_authors")


def label_quality(samples: list[TrainingImage], labels: dict[str, tuple[np.ndarray, np.ndarray]],
                  truth: Truth) -> list[dict]:
    """Per image: share of GT nucleus pixels among pixels labelled nucleus / background, and coverage."""
    rows = []
    for s in samples:
        if s.name not in labels or s.name not in truth:
            continue
        fg = truth[s.name] > 0
        row = {"name": s.name}
        for k, lab in zip(("vor", "clu"), labels[s.name]):
            nuc, bg = lab == NUCLEUS, lab == BACKGROUND
            row[f"{k}_nuc_prec"] = float(fg[nuc].mean()) if nuc.any() else float("nan")
            row[f"{k}_bg_prec"] = float((~fg[bg]).mean()) if bg.any() else float("nan")
            row[f"{k}_labelled"] = float((nuc | bg).mean())
        row["clu_nuc_recall"] = float(((labels[s.name][1] == NUCLEUS) & fg).sum() / max(fg.sum(), 1))
        rows.append(row)
    return rows


def upsample(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if prob.shape == tuple(shape):
        return prob
    t = torch.from_numpy(np.ascontiguousarray(prob))[None, None]
    return torch.nn.functional.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def choose_threshold_masks(model, val: list[TrainingImage], truth: Truth, thr: Thresholds, method: str, device) -> float:
    """Paper protocol: the threshold maximising mean Kumar AJI on the val images (working resolution)."""
    probs = [nucleus_probability(model, s.image, device=device) for s in val]
    best, best_t = -1.0, 0.5
    for t in (0.3, 0.4, 0.5, 0.6, 0.7):
        sc = np.mean([aji(truth[s.name], instances_from_probability(p, threshold=t, min_area_px=thr.min_area_px, method=method,
                                                                   h_px=thr.h_px)) for p, s in zip(probs, val)])
        if sc > best:
            best, best_t = sc, t
    return best_t


def evaluate(model, test: list[tuple[TrainingImage, np.ndarray]], thr: Thresholds, scale: float, device, tta: bool,
             thresholds_by_method: dict[str, float]) -> dict[str, dict[str, float]]:
    """Mean test metrics per instance method, at full resolution."""
    per: dict[str, list[dict]] = {m: [] for m in thresholds_by_method}
    for s, gt_full in test:
        p = upsample(nucleus_probability(model, s.image, device=device, tta=tta), gt_full.shape)
        for m, t in thresholds_by_method.items():
            lab = instances_from_probability(p, threshold=t, min_area_px=thr.min_area_px * scale**2, method=m,
                                             h_px=thr.h_px * scale)
            per[m].append(segmentation_scores(gt_full, lab))
    return {m: mean_scores(v) for m, v in per.items()}


def crf_step_cost(cfg: TrainConfig, device, steps: int = 3) -> tuple[float, float]:
    """Seconds per training step (batch, crop of the profile) without and with the CRF term."""
    from pointnuc.models.net import build_network
    from pointnuc.train.seg_losses import Stage2Loss
    from pointnuc.train.segment import crf_downsample

    seg, c = cfg.segmentation, cfg.data.crop_size
    net = build_network(2, cfg.encoder, pretrained=False).to(device)
    opt = torch.optim.Adam(net.parameters(), 1e-5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(seg.batch_size, 3, c, c, generator=g).to(device)
    tg = torch.cat([torch.randint(-1, 2, (seg.batch_size, 2, c, c), generator=g).float(),
                    torch.rand(seg.batch_size, 3, c, c, generator=g)], 1).to(device)
    sxy = cfg.data.px(seg.crf_sigma_xy_um)
    losses = {"plain": Stage2Loss(seg.alpha), "crf": Stage2Loss(seg.alpha, seg.crf_beta, sxy, seg.crf_sigma_rgb, crf_downsample(sxy))}
    # interleaved plain/CRF steps, so that load from other jobs on a shared machine hits both alike
    times: dict[str, list[float]] = {k: [] for k in losses}
    for i in range(steps + 1):
        for name, fn in losses.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = fn(net(x), tg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times[name].append(time.perf_counter() - t0)
    out = {k: float(np.median(v)) for k, v in times.items()}
    return out["plain"], out["crf"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="quick", choices=["paper", "quick", "tiny"])
    ap.add_argument("--points", default="detected", choices=["detected", "gt"], help="stage-2 input: stage-1 detections or all GT points")
    ap.add_argument("--stage1-cache", type=Path, default=None, help="npz of stage-1 detections in full-resolution pixels (written if missing)")
    ap.add_argument("--stage1-dir", type=Path, default=None,
                    help="reuse the detector.pt of an earlier stage-1 run (with --stage1-threshold/--stage1-min-area)")
    ap.add_argument("--stage1-threshold", type=float, default=0.5)
    ap.add_argument("--stage1-min-area", type=float, default=0.0)
    ap.add_argument("--images", type=int, default=None, help="use only the first N images of each split (smoke runs)")
    ap.add_argument("--epochs", type=int, default=None, help="stage-2 epochs")
    ap.add_argument("--crf-epochs", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. segmentation.crf_beta=0.5")
    ap.add_argument("--supervised", action="store_true", help="fully supervised reference (same net, full masks; no CRF)")
    ap.add_argument("--tta", action="store_true", help="flip test-time augmentation at test")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    overrides: dict = {"seed": args.seed}
    if args.epochs is not None:
        overrides["segmentation.epochs"] = args.epochs
    if args.crf_epochs is not None:
        overrides["segmentation.crf_epochs"] = args.crf_epochs
    overrides.update(parse_set(args.set))
    cfg = profile_config(args.profile, **overrides)
    device = resolve_device(args.device)
    train, val, test, gts, _ref, scale, truth = mo_samples(cfg, args.seed, args.images)
    work = args.work or Path(f"/tmp/pointnuc-bench-stage2-{args.profile}-{args.points}")
    layout = ModelLayout(work)

    t1 = 0.0
    stage1_note = ""
    detector_state = None  # the segmenter's start with segmentation.init_from_detector
    if args.points == "gt":
        # GT-points row: every true point is known, on the val images too (minus the held-back ones)
        points = {s.name: gts[s.name] / scale for s in train + val}
        stage1_note = "all ground-truth points (no stage 1)"
    else:
        cache = args.stage1_cache
        if args.stage1_dir is not None:
            detector_state = torch.load(ModelLayout(args.stage1_dir).detector, map_location="cpu", weights_only=True)
        if cache is not None and cache.is_file():
            z = np.load(cache)
            points = {k: z[k] / scale for k in z.files}
            stage1_note = f"stage-1 detections loaded from {cache}"
        elif args.stage1_dir is not None:
            from pointnuc.models.net import build_network
            from pointnuc.train.detect import detect, predict_probabilities

            net = build_network(1, cfg.encoder, pretrained=False)
            net.load_state_dict(detector_state)
            s1 = detection_samples(train + val, cfg)
            probs = predict_probabilities(net, s1, device)
            points = points_between({s.name: detect(p, s.valid, args.stage1_threshold, args.stage1_min_area)
                                     for s, p in zip(s1, probs)}, s1, train + val)
            stage1_note = (f"stage-1 detector from {args.stage1_dir} (threshold {args.stage1_threshold}, "
                           f"min area {args.stage1_min_area} px)")
            if cache is not None:
                np.savez(cache, **{k: v * scale for k, v in points.items()})
        else:
            from pointnuc.train.detect import detect, predict_probabilities, train_detector

            t0 = time.time()
            train1, val1 = detection_samples(train, cfg), detection_samples(val, cfg)
            det = train_detector(train1, cfg.for_detection(), layout, device=device, progress=False,
                                 selection=PaperProtocol(tune_samples=val1, truth=rescaled_truth(truth, val1)))
            detector_state = det.model.state_dict()
            probs = predict_probabilities(det.model, val1, device)
            points = dict(det.points)
            points.update({s.name: detect(p, s.valid, det.threshold, det.min_area_px) for s, p in zip(val1, probs)})
            points = points_between(points, [*train1, *val1], train + val)
            t1 = time.time() - t0
            stage1_note = f"stage 1 run here ({t1 / 60:.1f} min, threshold {det.threshold:.2f})"
            if cache is not None:
                np.savez(cache, **{k: v * scale for k, v in points.items()})
        # stage-1 detection quality on the train images, for reference
        from pointnuc.metrics import detection_counts, detection_scores

        dsc = detection_scores([detection_counts(points[s.name] * scale, gts[s.name], 11.0) for s in train])
        stage1_note += f"; detections on train images vs all GT: P {dsc['P']:.3f} R {dsc['R']:.3f} F1 {dsc['F1']:.3f}"
    logging.info("points: %s", stage1_note)

    # label generation speed on one full-resolution 1000x1000 image (all its GT points, 0.25 µm/px)
    from pointnuc.labels.cluster import labels_for_image

    n0 = train[0].name
    img0, _ = load_image(shared_dir() / "data" / "monuseg" / "train", n0)
    labels_for_image(img0[:64, :64], gts[n0][:3], cfg.segmentation, FULL_RES_UM)  # warm-up (imports)
    tl = time.perf_counter()
    labels_for_image(img0, gts[n0], cfg.segmentation, FULL_RES_UM)
    label_full_s = time.perf_counter() - tl
    logging.info("Voronoi + cluster labels of a 1000x1000 image: %.2f s", label_full_s)
    plain_s, crf_s = crf_step_cost(cfg, device)
    logging.info("step cost: plain %.2f s, with CRF %.2f s (x%.2f)", plain_s, crf_s, crf_s / plain_s)

    t0 = time.time()
    selection = PaperProtocol(tune_samples=val, truth=truth, use="points")
    if args.supervised:
        res = train_supervised(train, truth, points, cfg, layout, device=device, progress=False, resume=args.resume,
                               detector_state=detector_state, selection=selection)
    else:
        res = train_segmenter(train, points, cfg, layout, device=device, progress=False, resume=args.resume,
                              detector_state=detector_state, selection=selection)
    t2 = time.time() - t0
    lq = label_quality(train, res.labels, truth)

    model = res.model
    thr = res.thresholds
    variants: list[tuple[str, dict | None, str]] = [("supervised" if args.supervised else "CRF", None, "points")]
    if selection.plain_state is not None:
        variants.insert(0, ("no CRF", selection.plain_state, "points"))
    for k in ([] if args.supervised else ["plain-aji", "crf-aji"]):
        if selection.alt_states.get(k) is not None:
            variants.append(("no CRF" if k.startswith("plain") else "CRF", selection.alt_states[k], "masks"))
    final_state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for name, state, sel in variants:
        model.load_state_dict(state if state is not None else final_state)
        if sel == "points":
            tmap = {"cc": thr.prob, "watershed": thr.prob}
        else:
            tmap = {m: choose_threshold_masks(model, val, truth, thr, m, device) for m in ("cc", "watershed")}
        # TTA only for the model a user gets (CRF, points-selected): it costs 4 predictions per image
        for tta in ([False, True] if args.tta and name == "CRF" and sel == "points" else [False]):
            sc = evaluate(model, test, thr, scale, device, tta, tmap)
            for m, v in sc.items():
                rows.append((name, sel, m, tmap[m], tta, v))
                logging.info("%s %s %s t=%.2f tta=%s: %s", name, sel, m, tmap[m], tta,
                             " ".join(f"{k} {v[k]:.4f}" for k in METRICS))
    model.load_state_dict(final_state)
    wall = time.time() - t_start

    seg = cfg.segmentation
    lines = [
        f"# Stage 2 benchmark, profile `{args.profile}`, " + ("fully supervised reference" if args.supervised else f"points: {args.points}"),
        "",
        f"- command: `{' '.join([Path(sys.executable).name, 'benchmarks/stage2.py'] + (argv if argv is not None else sys.argv[1:]))}`",
        f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='minutes')}",
        f"- machine: {machine_line(device)}",
        f"- config: encoder {cfg.encoder}, {cfg.data.pixel_size_um} µm/px, {seg.epochs} epochs (lr {seg.lr}, {seg.lr_schedule}{f', EMA {seg.ema}' if seg.ema else ''}) + "
        + (f"{seg.refine_epochs} self-training epochs (labels: p < {seg.refine_low} / > {seg.refine_high}) + " if seg.refine_epochs else "")
        + f"{seg.crf_epochs} CRF epochs (lr {seg.crf_lr}, β {seg.crf_beta}, σ_xy {seg.crf_sigma_xy_um} µm, σ_rgb {seg.crf_sigma_rgb}), "
        f"batch {seg.batch_size}, {cfg.data.patches_per_image} patches/image, crop {cfg.data.crop_size}, "
        f"colour: Reinhard{' + stain step' if cfg.data.stain_normalise else ''}, stain jitter {cfg.data.stain_jitter}, start: " + ("stage-1 detector" if seg.init_from_detector and detector_state is not None else "ImageNet/random"),
        f"- points: {stage1_note}",
        f"- data: {len(train)} train, {len(val)} val ({sum(len(s.holdout) for s in val)} held-back points), {len(test)} test images",
        f"- wall time: {wall / 60:.1f} min (stage 1 {t1 / 60:.1f} min, stage 2 training + selection {t2 / 60:.1f} min)",
        (f"- labels: Voronoi + cluster label of one 1000x1000 image ({len(gts[n0])} points) in {label_full_s:.2f} s; "
        f"all {len(train)} train images at the working resolution in {res.metrics['label_seconds']:.1f} s"),
        f"- CRF cost per training step: plain {plain_s:.2f} s, with CRF {crf_s:.2f} s (x{crf_s / plain_s:.2f}); in training: "
        + ", ".join(f"{k} {np.mean([e.patches_per_s for e in h.epochs]):.2f} patches/s" for k, h in res.history.items()),
        f"- selection (points): threshold {thr.prob:.2f}, score {res.metrics.get('selection_score', float('nan')):.4f}; "
        f"best epochs: " + ", ".join(f"{k} {h.best_epoch}" for k, h in res.history.items()),
        "",
        "| model | selection | instances | threshold | TTA | Acc | F1 | Dice_obj | AJI (Kumar) | AJI (authors' code) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, sel, m, t, tta, v in rows:
        lines.append(f"| {name} | {sel} | {m} | {t:.2f} | {'yes' if tta else 'no'} | "
                     + " | ".join(f"{v[k]:.4f}" for k in METRICS) + " |")
    pr = PAPER_GT if args.points == "gt" else PAPER_10
    lines.append(f"| paper Table III ({'GT points' if args.points == 'gt' else '10% points'}; AJI = authors' code) | test set! | cc | – | no | "
                 f"{pr['acc']:.4f} | {pr['F1']:.4f} | {pr['dice_obj']:.4f} | – | {pr['aji_authors']:.4f} |")
    lines.append("| QuPath 0.6.0 cell detection (no training) | – | watershed | – | no | "
                 + " | ".join(f"{QUPATH[k]:.4f}" for k in METRICS) + " |")
    lines += ["", ("Label quality on the train images (share of true nucleus pixels among pixels labelled nucleus; "
              "share of true background among pixels labelled background; labelled share):"), "",
              "| image | Voronoi nuc prec | Voronoi bg prec | Voronoi labelled | cluster nuc prec | cluster bg prec | cluster labelled | cluster nuc recall |",
              "|---|---|---|---|---|---|---|---|"]
    for r in lq:
        lines.append(f"| {r['name']} | {r['vor_nuc_prec']:.3f} | {r['vor_bg_prec']:.3f} | {r['vor_labelled']:.3f} | "
                     f"{r['clu_nuc_prec']:.3f} | {r['clu_bg_prec']:.3f} | {r['clu_labelled']:.3f} | {r['clu_nuc_recall']:.3f} |")
    lines += ["", "Epoch losses: " + "; ".join(f"{k}: " + ", ".join(f"{v:.4f}" for v in h.losses) for k, h in res.history.items()),
              "Per-epoch selection scores: " + "; ".join(
                  f"{k}: " + ", ".join(f"{e.epoch}: {e.scores.get('points', float('nan')):.3f}/{e.scores.get('aji', float('nan')):.3f}"
                                       for e in h.epochs if e.scores) for k, h in res.history.items())
              + " (epoch: points score / val AJI)"]
    text = "\n".join(lines) + "\n"
    print(text)
    tag = "-supervised" if args.supervised else ("-gt" if args.points == "gt" else "")
    out = args.out or Path(__file__).resolve().parent / "results" / f"stage2-{args.profile}{tag}.md"
    if args.out or (args.images is None and args.epochs is None):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
