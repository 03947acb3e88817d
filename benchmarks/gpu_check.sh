#!/usr/bin/env bash
# Every GPU measurement of issue #28 in one device call (run from the repository root; about 5-8 min on an H100/H200):
#   end to end vs the bare network and the 100k x 80k slide extrapolation, per encoder and working resolution
#   (benchmarks/segment_speed.py prints both; goal: >= 85 % of the bare network, <= 30 s for the slide).
# Written in session 19 without a GPU: checked with `bash -n` only; its first GPU run is its test.
# Set-up on a bare machine first: python3 -m venv .venv && .venv/bin/pip install torch torchvision && .venv/bin/pip install -e .
# Results land in ${OUT:-/tmp}/gpu-check/; copy them into benchmarks/results/ with the machine's name.
set -u
PY=${PY:-.venv/bin/python}
DEST=${OUT:-/tmp}/gpu-check
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$DEST/gpu.txt" 2>&1
# at most 7.3 min in all (the limit for one device call: 8): three speed runs, the CPU-instances run, instances_torch
for run in "resnet34 0.5" "resnet34 0.25" "slim 0.5"; do
  set -- $run
  timeout 100 "$PY" benchmarks/segment_speed.py speed --encoder "$1" --model-px "$2" --size 8192 --device cuda \
    --instances device > "$DEST/speed-$1-$2.txt" 2>&1 || echo "speed $1 $2: exit $?" >> "$DEST/errors.txt"
done
# instance labels: the speed runs above compute them on the GPU (--instances device; off by default until measured);
# the same run with them in numpy on the CPU (the path before), and instances_torch alone on one 1184 x 1184 map
timeout 100 "$PY" benchmarks/segment_speed.py speed --encoder resnet34 --model-px 0.5 --size 8192 --device cuda \
  --instances cpu > "$DEST/speed-resnet34-0.5-instances-cpu.txt" 2>&1 || echo "speed instances cpu: exit $?" >> "$DEST/errors.txt"
timeout 40 "$PY" benchmarks/instances_torch.py --synthetic 1184 --device cuda --repeats 5 \
  > "$DEST/instances-torch.txt" 2>&1 || echo "instances_torch: exit $?" >> "$DEST/errors.txt"
tail -n 5 "$DEST"/speed-*.txt "$DEST/instances-torch.txt"
