"""Instances on the device (torch) against the numpy path, on the CPU.

Exact (the same label array, numbering included): thresholds, hole filling, components, the distance
transform, the Gaussian (bit for bit), the h-maxima markers, and the instances of every map below
except where two floods meet at exactly the same level. Measured at those ties (this file's maps):
the ring (a symmetric shape, 16 of 816 px) AJI 0.96; two smoothed random fields (400 x 400) 5 and 1 px
of ~18k, AJI 0.9995 and 0.9999; two MoNuSeg "MO" test maps of the ``cpu`` model (benchmarks/results/instances-torch.md)
0 and 17 px of ~145k, AJI 1.0 and 0.9998. Every map keeps the same number of instances and the same
foreground; the pixels that differ lie on the line between two touching nuclei.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from helpers import canonical_labels
from scipy import ndimage as ndi
from test_instances import _clumps, _two_touching_discs

from pointnuc.errors import InputError
from pointnuc.infer.instances import fill_small_holes, instances_from_probability
from pointnuc.infer.instances_torch import (
    PixelGraph,
    components,
    distance,
    fill_small_holes_torch,
    gaussian_scipy,
    instances_torch,
)
from pointnuc.metrics import aji

YY, XX = np.mgrid[:60, :90]


def _disc(cy: float, cx: float, r: float) -> np.ndarray:
    return (YY - cy) ** 2 + (XX - cx) ** 2 <= r * r


def _field(size: int, seed: int) -> np.ndarray:
    """A nucleus-like probability map (about 11 % foreground): blobs of random size that touch and merge, smooth noise."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.float32)
    n = size * size // 1200
    img[rng.integers(0, size, n), rng.integers(0, size, n)] = 1
    blobs = ndi.gaussian_filter(img, 4.0) * 2 * np.pi * 16
    noise = ndi.gaussian_filter(rng.normal(size=(size, size)).astype(np.float32), 3) * 3
    return (1 / (1 + np.exp(-(blobs * 6 - 1.5 + noise)))).astype(np.float32)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Many small tensor operations: one thread (the suite's machine runs other work on its two cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _both(p: np.ndarray, **kw: float) -> tuple[np.ndarray, np.ndarray]:
    kw = {"min_area_px": 5.0, "h_px": 1.0, **kw}
    ref = instances_from_probability(p, method="watershed", **kw)  # type: ignore[arg-type]
    return ref, instances_torch(torch.from_numpy(p), **kw).numpy()


def test_distance_and_gaussian_are_scipys_to_the_bit() -> None:
    rng = np.random.default_rng(0)
    for shape, density in (((64, 80), 0.7), ((40, 33), 0.97), ((7, 5), 0.5), ((50, 60), 0.999), ((9, 12), 2.0)):
        mask = rng.random(shape) < density  # (the last: no background at all)
        d = distance(torch.from_numpy(mask)[None])[0].numpy()
        assert np.array_equal(d, ndi.distance_transform_edt(mask))
        x = rng.random(shape) * 10
        assert np.array_equal(gaussian_scipy(torch.from_numpy(x)[None])[0].numpy(), ndi.gaussian_filter(x, 1.0))


def test_components_and_holes_are_scipys() -> None:
    rng = np.random.default_rng(1)
    for density in (0.3, 0.55, 0.7):
        mask = rng.random((70, 90)) < density
        g = PixelGraph(torch.from_numpy(mask)[None], 8)
        for conn, structure in ((4, None), (8, np.ones((3, 3)))):
            roots = components(g, g.on, conn)[: g.n]
            lab = np.zeros(mask.size, np.int64)
            lab[g.index.numpy()] = roots.numpy() + 1
            assert np.array_equal(canonical_labels(lab.reshape(mask.shape)), ndi.label(mask, structure)[0])
        for max_hole in (1, 3, 10, 30, 200):
            ours = fill_small_holes_torch(torch.from_numpy(mask)[None], max_hole)[0].numpy()
            assert np.array_equal(ours, fill_small_holes(mask, max_hole))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("h_px", [0.5, 1.0, 1.5])
def test_clumps_give_the_very_same_labels(seed: int, h_px: float) -> None:
    ref, ours = _both(_clumps(seed), h_px=h_px)
    assert ref.max() > 40 and ours.dtype == np.int32
    assert np.array_equal(ours, ref)


def test_hand_made_shapes_give_the_very_same_labels() -> None:
    dumbbell = _disc(30, 20, 10) | _disc(30, 60, 10) | ((abs(YY - 30) <= 2) & (XX > 20) & (XX < 60))
    holes = _disc(30, 45, 20) & ~_disc(30, 45, 2) & ~_disc(20, 40, 1)  # two small holes: filled
    borders = _disc(0, 0, 15) | _disc(59, 89, 12) | _disc(30, 89, 8) | _disc(30, 76, 8)
    diagonal = np.eye(60, 90, dtype=bool) | np.eye(60, 90, 1, dtype=bool)  # 8- but not 4-connected steps
    three = _disc(30, 25, 10) | _disc(30, 43, 10) | _disc(45, 34, 9)
    full = np.ones_like(three)
    for m, n in ((dumbbell, 2), (holes, 1), (borders, 4), (diagonal, 1), (three, 1), (full, 1)):
        ref, ours = _both(m.astype(np.float32))
        assert ref.max() == n and np.array_equal(ours, ref)
    ref, ours = _both(_two_touching_discs())
    assert ref.max() == 2 and np.array_equal(ours, ref)
    # connected components only, and holes of another size
    p = _clumps(3)
    for kw in ({"method": "cc", "min_area_px": 5.0}, {"method": "watershed", "max_hole_px": 300.0, "min_area_px": 12.0}):
        ref = instances_from_probability(p, **kw)  # type: ignore[arg-type]
        assert np.array_equal(instances_torch(torch.from_numpy(p), **kw).numpy(), ref)  # type: ignore[arg-type]


def test_a_batch_is_its_images_one_by_one() -> None:
    maps = np.stack([_clumps(4, 128), np.zeros((128, 128), np.float32), _clumps(5, 128)])
    batch = instances_torch(torch.from_numpy(maps), min_area_px=5, h_px=1.0).numpy()
    assert batch.shape == maps.shape and batch[1].max() == 0
    for p, lab in zip(maps, batch):
        assert np.array_equal(lab, instances_from_probability(p, method="watershed", min_area_px=5, h_px=1.0))
    with pytest.raises(InputError):
        instances_torch(torch.zeros(1, 1, 4, 4))


def test_where_floods_meet_at_the_same_level_the_tolerance_holds() -> None:
    ring = (_disc(30, 45, 20) & ~_disc(30, 45, 12)).astype(np.float32)  # symmetric: ties on its axes
    for p, min_aji, max_px in ((ring, 0.96, 16), (_field(400, 0), 0.999, 5), (_field(400, 1), 0.9998, 1)):
        ref, ours = _both(p, min_area_px=20.0)
        assert ours.max() == ref.max() > 0 and np.array_equal(ours > 0, ref > 0)
        assert aji(ref, ours) >= min_aji and (ours != ref).sum() <= max_px
        # the pixels that differ sit between two instances of the reference
        ys, xs = np.nonzero(ours != ref)
        grown = ndi.grey_dilation(ref, size=3), -ndi.grey_dilation(-np.where(ref > 0, ref, ref.max() + 1), size=3)
        assert np.all(grown[0][ys, xs] != grown[1][ys, xs])
