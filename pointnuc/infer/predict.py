"""Network prediction: the forward step both paths share, and the two paths.

- :func:`predict_image`: an image that fits in memory (training, validation, the report), by
  sliding windows that overlap by ``margin`` pixels on each side, the image mirrored at its
  border; only each window's centre is kept, so the result does not depend on the window
  grid (up to the network's receptive field beyond ``margin``).
- :func:`predict_batch`: a batch of whole-slide tiles (:mod:`pointnuc.infer.wsi`), each already
  holding its halo of slide pixels (white beyond the slide), colour-normalised on the device; the
  batch goes in channels-last (the network is converted to it by :mod:`pointnuc.infer.wsi`).

Both run :func:`probabilities`. They are not one path: at an image's border the first sees the
mirrored image, the second the white of glass (what a slide has there), so their numbers
differ within the network's receptive field of the border and agree elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pointnuc.models.net import preprocess
from pointnuc.stain import colour_apply_torch


def probabilities(
    model: torch.nn.Module, x: torch.Tensor, *, activation: str, amp: bool, channels_last: bool = False
) -> torch.Tensor:
    """Probabilities (B, C, H, W) float32 of a preprocessed batch on its device.

    ``activation``: ``sigmoid``, ``softmax``, or ``auto`` (sigmoid for one output channel).
    ``amp``: autocast (float16 on CUDA, bfloat16 on the CPU). ``channels_last``: the batch in
    that memory format (for a network converted to it).
    """
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = torch.float16 if x.device.type == "cuda" else torch.bfloat16
    with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=amp):
        logits = model(x)
    logits = logits.float()
    if activation == "auto":
        activation = "sigmoid" if logits.shape[1] == 1 else "softmax"
    return torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=1)


def _starts(length: int, window: int, step: int) -> list[int]:
    if length <= window:
        return [0]
    s = list(range(0, length - window, step))
    s.append(length - window)
    return s


@torch.no_grad()
def predict_image(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    activation: str = "softmax",
    window: int = 512,
    margin: int = 32,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Probabilities (C, H, W) float32 for a uint8 RGB image (H, W, 3), already colour-normalised.

    ``activation``: ``sigmoid`` (detector, C = 1) or ``softmax`` (segmenter, C = 2).
    """
    model.eval()
    device = torch.device(device)
    h, w = image.shape[:2]
    # pad to at least one window and to a multiple of 32 so every window is valid for the U-Net
    ph, pw = max(h, 64), max(w, 64)
    win = min(window, ((max(ph, pw) + 31) // 32) * 32)
    ph, pw = max(ph, win) if h > win else win, max(pw, win) if w > win else win
    padded = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
    step = max(win - 2 * margin, 32)
    ys, xs = _starts(ph, win, step), _starts(pw, win, step)
    boxes = [(y, x) for y in ys for x in xs]
    out: np.ndarray | None = None
    use_amp = device.type == "cuda"
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        batch = np.stack([padded[y : y + win, x : x + win] for y, x in chunk])
        t = preprocess(batch).to(device)
        prob = probabilities(model, t, activation=activation, amp=use_amp).cpu().numpy()
        if out is None:
            out = np.zeros((prob.shape[1], ph, pw), np.float32)
        for (y, x), p in zip(chunk, prob):
            # keep the window's centre; at the image border keep up to the border
            y0 = 0 if y == 0 else margin
            x0 = 0 if x == 0 else margin
            y1 = win if y + win >= ph else win - margin
            x1 = win if x + win >= pw else win - margin
            out[:, y + y0 : y + y1, x + x0 : x + x1] = p[:, y0:y1, x0:x1]
    assert out is not None
    return out[:, :h, :w]


FLIPS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))


def predict_flips(
    model: torch.nn.Module,
    image: np.ndarray,
    channel: int,
    flips: Sequence[tuple[bool, bool]] = FLIPS,
    *,
    activation: str = "softmax",
    window: int = 512,
    margin: int = 32,
    device: torch.device | str = "cpu",
) -> list[np.ndarray]:
    """One output channel (H, W) of :func:`predict_image` on each of ``flips`` of ``image``, mapped back."""
    img = np.asarray(image)
    out = []
    for fy, fx in flips:
        v = img[::-1] if fy else img
        v = v[:, ::-1] if fx else v
        p = predict_image(model, np.ascontiguousarray(v), activation=activation, window=window, margin=margin,
                          device=device)[channel]
        p = p[::-1] if fy else p
        out.append(p[:, ::-1] if fx else p)
    return out


def predict_channel(
    model: torch.nn.Module,
    image: np.ndarray,
    channel: int,
    *,
    activation: str = "softmax",
    tta: bool = False,
    window: int = 512,
    margin: int = 32,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """One output channel (H, W) of :func:`predict_image`; ``tta``: averaged over the four flips."""
    maps = predict_flips(model, image, channel, FLIPS if tta else FLIPS[:1], activation=activation, window=window,
                         margin=margin, device=device)
    acc = np.zeros(maps[0].shape, np.float32)
    for p in maps:
        acc += p
    return acc / len(maps)


def nucleus_probability(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    device: str | torch.device = "cpu",
    tta: bool = False,
    window: int = 512,
    margin: int = 32,
) -> np.ndarray:
    """Nucleus probability (H, W) of a segmenter on a colour-normalised uint8 RGB image.

    ``tta``: average over the four flips (horizontal, vertical, both, none).
    """
    return predict_channel(model, image, 1, activation="softmax", tta=tta, window=window, margin=margin, device=device)


@torch.no_grad()
def foreground_batch(
    network: torch.nn.Module, batch: np.ndarray, device: torch.device, amp: bool,
    norm: tuple[Sequence[Any], Mapping[str, Sequence[float]]] | None = None, tta: bool = False,
) -> torch.Tensor:
    """Foreground probability (B, T, T) float32, on ``device``, of a batch of uint8 RGB windows (B, T, T, 3).

    ``norm`` = (source stats, reference): Reinhard-normalise the batch on the device first.
    ``tta``: the mean over the four flips (none, left-right, up-down, both).
    """
    x = torch.from_numpy(batch)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    if norm is not None:
        x = colour_apply_torch(x, *norm)
    t = preprocess(x)

    def foreground(inp: torch.Tensor) -> torch.Tensor:
        p = probabilities(network, inp, activation="auto", amp=amp, channels_last=True)
        return p[:, 0] if p.shape[1] == 1 else p[:, 1]

    fg = foreground(t)
    if tta:  # the flips of predict_channel; image dims 2, 3 of (B, C, H, W) are dims 1, 2 of the (B, H, W) output
        for fy, fx in FLIPS[1:]:
            dims = [d for d, flip in ((2, fy), (3, fx)) if flip]
            fg += foreground(t.flip(dims)).flip([d - 1 for d in dims])
        fg /= len(FLIPS)
    return fg


def predict_batch(
    network: torch.nn.Module, batch: np.ndarray, device: torch.device, amp: bool,
    norm: tuple[Sequence[Any], Mapping[str, Sequence[float]]] | None = None, half: bool = False, tta: bool = False,
) -> np.ndarray:
    """:func:`foreground_batch` on the CPU as numpy; ``half``: float16 instead, rounded on the device (half the copy back)."""
    fg = foreground_batch(network, batch, device, amp, norm, tta)
    return (fg.half() if half else fg).cpu().numpy()
