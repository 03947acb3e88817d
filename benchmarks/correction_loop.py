"""Issue #26: the correction loop against random clicks on MoNuSeg "MO", with a simulated annotator.

Projects are GeoJSON folders as ``mo_project.py`` writes them: the 16 train + val images (the
user protocol: ``pointnuc train`` holds back 20 % of each image's points) and the 14 test images,
used only to score (``pointnuc segment`` + ``pointnuc.evaluate``: Kumar AJI, Dice_obj, pixel F1,
pooled detection F1).

- Random arms: 5, 10, 25, 50 % of each image's nuclei as points (``stage1.sample_points``'s
  sampling, other fractions), each a fresh ``pointnuc train``; with ``--random-outlines`` the same
  nuclei given as their true outlines (fraction 1: every nucleus outlined, full supervision).
- The loop: the 5 % model (or ``--start``: an earlier run's ``random-0.05`` folder, with its
  ``model/``), then each round: ``segment`` the loop's project (its detections, recorded by
  :mod:`pointnuc.io.written`), ``suggest`` N per image, the annotator's answers (below), ``train
  --from`` (:mod:`pointnuc.train.correction`), score. Every answer is one click; a round's row
  counts them per kind.
- The annotator answers from the ground truth, as a user in QuPath: imports pointnuc's file of
  each image, answers, exports all objects as the image's GeoJSON (:func:`answer_round`):

  - ``points``: a suggestion on a true nucleus -> a ``Nucleus`` point at its centre
    (``outlines``, or ``--answer outline``: its true outline as a ``Nucleus`` polygon
    annotation, a full mask in stage 2 and its centre a point in stage 1);
  - ``deletions``: pointnuc's detections within ``VIEW_RADII`` nucleus radii of a suggestion
    (what the user sees around it) with at most ``FALSE_OVERLAP`` of their pixels on true
    nuclei are deleted: left out of the export, so the next training reads them as deleted
    detections (background); a suggestion sitting on such a detection is answered by
    deleting it;
  - ``background``: a suggestion on no nucleus (and on no deleted detection) -> a
    ``Background`` point there.

  ``--marks`` picks the kinds (default ``points,deletions,background``); suggestions whose
  answer is not among them are left unanswered (the ablation of what each kind buys).
  Answers carry the suggestion's rank, as a point reclassified in QuPath does, so ``pointnuc
  inspect`` counts them. Without ``deletions`` the loop's project is not segmented.
- ``--from-start``: every round trains ``--from`` the start model (on all answers so far) rather than
  the previous round's, to tell a chain's drift from what the answers teach.

    nice -n 10 .venv/bin/python benchmarks/correction_loop.py --profile quick            # the lead's long run
    .venv/bin/python benchmarks/correction_loop.py --profile tiny --images 2 --rounds 1    # smoke run (< 3 min)
    ... --start /work/bench/loop1/cpu/random-0.05 --fractions 0.05 --work W --marks points   # an ablation arm

``--start`` needs a folder ``random-F`` (F the fraction, as a run names it) holding the arm's
GeoJSON project and its ``model/``; ``--work`` must lie outside it (the run clears its own work
folder). Arms other than the default write ``correction-loop-PROFILE-KINDS.*``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mo_project import _write
from stage1 import load_image, read_split, shared_dir

from pointnuc.config import profile_config
from pointnuc.io.base import SUGGESTION_MARKER

FRACTIONS = (0.05, 0.10, 0.25, 0.50)
VIEW_RADII = 4.0  #: detections this many nucleus radii from a suggestion are "shown" with it
FALSE_OVERLAP = 0.25  #: a shown detection with at most this share of its pixels on true nuclei is deleted
MARK_KINDS = ("points", "deletions", "background", "outlines")  #: the kinds of answers (``--marks``)
DEFAULT_MARKS = "points,deletions,background"


def centres_by_label(lab: np.ndarray) -> dict[int, tuple[float, float]]:
    """Bounding-box centre (QuPath x/y) of each instance id, as ``gt_points_from_labels``."""
    from scipy import ndimage as ndi

    out = {}
    for i, sl in enumerate(ndi.find_objects(lab.astype(np.int64, copy=False)), start=1):
        if sl is not None:
            out[i] = ((sl[1].start + sl[1].stop - 1) // 2 + 0.5, (sl[0].start + sl[0].stop - 1) // 2 + 0.5)
    return out


def sample_fraction(gt_xy: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    n = max(1, round(fraction * len(gt_xy)))
    return gt_xy[np.sort(rng.choice(len(gt_xy), n, replace=False))]


def feature(geom: dict, cls: str, rank: float | None = None) -> dict:
    props: dict = {"objectType": "annotation", "classification": {"name": cls, "color": [255, 228, 22]}}
    if rank is not None:
        props["measurements"] = {SUGGESTION_MARKER: float(rank)}
    return {"type": "Feature", "geometry": geom, "properties": props}


def parse_marks(marks: str, answer: str) -> frozenset[str]:
    """The kinds of answers the annotator gives (``--marks``, ``--answer``); a SystemExit line when unknown."""
    kinds = frozenset(k.strip() for k in marks.split(",") if k.strip())
    bad = kinds - set(MARK_KINDS)
    if bad or not kinds:
        raise SystemExit(f"--marks: a comma list of {', '.join(MARK_KINDS)}, not {marks!r}")
    if answer == "outline" and "points" in kinds:  # nuclei answered by their outlines
        kinds = (kinds - {"points"}) | {"outlines"}
    if {"points", "outlines"} <= kinds:
        raise SystemExit("--marks: a nucleus is answered by a point or by its outline, not both")
    return kinds


def detections(path: Path) -> list[dict]:
    """pointnuc's objects in its file of an image (what ``segment`` wrote and the user imports into QuPath)."""
    from pointnuc.io.geojson import feature_is_pointnuc, read_features

    return [f for f in read_features(path) if feature_is_pointnuc(f)] if path.is_file() else []


def false_detection(geom, lab: np.ndarray) -> bool:
    """A detection the annotator deletes: at most :data:`FALSE_OVERLAP` of its pixels lie on true nuclei."""
    from pointnuc.geometry import polygon_pixels

    rr, cc = polygon_pixels(geom, lab.shape)
    if not len(rr):
        c = geom.centroid
        return lab[min(int(c.y), lab.shape[0] - 1), min(int(c.x), lab.shape[1] - 1)] == 0
    return float(np.mean(lab[rr, cc] > 0)) <= FALSE_OVERLAP


def false_near(det_xy: np.ndarray, false: list[bool], deleted: set[int], x: float, y: float, radius: float) -> list[int]:
    """Indices of the false detections not yet deleted whose centres lie within ``radius`` of (x, y), nearest first."""
    if not len(det_xy):
        return []
    d = np.hypot(det_xy[:, 0] - x, det_xy[:, 1] - y)
    return [int(j) for j in np.argsort(d, kind="stable") if d[j] <= radius and false[j] and j not in deleted]


def answer_round(proj: Path, labels: dict[str, np.ndarray], kinds: frozenset[str]) -> dict[str, int]:
    """The simulated annotator answers the latest suggestions; clicks per kind of answer.

    As a user does in QuPath: import pointnuc's file of each image (its detections, from the
    ``segment`` of this round, and the suggestions), answer, delete false detections, export
    all objects as the image's GeoJSON (``proj/STEM.geojson``). The export keeps the user's
    earlier marks; pointnuc's objects of an earlier round are replaced by this round's, less
    the deleted ones (whose ids :mod:`pointnuc.io.written` recorded: the next training reads
    them as background). Suggestions left unanswered are not exported.
    """
    from shapely.geometry import shape

    from pointnuc.geometry import labels_to_polygons
    from pointnuc.io.geojson import feature_is_pointnuc
    from pointnuc.io.geojson_project import OUTPUT_FOLDER
    from pointnuc.suggest import read_record

    record = read_record(proj) or {"images": {}}
    clicks = dict.fromkeys(MARK_KINDS, 0)
    for name, items in record["images"].items():
        stem = name.rsplit(".", 1)[0]
        lab = labels[stem]
        centres = centres_by_label(lab)
        export = proj / f"{stem}.geojson"
        doc = json.loads(export.read_text())
        user = [f for f in doc["features"] if not feature_is_pointnuc(f)]
        dets = detections(proj / OUTPUT_FOLDER / f"{stem}.geojson") if "deletions" in kinds else []
        geoms = [shape(f.get("nucleusGeometry") or f["geometry"]) for f in dets]
        det_xy = np.array([(g.centroid.x, g.centroid.y) for g in geoms], float).reshape(-1, 2)
        false = [false_detection(g, lab) for g in geoms]
        deleted: set[int] = set()
        for s in items:
            r = float(s["radius_px"])
            k = int(lab[min(int(s["y"]), lab.shape[0] - 1), min(int(s["x"]), lab.shape[1] - 1)])
            if k > 0 and kinds & {"points", "outlines"}:
                if "outlines" in kinds:
                    user.append(outline_feature(labels_to_polygons(np.where(lab == k, 1, 0).astype(np.int32))[1],
                                                s["rank"]))
                    clicks["outlines"] += 1
                else:
                    user.append(feature({"type": "Point", "coordinates": list(centres[k])}, "Nucleus", s["rank"]))
                    clicks["points"] += 1
            elif k == 0:
                on = false_near(det_xy, false, deleted, s["x"], s["y"], r) if s.get("detected") else []
                if on:  # the suggestion sits on a false detection: deleting it is the answer
                    deleted.add(on[0])
                    clicks["deletions"] += 1
                elif "background" in kinds:
                    user.append(feature({"type": "Point", "coordinates": [s["x"], s["y"]]}, "Background", s["rank"]))
                    clicks["background"] += 1
            for j in false_near(det_xy, false, deleted, s["x"], s["y"], VIEW_RADII * r):  # shown around the suggestion
                deleted.add(j)
                clicks["deletions"] += 1
        doc["features"] = user + [f for j, f in enumerate(dets) if j not in deleted]
        export.write_text(json.dumps(doc))
    return clicks


def outline_feature(poly, rank: float | None = None) -> dict:
    """A true nucleus' outline (shapely polygon) as a ``Nucleus`` polygon annotation (a user's outline)."""
    from shapely.geometry import mapping

    return feature({"type": "Polygon", "coordinates": json.loads(json.dumps(mapping(poly)["coordinates"]))}, "Nucleus",
                   rank)


def write_outlines(export: Path, lab: np.ndarray, centres_xy: np.ndarray) -> None:
    """Replace an image's marks by the true outlines of the nuclei whose centres are ``centres_xy``."""
    from pointnuc.geometry import labels_to_polygons

    ids = {c: k for k, c in centres_by_label(lab).items()}
    polys = labels_to_polygons(lab.astype(np.int32))
    feats = [outline_feature(polys[ids[(float(x), float(y))]]) for x, y in centres_xy]
    export.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def _points(path: Path) -> list:
    """The Nucleus marks of a user's export: each point's coordinates, each outline's first ring."""
    out: list = []
    for feat in json.loads(path.read_text())["features"]:
        if feat["properties"].get("classification", {}).get("name") == "Nucleus":
            g = feat["geometry"]
            out += ([g["coordinates"]] if g["type"] in ("Point", "Polygon") else
                    list(g["coordinates"]) if g["type"] == "MultiPoint" else [])
    return out


def score(model: Path, test: Path, data: Path) -> dict[str, float]:
    """Segment the test project with ``model`` and score it against the labels."""
    from pointnuc.evaluate import evaluate
    from pointnuc.io import open_project
    from pointnuc.pipeline import segment_project

    for f in (test / "pointnuc-geojson").glob("*.geojson*"):
        f.unlink()
    segment_project(open_project(test), model, progress=False, redo=True)
    ev = evaluate(test / "pointnuc-geojson", data)
    return {"aji": ev.segmentation.get("aji", float("nan")), "dice_obj": ev.segmentation.get("dice_obj", float("nan")),
            "pixel_f1": ev.segmentation.get("F1", float("nan")), "det_f1": ev.detection.get("F1", float("nan"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--images", type=int, default=None, help="use only the first N images of each split part")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-image", type=int, default=10, help="suggestions per image per round")
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    ap.add_argument("--answer", choices=("point", "outline"), default="point",
                    help="a nucleus is answered by a Nucleus point at its centre or by its true outline (a Nucleus "
                         "polygon annotation)")
    ap.add_argument("--random-outlines", action="store_true",
                    help="the random arms give their nuclei as true outlines (Nucleus polygon annotations: full masks in "
                         "stage 2, their centres points in stage 1) instead of points; fraction 1 is full supervision")
    ap.add_argument("--marks", default=DEFAULT_MARKS,
                    help=f"the kinds of answers the annotator gives, a comma list of {', '.join(MARK_KINDS)} "
                         "(outlines: nuclei answered by outlines, as --answer outline); the others are left "
                         f"unanswered (default {DEFAULT_MARKS})")
    ap.add_argument("--work", type=Path, default=Path("/work/bench/loop"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from-start", action="store_true",
                    help="every round trains --from the start model (on all answers so far) instead of the last round's")
    ap.add_argument("--start", type=Path, default=None,
                    help="the loop starts from this random arm of an earlier run (its folder, with model/) instead of "
                         "training the smallest fraction again; its training time is read from the model")
    ap.add_argument("--combine", type=Path, nargs="+", default=None,
                    help="only write the table and plot of earlier runs' JSON files together (e.g. the loop's run and "
                         "a run of the other random arms); an arm in several files is taken from the first")
    args = ap.parse_args(argv)
    kinds = parse_marks(args.marks, args.answer)
    args.tag = "" if kinds == parse_marks(DEFAULT_MARKS, "point") else "-" + "+".join(k for k in MARK_KINDS if k in kinds)
    if args.from_start:
        args.tag += "-from-start"
    if args.random_outlines:
        args.tag += "-random-outlines"
    if args.combine:
        combined: list[dict] = []
        for f in args.combine:
            combined += [r for r in json.loads(f.read_text()) if not any(r["arm"] == o["arm"] and r["round"] == o["round"]
                                                                    for o in combined)]
        combined.sort(key=lambda r: (r["arm"].startswith("loop"), r["arm"].endswith("outlines"),
                                     r["arm"] if r["arm"].startswith("loop") else "", r["clicks"], r["round"]))
        start = min((r for r in combined if r["arm"].startswith("random")), key=lambda r: r["clicks"])
        report(combined, args, float(start["train_s"]))
        return 0

    from pointnuc.io import open_project
    from pointnuc.train.correction import correction_config, load_parent
    from pointnuc.train.run import train_project

    data = shared_dir() / "data" / "monuseg" / "train"
    split = read_split(data)
    lim = slice(None, args.images)
    train_names = (split["train"][lim] + split["val"][lim])
    test_names = (split["testA"] + split["testB"])[lim]
    raw = {n: load_image(data, n) for n in train_names + test_names}
    labels = {n: raw[n][1] for n in train_names}
    gts = {n: np.array(list(centres_by_label(raw[n][1]).values()), float) for n in train_names}
    config = profile_config(args.profile, seed=args.seed)
    work = args.work / args.profile
    if args.start is not None and args.start.resolve().is_relative_to(work.resolve()):
        raise SystemExit(f"--start {args.start} lies in the work folder {work}, which the run clears: use another --work")
    shutil.rmtree(work, ignore_errors=True)
    test = work / "test"
    for n in test_names:
        _write(test, n, raw[n][0], np.zeros((0, 2)))
    rows: list[dict] = []

    def fresh(fraction: float) -> tuple[Path, Path, int, float]:
        rng = np.random.default_rng(args.seed)
        proj = work / f"random-{fraction:g}"
        n_clicks = 0
        for n in train_names:
            pts = sample_fraction(gts[n], fraction, rng)
            n_clicks += len(pts)
            _write(proj, n, raw[n][0], np.zeros((0, 2)) if args.random_outlines else pts)
            if args.random_outlines:
                write_outlines(proj / f"{n}.geojson", labels[n], pts)
        t0 = time.time()
        train_project(open_project(proj), proj / "model", config, progress=False, offline=True)
        return proj, proj / "model", n_clicks, time.time() - t0

    def random_arm(f: float) -> str:
        return f"random {f:.0%}" + (" outlines" if args.random_outlines else "")

    fractions = [float(f) for f in args.fractions.split(",")]
    fresh_models = {}
    if args.start is not None:  # an earlier run's arm: scored again, not trained again
        f0 = float(args.start.name.removeprefix("random-"))
        info = json.loads((args.start / "model" / "pointnuc-model.json").read_text())
        n0 = sum(len(_points(g)) for g in args.start.glob("*.geojson"))
        fresh_models[f0] = (args.start, args.start / "model", n0, float(info["provenance"]["seconds"]))
        rows.append({"arm": random_arm(f0), "round": 0, "clicks": n0, "train_s": fresh_models[f0][3],
                     "round_s": fresh_models[f0][3], **score(args.start / "model", test, data)})
        fractions = [f for f in fractions if f != f0]
    for f in fractions:
        proj, model, clicks, secs = fresh(f)
        fresh_models[f] = (proj, model, clicks, secs)
        rows.append({"arm": random_arm(f), "round": 0, "clicks": clicks, "train_s": round(secs, 1),
                     "round_s": round(secs, 1), **score(model, test, data)})
        print(rows[-1], flush=True)
    start = min(fresh_models)
    proj0, model, clicks, fresh_s = fresh_models[start]
    loop = work / "loop"
    arm = "loop" + (f" ({args.tag[1:]})" if args.tag else "")  # arms of an ablation stay apart in --combine
    shutil.copytree(proj0, loop, ignore=shutil.ignore_patterns("model", "pointnuc-*"))
    rows.append({**next(r for r in rows if r["arm"] == random_arm(start)), "arm": arm})
    from pointnuc.pipeline import segment_project
    from pointnuc.suggest import suggest_project

    first = model
    for k in range(1, args.rounds + 1):
        t0 = time.time()
        if "deletions" in kinds:  # the model's detections in the project, to be reviewed (and recorded as written)
            segment_project(open_project(loop), model, progress=False, redo=True)
        suggest_project(open_project(loop), model, n=args.per_image * len(train_names))
        answers = answer_round(loop, labels, kinds)
        clicks += sum(answers.values())
        t1 = time.time()
        parent = load_parent(first if args.from_start else model)
        child = loop / f"model-round{k}"
        train_project(open_project(loop), child, correction_config(parent, overrides={"seed": args.seed}),
                      progress=False, parent=parent)
        train_s = time.time() - t1
        model = child
        rows.append({"arm": arm, "round": k, "clicks": clicks, "train_s": round(train_s, 1),
                     "round_s": round(time.time() - t0, 1), **answers, **score(model, test, data),
                     "train_share": round(train_s / fresh_s, 3)})
        print(rows[-1], flush=True)
    report(rows, args, fresh_s)
    return 0


def report(rows: list[dict], args: argparse.Namespace, fresh_s: float) -> None:
    """The table (Markdown + JSON) and the plot (matplotlib when installed) in ``args.out``."""
    import platform

    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"correction-loop-{args.profile}" + (f"-{args.images}img" if args.images else "") + getattr(args, "tag", "")
    head = ["arm", "round", "clicks", *MARK_KINDS, "aji", "dice_obj", "pixel_f1", "det_f1", "train_s", "round_s",
            "train_share"]
    machine = f"{platform.node()} {platform.machine()}, Python {platform.python_version()}"
    lines = [f"# Correction loop vs random clicks ({args.profile})", "",
             f"Command: `python benchmarks/correction_loop.py {' '.join(sys.argv[1:])}`  ",
             f"Date: {dt.datetime.now().isoformat(timespec='seconds')}; machine: {machine}  ",
             (f"Fresh training of the start arm: {fresh_s:.0f} s; train_share = a round's training / that. "
              f"The loop's answers: {args.marks} (nuclei as {args.answer}s); {', '.join(MARK_KINDS)}: a round's "
              "clicks of each kind."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(h, ''):.3f}" if isinstance(r.get(h), float) and h not in ("train_s", "round_s")
                                       else str(r.get(h, "")) for h in head) + " |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 4, figsize=(16, 4))
        for ax, key in zip(axes, ("aji", "dice_obj", "pixel_f1", "det_f1")):
            loops = sorted({r["arm"] for r in rows if r["arm"].startswith("loop")})
            series = {"random points": [r for r in rows if r["arm"].startswith("random") and
                                        not r["arm"].endswith("outlines")],
                      "random outlines": [r for r in rows if r["arm"].startswith("random") and
                                          r["arm"].endswith("outlines")],
                      **{a: [r for r in rows if r["arm"] == a] for a in loops}}
            for arm, chosen in series.items():
                pts = sorted((r["clicks"], r[key]) for r in chosen)
                if pts:
                    ax.plot(*zip(*pts), "o--" if arm.startswith("random") else "s-", label=arm)
            ten = [r for r in series["random points"] if r["arm"] == "random 10%"]
            if key == "aji" and ten:  # the goal: +0.04 over 10 % random points at their clicks
                ax.axhline(ten[0]["aji"] + 0.04, color="grey", lw=0.8, ls=":", label="goal (10 % points + .04)")
            ax.set_xscale("log")
            ax.set_xlabel("clicks (log)")
            ax.set_title(key)
            ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(args.out / f"{tag}.png", dpi=100)
        lines += ["", f"![plot]({tag}.png)"]
    except ImportError:
        lines += ["", "(no plot: matplotlib is not installed)"]
    (args.out / f"{tag}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out / f"{tag}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
