"""Samples as pointnuc works on them: 8-bit RGB at full scale, and which pixel sizes are a microscope's.

Shared by the readers of :mod:`pointnuc.io.slide` (Pillow) and :mod:`pointnuc.io.tiff` (TIFF).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

#: coarser pixel sizes than this (µm/px) are screen/print dpi, not a microscope's
MAX_PLAUSIBLE_UM = 20.0
#: bit depths tried for integer samples whose file gives no maximum (see :func:`full_scale`)
BIT_DEPTHS = (8, 10, 12, 14, 16)
#: the data maximum is taken over the coarsest level when it has at most this many pixels, else over a sample of it
_MAX_SCAN_PX = 4096 * 4096


def plausible_um(um: float | None) -> float | None:
    """``um`` as a float when it is a plausible microscope pixel size (µm/px), else None."""
    if um is None:
        return None
    try:
        um = float(um)
    except (TypeError, ValueError):
        return None
    return um if math.isfinite(um) and 0 < um <= MAX_PLAUSIBLE_UM else None


def full_scale(dtype: np.dtype, data_max: Callable[[], float], *, bits: int | None = None,
               max_value: float | None = None) -> float:
    """The sample value that becomes 255 (full brightness) in the 8-bit RGB pointnuc works on.

    8-bit samples: 255. Wider integers, first rule that applies:

    1. the file's maximum sample value (TIFF ``SMaxSampleValue`` / ``MaxSampleValue``);
    2. its bit depth when below the container's (TIFF ``BitsPerSample`` 12 read into 16-bit
       samples: 4095);
    3. the smallest ``2**b - 1``, ``b`` in :data:`BIT_DEPTHS`, that holds the data's maximum
       (``data_max()``): cameras write 12 or 14 bits into files that say 16. A brightfield
       image's background is close to full scale, so its maximum gives the depth away.

    Floats: 1.0 when the data lie within [0, 1], else 255.
    """
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return 255.0
    if dtype.kind == "f":
        return 1.0 if data_max() <= 1.0 else 255.0
    if max_value is not None and max_value > 0:
        return float(max_value)
    container = 8 * dtype.itemsize - (1 if dtype.kind == "i" else 0)
    if bits is not None and 8 <= bits < container:
        return float(2**bits - 1)
    peak = data_max()
    for b in BIT_DEPTHS:
        if peak <= 2**b - 1:
            return float(2**b - 1)
    return float(2**container - 1)


def to_rgb(arr: np.ndarray, scale: float = 255.0) -> np.ndarray:
    """(H, W, 3) uint8 from (H, W[, S]) samples, ``scale`` becoming 255 (see :func:`full_scale`)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] > 3:
        arr = arr[:, :, :3]  # RGBA: the alpha channel is not colour
    if arr.dtype == np.uint8 and scale == 255.0:
        return arr
    out = arr.astype(np.float32) * np.float32(255.0 / scale) + np.float32(0.5)
    return np.clip(out, 0, 255).astype(np.uint8)


def data_max(read: Callable[[int, int, int, int], np.ndarray], w: int, h: int) -> float:
    """Largest sample of a level read by ``read(x, y, w, h)``: all of it, or an 8 x 8 grid of
    256-px windows when it is larger than :data:`_MAX_SCAN_PX` (a slide's background is everywhere)."""
    if w * h <= _MAX_SCAN_PX:
        return float(np.max(read(0, 0, w, h)))
    size = 256
    xs = np.linspace(0, w - size, 8).astype(int)
    ys = np.linspace(0, h - size, 8).astype(int)
    return max(float(np.max(read(int(x), int(y), size, size))) for y in ys for x in xs)
