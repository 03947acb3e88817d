"""Reinhard colour normalisation (paper §V-B2) in CIE LAB.

The reference is the LAB mean/std of the training images, computed once at training
and stored with the model (JSON-serialisable), so inference normalises every slide
to the same target.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.color import lab2rgb, rgb2lab

from pointnuc.errors import InputError


def _lab(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] < 3:
        raise InputError(f"expected an RGB image (H, W, 3), got shape {img.shape}")
    return rgb2lab(img[..., :3].astype(np.float32) / 255.0).astype(np.float32)


def lab_stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel LAB mean and std of one RGB uint8 image."""
    lab = _lab(image).reshape(-1, 3)
    return lab.mean(0), lab.std(0)


def reinhard_reference(images: Sequence[np.ndarray]) -> dict[str, list[float]]:
    """The normalisation target: mean of the images' LAB means and stds, as ``{"mean", "std"}``."""
    if len(images) == 0:
        raise InputError("no images to compute a colour reference from")
    stats = [lab_stats(im) for im in images]
    mean = np.mean([m for m, _ in stats], axis=0)
    std = np.mean([s for _, s in stats], axis=0)
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def reinhard_normalize(image: np.ndarray, ref: dict[str, Sequence[float]]) -> np.ndarray:
    """uint8 RGB with its LAB mean/std moved to ``ref``'s (Reinhard et al. 2001)."""
    try:
        tm, ts = np.asarray(ref["mean"], np.float32), np.asarray(ref["std"], np.float32)
    except (KeyError, TypeError):
        raise InputError("colour reference must have 'mean' and 'std' lists") from None
    if tm.shape != (3,) or ts.shape != (3,):
        raise InputError("colour reference mean/std must have 3 values each")
    lab = _lab(image)
    m = lab.reshape(-1, 3).mean(0)
    s = lab.reshape(-1, 3).std(0)
    lab = (lab - m) / np.maximum(s, 1e-6) * ts + tm
    rgb = lab2rgb(lab.astype(np.float64))
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
