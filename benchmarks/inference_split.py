"""Where one image's ``segment_slide`` time goes, and its scores, on the MO test images (issue #28).

In-process, one image after another (no image-level concurrency), torch on ``--threads``
threads: mean seconds per image of the colour statistics (``start``), reading + colour
normalisation, the network and the instances + outlines (``post``), from
:class:`pointnuc.infer.wsi.SlideResult` timings; Kumar AJI (mean) and pooled detection F1 as
``side_by_side.py`` scores them. ``KEY=VALUE`` arguments go to ``segment_slide`` (e.g. ``halo=0``).

    .venv/bin/python benchmarks/inference_split.py /work/bench/mo/model-cpu --test /work/bench/mo/test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

from side_by_side import score
from stage1 import load_image, read_split, shared_dir

from pointnuc.infer.wsi import segment_slide
from pointnuc.io.slide import open_slide
from pointnuc.metrics import detection_scores
from pointnuc.models.bundle import load_info, load_network


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--test", type=Path, required=True, help="the test/ folder mo_project.py wrote")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("settings", nargs="*", help="KEY=VALUE for segment_slide (JSON values)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = {k: json.loads(v) if v[:1] in "0123456789[-tfn" else v for k, v in (a.split("=", 1) for a in args.settings)}
    data = shared_dir() / "data" / "monuseg" / "train"
    split = read_split(data)
    names = split["testA"] + split["testB"]
    info = load_info(args.model)
    net = load_network(args.model, "segmenter", info)

    def run(name: str) -> tuple[list, dict[str, float]]:
        t0 = time.perf_counter()
        with open_slide(args.test / f"{name}.tif", pixel_size_um=0.25) as slide:
            r = segment_slide(slide, net, info, device="cpu", progress=False, **kw)
        return [n.polygon for n in r.nuclei], {**r.timings, "start": r.start_seconds, "total": time.perf_counter() - t0}

    run(names[0])  # warm-up
    polys, times = {}, []
    for n in names:
        polys[n], t = run(n)
        times.append(t)
    ajis, counts = zip(*(score(polys[n], load_image(data, n)[1]) for n in names), strict=True)
    print(f"{args.model} {kw}: Kumar AJI {np.mean(ajis):.4f}, detection F1 {detection_scores(list(counts))['F1']:.4f}, "
          f"{sum(map(len, polys.values()))} nuclei")
    print("seconds per image: " + ", ".join(f"{k} {np.mean([t[k] for t in times]):.3f}" for k in times[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
