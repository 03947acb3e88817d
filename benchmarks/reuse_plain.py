"""Reuse a finished plain stage 2 of a quick MO benchmark run under other CRF-stage settings.

The plain stage (24 epochs) does not depend on the CRF settings, but its checkpoint's
fingerprint covers the whole configuration, so ``stage2.py --resume`` refuses it once a
CRF setting changes. This copies the plain checkpoint of SRC into DST with the fingerprint
of the new settings, after checking that SRC was written under the quick profile with
``--set`` values OLD. Then ``stage2.py --resume --work DST --set ...`` trains only the CRF
stage (session 11's β variants, ``results/stage2-quick-variants.md``).

    .venv/bin/python benchmarks/reuse_plain.py SRC DST segmentation.crf_beta=10.0 [--old KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage1 import parse_set

from pointnuc.config import TrainConfig, profile_config
from pointnuc.models.net import build_network
from pointnuc.train.fit import fingerprint

N_TRAIN_IMAGES = 12  #: the MO split's training images


def plain_fingerprint(cfg: TrainConfig) -> str:
    """The fingerprint ``train_segmenter`` gives its plain stage under ``cfg``."""
    seg = cfg.segmentation
    return fingerprint(build_network(2, cfg.encoder, pretrained=False), stage="segmenter", lr=seg.lr,
                       batch_size=seg.batch_size, seed=cfg.seed + 7, weight_decay=0.0, schedule=seg.lr_schedule,
                       ema=seg.ema, n_items=N_TRAIN_IMAGES * cfg.data.patches_per_image,
                       config={"train": cfg.to_dict(), "stage": "plain"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path, help="work folder of the finished run")
    ap.add_argument("dst", type=Path, help="new work folder")
    ap.add_argument("new", nargs="*", metavar="KEY=VALUE", help="the new run's --set values (CRF settings, seed)")
    ap.add_argument("--old", action="append", default=[], metavar="KEY=VALUE", help="the finished run's --set values")
    args = ap.parse_args(argv)
    state = torch.load(args.src / "checkpoints" / "segmenter.pt", map_location="cpu", weights_only=False)
    old = plain_fingerprint(profile_config("quick", **{"seed": 0, **parse_set(args.old)}))
    if state["fingerprint"] != old:
        print(f"{args.src} was not written by a quick run with --set {' '.join(args.old) or '(none)'}", file=sys.stderr)
        return 1
    state["fingerprint"] = plain_fingerprint(profile_config("quick", **{"seed": 0, **parse_set(args.new)}))
    (args.dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(state, args.dst / "checkpoints" / "segmenter.pt")
    print(f"plain stage (epoch {state['epoch']}) of {args.src} ready in {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
