"""Throughput and memory of ``segment_slide``: end to end vs the bare network, on the same tiles.

    .venv/bin/python benchmarks/segment_speed.py speed --encoder resnet34 --model-px 0.5
    .venv/bin/python benchmarks/segment_speed.py speed --encoder resnet34 --model-px 0.25
    .venv/bin/python benchmarks/segment_speed.py memory --size 20000 --encoder tiny
    # on a GPU machine: same commands; device auto picks CUDA (AMP, tile 1024, batch 16)
    # --instances device|cpu: instance labels in torch on the device or numpy in post-processing (the default)

The slide is a synthetic pyramidal TIFF (JPEG tiles, 0.25 µm/px = 40x) with dark discs
on pink tissue. The network is a U-Net with the chosen encoder and random weights; its
output is replaced by a darkness map (added as ``0 * logits``, so every FLOP of the
U-Net is still paid) so that post-processing sees a realistic number of nuclei.

Megapixels are working-resolution pixels of the tile cores (each slide pixel once),
the same count for both figures, so the ratio is the share of the network's speed
the whole pipeline keeps (goal: >= 85 %). "Once started" leaves out each run's fixed
start (plan, thumbnail, colour statistics, worker start-up), which a test slide of a few
hundred megapixels pays in full and a whole slide once; the whole-slide extrapolation is
that start plus the slide's megapixels at the once-started rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from synth_slide import SynthSlide, lattice_discs, write_slide

from pointnuc.config import profile_config
from pointnuc.models.bundle import ModelInfo
from pointnuc.models.net import IMAGENET_MEAN, IMAGENET_STD, UNet

SLIDE_PX = 0.25
#: MoNuSeg-like colour reference (LAB mean/std), so the Reinhard step is paid as in real use
NORM_REF = {"mean": [62.0, 25.0, -12.0], "std": [16.0, 9.0, 7.0], "stain": [0.29, 1.82, 0.30, 0.90]}  # stain: the MO train images'


class BenchNet(nn.Module):
    """A real U-Net's compute with a darkness map's output (realistic nuclei for post-processing)."""

    def __init__(self, encoder: str) -> None:
        super().__init__()
        self.unet = UNet(2, encoder)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.unet(x)
        dark = 1.0 - self.pool((x * self.std + self.mean).mean(1, keepdim=True))
        fg = 30.0 * (dark - 0.45)
        return logits * 0 + torch.cat([torch.zeros_like(fg), fg], dim=1)


def make_slide(path: Path, size: int, tissue: float, seed: int = 0) -> SynthSlide:
    tissue_x1 = round(size * tissue)
    centres, radii = lattice_discs(size, size, tissue_x1, 44.0, seed)
    truth = SynthSlide(size, size, centres, radii, tissue_x1)
    write_slide(path, truth, SLIDE_PX, levels=4, compression="jpeg")
    return truth


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its ended children (worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def speed(args: argparse.Namespace) -> dict:
    from pointnuc.infer.predict import predict_batch
    from pointnuc.infer.slide_tiles import plan_slide, read_tile
    from pointnuc.infer.wsi import CPU_BATCH_PIXELS, DEFAULT_BATCH, DEFAULT_TILE, segment_slide
    from pointnuc.io.slide import open_slide

    dev = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else (args.device if args.device != "auto" else "cpu"))
    kind = dev.type
    tile_setting = args.tile_size or DEFAULT_TILE[kind]  # on the CPU (smallest, largest): fitted to the slide
    amp = kind == "cuda"
    info = ModelInfo(config=profile_config("quick", **{"data.pixel_size_um": args.model_px, "encoder": args.encoder}), norm_reference=NORM_REF)
    torch.manual_seed(0)
    net = BenchNet(args.encoder).eval().to(dev)
    net = net.to(memory_format=torch.channels_last)  # as segment_slide runs it
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "speed.tif"
        t0 = time.perf_counter()
        make_slide(path, args.size, 1.0)
        t_write = time.perf_counter() - t0
        with open_slide(path) as slide:
            plan = plan_slide(slide, info, tile_size=tile_setting)
            tile = plan.grid.tile_size
            batch = args.batch_size or DEFAULT_BATCH[kind] or max(1, CPU_BATCH_PIXELS // (tile * tile))
            tiles = list(plan.tiles)
            core_mp = sum(t.core.height * t.core.width for t in tiles) / 1e6
            images = [read_tile(slide, plan, t) for t in tiles]  # the same tiles, held in memory for the bare run
            predict_batch(net, np.stack(images[:batch]), dev, amp)  # warm-up
            bare, e2e, start, res = [], [], [], None
            bare_cpu, e2e_cpu = [], []
            for _ in range(args.repeats):
                if kind == "cuda":
                    torch.cuda.synchronize()
                c0 = cpu_seconds()
                t0 = time.perf_counter()
                for i in range(0, len(images), batch):
                    predict_batch(net, np.stack(images[i : i + batch]), dev, amp)
                if kind == "cuda":
                    torch.cuda.synchronize()
                bare.append(time.perf_counter() - t0)
                bare_cpu.append(cpu_seconds() - c0)
                c0 = cpu_seconds()
                res = segment_slide(slide, net, info, device=dev, batch_size=batch, tile_size=tile,
                                    num_workers=args.workers, progress=False, post_processes=args.post_processes,
                                    instances_on_device=None if args.instances == "auto" else args.instances == "device")
                e2e.append(res.seconds)
                start.append(res.start_seconds)
                e2e_cpu.append(cpu_seconds() - c0)
    assert res is not None
    tb, te = min(bare), min(e2e)
    # once started: the slide's fixed start (plan, thumbnail, colour statistics, workers) left out
    i_best = e2e.index(te)
    ts = te - start[i_best]
    out = {
        "device": str(dev), "encoder": args.encoder, "model_px_um": args.model_px, "slide_px": args.size,
        "tile": tile, "halo": res.halo, "batch": batch, "amp": amp, "workers": args.workers,
        "post_processes": args.post_processes, "n_tiles": len(tiles),
        "core_megapixels": round(core_mp, 3), "nuclei": res.n_nuclei, "instances": info.config.segmentation.instance_method,
        "instances_on": args.instances,
        "bare_seconds": [round(t, 2) for t in bare], "e2e_seconds": [round(t, 2) for t in e2e],
        "bare_mp_s": round(core_mp / tb, 4), "e2e_mp_s": round(core_mp / te, 4), "ratio": round(tb / te, 3),
        "start_seconds": [round(t, 2) for t in start], "started_mp_s": round(core_mp / ts, 4),
        "started_ratio": round(tb / ts, 3),
        "busy_seconds": {k: round(v, 2) for k, v in res.timings.items()}, "slide_write_seconds": round(t_write, 1),
        # CPU seconds (all threads, and worker processes once they end): less sensitive to other jobs than wall time
        "bare_cpu_seconds": [round(t, 2) for t in bare_cpu], "e2e_cpu_seconds": [round(t, 2) for t in e2e_cpu],
    }
    # extrapolation: a 100,000 x 80,000 px 40x (0.25 µm/px) slide with 40 % tissue
    ds = args.model_px / SLIDE_PX
    wsi_mp = 100_000 * 80_000 * 0.40 / ds**2 / 1e6
    out["wsi_100k_80k_40pct_minutes"] = round((start[i_best] + wsi_mp / out["started_mp_s"]) / 60, 1)
    return out


def memory_child(args: argparse.Namespace) -> None:
    from pointnuc.infer.wsi import segment_slide
    from pointnuc.io.slide import open_slide

    info = ModelInfo(config=profile_config("quick", **{"data.pixel_size_um": args.model_px, "encoder": args.encoder}), norm_reference=NORM_REF)
    net = BenchNet(args.encoder).eval()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open_slide(Path(args.slide)) as slide:
        n = [0]
        sink = (lambda found: n.__setitem__(0, n[0] + len(found))) if args.stream else None
        res = segment_slide(slide, net, info, batch_size=args.batch_size, num_workers=args.workers, progress=False,
                            sink=sink)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": round(peak, 1), "rss_after_imports_mib": round(base, 1), "seconds": round(res.seconds, 1),
                      "n_tiles": res.n_tiles, "n_tiles_total": res.n_tiles_total, "nuclei": res.n_nuclei,
                      "kept_in_memory": len(res.nuclei), "busy_seconds": {k: round(v, 1) for k, v in res.timings.items()}}))


def memory(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "big.tif"
        t0 = time.perf_counter()
        make_slide(path, args.size, args.tissue)
        t_write = time.perf_counter() - t0
        size_mb = path.stat().st_size / 2**20
        cmd = [sys.executable, __file__, "_memory_child", "--slide", str(path), "--encoder", args.encoder,
               "--model-px", str(args.model_px), "--batch-size", str(args.batch_size or 2)]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        if args.stream:
            cmd.append("--stream")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update({"slide_px": args.size, "tissue_fraction": args.tissue, "raw_rgb_mib": round(args.size**2 * 3 / 2**20),
                "file_mib": round(size_mb), "write_seconds": round(t_write, 1), "encoder": args.encoder,
                "model_px_um": args.model_px, "stream": args.stream})
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "memory", "_memory_child"])
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--model-px", type=float, default=0.5, help="model pixel size, µm/px (quick profile: 0.5)")
    p.add_argument("--size", type=int, default=3072, help="slide side, full-res px at 0.25 µm/px")
    p.add_argument("--tissue", type=float, default=0.6, help="share of the slide width that is tissue (memory run)")
    p.add_argument("--tile-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="reader/post threads [default: by device]")
    p.add_argument("--post-processes", type=int, default=None,
                   help="polygon work in this many worker processes [default: by device; 0 = threads]")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--instances", choices=["auto", "device", "cpu"], default="auto",
                   help="instance labels on the device (torch) or the CPU (numpy) [default: device on CUDA]")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--stream", action="store_true", help="memory run: nuclei to a sink, not kept")
    p.add_argument("--slide", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "_memory_child":
        memory_child(args)
        return
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {machine()}")
    print("# " + " ".join([Path(sys.executable).name, *sys.argv]))
    res = speed(args) if args.what == "speed" else memory(args)
    print(json.dumps(res, indent=1))
    if args.what == "speed":
        print(f"end to end {res['e2e_mp_s']:.3f} MP/s, bare network {res['bare_mp_s']:.3f} MP/s, ratio {100 * res['ratio']:.0f} %; "
              f"100k x 80k px 40x slide, 40 % tissue: {res['wsi_100k_80k_40pct_minutes']} min on {res['device']}")
        print(f"once started ({res['start_seconds']} s of start-up left out): {res['started_mp_s']:.3f} MP/s, "
              f"ratio {100 * res['started_ratio']:.0f} %")
    else:
        print(f"peak RSS {res['peak_rss_mib']:.0f} MiB for a {res['slide_px']} x {res['slide_px']} px slide "
              f"({res['raw_rgb_mib']} MiB raw RGB), {res['seconds']} s")


if __name__ == "__main__":
    main()
