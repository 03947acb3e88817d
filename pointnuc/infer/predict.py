"""Network prediction on an image that fits in memory (sliding window).

Windows overlap by ``margin`` pixels on each side; only each window's centre is kept,
so the result does not depend on the window grid (up to the network's receptive
field beyond ``margin``).
"""

from __future__ import annotations

import numpy as np
import torch

from pointnuc.models.net import preprocess


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
        with torch.autocast(device_type=device.type, enabled=use_amp):
            logits = model(t).float()
        prob = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=1)
        prob = prob.cpu().numpy()
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
    img = np.asarray(image)
    acc = np.zeros(img.shape[:2], np.float32)
    for fy, fx in FLIPS if tta else FLIPS[:1]:
        v = img[::-1] if fy else img
        v = v[:, ::-1] if fx else v
        p = predict_image(model, np.ascontiguousarray(v), activation=activation, window=window, margin=margin,
                          device=device)[channel]
        p = p[::-1] if fy else p
        acc += p[:, ::-1] if fx else p
    return acc / (len(FLIPS) if tta else 1)
