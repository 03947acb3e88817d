"""Per-tile CPU costs of ``segment_slide`` besides the network: reading, instances, polygons.

    .venv/bin/python benchmarks/post_speed.py --tile 1024 --model-px 0.5

One tile of the synthetic slide of ``segment_speed.py`` (0.25 µm/px JPEG pyramid), its
probability map from the same darkness rule as ``BenchNet``, then each step timed alone
(best of ``--repeats``), single-threaded, so the figures are CPU seconds per tile.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def best(fn, repeats: int) -> tuple[float, object]:
    out, ts = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--model-px", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from helpers import canonical_labels, watershed_reference
    from segment_speed import NORM_REF, make_slide

    from pointnuc.config import profile_config
    from pointnuc.infer import instances as inst
    from pointnuc.infer.polygons import TileContext, pack_nuclei, tile_nuclei, unpack_nuclei
    from pointnuc.infer.slide_tiles import plan_slide, read_tile, working_halo
    from pointnuc.infer.wsi import instance_params
    from pointnuc.io.slide import open_slide
    from pointnuc.models.bundle import ModelInfo
    from pointnuc.stain import colour_apply as normalise_tile

    info = ModelInfo(config=profile_config("quick", **{"data.pixel_size_um": args.model_px}), norm_reference=NORM_REF)
    ds = args.model_px / 0.25
    size = int(args.tile * ds * 2)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "post.tif"
        make_slide(path, size, 1.0)
        with open_slide(path) as slide:
            plan = plan_slide(slide, info, tile_size=args.tile, tissue=False)
            tile = plan.tiles[0]
            t_read, img = best(lambda: read_tile(slide, plan, tile), args.repeats)
    src = (np.array([70.0, 20.0, -10.0], np.float32), np.array([15.0, 10.0, 8.0], np.float32), [0.35, 1.2, 0.32, 0.6])
    t_norm, img = best(lambda: normalise_tile(img, src, NORM_REF), args.repeats)
    dark = 1.0 - ndi.uniform_filter(img.astype(np.float32).mean(-1) / 255.0, 3, mode="nearest")
    prob = (1.0 / (1.0 + np.exp(-30.0 * (dark - 0.45)))).astype(np.float32)
    params = instance_params(info)
    kw = {"threshold": params.threshold, "min_area_px": params.min_area_px, "h_px": params.h_px}
    print(f"# tile {args.tile} px at {args.model_px} µm/px (halo {working_halo(info)}), method {params.method}, h {params.h_px:.2f}")
    print(f"read (level 0, downsample {ds:g}): {t_read * 1e3:.0f} ms;  colour normalisation (Reinhard + stain): {t_norm * 1e3:.0f} ms")
    t_cc, lab_cc = best(lambda: inst.instances_from_probability(prob, method="cc", **kw), args.repeats)
    t_ws, lab_ws = best(lambda: inst.instances_from_probability(prob, method="watershed", **kw), args.repeats)
    print(f"instances cc: {t_cc * 1e3:.0f} ms ({lab_cc.max()});  watershed: {t_ws * 1e3:.0f} ms ({lab_ws.max()})")
    t_ref, lab_ref = best(lambda: watershed_reference(prob, **kw), args.repeats)
    same = lab_ref.max() == lab_ws.max() and np.array_equal(canonical_labels(lab_ref), canonical_labels(lab_ws))
    print(f"instances watershed, old whole-tile path: {t_ref * 1e3:.0f} ms ({lab_ref.max()}); same instances: {same}")
    ctx = TileContext(plan.origin, plan.downsample, plan.pixel_size_um, params, None, keep_margin=None)
    t_tile, (nuc, _) = best(lambda: tile_nuclei(prob, tile, ctx), args.repeats)
    print(f"tile_nuclei (instances + ownership + polygons + measurements): {t_tile * 1e3:.0f} ms, "
          f"{len(nuc)} nuclei, {(t_tile - t_ws) / max(len(nuc), 1) * 1e3:.3f} ms per nucleus beyond instances")
    old = replace(ctx, outline="pixels")
    t_old, (nuc_old, _) = best(lambda: tile_nuclei(prob, tile, old), args.repeats)
    print(f"  the same with the pixel-staircase outlines of sessions <= 18: {t_old * 1e3:.0f} ms, {len(nuc_old)} nuclei "
          f"(sub-pixel outlines cost {(t_tile - t_old) * 1e3:.0f} ms more per tile)")
    # the GPU path: a worker process packs the tile's nuclei, the main process unpacks them (serial work there)
    t_pack, packed = best(lambda: pack_nuclei(nuc), args.repeats)
    t_unpack, _ = best(lambda: unpack_nuclei(packed), args.repeats)
    t_stack, _ = best(lambda: np.stack([img] * 16), args.repeats)
    print(f"worker processes (GPU path): pack {t_pack * 1e3:.0f} ms; main process: unpack {t_unpack * 1e3:.0f} ms per tile, "
          f"batching (np.stack of 16 tiles) {t_stack / 16 * 1e3:.1f} ms per tile")


if __name__ == "__main__":
    main()
