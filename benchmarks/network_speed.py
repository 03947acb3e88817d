"""Forward throughput of the segmenter's U-Net per encoder on this CPU (issue #28).

    nice -n 10 .venv/bin/python benchmarks/network_speed.py --out benchmarks/results/network-speed.md

For each encoder (random weights, two output channels, evaluation mode) and each setting
(threads, channels-last, bfloat16 autocast) it times the forward pass of a batch of tiles as
``pointnuc segment`` sends them (``torch.inference_mode``), alternating the rows in rounds so that
a change of load elsewhere on the machine moves every row alike, and keeps each row's best
round. "Mpx/s" counts the pixels the network sees (tile windows, halo included); GMAC/Mpx is
multiply-adds per megapixel (torch's FLOP counter / 2). The ratio column is each row's time
relative to resnet34 at the same threads, fp32, contiguous, from CPU seconds (this process's user +
system time), which a busy machine inflates far less than wall time when one thread runs: on a shared
machine read the 1-thread CPU-second ratios; wall seconds at 2 threads need an idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pointnuc.models.net import build_network


def cpu_flags() -> str:
    """The CPU's model name and its bf16/AMX flags (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    wanted = [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")]
    return f"{name} ({', '.join(wanted) or 'no avx2'})"


def gmac_per_mpx(net: torch.nn.Module, tile: int) -> float:
    """Multiply-adds of one forward pass per megapixel of input."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, tile, tile)
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        net(x)
    return fc.get_total_flops() / 2 / 1e9 / (tile * tile / 1e6)


def time_forward(net: torch.nn.Module, x: torch.Tensor, *, bf16: bool, reps: int) -> tuple[float, float]:
    """Best wall seconds and best CPU seconds (this process) of ``reps`` forward passes of ``x`` (after one warm-up)."""
    wall = cpu = float("inf")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        net(x)
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            net(x)
            wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu


def time_train_step(net: torch.nn.Module, batch: int, crop: int, reps: int) -> float:
    """Best CPU seconds of one training step (forward, cross-entropy, backward, Adam) on ``batch`` crops."""
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, crop, crop)
    y = torch.randint(0, 2, (batch, crop, crop))
    best = float("inf")
    for i in range(reps + 1):
        c0 = time.process_time()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if i:
            best = min(best, time.process_time() - c0)
    net.eval()
    return best


def segment_images(images: list[Path], encoders: list[str], threads: int) -> list[str]:
    """Rows of seconds per image of ``segment_slide`` in-process: the old CPU tiles (512, batch 2) vs today's default.

    The network is ``benchmarks/segment_speed.py``'s BenchNet (a U-Net's compute, a darkness map's output),
    so post-processing sees nucleus-like objects without a trained model. Each image's best of two runs.
    """
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "tests"))
    from segment_speed import NORM_REF, BenchNet

    from pointnuc.config import profile_config
    from pointnuc.infer.wsi import segment_slide
    from pointnuc.io.slide import open_slide
    from pointnuc.models.bundle import ModelInfo

    torch.set_num_threads(threads)
    rows = ["", (f"`segment_slide` in-process on {len(images)} images, {threads} threads (network: BenchNet, "
            "a U-Net's compute with a darkness map's output), best of 2 runs per image:"), "",
            "| encoder | tiles | tile px | s per image | CPU s per image | network s | post s (busy) | read s (busy) | nuclei |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for enc in encoders:
        net = BenchNet(enc).eval()
        info = ModelInfo(config=profile_config("quick", encoder=enc), norm_reference=NORM_REF)
        for label, kw in (("512, batch 2", {"tile_size": 512, "batch_size": 2}), ("fitted (default)", {})):
            tot = {"s": 0.0, "cpu": 0.0, "network": 0.0, "post": 0.0, "read": 0.0, "n": 0.0}
            tile = 0
            for path in images:
                runs, cpus = [], []
                for _ in range(2):
                    c0 = time.process_time()
                    with open_slide(path) as slide:
                        runs.append(segment_slide(slide, net, info, progress=False, device="cpu", **kw))
                    cpus.append(time.process_time() - c0)
                r = min(runs, key=lambda r: r.seconds)
                tot["s"] += r.seconds
                tot["cpu"] += min(cpus)
                tot["n"] += r.n_nuclei
                tile = r.tile_size
                for k in ("network", "post", "read"):
                    tot[k] += r.timings[k]
            n = len(images)
            rows.append(f"| {enc} | {label} | {tile} | {tot['s'] / n:.2f} | {tot['cpu'] / n:.2f} | {tot['network'] / n:.2f} | "
                        f"{tot['post'] / n:.2f} | {tot['read'] / n:.2f} | {tot['n'] / n:.0f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoders", default="resnet34,resnet18,slim18,slim")
    ap.add_argument("--tile", type=int, default=512, help="tile window, px a side")
    ap.add_argument("--batch", type=int, default=1, help="tiles per forward pass (pointnuc segment's CPU default: as many as fit 2 Mpx)")
    ap.add_argument("--threads", default="1,2", help="torch.set_num_threads values to try")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="forward passes per row and round (best kept)")
    ap.add_argument("--variants", default="fp32,channels_last,bf16,bf16+channels_last",
                    help="settings tried with the first --threads value")
    ap.add_argument("--train-batch", type=int, default=8, help="training step: crops per batch (quick profile: 8)")
    ap.add_argument("--train-crop", type=int, default=160, help="training step: crop size (quick profile: 160)")
    ap.add_argument("--images", type=Path, help="a folder of images (e.g. the MO test .tif): also time segment_slide")
    ap.add_argument("--max-images", type=int, default=3)
    ap.add_argument("--segment-threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    encoders = args.encoders.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    nets = {e: build_network(2, e, pretrained=False).eval() for e in encoders}
    macs = {e: gmac_per_mpx(nets[e], args.tile) for e in encoders}
    rows: list[tuple[str, int, str]] = []
    for e in encoders:
        for v in args.variants.split(","):
            rows.append((e, threads[0], v))
        for t in threads[1:]:
            rows.append((e, t, "fp32"))
    x = torch.randn(args.batch, 3, args.tile, args.tile)
    best: dict[tuple[str, int, str], tuple[float, float]] = {}
    load0 = os.getloadavg()[0]
    for _ in range(args.rounds):
        for row in rows:
            e, t, v = row
            torch.set_num_threads(t)
            net = nets[e]
            inp = x
            if "channels_last" in v:
                net = net.to(memory_format=torch.channels_last)
                inp = x.contiguous(memory_format=torch.channels_last)
            s = time_forward(net, inp, bf16="bf16" in v, reps=args.reps)
            net.to(memory_format=torch.contiguous_format)
            w0, c0 = best.get(row, (float("inf"), float("inf")))
            best[row] = (min(w0, s[0]), min(c0, s[1]))
    train: dict[str, float] = {}
    torch.set_num_threads(threads[0])
    for _ in range(args.rounds):
        for e in encoders:
            train[e] = min(train.get(e, float("inf")), time_train_step(nets[e], args.train_batch, args.train_crop, 1))
    mpx = args.batch * args.tile * args.tile / 1e6
    lines = [
        "# Forward throughput of the U-Net per encoder, CPU (issue #28)",
        "",
        "    " + " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]]),
        "",
        (f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {platform.node()} {platform.machine()}, "
         f"{os.cpu_count()} CPUs, {cpu_flags()}, torch {torch.__version__}; load average {load0:.1f} at the start, "
         f"{os.getloadavg()[0]:.1f} at the end"),
        "",
        (f"Batch of {args.batch} tiles of {args.tile} x {args.tile} px, random weights, torch.inference_mode; "
         f"best of {args.rounds} rounds x {args.reps} passes per row."),
        "",
        (f"| encoder | params (M) | GMAC/Mpx | threads | setting | wall s per batch | CPU s per batch | Mpx/s (wall) "
        f"| Mpx per CPU-s | CPU time vs {encoders[0]} |"),
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        e, t, v = row
        base = best.get((encoders[0], t, "fp32"), (float("nan"), float("nan")))[1]
        params = sum(p.numel() for p in nets[e].parameters()) / 1e6
        wall, cpu = best[row]
        lines.append(f"| {e} | {params:.2f} | {macs[e]:.1f} | {t} | {v} | {wall:.3f} | {cpu:.3f} | {mpx / wall:.2f} | "
                     f"{mpx / cpu:.2f} | {cpu / base:.2f} |")
    lines += [
        "",
        (f"Training step (forward, cross-entropy, backward, Adam) on {args.train_batch} crops of {args.train_crop} px, "
         f"{threads[0]} threads, fp32:"),
        "",
        "| encoder | CPU s per step | CPU time vs " + encoders[0] + " |",
        "|---|---:|---:|",
    ]
    lines += [f"| {e} | {train[e]:.3f} | {train[e] / train[encoders[0]]:.2f} |" for e in encoders]
    if args.images:
        images = sorted(args.images.glob("*.tif"))[: args.max_images]
        lines += segment_images(images, encoders, args.segment_threads)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
