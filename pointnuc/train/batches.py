"""How batches reach the network: one stream over all epochs, DataLoader workers, ImageNet normalisation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pointnuc.models.net import IMAGENET_MEAN, IMAGENET_STD


def normalise_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalised float; float input is passed through."""
    if images.dtype != torch.uint8:
        return images.float()
    t = images.float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=t.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=t.device).view(1, 3, 1, 1)
    return (t - mean) / std


def _seed_worker(worker_id: int) -> None:
    torch.set_num_threads(1)


def loader_start_method() -> str | None:
    """How DataLoader workers start: ``"spawn"`` when a JVM runs in this process, else the default.

    A worker forked from a process that runs QuPath's JVM (paquo, jpype) can hang on a lock
    a JVM thread held at the fork; pointnuc itself runs QuPath in a child process
    (:mod:`pointnuc.io.qupath`), but a script may have imported paquo.
    """
    import sys

    jpype = sys.modules.get("jpype")
    started = getattr(jpype, "isJVMStarted", None)
    return "spawn" if started is not None and started() else None


def default_workers(device: torch.device) -> int:
    """DataLoader workers: 1 on CPU (the network already uses the cores), on CUDA enough
    to keep the GPU fed (all cores but two, at most 12)."""
    if device.type != "cuda":
        return 1
    return max(2, min(12, (os.cpu_count() or 4) - 2))


class EpochBatches(Sampler[list[Any]]):
    """Batches of all epochs ``epochs`` in one stream, reshuffled per epoch from ``seed``.

    With ``epoch_items`` each index is ``(epoch, i)``, so an epoch-aware dataset (such as
    :class:`pointnuc.train.data.PatchDataset`) draws that epoch's crops in whatever worker
    runs it. One DataLoader over all epochs keeps its workers and its prefetch running across
    epoch ends instead of restarting them every epoch (on a GPU, where an epoch lasts a
    second, the restarts dominated).
    """

    def __init__(self, n: int, batch_size: int, epochs: range, seed: int, epoch_items: bool) -> None:
        self.n, self.batch_size, self.epochs, self.seed, self.epoch_items = n, batch_size, epochs, seed, epoch_items

    def steps_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def __len__(self) -> int:
        return len(self.epochs) * self.steps_per_epoch()

    def __iter__(self) -> Iterator[list[Any]]:
        for e in self.epochs:
            g = torch.Generator().manual_seed(self.seed * 100003 + e)
            perm = torch.randperm(self.n, generator=g).tolist()
            for i in range(0, self.n, self.batch_size):
                chunk = perm[i : i + self.batch_size]
                yield [(e, j) for j in chunk] if self.epoch_items else chunk


def epoch_stream(dataset: Dataset, batch_size: int, epochs: range, seed: int, workers: int,
                 pin_memory: bool) -> tuple[Iterator[Any], int]:
    """The batches of all ``epochs`` in one stream (:class:`EpochBatches`), and the steps per epoch."""
    epoch_items = hasattr(dataset, "set_epoch")  # epoch-aware: its items are keyed (epoch, i)
    sampler = EpochBatches(len(dataset), batch_size, epochs, seed, epoch_items)  # type: ignore[arg-type]  # map-style: sized
    if not epochs:
        return iter(()), sampler.steps_per_epoch()
    loader_kw: dict[str, Any] = {}
    if workers > 0:
        loader_kw = {"worker_init_fn": _seed_worker, "prefetch_factor": 4,
                     "multiprocessing_context": loader_start_method()}
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory, **loader_kw)
    return iter(loader), sampler.steps_per_epoch()
