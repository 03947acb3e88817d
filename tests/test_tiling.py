"""The two proofs of the tiling: cut-and-stitch round trip, and tiled == untiled prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import label_tiles, read_window, stitch_labels, tiled_predict, untiled_reference
from scipy import ndimage as ndi

from pointnuc.errors import InputError
from pointnuc.infer.tiling import Box, fit_tile_size, make_grid, owned_labels, round_halo, tiles_intersecting


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images are equal up to relabelling (0 stays background)."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def _random_labels(h: int, w: int, n: int, rmax: int, seed: int) -> np.ndarray:
    """Non-overlapping discs (and some blobs) of radius <= rmax, many across seams."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w), np.int32)
    yy, xx = np.mgrid[:h, :w]
    k = 1
    for _ in range(n):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1.5, rmax)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if disc.any() and not (lab[disc] > 0).any():
            lab[disc] = k
            k += 1
    return lab


def test_grid_cores_partition_image() -> None:
    g = make_grid(100, 70, tile_size=64, halo=16)
    assert g.core_size == 32 and g.shape == (4, 3) and len(g) == 12
    cover = np.zeros((100, 70), int)
    for t in g:
        cover[t.core.slices()] += 1
        assert t.window.height == t.window.width == 64
        assert t.window.y0 == t.core.y0 - 16 and t.window.x0 == t.core.x0 - 16
    assert (cover == 1).all()
    last = g.tiles[-1]
    assert last.core == Box(96, 64, 100, 70) and last.valid == Box(80, 48, 100, 70)
    assert last.image_edges == (False, False, True, True)
    assert g.tiles[0].image_edges == (True, True, False, False)


def test_grid_rejects_bad_sizes() -> None:
    with pytest.raises(InputError):
        make_grid(10, 10, tile_size=50, halo=0)
    with pytest.raises(InputError):
        make_grid(10, 10, tile_size=64, halo=8)
    with pytest.raises(InputError):
        make_grid(10, 10, tile_size=64, halo=32)
    assert round_halo(0) == 0 and round_halo(1) == 16 and round_halo(16) == 16 and round_halo(40.5) == 48


def test_read_window_pads() -> None:
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    w = read_window(img, Box(-1, 2, 2, 6), pad_value=99)
    assert w.tolist() == [[99, 99, 99, 99], [2, 3, 99, 99], [6, 7, 99, 99]]


def test_ownership_hand_case() -> None:
    # 2 tiles side by side: cores x in [0,32) and [32,40); one object straddles the seam at x=32
    g = make_grid(8, 40, tile_size=64, halo=16)
    left, right = g.tiles
    lab = np.zeros((8, 40), np.int32)
    lab[2:4, 31:33] = 1  # pixel centres 31.5, 32.5 -> centroid x = 32.0 exactly -> right core [32, 40)
    lab[5:7, 29:31] = 2  # centroid x = 30.0 -> left core
    assert owned_labels(lab[left.valid.slices()], left).tolist() == [2]
    assert owned_labels(lab[right.valid.slices()], right).tolist() == [1]
    # an object touching the interior edge of the right tile's valid box is dropped there
    lab2 = np.zeros((8, 40), np.int32)
    lab2[0:2, 16:18] = 3  # right valid box starts at x=16 (interior) -> cut there
    assert owned_labels(lab2[right.valid.slices()], right).tolist() == []
    # ...the left tile sees it whole, its centroid x = 17.0 is in the left core: kept there
    assert owned_labels(lab2[left.valid.slices()], left).tolist() == [3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cut_and_stitch_round_trip(seed: int) -> None:
    lab = _random_labels(173, 251, 150, rmax=9, seed=seed)
    g = make_grid(173, 251, tile_size=96, halo=32)  # halo 32 > largest diameter (19 px)
    stitched = stitch_labels(g, label_tiles(lab, g))
    assert _same_partition(lab, stitched)
    assert len(np.unique(stitched)) == len(np.unique(lab))


def _blur_model(batch: np.ndarray) -> np.ndarray:
    """Deterministic stand-in network: darkness, blurred (zero padding at the window edge), thresholded-ish."""
    dark = 1.0 - batch.astype(np.float32).mean(axis=-1) / 255.0
    out = np.stack([ndi.uniform_filter(d, size=7, mode="constant") for d in dark])
    return (1.0 / (1.0 + np.exp(-20 * (out - 0.4))))[:, None]


def _disc_image(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    lab = _random_labels(h, w, 120, rmax=8, seed=seed)
    img = np.full((h, w, 3), (230, 190, 215), np.uint8)
    img[lab > 0] = (90, 40, 120)
    return img, lab


def test_tiled_equals_untiled_fake_model() -> None:
    img, _lab = _disc_image(150, 210, seed=3)
    tiled = tiled_predict(img, _blur_model, tile_size=64, halo=16, pad_value=255)
    ref = untiled_reference(img, _blur_model, tile_size=64, halo=16, pad_value=255)
    np.testing.assert_allclose(tiled, ref, atol=1e-6)
    # and the instances from the tiled map, cut and stitched, equal those of the untiled map
    inst, _ = ndi.label(ref[0] > 0.5)
    g = make_grid(150, 210, tile_size=96, halo=32)
    per_tile = ((t, ndi.label(tiled[0][t.valid.slices()] > 0.5)[0]) for t in g)
    assert _same_partition(inst, stitch_labels(g, per_tile))


def test_tiled_equals_untiled_tiny_unet() -> None:
    from pointnuc.models.net import UNet, preprocess

    torch.manual_seed(0)
    net = UNet(2, "tiny").eval()
    img, _ = _disc_image(200, 230, seed=4)

    @torch.no_grad()
    def predict(batch: np.ndarray) -> np.ndarray:
        return torch.softmax(net(preprocess(batch)), dim=1).numpy()

    tiled = tiled_predict(img, predict, tile_size=192, halo=48, pad_value=255)
    ref = untiled_reference(img, predict, tile_size=192, halo=48, pad_value=255)
    assert tiled.shape == ref.shape == (2, 200, 230)
    assert np.abs(tiled - ref).max() < 1e-5  # measured 2e-7; with no halo it is 0.12


def test_fit_tile_size_by_hand() -> None:
    # a 1000 x 1000 image, halo 80: one tile of 1184 (1000 + 2 x 80, up to a multiple of 32), not nine of 512
    assert fit_tile_size(1000, 1000, halo=80, smallest=32, largest=1536) == 1184
    # capped at 1024: 2 x 2 tiles of 672 (core 512) show 1.8 Mpx; 1024 (core 864) would show 4 x 1.05 Mpx
    assert fit_tile_size(1000, 1000, halo=80, smallest=32, largest=1024) == 672
    # a large slide: the largest size (least halo per core pixel); a small image: one tile just large enough
    assert fit_tile_size(80_000, 100_000, halo=80, smallest=32, largest=1536) == 1536
    assert fit_tile_size(100, 60, halo=80, smallest=32, largest=1536) == 288
    assert fit_tile_size(100, 60, halo=80, smallest=512, largest=1536) == 512
    for h, w in ((1000, 1000), (700, 2100), (5000, 300)):
        t = fit_tile_size(h, w, halo=48, smallest=32, largest=1024)
        g = make_grid(h, w, tile_size=t, halo=48)
        shown = len(g) * t * t
        assert all(len(make_grid(h, w, tile_size=s, halo=48)) * s * s >= shown for s in range(128, 1025, 32))


def test_fitted_tiles_equal_the_old_512_grid_tiny_unet() -> None:
    """The fitted (one-tile) grid and the fixed small grid give the same probabilities and instances."""
    from pointnuc.models.net import UNet, preprocess

    torch.manual_seed(0)
    net = UNet(2, "tiny").eval()
    img, _ = _disc_image(200, 230, seed=5)

    @torch.no_grad()
    def predict(batch: np.ndarray) -> np.ndarray:
        return torch.softmax(net(preprocess(batch)), dim=1).numpy()

    fitted = fit_tile_size(200, 230, halo=48, smallest=32, largest=512)
    assert fitted == 352 and len(make_grid(200, 230, tile_size=fitted, halo=48)) == 1
    one = tiled_predict(img, predict, tile_size=fitted, halo=48, pad_value=255)
    many = tiled_predict(img, predict, tile_size=160, halo=48, pad_value=255)  # 4 x 4 tiles of 64-px cores
    assert np.abs(one - many).max() < 1e-5
    assert _same_partition(ndi.label(one[1] > 0.5)[0], ndi.label(many[1] > 0.5)[0])


def test_tiles_intersecting_a_coarse_mask() -> None:
    g = make_grid(100, 100, tile_size=64, halo=16)  # cores of 32 px: 4 x 4 tiles
    mask = np.zeros((25, 25), bool)  # 4 image px per mask px
    mask[9, 17] = True  # image rows 36..40, cols 68..72 -> the core at row 1, col 2
    assert [(t.row, t.col) for t in tiles_intersecting(g, mask, 4.0)] == [(1, 2)]
    # the same grid laid over a region starting at image (row 32, col 0): now core row 0
    assert [(t.row, t.col) for t in tiles_intersecting(g, mask, 4.0, origin=(32, 0))] == [(0, 2)]


def test_an_area_that_fits_one_window_shows_its_context_and_little_white() -> None:
    """One window for an area that fits (the CPU's fitted tiles): its core is the area, its window the area's
    context where the image goes on and EDGE_PX of white beyond the image's edge, not the tiles' whole halo."""
    from pointnuc.infer.slide_tiles import EDGE_PX, one_window

    image = Box(0, 0, 1000, 1000)
    (whole,) = one_window(image, 80, image, 1536).tiles  # type: ignore[union-attr]
    assert whole.core == whole.valid == image and whole.window == Box(-EDGE_PX, -EDGE_PX, 1056 - EDGE_PX, 1056 - EDGE_PX)
    # a region's area at the image's left edge: 80 px of context inside the image, the same white as the whole
    # image beyond its edge (grid coordinates are the area's)
    grid = one_window(Box(100, 0, 400, 300), 80, image, 1536)
    assert grid is not None and grid.tile_size == 480 and grid.halo == 0
    (part,) = grid.tiles
    assert part.core == Box(0, 0, 300, 300) and part.window == Box(-80, -EDGE_PX, 400, 464)
    assert one_window(Box(0, 0, 1500, 1500), 80, Box(0, 0, 1500, 1500), 1536).tile_size == 1536  # type: ignore[union-attr]
    assert one_window(Box(0, 0, 1600, 1600), 80, Box(0, 0, 1600, 1600), 1536) is None
