"""Colour of H&E images: Reinhard normalisation (paper §V-B2) in CIE LAB, and stain jitter.

The reference is the LAB mean/std of the training images, computed once at training
and stored with the model (JSON-serialisable), so inference normalises every slide
to the same target. :func:`stain_jitter` is training augmentation (ours, not the
paper's): it varies the amount of haematoxylin and eosin per crop, so that a network
trained on a dozen images still finds pale or dark nuclei after normalisation.
"""

from __future__ import annotations

import warnings
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
    return reinhard_apply(image, lab_stats(image), ref)


def reinhard_apply(image: np.ndarray, source: tuple[np.ndarray, np.ndarray], ref: dict[str, Sequence[float]]) -> np.ndarray:
    """uint8 RGB whose LAB statistics ``source`` (mean, std) are moved to ``ref``'s.

    Inference passes one slide-wide ``source`` so that tiles agree at seams;
    :func:`reinhard_normalize` passes the image's own.

    scikit-image's formulas in float32, with the two gamma curves as look-up tables (256
    entries in, 65,536 out): the same pixels as :func:`_reinhard_apply_skimage` to within one
    grey level, at about a quarter of the cost.
    """
    img = np.asarray(image)[..., :3]
    m_fwd, m_inv, white = _lab_matrices()
    tm, ts = np.asarray(ref["mean"], np.float32), np.asarray(ref["std"], np.float32)
    sm, ss = np.asarray(source[0], np.float32), np.maximum(np.asarray(source[1], np.float32), 1e-6)
    gain = ts / ss
    # channel planes and explicit 3x3 products (a BLAS call on (N, 3) x (3, 3) is slower)
    lin = [_SRGB_TO_LINEAR[img[..., k]] for k in range(3)]
    third = np.float32(16.0 / 116.0)
    f = []
    for j in range(3):
        x = lin[0] * (m_fwd[j, 0] / white[j]) + lin[1] * (m_fwd[j, 1] / white[j]) + lin[2] * (m_fwd[j, 2] / white[j])
        f.append(np.where(x > 0.008856, np.cbrt(np.maximum(x, 0)), 7.787 * x + third))
    L = (116.0 * f[1] - 16.0 - sm[0]) * gain[0] + tm[0]
    a = (500.0 * (f[0] - f[1]) - sm[1]) * gain[1] + tm[1]
    b = (200.0 * (f[1] - f[2]) - sm[2]) * gain[2] + tm[2]
    fy = (L + 16.0) / 116.0
    f = [a / 500.0 + fy, fy, np.maximum(fy - b / 200.0, 0)]
    xyz = [np.where(g > 0.2068966, g * g * g, (g - third) / np.float32(7.787)) * white[k] for k, g in enumerate(f)]
    out = np.empty(img.shape, np.uint8)
    for k in range(3):
        v = xyz[0] * m_inv[k, 0] + xyz[1] * m_inv[k, 1] + xyz[2] * m_inv[k, 2]
        idx = np.clip(v * np.float32(_LUT_OUT - 1) + 0.5, 0, _LUT_OUT - 1).astype(np.int32)
        out[..., k] = _LINEAR_TO_SRGB[idx]
    return out


def _lab_matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = np.asarray(XYZ_FROM_RGB, np.float64)
    return m.astype(np.float32), np.linalg.inv(m).astype(np.float32), np.asarray(D65, np.float32)


def _srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)


def _linear_to_srgb_u8(lin: np.ndarray) -> np.ndarray:
    lin = np.clip(lin, 0, None)
    rgb = np.where(lin > 0.0031308, 1.055 * np.power(np.maximum(lin, 0.0031308), 1 / 2.4) - 0.055, 12.92 * lin)
    return np.clip(np.rint(np.clip(rgb, 0, 1) * 255.0), 0, 255).astype(np.uint8)


_LUT_OUT = 65536
_SRGB_TO_LINEAR = _srgb_to_linear(np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
#: linear value k / (_LUT_OUT - 1) -> sRGB uint8 (the curve's steepest slope is 12.92, so one
#: step moves the output by 0.05 of a grey level)
_LINEAR_TO_SRGB = _linear_to_srgb_u8(np.arange(_LUT_OUT, dtype=np.float64) / (_LUT_OUT - 1))


def _reinhard_apply_skimage(image: np.ndarray, source: tuple[np.ndarray, np.ndarray], ref: dict[str, Sequence[float]]) -> np.ndarray:
    """:func:`reinhard_apply` through scikit-image's ``rgb2lab``/``lab2rgb`` (the reference; slower)."""
    tm, ts = np.asarray(ref["mean"], np.float32), np.asarray(ref["std"], np.float32)
    m, s = source
    lab = rgb2lab(np.asarray(image)[..., :3].astype(np.float32) / 255.0).astype(np.float32)
    lab = (lab - m) / np.maximum(s, 1e-6) * ts + tm
    with warnings.catch_warnings():  # out-of-gamut colours are clipped
        warnings.simplefilter("ignore", UserWarning)
        rgb = lab2rgb(lab)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
D65 = (0.95047, 1.0, 1.08883)


# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) in optical density,
# the matrix scikit-image's ``rgb2hed`` inverts
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)
_OD_OF_U8 = -np.log(np.maximum(np.arange(256, dtype=np.float32), 1.0) / 255.0)


def stain_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """uint8 RGB with the amount of each stain varied at random (training augmentation).

    Colour deconvolution into haematoxylin, eosin and a residual channel (Ruifrok &
    Johnston), each channel's optical density ``c`` becomes ``c · U(1 - s, 1 + s) +
    0.2 · U(-s, s)``, recomposed (the "HED" augmentation of Tellez et al. 2018).
    ``strength`` 0 returns the image unchanged.
    """
    if strength <= 0:
        return image
    od = _OD_OF_U8[np.asarray(image)[..., :3]]
    stains = od @ HED_FROM_RGB
    alpha = rng.uniform(1.0 - strength, 1.0 + strength, 3).astype(np.float32)
    beta = (rng.uniform(-strength, strength, 3) * 0.2).astype(np.float32)
    od = np.maximum((stains * alpha + beta) @ RGB_FROM_HED, 0.0)
    return np.clip(np.rint(255.0 * np.exp(-od)), 0, 255).astype(np.uint8)
