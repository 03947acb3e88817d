"""Instances in torch (``pointnuc.infer.instances_torch``) against the numpy path: time and agreement.

    .venv/bin/python benchmarks/instances_torch.py --model /work/bench/mo/model-cpu --images a.tif b.tif
    .venv/bin/python benchmarks/instances_torch.py --synthetic 1184 --device cuda

With ``--model``: each image goes through ``segment_slide``'s own reading and network (a
``SlideSegmenter`` whose post-processing keeps each tile's probability), and the box each tile
searches for nuclei (float16-rounded, as ``tile_nuclei`` sees it) is the input of both paths. With
``--synthetic N``: an N x N smoothed random field (``tests/test_instances_torch.py``). For each map:
instances of both, pixels that differ, AJI of one against the other, best-of-``--repeats`` seconds
(``--threads`` torch threads; numpy/scipy are single-threaded).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def best(fn: Any, repeats: int, sync: bool) -> tuple[float, Any]:
    out, ts = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if sync:
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return min(ts), out


def model_maps(model: Path, images: list[Path]) -> list[tuple[str, np.ndarray, Any]]:
    """(name, the searched box's probability, instance parameters) of every tile of each image."""
    from pointnuc.infer.polygons import TileContext, search_box
    from pointnuc.infer.wsi import SegmentSettings, SlideSegmenter
    from pointnuc.io.slide import open_slide
    from pointnuc.models.bundle import load_info, load_network

    info = load_info(model)
    net = load_network(model, info=info)
    maps: list[tuple[str, np.ndarray, Any]] = []

    class Keep(SlideSegmenter):
        def post_process(self, job: tuple[Any, ...], context: TileContext) -> tuple[list, int, float]:  # type: ignore[override]
            tile, prob = job[:2]
            s = search_box(tile, context.keep_margin)
            box = s.valid.shift(-s.window.y0, -s.window.x0).slices()
            maps.append((f"{name} {tile.core}", prob[box].astype(np.float16).astype(np.float32), context.params))
            return [], 0, 0.0

    for path in images:
        name = path.stem
        with open_slide(path) as slide:
            Keep(net, info, SegmentSettings(progress=False, instances_on_device=False, num_workers=1)).run(slide)
    return maps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--images", type=Path, nargs="*", default=[])
    p.add_argument("--synthetic", type=int, default=0, help="side of a synthetic map (0: none)")
    p.add_argument("--device", default="cpu", help="where instances_torch runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from pointnuc.infer.instances import instances_from_probability
    from pointnuc.infer.instances_torch import instances_torch
    from pointnuc.infer.polygons import InstanceParams
    from pointnuc.metrics import aji

    maps = model_maps(args.model, args.images) if args.model else []
    if args.synthetic:
        from test_instances_torch import _field

        maps.append((f"synthetic {args.synthetic}", _field(args.synthetic, 0),
                     InstanceParams(min_area_px=20.0, h_px=1.0, method="watershed")))
    dev = torch.device(args.device)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · torch {torch.__version__}, {args.threads} thread(s), "
          f"instances_torch on {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    print("# " + " ".join([Path(sys.executable).name, *sys.argv]))
    print("| map | shape | foreground px | instances numpy / torch | px differing | AJI torch vs numpy | numpy s | torch s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, prob, ip in maps:
        kw = {"threshold": ip.threshold, "min_area_px": ip.min_area_px, "h_px": ip.h_px}
        t_np, ref = best(partial(instances_from_probability, prob, method=ip.method, **kw), args.repeats, False)
        x = torch.from_numpy(prob).to(dev)
        instances_torch(x, method=ip.method, **kw)  # warm-up
        t_t, ours = best(partial(instances_torch, x, method=ip.method, **kw), args.repeats, dev.type == "cuda")
        ours = ours.cpu().numpy()
        print(f"| {name} | {prob.shape[0]} x {prob.shape[1]} | {int((ref > 0).sum())} | {ref.max()} / {ours.max()} | "
              f"{int((ref != ours).sum())} | {aji(ref, ours):.4f} | {t_np:.3f} | {t_t:.3f} |")


if __name__ == "__main__":
    main()
