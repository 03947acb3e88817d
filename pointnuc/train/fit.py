"""The one training loop both stages use: Adam, AMP on CUDA, checkpoints, resume, NaN guard.

Checkpoints: ``checkpoint_dir/<stage_name>.pt`` (model, optimizer, AMP scaler, epoch, history,
best state, configuration fingerprint), written atomically, after the first and the last epoch
of every fit and in between after every epoch unless saving would take more than
:data:`CHECKPOINT_COST_SHARE` of the training time (:func:`checkpoint_due`). So an interrupted
run, however short, has an epoch to resume from. On a CPU an epoch lasts far longer than a save,
so every epoch is saved; on a GPU an epoch of the paper's schedule lasts about a second and a
ResNet-34 checkpoint (with Adam's state and the best state) is ~360 MB, about 2 s to write and
fsync on a 2-core VM, so a save follows about every 20 s of training.
``resume=True`` continues from it; a checkpoint written under another configuration
(different fingerprint) is refused. ``fit`` leaves its ``epochs`` argument out of the
fingerprint, but ``pointnuc train`` passes its whole configuration (epochs included) as
``config``, so there any change of settings is a new run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pointnuc.config import LR_SCHEDULES
from pointnuc.errors import InputError, TrainingError
from pointnuc.fileio import atomic_write
from pointnuc.models.net import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

#: checkpoints may take at most about this share of the training time (see :func:`checkpoint_due`)
CHECKPOINT_COST_SHARE = 0.1

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EpochHook = Callable[[int, nn.Module], "dict[str, Any] | None"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an InputError."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA GPU is available")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")


@dataclass
class EpochStats:
    """What one epoch did."""

    epoch: int  #: 1-based
    loss: float  #: mean training loss over the epoch's batches
    seconds: float
    patches_per_s: float
    data_wait_share: float  #: share of the epoch's time spent waiting for batches
    scores: dict[str, Any] = field(default_factory=dict)  #: what ``on_epoch_end`` returned


@dataclass
class FitHistory:
    """Per-epoch statistics and the selected epoch."""

    epochs: list[EpochStats] = field(default_factory=list)
    best_epoch: int | None = None  #: epoch whose state the model holds after fit (None: the last)
    best_score: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FitHistory":
        return cls(
            epochs=[EpochStats(**e) for e in d.get("epochs", [])],
            best_epoch=d.get("best_epoch"),
            best_score=d.get("best_score"),
        )

    @property
    def losses(self) -> list[float]:
        return [e.loss for e in self.epochs]


def fingerprint(model: nn.Module, **settings: Any) -> str:
    """A short hash of the architecture (parameter names/shapes) and training settings."""
    arch = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    blob = json.dumps({"arch": arch, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


class EpochBatches(torch.utils.data.Sampler):
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

    def __iter__(self):  # type: ignore[override]
        for e in self.epochs:
            g = torch.Generator().manual_seed(self.seed * 100003 + e)
            perm = torch.randperm(self.n, generator=g).tolist()
            for i in range(0, self.n, self.batch_size):
                chunk = perm[i : i + self.batch_size]
                yield [(e, j) for j in chunk] if self.epoch_items else chunk


def _save_atomic(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_due(
    epoch: int, first: int, last: int, since_save_s: float, save_s: float | None, interval_s: float | None = None
) -> bool:
    """Whether :func:`fit` writes a checkpoint after ``epoch``.

    Always after the ``first`` epoch of a fit (so an interrupted run has something to resume
    from) and after the ``last``; in between when the previous save took (``save_s``) at most
    :data:`CHECKPOINT_COST_SHARE` of the time trained since it (``since_save_s``), which keeps
    saving below about a tenth of the training time. ``interval_s`` (tests): instead, a save
    whenever that many seconds have passed since the last one (and after the last epoch).
    """
    if epoch >= last:
        return True
    if interval_s is not None:
        return since_save_s >= interval_s
    if epoch == first or save_s is None:
        return True
    return save_s <= CHECKPOINT_COST_SHARE * since_save_s


def checkpoint_path(checkpoint_dir: Path, stage_name: str) -> Path:
    """Where :func:`fit` keeps the checkpoint of ``stage_name``."""
    return Path(checkpoint_dir) / f"{stage_name}.pt"


def scheduled_lr(lr: float, schedule: str, step: int, total: int) -> float:
    """The learning rate of 0-based ``step`` of ``total``: ``constant``, or ``cosine`` decay from ``lr`` towards 0."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return 0.5 * lr * (1.0 + math.cos(math.pi * step / max(total, 1)))
    raise InputError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")


def ema_decay(ema: float, step: int) -> float:
    """The averaging weight of 0-based ``step``: ``ema``, lower in the first steps so the start fades fast."""
    return min(ema, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(average: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    """``average ← decay · average + (1 − decay) · model`` for float tensors (BatchNorm statistics too); others copied."""
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            average[k].lerp_(v.detach(), 1.0 - decay)
        else:
            average[k].copy_(v)


def fit(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    loss_fn: LossFn,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    device: str | torch.device,
    checkpoint_dir: Path,
    stage_name: str,
    seed: int,
    resume: bool,
    progress: bool = True,
    on_epoch_end: EpochHook | None = None,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    ema: float = 0.0,
    num_workers: int | None = None,
    config: Mapping[str, Any] | None = None,
    checkpoint_interval_s: float | None = None,
) -> FitHistory:
    """Train ``model`` on ``dataset`` with Adam; returns the per-epoch history.

    ``loss_fn(logits, targets) -> scalar``. Batches of uint8 images are ImageNet-normalised
    on the device. ``on_epoch_end(epoch, model)`` may return a dict; if it has a ``score``
    (higher is better) the best-scoring state is kept and loaded into ``model`` at the end.
    A non-finite loss stops training with :class:`TrainingError`; the last checkpoint
    (end of the previous epoch) stays on disk. ``config``: extra settings that must match
    for a resume (e.g. the stage's TrainConfig as a dict). ``num_workers``: DataLoader
    workers (default: 1 on CPU — the network already uses the cores —, 4 on CUDA).
    ``schedule``: the learning rate per step (:func:`scheduled_lr`), set from the step
    number, so a resumed run continues on the same curve. ``ema`` > 0: an exponential
    moving average of the weights (this decay per step, :func:`ema_decay`) is what is
    scored, kept and returned; the optimiser trains the live weights. Checkpoints: see
    :func:`checkpoint_due` (``checkpoint_interval_s`` replaces its timing rule).
    """
    if epochs < 1:
        raise InputError("epochs must be at least 1")
    scheduled_lr(lr, schedule, 0, 1)  # an unknown schedule fails before any work
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise TrainingError(f"{stage_name}: the training set is empty")
    dev = resolve_device(device)
    model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    use_amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    fp = fingerprint(
        model, stage=stage_name, lr=lr, batch_size=batch_size, seed=seed, weight_decay=weight_decay,
        schedule=schedule, ema=ema, n_items=len(dataset), config=dict(config or {}),  # type: ignore[arg-type]
    )
    ckpt = checkpoint_path(checkpoint_dir, stage_name)
    history = FitHistory()
    best_state: dict[str, torch.Tensor] | None = None
    start = 0
    average: dict[str, torch.Tensor] | None = None
    if resume and ckpt.is_file():
        try:
            state = torch.load(ckpt, map_location=dev, weights_only=False)
        except Exception as err:
            raise TrainingError(f"checkpoint {ckpt} cannot be read ({err.__class__.__name__}); delete it or train without --resume") from None
        if state.get("fingerprint") != fp:
            raise TrainingError(
                f"checkpoint {ckpt} was written with another configuration; "
                "train into a new folder or without --resume"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        history = FitHistory.from_json(state["history"])
        best_state = state.get("best_state")
        average = state.get("average")
        start = int(state["epoch"])
        log.info("%s: resuming after epoch %d", stage_name, start)
    elif resume:
        log.info("%s: no checkpoint to resume from; starting at epoch 1", stage_name)

    if ema > 0 and average is None:
        average = {k: v.detach().clone() for k, v in model.state_dict().items()}
    workers = num_workers if num_workers is not None else default_workers(dev)
    epoch_items = hasattr(dataset, "set_epoch")  # epoch-aware: its items are keyed (epoch, i)
    sampler = EpochBatches(len(dataset), batch_size, range(start + 1, epochs + 1), seed, epoch_items)  # type: ignore[arg-type]
    loader_kw: dict[str, Any] = {}
    if workers > 0:
        loader_kw = {"worker_init_fn": _seed_worker, "prefetch_factor": 4,
                     "multiprocessing_context": loader_start_method()}
    steps_per_epoch = sampler.steps_per_epoch()
    bar = None
    if progress and start < epochs:
        from pointnuc.progress import progress_bar

        bar = progress_bar((epochs - start) * steps_per_epoch, stage_name, "batch")
    batches = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=use_amp, **loader_kw,
    )) if start < epochs else iter(())
    last_save = time.monotonic()
    save_s: float | None = None  # how long the last checkpoint took to write
    try:
        for epoch in range(start + 1, epochs + 1):
            torch.manual_seed(seed * 100003 + epoch)
            model.train()
            t0 = time.perf_counter()
            wait = 0.0
            total, n_items = 0.0, 0
            t_wait = time.perf_counter()
            for i in range(steps_per_epoch):
                step = (epoch - 1) * steps_per_epoch + i
                for group in opt.param_groups:
                    group["lr"] = scheduled_lr(lr, schedule, step, epochs * steps_per_epoch)
                images, targets = next(batches)
                wait += time.perf_counter() - t_wait
                x = normalise_batch(images.to(dev, non_blocking=True))
                y = targets.to(dev, non_blocking=True)
                with torch.autocast(device_type=dev.type, enabled=use_amp):
                    logits = model(x)
                loss = loss_fn(logits.float(), y)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"{stage_name}: the loss became {loss.item()} in epoch {epoch}; stopped "
                        f"(last good checkpoint: {ckpt if ckpt.is_file() else 'none yet'}); try a lower learning rate"
                    )
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if average is not None:
                    ema_update(average, model, ema_decay(ema, step))
                total += float(loss.item()) * len(images)
                n_items += len(images)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=f"{epoch}/{epochs}", loss=f"{loss.item():.4f}")
                t_wait = time.perf_counter()
            secs = time.perf_counter() - t0
            stats = EpochStats(
                epoch=epoch, loss=total / max(n_items, 1), seconds=secs,
                patches_per_s=n_items / max(secs, 1e-9), data_wait_share=wait / max(secs, 1e-9),
            )
            if on_epoch_end is not None:
                live = None
                if average is not None:  # the average is what gets scored and kept
                    live = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    model.load_state_dict(average)
                scores = on_epoch_end(epoch, model) or {}
                stats.scores = {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in scores.items()}
                score = scores.get("score")
                if score is not None and np.isfinite(score) and (history.best_score is None or score > history.best_score):
                    history.best_score, history.best_epoch = float(score), epoch
                    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                if live is not None:
                    model.load_state_dict(live)
            history.epochs.append(stats)
            log.info(
                "%s epoch %d/%d: loss %.5f, %.1f s, %.1f patches/s, data wait %.0f%%",
                stage_name, epoch, epochs, stats.loss, secs, stats.patches_per_s, 100 * stats.data_wait_share,
            )
            if not checkpoint_due(epoch, start + 1, epochs, time.monotonic() - last_save, save_s, checkpoint_interval_s):
                continue
            t_save = time.monotonic()
            _save_atomic(
                {
                    "fingerprint": fp, "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict(), "history": history.to_json(), "best_state": best_state,
                    "average": average,
                },
                ckpt,
            )
            last_save = time.monotonic()
            save_s = last_save - t_save
    finally:
        if bar is not None:
            bar.close()
    if best_state is not None:
        model.load_state_dict(copy.deepcopy(best_state))
    elif average is not None:
        model.load_state_dict(average)
    return history
