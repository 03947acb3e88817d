"""Issue #26: the correction loop against random clicks on MoNuSeg "MO", with a simulated annotator.

Projects are GeoJSON folders as ``mo_project.py`` writes them: the 16 train + val images (the
user protocol: ``pointnuc train`` holds back 20 % of each image's points) and the 14 test images,
used only to score (``pointnuc segment`` + ``pointnuc.evaluate``: Kumar AJI, Dice_obj, pixel F1,
pooled detection F1).

- Random arms: 5, 10, 25, 50 % of each image's nuclei as points (``stage1.sample_points``'s
  sampling, other fractions), each a fresh ``pointnuc train``.
- The loop: the 5 % model, then each round ``suggest`` N per image; the annotator answers from
  the ground truth: a nucleus there -> a ``Nucleus`` point at its centre (``--outlines``: its
  outline as a Nucleus polygon), none -> a ``Background`` point there; and, among the model's
  detections within ``VIEW_RADII`` nucleus radii of a suggestion (what the user sees around it),
  each false one (no true centre within a radius) becomes a ``Background`` point at it (the
  stand-in for deleting it; one click each). Every answer is one click. Then ``train --from``
  (:mod:`pointnuc.train.correction`) and score. Answers carry the suggestion's rank, as a point
  reclassified in QuPath does, so ``pointnuc inspect`` counts them.

Background points and outlines are supervision only once pointnuc reads them (issue #26's marks
part); until then the loop learns from its Nucleus answers alone.

    nice -n 10 .venv/bin/python benchmarks/correction_loop.py --profile quick            # the lead's long run
    .venv/bin/python benchmarks/correction_loop.py --profile tiny --images 2 --rounds 1    # smoke run (< 3 min)
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


def answer_round(proj: Path, model: Path, labels: dict[str, np.ndarray], outlines: bool) -> dict[str, int]:
    """The simulated annotator answers the latest suggestions in the users' exports; click counts."""
    from shapely.geometry import mapping

    from pointnuc.geometry import labels_to_polygons
    from pointnuc.models.layout import ModelLayout
    from pointnuc.suggest import read_record

    record = read_record(proj) or {"images": {}}
    clicks = {"nucleus": 0, "background": 0, "deleted": 0}
    for name, items in record["images"].items():
        stem = name.rsplit(".", 1)[0]
        lab = labels[stem]
        centres = centres_by_label(lab)
        export = proj / f"{stem}.geojson"
        doc = json.loads(export.read_text())
        det_file = next(ModelLayout(model).points.glob(f"{name}#*.json"), None)
        dets = np.asarray(json.loads(det_file.read_text())["points_xy"], float).reshape(-1, 2) if det_file else np.zeros((0, 2))
        deleted: set[int] = set()
        for s in items:
            r = float(s["radius_px"])
            k = int(lab[min(int(s["y"]), lab.shape[0] - 1), min(int(s["x"]), lab.shape[1] - 1)])
            if k > 0:
                if outlines:
                    poly = labels_to_polygons(np.where(lab == k, 1, 0).astype(np.int32))[1]
                    geom = {"type": "Polygon", "coordinates": json.loads(json.dumps(mapping(poly)["coordinates"]))}
                else:
                    geom = {"type": "Point", "coordinates": list(centres[k])}
                doc["features"].append(feature(geom, "Nucleus", s["rank"]))
                clicks["nucleus"] += 1
            else:
                doc["features"].append(feature({"type": "Point", "coordinates": [s["x"], s["y"]]}, "Background", s["rank"]))
                clicks["background"] += 1
            for j, (x, y) in enumerate(dets):  # false detections shown around the suggestion
                if j in deleted or np.hypot(x - s["x"], y - s["y"]) > VIEW_RADII * r:
                    continue
                if lab[min(int(y), lab.shape[0] - 1), min(int(x), lab.shape[1] - 1)] == 0:  # on no true nucleus
                    deleted.add(j)
                    doc["features"].append(feature({"type": "Point", "coordinates": [float(x), float(y)]}, "Background"))
                    clicks["deleted"] += 1
        export.write_text(json.dumps(doc))
    return clicks


def _points(path: Path) -> list:
    """The Nucleus points of a user's export."""
    out: list = []
    for feat in json.loads(path.read_text())["features"]:
        if feat["properties"].get("classification", {}).get("name") == "Nucleus":
            g = feat["geometry"]
            out += [g["coordinates"]] if g["type"] == "Point" else list(g["coordinates"]) if g["type"] == "MultiPoint" else []
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
    ap.add_argument("--outlines", action="store_true", help="answer a nucleus with its outline, not a point")
    ap.add_argument("--work", type=Path, default=Path("/work/bench/loop"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=Path, default=None,
                    help="the loop starts from this random arm of an earlier run (its folder, with model/) instead of "
                         "training the smallest fraction again; its training time is read from the model")
    ap.add_argument("--combine", type=Path, nargs="+", default=None,
                    help="only write the table and plot of earlier runs' JSON files together (e.g. the loop's run and "
                         "a run of the other random arms); an arm in several files is taken from the first")
    args = ap.parse_args(argv)
    if args.combine:
        combined: list[dict] = []
        for f in args.combine:
            combined += [r for r in json.loads(f.read_text()) if not any(r["arm"] == o["arm"] and r["round"] == o["round"]
                                                                    for o in combined)]
        combined.sort(key=lambda r: (r["arm"] == "loop", r["clicks"], r["round"]))
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
            _write(proj, n, raw[n][0], pts)
        t0 = time.time()
        train_project(open_project(proj), proj / "model", config, progress=False, offline=True)
        return proj, proj / "model", n_clicks, time.time() - t0

    fractions = [float(f) for f in args.fractions.split(",")]
    fresh_models = {}
    if args.start is not None:  # an earlier run's arm: scored again, not trained again
        f0 = float(args.start.name.removeprefix("random-"))
        info = json.loads((args.start / "model" / "pointnuc-model.json").read_text())
        n0 = sum(len(_points(g)) for g in args.start.glob("*.geojson"))
        fresh_models[f0] = (args.start, args.start / "model", n0, float(info["provenance"]["seconds"]))
        rows.append({"arm": f"random {f0:.0%}", "round": 0, "clicks": n0, "train_s": fresh_models[f0][3],
                     "round_s": fresh_models[f0][3], **score(args.start / "model", test, data)})
        fractions = [f for f in fractions if f != f0]
    for f in fractions:
        proj, model, clicks, secs = fresh(f)
        fresh_models[f] = (proj, model, clicks, secs)
        rows.append({"arm": f"random {f:.0%}", "round": 0, "clicks": clicks, "train_s": round(secs, 1),
                     "round_s": round(secs, 1), **score(model, test, data)})
        print(rows[-1], flush=True)
    start = min(fresh_models)
    proj0, model, clicks, fresh_s = fresh_models[start]
    loop = work / "loop"
    shutil.copytree(proj0, loop, ignore=shutil.ignore_patterns("model", "pointnuc-*"))
    rows.append({**next(r for r in rows if r["arm"] == f"random {start:.0%}"), "arm": "loop"})
    from pointnuc.suggest import suggest_project

    for k in range(1, args.rounds + 1):
        t0 = time.time()
        project = open_project(loop)
        suggest_project(project, model, n=args.per_image * len(train_names))
        answers = answer_round(loop, model, labels, args.outlines)
        clicks += sum(answers.values())
        t1 = time.time()
        parent = load_parent(model)
        child = loop / f"model-round{k}"
        train_project(open_project(loop), child, correction_config(parent, overrides={"seed": args.seed}),
                      progress=False, parent=parent)
        train_s = time.time() - t1
        model = child
        rows.append({"arm": "loop", "round": k, "clicks": clicks, "train_s": round(train_s, 1),
                     "round_s": round(time.time() - t0, 1), **answers, **score(model, test, data),
                     "train_share": round(train_s / fresh_s, 3)})
        print(rows[-1], flush=True)
    report(rows, args, fresh_s)
    return 0


def report(rows: list[dict], args: argparse.Namespace, fresh_s: float) -> None:
    """The table (Markdown + JSON) and the plot (matplotlib when installed) in ``args.out``."""
    import platform

    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"correction-loop-{args.profile}" + (f"-{args.images}img" if args.images else "")
    head = ["arm", "round", "clicks", "aji", "dice_obj", "pixel_f1", "det_f1", "train_s", "round_s", "train_share"]
    machine = f"{platform.node()} {platform.machine()}, Python {platform.python_version()}"
    lines = [f"# Correction loop vs random clicks ({args.profile})", "",
             f"Command: `python benchmarks/correction_loop.py {' '.join(sys.argv[1:])}`  ",
             f"Date: {dt.datetime.now().isoformat(timespec='seconds')}; machine: {machine}  ",
             f"Fresh training of the start arm: {fresh_s:.0f} s; train_share = a round's training / that.", "",
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
            for arm, style in (("random", "o--"), ("loop", "s-")):
                pts = sorted((r["clicks"], r[key]) for r in rows if r["arm"].startswith(arm))
                if pts:
                    ax.plot(*zip(*pts), style, label=arm)
            ax.set_xlabel("clicks")
            ax.set_title(key)
            ax.legend()
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
