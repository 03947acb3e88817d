"""pointnuc beside QuPath's own cell detection, in one run (issue #28): speed and quality on MO.

On the 14 MoNuSeg "MO" test images (1000 x 1000 px at their 0.25 µm/px, as TIFFs written by
``mo_project.py``), with the same number of threads for both:

* QuPath 0.6.0's ``WatershedCellDetection`` (Analyze > Cell detection > Cell detection) with
  QuPath's own default parameters, passed explicitly (it works at 0.5 µm/px), run by the real
  QuPath assembled from ``../shared/qupath-0.6.0`` (``tests/qupath_kit.py``: one JVM for all images,
  ``runPlugin`` with a ``CommandLineTaskRunner`` of ``--threads`` threads on an ``ImageData``
  with a full-image annotation selected). Seconds per image: ``runPlugin`` alone; the JVM's start
  and reading the images are left out and reported apart.
* ``pointnuc segment`` (the real command, in a child process, ``--device cpu``) on a folder
  project of the same TIFFs, torch limited to ``--threads`` threads (``OMP_NUM_THREADS``).
  Seconds per image: the run of the images as ``segment`` reports it ("Segmented N image(s) in X
  s": segmenting, small images two at a time on the CPU (from 6 images on in two worker processes),
  keeping and writing each image's GeoJSON with its measurements) over N; the one-off start (imports,
  loading the model, starting the worker processes) is left out and reported apart. The table also shows each image's own time as pointnuc records it.

Both results are rasterised to label images (a pixel whose centre lies in a nucleus) and scored
against the ground-truth labels: Kumar's AJI (mean over images) and detection F1 (polygon
centroids matched one-to-one within 11 px = 2.75 µm, per image and pooled). Megapixels are
full-resolution pixels of the whole image. The last line is the speed ratio
QuPath seconds per image / pointnuc seconds per image (pointnuc's images per second over
QuPath's): 1.0 or more means pointnuc is at least as fast, the goal of #28.

    nice -n 5 .venv/bin/python benchmarks/side_by_side.py --model /tmp/mo/model --threads 2 \\
        --out benchmarks/results/side-by-side.md
    .venv/bin/python benchmarks/side_by_side.py --model /tmp/tiny-model --images 2   # smoke run

``--test DIR`` takes the ``test/`` folder written by ``mo_project.py``; without it the test images
are written into a temporary folder first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import mo_project
from qupath_kit import WATERSHED_DEFAULTS, python_with_qupath, setup_qupath
from stage1 import MATCH_RADIUS_FULL, load_image, machine_line, read_split, shared_dir

from pointnuc.evaluate import polygons_to_labels
from pointnuc.metrics import aji, detection_counts, detection_scores, gt_points_from_labels

#: run in the kit's child process (a JVM with QuPath): one detection per image, nuclei only come back
QUPATH_CODE = """
import qupath_kit
jp = qupath_kit._java()
out = []
for path in {paths!r}:
    r = qupath_kit.watershed(jp, path, {params!r}, {threads})
    r["nuclei"] = [c["nucleus_wkb"] for c in r.pop("cells") if c.get("nucleus_wkb")]
    out.append(r)
answer(out)
"""


@dataclass
class Run:
    """One method on all images: per-image seconds and nucleus outlines, and the run's totals."""

    seconds: dict[str, float]
    polygons: dict[str, list[Any]]
    wall: float  #: the whole child process, start to end
    cpu: float  #: user + system CPU seconds of the child process, all its threads
    per_image: float  #: seconds per image over the whole run of images (what the ratio compares)
    loop: float  #: seconds of the run of images (per_image x images)
    notes: list[str]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_qupath(paths: list[Path], threads: int) -> Run:
    """QuPath's cell detection with its defaults on each image, in one JVM."""
    qupath = setup_qupath(shared_dir(), ROOT / ".qupath")
    os.environ["PAQUO_QUPATH_DIR"] = str(qupath)
    params = dict(WATERSHED_DEFAULTS)
    code = QUPATH_CODE.format(paths=[str(p) for p in paths], params=params, threads=threads)
    c0, t0 = children_cpu(), time.perf_counter()
    results = python_with_qupath(code, timeout=120 + 60 * len(paths))
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    notes = [f"QuPath parameters (passed explicitly): `{json.dumps(params)}`"]
    first = results[0]
    if any(not r["ok"] for r in results):
        raise SystemExit("QuPath's cell detection failed on " + ", ".join(str(p) for p, r in zip(paths, results, strict=True)
                                                                          if not r["ok"]))
    diff = {k: (v, first["qupath_defaults"].get(k)) for k, v in params.items() if first["qupath_defaults"].get(k) != v}
    notes.append("these are QuPath's own defaults (the plugin's default parameter list)" if not diff
                 else f"NOT QuPath's defaults: (passed, QuPath's) = {diff}")
    if {r["pixel_size_um"] for r in results} != {0.25}:
        notes.append(f"QuPath read pixel sizes {sorted({r['pixel_size_um'] for r in results}, key=str)} µm/px, not 0.25")
    per = [float(r["seconds"]) for r in results]
    return Run(seconds={p.stem: r["seconds"] for p, r in zip(paths, results, strict=True)},
               per_image=float(np.mean(per)), loop=float(np.sum(per)),
               polygons={p.stem: [shapely.from_wkb(bytes.fromhex(h)) for h in r["nuclei"]]
                         for p, r in zip(paths, results, strict=True)},
               wall=wall, cpu=cpu, notes=notes)


def run_pointnuc(paths: list[Path], model: Path, threads: int, work: Path) -> Run:
    """``pointnuc segment`` on a folder project of the images, torch on ``threads`` threads."""
    from pointnuc.io.geojson import read_nuclei

    project = work / "project"
    project.mkdir()
    for p in paths:
        shutil.copy2(p, project / p.name)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "pointnuc", "segment", str(project), "--model", str(model), "--device", "cpu",
           "--no-progress"]
    c0, t0 = children_cpu(), time.perf_counter()
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=work)
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    if r.returncode != 0:
        raise SystemExit(f"pointnuc segment failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    seconds: dict[str, float] = {}
    for f in (project / "pointnuc-results").rglob("*.json"):
        record = json.loads(f.read_text(encoding="utf-8"))
        if isinstance(record, dict) and "key" in record and "seconds" in record:
            seconds[Path(record["key"]["image"]).stem] = float(record["seconds"])
    missing = [p.stem for p in paths if p.stem not in seconds]
    if missing:
        raise SystemExit(f"pointnuc segment kept no result for {missing}")
    polygons = {p.stem: [n.polygon for n in read_nuclei(project / "pointnuc-geojson" / f"{p.stem}.geojson")]
                for p in paths}
    # the loop over the images as `segment` reports it: segmenting (small images two at a time on the CPU),
    # keeping and writing each result with its measurements; the model's loading and the start are left out
    m = re.search(r"Segmented (\d+) image\(s\) in ([\d.]+) s", r.stdout)
    if not m or int(m.group(1)) != len(paths):
        raise SystemExit(f"pointnuc segment did not report its run of {len(paths)} images:\n{r.stdout[-2000:]}")
    loop = float(m.group(2))
    return Run(seconds=seconds, polygons=polygons, wall=wall, cpu=cpu, per_image=loop / len(paths), loop=loop,
               notes=[(f"`{' '.join(['pointnuc', *cmd[3:]])}` with OMP_NUM_THREADS={threads} "
                      "(pointnuc's own CPU defaults otherwise: images that fit one network window two at a time, from 6 "
                      "images on in two worker processes, each with half the threads; batch norms folded, channels-last, "
                      "bf16 where the CPU has it; 2 reader/post-processing threads per image)")])


def score(polygons: list[Any], truth: np.ndarray) -> tuple[float, Any]:
    """Kumar AJI and the detection counts of one image's nuclei against its label image."""
    labels = polygons_to_labels(polygons, truth.shape)
    centroids = np.array([[g.centroid.x, g.centroid.y] for g in polygons]).reshape(-1, 2)
    return aji(truth, labels), detection_counts(centroids, gt_points_from_labels(truth), MATCH_RADIUS_FULL)


def training_line(model: Path) -> str:
    """The model's training time, from its description's provenance."""
    try:
        meta = json.loads((model / "pointnuc-model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"Training time: unknown ({err})"
    prov = meta.get("provenance", {})
    if "seconds" not in prov:
        return "Training time: not recorded in the model's pointnuc-model.json"
    stages = ", ".join(f"stage {i} {prov[k] / 60:.1f} min" for i, k in ((1, "stage1_seconds"), (2, "stage2_seconds"))
                       if k in prov)
    images = prov.get("images", {})
    return (f"Training time of the model ({model}, {len(images)} images, {sum(images.values())} points, "
            f"encoder {meta.get('config', {}).get('encoder', '?')}, on {prov.get('device', '?')}): "
            f"**{prov['seconds'] / 60:.1f} min** ({stages}; started {prov.get('started', '?')})")


def report(names: list[str], sizes: dict[str, tuple[int, int]], truth: dict[str, np.ndarray], qp: Run, pn: Run,
           threads: int, model: Path) -> list[str]:
    """The results as Markdown lines, the speed ratio last."""
    rows = [("| image | Mpx | QuPath s | pointnuc s | true nuclei | QuPath nuclei | pointnuc nuclei | QuPath AJI "
            "| pointnuc AJI | QuPath F1 | pointnuc F1 |"), "|---|" + "---:|" * 10]
    ajis: dict[str, list[float]] = {"qp": [], "pn": []}
    counts: dict[str, list[Any]] = {"qp": [], "pn": []}
    for name in names:
        mpx = sizes[name][0] * sizes[name][1] / 1e6
        cells = [f"{name}", f"{mpx:.2f}", f"{qp.seconds[name]:.2f}", f"{pn.seconds[name]:.2f}",
                 str(len(np.unique(truth[name])) - 1), str(len(qp.polygons[name])), str(len(pn.polygons[name]))]
        f1s = []
        for key, run in (("qp", qp), ("pn", pn)):
            a, c = score(run.polygons[name], truth[name])
            ajis[key].append(a)
            counts[key].append(c)
            f1s.append(detection_scores([c])["F1"])
        cells += [f"{ajis['qp'][-1]:.4f}", f"{ajis['pn'][-1]:.4f}", f"{f1s[0]:.4f}", f"{f1s[1]:.4f}"]
        rows.append("| " + " | ".join(cells) + " |")
    mpx_total = sum(w * h for w, h in sizes.values()) / 1e6
    qs, ps = qp.per_image, pn.per_image
    f1 = {k: detection_scores(v)["F1"] for k, v in counts.items()}
    rows.append(f"| **mean** (F1 pooled) | {mpx_total / len(names):.2f} | **{np.mean(list(qp.seconds.values())):.2f}** | "
                f"**{np.mean(list(pn.seconds.values())):.2f}** | | | | "
                f"**{np.mean(ajis['qp']):.4f}** | **{np.mean(ajis['pn']):.4f}** | **{f1['qp']:.4f}** | **{f1['pn']:.4f}** |")
    lines = [(f"{len(names)} images, {threads} thread(s) each. Seconds in the table: each image's own time (QuPath's "
             "`runPlugin`; pointnuc's segmenting of that image, beside another one where it runs two at a time). "
             "The ratio compares seconds per image over the whole run: QuPath's `runPlugin` times summed (one image "
             "after another, its image reading left out), pointnuc's run of the images as `segment` reports it "
             "(segmenting, keeping and writing each image's GeoJSON with its measurements)."), "", *rows, ""]
    for label, run, sec, key, fixed in (
        ("QuPath 0.6.0 cell detection", qp, qs, "qp", "JVM start, reading the images and returning the cells"),
        ("pointnuc segment", pn, ps, "pn", "start-up, loading the model, starting the worker processes"),
    ):
        lines.append(f"- **{label}**: {sec:.2f} s per image over the run of {len(names)} images, "
                     f"**{mpx_total / run.loop:.3f} full-resolution Mpx/s**, Kumar AJI {np.mean(ajis[key]):.4f} (mean), "
                     f"detection F1 {f1[key]:.4f} (pooled); the whole child process {run.wall:.1f} s wall (of which "
                     f"{run.wall - run.loop:.1f} s one-off: {fixed}, left out above), {run.cpu:.1f} CPU s")
        lines += [f"  - {n}" for n in run.notes]
    lines += ["", f"- {training_line(model)}", "",
              f"ratio pointnuc / QuPath (images per second): {qs / ps:.3f}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="a model folder from `pointnuc train`")
    ap.add_argument("--test", type=Path, default=None,
                    help="the test/ folder mo_project.py wrote [default: write it into a temporary folder]")
    ap.add_argument("--images", type=int, default=None, help="only the first N test images (smoke runs)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for both: QuPath's task runner and torch [default: all cores]")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as Markdown here")
    args = ap.parse_args(argv)
    if not (args.model / "pointnuc-model.json").is_file():
        raise SystemExit(f"{args.model} is not a pointnuc model folder (no pointnuc-model.json)")
    torch.set_num_threads(args.threads)  # only for the machine line: the work runs in child processes
    started = dt.datetime.now(dt.UTC)
    load0 = os.getloadavg()[0]
    data = shared_dir() / "data" / "monuseg" / "train"
    split = read_split(data)
    names = (split["testA"] + split["testB"])[: args.images]
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        work = Path(tmp)
        test = args.test
        if test is None:
            mo_project.main([str(work / "mo")])
            test = work / "mo" / "test"
        paths = [test / f"{n}.tif" for n in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise SystemExit(f"test images missing: {missing[:3]} (write them with benchmarks/mo_project.py)")
        truth = {n: load_image(data, n)[1] for n in names}
        sizes = {n: (t.shape[1], t.shape[0]) for n, t in truth.items()}
        print(f"QuPath's cell detection on {len(paths)} images ...", flush=True)
        qp = run_qupath(paths, args.threads)
        print(f"pointnuc segment on {len(paths)} images ...", flush=True)
        pn = run_pointnuc(paths, args.model, args.threads, work)
    lines = report(names, sizes, truth, qp, pn, args.threads, args.model)
    print("\n".join(lines))
    if args.out:
        head = ["# pointnuc beside QuPath's own cell detection (issue #28)", "",
                "    " + " ".join([Path(sys.executable).name, *sys.argv]), "",
                (f"{started:%Y-%m-%d %H:%M} UTC; {machine_line(torch.device('cpu'))} (load average {load0:.1f} "
                "at the start)"), ""]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(head + lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
