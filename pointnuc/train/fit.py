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
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pointnuc.config import LR_SCHEDULES
from pointnuc.errors import InputError, TrainingError, raise_if_stop_requested
from pointnuc.fileio import atomic_write
from pointnuc.train.batches import default_workers, epoch_stream, normalise_batch

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
    def from_json(cls, d: Mapping[str, Any]) -> FitHistory:
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


@dataclass(frozen=True)
class FitSettings:
    """How one fit trains: its schedule and optimiser. With the fit's ``config`` they are what a
    checkpoint must have been written with to be resumed (``epochs`` excepted)."""

    epochs: int
    lr: float
    batch_size: int
    seed: int  #: crops, batch order and each epoch's randomness
    weight_decay: float = 0.0  #: Adam's
    #: the learning rate per step (:func:`scheduled_lr`), set from the step number, so a resumed
    #: run continues on the same curve
    schedule: str = "constant"
    #: > 0: an exponential moving average of the weights (this decay per step, :func:`ema_decay`) is
    #: what is scored, kept and returned; the optimiser trains the live weights
    ema: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InputError("epochs must be at least 1")
        scheduled_lr(self.lr, self.schedule, 0, 1)  # an unknown schedule fails before any work


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class _Progress:
    """What a fit carries from epoch to epoch, and its checkpoint holds besides the training state."""

    history: FitHistory = field(default_factory=FitHistory)
    best_state: dict[str, torch.Tensor] | None = None  #: the best-scoring state (None: no score yet)
    average: dict[str, torch.Tensor] | None = None  #: the weights' moving average (settings.ema > 0)
    epoch: int = 0  #: epochs done


class _Fit:
    """One fit's model, optimiser and AMP scaler, and the steps they take (see :func:`fit`)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, settings: FitSettings, device: torch.device,
                 stage_name: str, checkpoint: Path) -> None:
        self.model, self.loss_fn, self.settings, self.dev = model, loss_fn, settings, device
        self.stage_name, self.checkpoint = stage_name, checkpoint
        model.to(device)
        self.opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.use_amp = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def resume(self, fp: str) -> _Progress:
        """The state of the checkpoint written under fingerprint ``fp``, loaded into the model and optimiser."""
        ckpt = self.checkpoint
        if not ckpt.is_file():
            log.info("%s: no checkpoint to resume from; starting at epoch 1", self.stage_name)
            return _Progress()
        try:
            state = torch.load(ckpt, map_location=self.dev, weights_only=False)
        except Exception as err:  # noqa: BLE001  (any damage, whatever torch raises: the user deletes it)
            raise TrainingError(f"checkpoint {ckpt} cannot be read ({err.__class__.__name__}); delete it or train without --resume") from None
        if state.get("fingerprint") != fp:
            raise TrainingError(
                f"checkpoint {ckpt} was written with another configuration; "
                "train into a new folder or without --resume"
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        log.info("%s: resuming after epoch %d", self.stage_name, int(state["epoch"]))
        return _Progress(FitHistory.from_json(state["history"]), state.get("best_state"), state.get("average"),
                         int(state["epoch"]))

    def epoch(self, epoch: int, batches: Iterator[Any], steps: int, average: dict[str, torch.Tensor] | None,
              bar: Any) -> EpochStats:
        """Train one epoch of ``steps`` batches (the moving ``average`` follows each step)."""
        s, model, dev = self.settings, self.model, self.dev
        torch.manual_seed(s.seed * 100003 + epoch)
        model.train()
        t0 = time.perf_counter()
        wait = 0.0
        total, n_items = 0.0, 0
        t_wait = time.perf_counter()
        for i in range(steps):
            raise_if_stop_requested()
            step = (epoch - 1) * steps + i
            for group in self.opt.param_groups:
                group["lr"] = scheduled_lr(s.lr, s.schedule, step, s.epochs * steps)
            images, targets = next(batches)
            wait += time.perf_counter() - t_wait
            x = normalise_batch(images.to(dev, non_blocking=True))
            y = targets.to(dev, non_blocking=True)
            with torch.autocast(device_type=dev.type, enabled=self.use_amp):
                logits = model(x)
            loss = self.loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                ckpt = self.checkpoint
                raise TrainingError(
                    f"{self.stage_name}: the loss became {loss.item()} in epoch {epoch}; stopped "
                    f"(last good checkpoint: {ckpt if ckpt.is_file() else 'none yet'}); try a lower learning rate"
                )
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            if average is not None:
                ema_update(average, model, ema_decay(s.ema, step))
            total += float(loss.item()) * len(images)
            n_items += len(images)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch}/{s.epochs}", loss=f"{loss.item():.4f}")
            t_wait = time.perf_counter()
        secs = time.perf_counter() - t0
        return EpochStats(epoch=epoch, loss=total / max(n_items, 1), seconds=secs,
                          patches_per_s=n_items / max(secs, 1e-9), data_wait_share=wait / max(secs, 1e-9))

    def score(self, hook: EpochHook, stats: EpochStats, progress: _Progress) -> None:
        """``hook``'s scores of the epoch (of the moving average when there is one); the best state is kept."""
        model, history = self.model, progress.history
        live = None
        if progress.average is not None:  # the average is what gets scored and kept
            live = _copy(model)
            model.load_state_dict(progress.average)
        scores = hook(stats.epoch, model) or {}
        stats.scores = {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in scores.items()}
        score = scores.get("score")
        if score is not None and np.isfinite(score) and (history.best_score is None or score > history.best_score):
            history.best_score, history.best_epoch = float(score), stats.epoch
            progress.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if live is not None:
            model.load_state_dict(live)

    def save(self, fp: str, progress: _Progress) -> None:
        """Write the checkpoint after epoch ``progress.epoch`` (atomically)."""
        _save_atomic(
            {
                "fingerprint": fp, "epoch": progress.epoch, "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                "history": progress.history.to_json(), "best_state": progress.best_state, "average": progress.average,
            },
            self.checkpoint,
        )


def fit(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    loss_fn: LossFn,
    settings: FitSettings,
    *,
    device: str | torch.device,
    checkpoint_dir: Path,
    stage_name: str,
    resume: bool,
    progress: bool = True,
    on_epoch_end: EpochHook | None = None,
    num_workers: int | None = None,
    config: Mapping[str, Any] | None = None,
    checkpoint_interval_s: float | None = None,
) -> FitHistory:
    """Train ``model`` on ``dataset`` with Adam as ``settings`` say; returns the per-epoch history.

    ``loss_fn(logits, targets) -> scalar``. Batches of uint8 images are ImageNet-normalised
    on the device. ``on_epoch_end(epoch, model)`` may return a dict; if it has a ``score``
    (higher is better) the best-scoring state is kept and loaded into ``model`` at the end.
    A non-finite loss stops training with :class:`TrainingError`; the last checkpoint
    (end of the previous epoch) stays on disk. ``config``: extra settings that must match
    for a resume (e.g. the stage's TrainConfig as a dict). ``num_workers``: DataLoader
    workers (default: :func:`default_workers`, 1 on CPU, up to 12 on CUDA). Checkpoints:
    see :func:`checkpoint_due` (``checkpoint_interval_s`` replaces its timing rule).
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise TrainingError(f"{stage_name}: the training set is empty")
    s = settings
    dev = resolve_device(device)
    run = _Fit(model, loss_fn, s, dev, stage_name, checkpoint_path(checkpoint_dir, stage_name))
    fp = fingerprint(
        model, stage=stage_name, lr=s.lr, batch_size=s.batch_size, seed=s.seed, weight_decay=s.weight_decay,
        schedule=s.schedule, ema=s.ema, n_items=len(dataset), config=dict(config or {}),  # type: ignore[arg-type]
    )
    state = run.resume(fp) if resume else _Progress()
    if s.ema > 0 and state.average is None:
        state.average = _copy(model)
    start = state.epoch
    workers = num_workers if num_workers is not None else default_workers(dev)
    batches, steps = epoch_stream(dataset, s.batch_size, range(start + 1, s.epochs + 1), s.seed, workers,
                                  pin_memory=run.use_amp)
    bar = None
    if progress and start < s.epochs:
        from pointnuc.progress import progress_bar

        bar = progress_bar((s.epochs - start) * steps, stage_name, "batch")
    last_save = time.monotonic()
    save_s: float | None = None  # how long the last checkpoint took to write
    try:
        for epoch in range(start + 1, s.epochs + 1):
            stats = run.epoch(epoch, batches, steps, state.average, bar)
            if on_epoch_end is not None:
                run.score(on_epoch_end, stats, state)
            state.history.epochs.append(stats)
            state.epoch = epoch
            log.info(
                "%s epoch %d/%d: loss %.5f, %.1f s, %.1f patches/s, data wait %.0f%%",
                stage_name, epoch, s.epochs, stats.loss, stats.seconds, stats.patches_per_s, 100 * stats.data_wait_share,
            )
            if checkpoint_due(epoch, start + 1, s.epochs, time.monotonic() - last_save, save_s, checkpoint_interval_s):
                t_save = time.monotonic()
                run.save(fp, state)
                last_save = time.monotonic()
                save_s = last_save - t_save
    finally:
        if bar is not None:
            bar.close()
    if state.best_state is not None:
        model.load_state_dict(copy.deepcopy(state.best_state))
    elif state.average is not None:
        model.load_state_dict(state.average)
    return state.history
