"""Stain normalisation (pointnuc.stain): statistics, the affine stain step, the colour reference."""

from __future__ import annotations

import numpy as np
import pytest

from pointnuc.errors import InputError
from pointnuc.stain import (
    RGB_FROM_HED,
    colour_apply,
    colour_normalize,
    colour_reference,
    colour_stats,
    colour_stats_and_apply,
    reinhard_apply,
    reinhard_normalize,
    stain_apply,
    stain_stats,
)


def _stained(h: np.ndarray, e: np.ndarray) -> np.ndarray:
    """uint8 RGB of given haematoxylin / eosin optical densities (no residual stain)."""
    conc = np.stack([h, e, np.zeros_like(h)], -1).astype(np.float64)
    od = conc @ RGB_FROM_HED.astype(np.float64)
    return np.clip(np.rint(255.0 * np.exp(-od)), 0, 255).astype(np.uint8)


def _tissue(rng: np.random.Generator, h_range: tuple[float, float], e_range: tuple[float, float]) -> np.ndarray:
    return _stained(rng.uniform(*h_range, (120, 100)), rng.uniform(*e_range, (120, 100)))


def test_stain_stats_recover_known_concentrations() -> None:
    rng = np.random.default_rng(0)
    h, e = rng.uniform(0.2, 1.0, (120, 100)), rng.uniform(0.3, 0.6, (120, 100))
    s = stain_stats(_stained(h, e))
    expected = [np.percentile(h, 50), np.percentile(h, 99), np.percentile(e, 50), np.percentile(e, 99)]
    np.testing.assert_allclose(s, expected, atol=0.03)  # 8-bit rounding of the colours


def test_stain_stats_ignore_white_and_need_tissue() -> None:
    rng = np.random.default_rng(1)
    img = _tissue(rng, (0.2, 1.0), (0.3, 0.6))
    padded = np.full((120, 300, 3), 255, np.uint8)
    padded[:, :100] = img
    np.testing.assert_allclose(stain_stats(padded), stain_stats(img), atol=1e-6)  # background is not tissue
    assert stain_stats(np.full((50, 50, 3), 250, np.uint8)) is None  # no tissue
    assert stain_stats(np.full((50, 50, 3), (120, 60, 160), np.uint8)) is None  # tissue of one colour: no contrast


def test_stain_apply_moves_statistics_to_the_reference_and_keeps_them_put() -> None:
    rng = np.random.default_rng(2)
    pale = _tissue(rng, (0.3, 0.7), (0.3, 0.5))  # low-contrast haematoxylin, as a frozen section
    ref = stain_stats(_tissue(rng, (0.1, 1.6), (0.2, 0.8)))
    src = stain_stats(pale)
    out = stain_apply(pale, src, ref)
    assert out.dtype == np.uint8 and out.shape == pale.shape
    np.testing.assert_allclose(stain_stats(out), ref, atol=0.05)
    assert np.abs(stain_apply(pale, src, src).astype(int) - pale).max() <= 1  # at the reference: unchanged
    with pytest.raises(InputError):
        stain_apply(pale, src[:3], ref)


def test_colour_reference_and_normalisation() -> None:
    rng = np.random.default_rng(3)
    images = [_tissue(rng, (0.1, 1.5), (0.2, 0.7)), _tissue(rng, (0.2, 1.2), (0.3, 0.9))]
    plain = colour_reference(images, stain=False)
    assert set(plain) == {"mean", "std"}
    ref = colour_reference(images)
    assert ref["mean"] == plain["mean"] and len(ref["stain"]) == 4
    # a model without the stain step (older folders) normalises exactly as Reinhard alone
    img = _tissue(rng, (0.3, 0.8), (0.3, 0.5))
    assert np.array_equal(colour_normalize(img, plain), reinhard_normalize(img, plain))
    # with it: Reinhard, then the stain step measured on the Reinhard output
    m, s, st = colour_stats(img, ref)
    assert st == stain_stats(reinhard_apply(img, (m, s), ref))
    out = colour_normalize(img, ref)
    np.testing.assert_allclose(stain_stats(out), ref["stain"], atol=0.06)
    assert np.array_equal(colour_apply(img, (m, s), ref), reinhard_apply(img, (m, s), ref))  # no stain stats: no step
    white = np.full((40, 40, 3), 255, np.uint8)
    assert colour_stats(white, ref)[2] is None and colour_normalize(white, ref).shape == white.shape


def test_lab_stats_match_scikit_image() -> None:
    """The LAB statistics (fast float32 path) are scikit-image's ``rgb2lab`` statistics, every colour at once."""
    from skimage.color import rgb2lab

    from pointnuc.stain import lab_stats

    rng = np.random.default_rng(3)
    img = np.concatenate([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), _tissue(rng, (0.1, 1.5), (0.1, 0.8))[:64, :64]])
    lab = rgb2lab(img.astype(np.float64) / 255.0).reshape(-1, 3)
    mean, std = lab_stats(img)
    np.testing.assert_allclose(mean, lab.mean(0), atol=1e-3)
    np.testing.assert_allclose(std, lab.std(0), atol=1e-3)
    with pytest.raises(InputError):
        lab_stats(img[..., 0])


def test_statistics_and_normalisation_of_one_window_at_once_are_those_made_apart() -> None:
    """An image that is one window: its core's statistics and the whole window normalised with them, the LAB
    planes computed once, are exactly :func:`colour_stats` of the core and :func:`colour_apply` of the window;
    also with the stain step, and for a reference without it."""
    rng = np.random.default_rng(5)
    ref = colour_reference([_tissue(rng, (0.1, 1.5), (0.2, 0.7)), _tissue(rng, (0.2, 1.2), (0.3, 0.9))])
    window = np.full((120, 100, 3), 255, np.uint8)
    window[8:110, 5:95] = _tissue(rng, (0.3, 0.9), (0.2, 0.6))[:102, :90]  # white around, as beyond an image's edge
    core = (slice(8, 110), slice(5, 95))
    for r in (ref, {"mean": ref["mean"], "std": ref["std"]}):
        stats, out = colour_stats_and_apply(window, core, r, stain_stride=3)
        apart = colour_stats(np.ascontiguousarray(window[core]).reshape(-1, 1, 3), r, stain_stride=3)
        assert all(np.array_equal(a, b) for a, b in zip(stats[:2], apart[:2])) and stats[2] == apart[2]
        assert np.array_equal(out, colour_apply(window, apart, r))
