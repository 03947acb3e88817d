"""Dense-CRF loss against the brute-force N×N energy (value and gradient)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pointnuc.errors import InputError
from pointnuc.train.crf import bilateral_filter, crf_energy_exact, crf_loss


def _case(seed: int = 0, size: int = 24, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - 10) ** 2 + (xx - 12) ** 2 <= 36).to(dtype)
    image = torch.stack([0.9 - 0.6 * disc, 0.8 - 0.6 * disc, 0.85 - 0.4 * disc])[None].repeat(2, 1, 1, 1)
    image = (image + 0.03 * torch.randn(image.shape, generator=g, dtype=dtype)).clamp(0, 1)
    logits = 2.0 * torch.randn(2, size, size, generator=g, dtype=dtype) + 3 * (disc - 0.5)
    valid = torch.ones(2, size, size, dtype=torch.bool)
    valid[1, :, :5] = False
    return torch.sigmoid(logits), image, valid


def _energy_and_grad(fn, y, *args, **kw):
    y = y.clone().requires_grad_(True)
    e = fn(y, *args, **kw)
    (g,) = torch.autograd.grad(e, y)
    return e.detach(), g


def test_full_window_equals_brute_force():
    y, image, valid = _case()
    kw = {"sigma_xy_px": 3.0, "sigma_rgb": 0.1}
    e_ref, g_ref = _energy_and_grad(crf_energy_exact, y, image, valid, **kw)
    e, g = _energy_and_grad(crf_loss, y, image, valid, radius_sigmas=24 / 3.0, **kw)  # window covers the image
    assert e.item() == pytest.approx(e_ref.item(), rel=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_default_window_is_close_to_brute_force():
    y, image, valid = _case(1)
    kw = {"sigma_xy_px": 3.0, "sigma_rgb": 0.1}
    e_ref, g_ref = _energy_and_grad(crf_energy_exact, y, image, valid, **kw)
    e, g = _energy_and_grad(crf_loss, y, image, valid, **kw)
    rel_e = abs(e.item() - e_ref.item()) / e_ref.item()
    rel_g = (g - g_ref).norm().item() / g_ref.norm().item()
    print(f"CRF 2.5-sigma disk vs brute force: energy rel. error {rel_e:.4f}, gradient rel. error {rel_g:.4f}")
    assert rel_e < 0.03 and rel_g < 0.03
    assert torch.all(g[~valid] == 0)


def test_energy_is_zero_for_a_hard_uniform_map_and_counts_cut_pairs():
    _, image, _ = _case()
    ones = torch.ones(2, 24, 24, dtype=torch.float64)
    assert crf_loss(ones, image, sigma_xy_px=3.0, sigma_rgb=0.1).item() == pytest.approx(0.0, abs=1e-12)
    # uniform colour, two-pixel image split in a 0/1 labelling: one cut pair, weight exp(-1/2σ²)/(2πσ²) / 2 pixels
    img = torch.full((1, 3, 1, 2), 0.5, dtype=torch.float64)
    y = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    expected = np.exp(-1 / 2.0) / (2 * np.pi) / 2
    assert crf_loss(y, img, sigma_xy_px=1.0, sigma_rgb=0.1).item() == pytest.approx(expected)


def test_filter_is_symmetric_operator():
    _y, image, _ = _case(2)
    a = torch.rand(2, 1, 24, 24, dtype=torch.float64)
    b = torch.rand(2, 1, 24, 24, dtype=torch.float64)
    kw = {"sigma_xy_px": 2.0, "sigma_rgb": 0.2}
    lhs = (a * bilateral_filter(b, image, **kw)).sum()
    rhs = (b * bilateral_filter(a, image, **kw)).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-12)


def test_bad_shapes_raise():
    with pytest.raises(InputError):
        crf_loss(torch.rand(1, 8, 8), torch.rand(1, 8, 8), sigma_xy_px=2.0, sigma_rgb=0.1)


def test_downsampled_energy_is_close_to_brute_force():
    y, image, valid = _case(3, size=32)
    y = torch.nn.functional.avg_pool2d(y[:, None], 5, 1, 2, count_include_pad=False)[:, 0]  # smooth, like a network's map
    kw = {"sigma_xy_px": 6.0, "sigma_rgb": 0.1}
    e_ref, g_ref = _energy_and_grad(crf_energy_exact, y, image, valid, **kw)
    e, g = _energy_and_grad(crf_loss, y, image, valid, downsample=2, **kw)
    rel_e = abs(e.item() - e_ref.item()) / e_ref.item()
    cos = torch.nn.functional.cosine_similarity(g.ravel(), g_ref.ravel(), dim=0).item()
    print(f"CRF downsampled x2 vs brute force: energy rel. error {rel_e:.4f}, gradient cosine {cos:.4f}")
    assert rel_e < 0.1 and cos > 0.9


def test_partial_ce_ignores_unlabelled_pixels():
    from pointnuc.train.seg_losses import Stage2Loss, partial_ce

    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 0] = 2.0  # pixel (0,0): p(nucleus) = e²/(1+e²)
    target = torch.tensor([[[1.0, -1.0], [0.0, -1.0]]])
    expected = (np.log(1 + np.exp(-2.0)) + np.log(2.0)) / 2
    assert partial_ce(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert partial_ce(logits, torch.full((1, 2, 2), -1.0)).item() == 0.0
    # alpha mixes the two labels
    tg = torch.stack([target[0], torch.tensor([[0.0, 0.0], [-1.0, -1.0]])])[None]
    tg = torch.cat([tg, torch.full((1, 3, 2, 2), 0.5)], 1)
    l_clu = (np.log(1 + np.exp(2.0)) + np.log(2.0)) / 2
    assert Stage2Loss(alpha=0.25)(logits, tg).item() == pytest.approx(0.25 * expected + 0.75 * l_clu, rel=1e-6)


@pytest.mark.parametrize("group_elements", [1, 5000, 10**9])  # one offset a group, a few groups, all at once
def test_grouped_filter_equals_the_offset_loop(group_elements):
    """The GPU's grouped filter sums the same truncated kernel as the CPU's loop, in groups of any size."""
    from pointnuc.train.crf import _filter, _filter_grouped

    y, image, valid = _case(2, size=20)
    values = torch.stack([valid.to(y.dtype), y * valid], 1)
    for kw in ({"sigma_xy_px": 3.0, "sigma_rgb": 0.1, "radius_sigmas": 2.5},
               {"sigma_xy_px": 4.5, "sigma_rgb": 0.2, "radius_sigmas": 6.0}):  # a window wider than the image
        ref = _filter(values, image, **kw)
        out = _filter_grouped(values, image, group_elements=group_elements, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_grouped_path_energy_and_gradient_equal_brute_force(monkeypatch):
    """The whole loss through the grouped filter (what runs on a GPU), full window: the exact energy and gradient."""
    from pointnuc.train import crf

    monkeypatch.setattr(crf, "_filter", lambda v, i, **kw: crf._filter_grouped(v, i, group_elements=20000, **kw))
    y, image, valid = _case()
    kw = {"sigma_xy_px": 3.0, "sigma_rgb": 0.1}
    e_ref, g_ref = _energy_and_grad(crf_energy_exact, y, image, valid, **kw)
    e, g = _energy_and_grad(crf_loss, y, image, valid, radius_sigmas=24 / 3.0, **kw)
    assert e.item() == pytest.approx(e_ref.item(), rel=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
