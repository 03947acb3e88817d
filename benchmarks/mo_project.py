"""MoNuSeg "MO" as a user's projects: the 16 train + val images with 10 % of their nuclei clicked,
and the 14 test images, as GeoJSON-folder projects that ``pointnuc train`` / ``segment`` read.

The points are those of ``benchmarks/stage1.py`` (same seed, same sampling), so a model trained
here is the "user protocol" model (``pointnuc train`` holds back 20 % of each image's points).
Images are written as TIFFs with their 0.25 µm/px in the resolution tags, as a scanner's export.

    .venv/bin/python benchmarks/mo_project.py /tmp/mo                  # writes /tmp/mo/train, /tmp/mo/test
    nice -n 10 .venv/bin/pointnuc train /tmp/mo/train --profile quick --out /tmp/mo/model --no-progress
    .venv/bin/pointnuc segment /tmp/mo/test --model /tmp/mo/model --no-progress
    .venv/bin/pointnuc evaluate /tmp/mo/test/pointnuc-geojson ../shared/data/monuseg/train
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage1 import FULL_RES_UM, load_image, read_split, sample_points, shared_dir

from pointnuc.metrics import gt_points_from_labels


def _write(folder: Path, name: str, image: np.ndarray, points_xy: np.ndarray) -> None:
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    ppcm = 1e4 / FULL_RES_UM
    tifffile.imwrite(folder / f"{name}.tif", image, photometric="rgb", resolution=(ppcm, ppcm),
                     resolutionunit="CENTIMETER")
    feats = []
    if len(points_xy):
        feats.append({"type": "Feature", "geometry": {"type": "MultiPoint",
                                                      "coordinates": [[float(x), float(y)] for x, y in points_xy]},
                      "properties": {"objectType": "annotation",
                                     "classification": {"name": "Nucleus", "color": [255, 228, 22]}}})
    (folder / f"{name}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="folder for train/ and test/")
    ap.add_argument("--seed", type=int, default=0, help="the points' seed (stage1.py's --seed)")
    args = ap.parse_args(argv)
    data = shared_dir() / "data" / "monuseg" / "train"
    split = read_split(data)
    rng = np.random.default_rng(args.seed)
    n_points = 0
    for name in split["train"] + split["val"]:
        img, lab = load_image(data, name)
        pts = sample_points(gt_points_from_labels(lab), rng)
        n_points += len(pts)
        _write(args.out / "train", name, img, pts)
    for name in split["testA"] + split["testB"]:
        img, _ = load_image(data, name)
        _write(args.out / "test", name, img, np.zeros((0, 2)))
    print(f"{args.out / 'train'}: {len(split['train']) + len(split['val'])} images, {n_points} points; "
          f"{args.out / 'test'}: {len(split['testA']) + len(split['testB'])} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
