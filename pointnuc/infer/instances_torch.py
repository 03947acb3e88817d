"""Nucleus probability maps -> instance labels on the device, in torch (batched, any device).

The same steps as :func:`pointnuc.infer.instances.instances_from_probability` with
``method="watershed"``, written as whole-tensor iterations that run on a GPU beside the network:

- threshold, small holes filled (background 4-connected components off the border), 8-connected
  components: iterative minimum-label propagation with pointer jumping; **exact**.
- Euclidean distance transform: column distances by a running max/min of indices, then the row pass
  as a minimum over horizontal offsets, stopped once no offset can improve any pixel (the offset's
  square exceeds the largest squared distance): no radius cap; **exact** (the same float64 values).
- Gaussian smoothing (σ = 1, truncate 4, mode ``reflect``): scipy's ``correlate1d`` rebuilt with its
  summation order (centre, then the symmetric pairs from the outside in), rows then columns, float64;
  **bit-identical** to ``scipy.ndimage.gaussian_filter`` (asserted by the tests).
- the per-component choice (more than one plateau of maxima, or several 4-connected pieces) and
  skimage's ``h_maxima`` (the float ``resolution`` shift, reconstruction by dilation within each
  component, ``h > ptp`` per component): **exact**.
- the watershed of ``-dist`` from the markers (4-connectivity): each pixel's flood level (the lowest
  possible highest value on a path from a marker, computed exactly) orders the flooding as skimage's
  priority queue does; a pixel takes the label of its neighbour of lowest level. Only where two
  differently labelled neighbours have exactly the same level is skimage's queue order (insertion age)
  not reproduced: there the label grown first, then the smaller label, wins. **Approximate** at such
  exact ties (symmetric shapes); the tolerance is in ``tests/test_instances_torch.py``.
- pieces no marker reaches are their own instances; objects under ``min_area_px`` dropped; the instances
  numbered in the same order as the numpy path.

The distance transform and the Gaussian work on whole tiles; everything that iterates works on pixel
lists (:class:`PixelGraph`: the foreground, a band of background for the holes, the components to split),
so its cost follows the nuclei rather than the tile. Memory: a few (B, H, W) tensors (float64 for the
distances) and about 80 bytes per foreground pixel for its neighbour list. On one CPU thread it is about
3x slower than the numpy path (benchmarks/results/instances-torch.md): it is meant for the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from pointnuc.errors import InputError
from pointnuc.infer.instances import METHODS
from pointnuc.models.calibration import Thresholds

if TYPE_CHECKING:
    from pointnuc.infer.polygons import TileContext
    from pointnuc.infer.tiling import Tile

#: neighbour offsets (dy, dx); the first four are 4-connectivity
_OFFSETS = ((-1, 0), (0, -1), (0, 1), (1, 0), (-1, -1), (-1, 1), (1, -1), (1, 1))


class PixelGraph:
    """The pixels of a bool mask (B, H, W) as a list in raster order, image by image, each with the list
    positions of its neighbours on the mask (``nbr``, (n + 1, connectivity)). Position ``n`` stands for "no
    neighbour": arrays over the pixels have n + 1 entries, the last one a sentinel. The iterations below
    work on these lists, so their cost follows the nuclei's pixels, not the tile's."""

    def __init__(self, mask: torch.Tensor, connectivity: int) -> None:
        b, h, w = mask.shape
        self.shape = (b, h, w)
        flat = mask.reshape(-1)
        self.index = torch.nonzero(flat).squeeze(1)  #: flat index (over the batch) of each pixel
        n = self.n = int(self.index.numel())
        dev = mask.device
        pos = torch.full((flat.numel(),), n, dtype=torch.long, device=dev)
        pos[self.index] = torch.arange(n, device=dev)
        y, x = (self.index // w) % h, self.index % w
        cols = []
        for dy, dx in _OFFSETS[:connectivity]:
            inside = (y + dy >= 0) & (y + dy < h) & (x + dx >= 0) & (x + dx < w)
            j = (self.index + (dy * w + dx)).clamp(0, max(flat.numel() - 1, 0))
            cols.append(torch.where(inside, pos[j], n))
        nbr = torch.stack(cols, 1) if n else torch.zeros((0, connectivity), dtype=torch.long, device=dev)
        self.nbr = torch.cat([nbr, torch.full((1, connectivity), n, dtype=torch.long, device=dev)])
        self.on = torch.ones(n + 1, dtype=torch.bool, device=dev)
        self.on[n] = False

    def subgraph(self, sub: torch.Tensor) -> tuple[PixelGraph, torch.Tensor]:
        """The graph of the pixels where ``sub`` (n + 1,) and their positions here."""
        g = PixelGraph.__new__(PixelGraph)
        keep = torch.nonzero(sub[: self.n]).squeeze(1)
        m = g.n = int(keep.numel())
        pos = torch.full((self.n + 1,), m, dtype=torch.long, device=sub.device)
        pos[keep] = torch.arange(m, device=sub.device)
        g.shape, g.index = self.shape, self.index[keep]
        g.nbr = torch.cat([pos[self.nbr[keep]], torch.full((1, self.nbr.shape[1]), m, dtype=torch.long, device=sub.device)])
        g.on = torch.ones(m + 1, dtype=torch.bool, device=sub.device)
        g.on[m] = False
        return g, keep

    def pad(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """Per-pixel ``values`` (n,) with the sentinel ``fill`` appended."""
        return torch.cat([values, torch.full((1,), fill, dtype=values.dtype, device=values.device)])


def components(g: PixelGraph, sub: torch.Tensor, connectivity: int) -> torch.Tensor:
    """Connected components of the pixels where ``sub`` (n + 1,): each one's root, the first pixel of its
    component in raster order (its list position); ``n`` off ``sub``. Min-label hooking and pointer jumping
    (Shiloach-Vishkin style): a few rounds, not one per pixel of the component's width."""
    n = g.n
    nb = g.nbr[:, :connectivity]
    f = torch.where(sub, torch.arange(n + 1, device=sub.device), n)
    while True:
        fn = torch.where(sub, torch.minimum(f[nb].min(1).values, f), n)
        new = f.scatter_reduce(0, f, fn, "amin")  # hook each parent under its child's lowest neighbour
        new = torch.minimum(new, fn)
        new = new[new]  # shortcut
        if torch.equal(new, f):
            return f
        f = new


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., y, x] = x[..., y + dy, x + dx]`` (bool), False beyond the border."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    out[..., max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = x[..., max(0, dy) : h + min(0, dy) or None,
                                                                            max(0, dx) : w + min(0, dx) or None]
    return out


def _count(roots: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """How many pixels of ``where`` have each root (n + 1,)."""
    return torch.bincount(roots[where], minlength=roots.numel())


def fill_small_holes_torch(mask: torch.Tensor, max_hole_px: float) -> torch.Tensor:
    """:func:`pointnuc.infer.instances.fill_small_holes` on a batch (B, H, W) (exact).

    Only the background within ``k`` px (chessboard) of the mask is labelled, where a (2k + 1)² square
    holds ``max_hole_px``: a background pixel farther away lies in a component at least that large, so
    a piece of the band that touches such a pixel (or the image's border) is no small hole, and any other
    piece is a whole background component."""
    b, h, w = mask.shape
    k = max(1, math.ceil((math.sqrt(max(max_hole_px, 1.0)) - 1) / 2))
    m = mask[:, None].float()
    m = F.max_pool2d(F.max_pool2d(m, (1, 2 * k + 1), stride=1, padding=(0, k)), (2 * k + 1, 1), stride=1, padding=(k, 0))
    near = m[:, 0] > 0
    far = ~mask & ~near
    by_far = _shift(far, -1, 0) | _shift(far, 1, 0) | _shift(far, 0, -1) | _shift(far, 0, 1)
    g = PixelGraph(~mask & near, 4)
    roots = components(g, g.on, 4)
    y, x = (g.index // w) % h, g.index % w
    edge = g.pad((y == 0) | (y == h - 1) | (x == 0) | (x == w - 1) | by_far.view(-1)[g.index], False)
    fill = (_count(roots, g.on) < max_hole_px) & (_count(roots, edge) == 0)
    out = mask.clone().view(-1)
    out[g.index] = fill[roots][: g.n]
    return out.view(b, h, w)


def distance_sq(mask: torch.Tensor) -> torch.Tensor:
    """Exact squared Euclidean distance of each pixel to the nearest pixel off ``mask`` (int32, or int64 beyond
    32767 px a side; (B, H, W); 0 off it).

    Separable: the distance along each column, then the minimum over horizontal offsets ``dx`` of
    ``column² + dx²``, offset by offset, until ``dx²`` exceeds every distance found (no radius cap).
    """
    h, w = mask.shape[-2:]
    small = max(h, w) < 1 << 15  # int32 holds every squared distance (and big²)
    big = 1 << 15 if small else 1 << 30  # "no background in this column"
    iy = torch.arange(h, device=mask.device, dtype=torch.int32 if small else torch.int64).view(1, h, 1)
    bg = ~mask
    above = torch.cummax(torch.where(bg, iy, -big), dim=1).values
    below = torch.cummin(torch.where(bg, iy, big).flip(1), dim=1).values.flip(1)
    g = torch.minimum(iy - above, below - iy).clamp(max=big)
    g2 = g * g
    d2 = g2.clone()
    # an image without background: scipy measures from the pixel above the first, (-1, 0)
    none = ~bg.flatten(1).any(1).view(-1, 1, 1)
    for dx in range(1, w):
        if dx * dx >= int(torch.where(none, 0, d2).max()):
            break
        d2[..., dx:] = torch.minimum(d2[..., dx:], g2[..., :-dx] + dx * dx)
        d2[..., :-dx] = torch.minimum(d2[..., :-dx], g2[..., dx:] + dx * dx)
    ix = torch.arange(w, device=mask.device, dtype=iy.dtype).view(1, 1, w)
    return torch.where(none, (iy + 1) ** 2 + ix**2, d2)


def distance(mask: torch.Tensor) -> torch.Tensor:
    """``scipy.ndimage.distance_transform_edt`` of each mask (float64 (B, H, W)), the same values: the square
    roots come from numpy's ``sqrt`` (a table over the squared distances present), as torch's CPU ``sqrt``
    can be one unit in the last place off."""
    d2 = distance_sq(mask).long()
    table = np.sqrt(np.arange(int(d2.max()) + 1, dtype=np.float64))
    return torch.from_numpy(table).to(mask.device)[d2]


def _reflect_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``n`` axis extended by ``radius`` on each side in scipy's ``reflect`` mode (d c b a | a b c d)."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_scipy(x: torch.Tensor, sigma: float = 1.0, truncate: float = 4.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(x, sigma)`` over the last two dims of a float64 (B, H, W), bit for bit.

    The kernel as scipy computes it (numpy); each axis (rows first) as scipy's symmetric ``correlate1d``
    adds it up: ``x[i] w[0]``, then ``+ (x[i - j] + x[i + j]) w[j]`` for j = r .. 1, every step rounded.
    """
    radius = int(truncate * float(sigma) + 0.5)
    r = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * r**2)
    weights = (phi / phi.sum()).tolist()
    out = x
    for dim in (1, 2):
        n = out.shape[dim]
        ext = out.index_select(dim, _reflect_index(n, radius, out.device))
        acc = ext.narrow(dim, radius, n) * weights[radius]
        for j in range(radius, 0, -1):
            acc = acc + (ext.narrow(dim, radius - j, n) + ext.narrow(dim, radius + j, n)) * weights[radius - j]
        out = acc
    return out


def _reconstruct(g: PixelGraph, seed: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Greyscale reconstruction by dilation (8-connectivity) of ``seed`` under ``limit`` over the graph's pixels."""
    rec = torch.where(g.on, seed, float("-inf"))
    while True:
        new = torch.maximum(torch.minimum(rec[g.nbr].max(1).values, limit), rec)
        if torch.equal(new, rec):
            return rec
        rec = new


def _flood_level(g: PixelGraph, value: torch.Tensor, markers: torch.Tensor) -> torch.Tensor:
    """Each pixel's flood level from the markers (4-connectivity): the lowest achievable highest ``value``
    on a path from a marker; +inf where no marker reaches."""
    nb = g.nbr[:, :4]
    level = torch.where(markers, value, float("inf"))
    while True:
        reach = level[nb].min(1).values
        new = torch.where(markers, level, torch.minimum(level, torch.maximum(value, reach)))
        if torch.equal(new, level):
            return level
        level = new


def _flood_labels(g: PixelGraph, level: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Grow marker ``labels`` (>= 0; -1 unlabelled): each pixel takes the label of its neighbour of lowest
    flood level, once that one is labelled (ties: the first labelled, then the smaller label)."""
    nb = g.nbr[:, :4]
    around = level[nb]
    lowest = (nb < g.n) & (around == around.min(1, keepdim=True).values)
    big = torch.iinfo(torch.int64).max
    while True:
        near = labels[nb]
        best = torch.where(lowest & (near >= 0), near, big).min(1).values
        grow = (labels < 0) & (best < big)
        if not bool(grow.any()):
            return labels
        labels = torch.where(grow, best, labels)


def _instance_keys(g: PixelGraph, dist: torch.Tensor, h_px: float, method: str) -> torch.Tensor:
    """Per pixel (n,), a key that orders the instances as :func:`pointnuc.infer.instances._watershed` numbers
    them: whole components by their root, then the pieces of the split ones (component, marked or not, piece)."""
    n = g.n
    lab8 = components(g, g.on, 8)
    if method == "cc":
        return lab8[:n]
    d = g.pad(dist, 0.0)
    ar = torch.arange(n + 1, device=d.device)
    peak = g.on & (d >= d[g.nbr].max(1).values)
    n_plat = _count(lab8, peak & (components(g, peak, 8) == ar))
    n_four = _count(lab8, g.on & (components(g, g.on, 4) == ar))
    multi = g.on & ((n_plat > 1) | (n_four > 1))[lab8]
    if not bool(multi.any()):
        return lab8[:n]
    # the split components only, on their own graph: h-maxima (skimage.morphology.h_maxima on each one's crop)
    s, keep = g.subgraph(multi)
    sd, root = s.pad(dist[keep], 0.0), s.pad(lab8[keep], n)
    cmax = torch.zeros(n + 1, dtype=d.dtype, device=d.device).scatter_reduce(0, root, sd, "amax")
    seed = sd - h_px - (2 * float(np.finfo(np.float64).resolution)) * sd.abs()
    rec = _reconstruct(s, seed, sd)
    marks = s.on & (cmax[root] >= h_px) & ((sd - rec) >= h_px)  # (h > ptp of the crop: no maxima at all)
    # watershed of -dist from the markers, then the pieces no marker reached, each on its own
    level = _flood_level(s, torch.where(s.on, -sd, float("inf")), marks)
    grown = _flood_labels(s, level, torch.where(marks, components(s, marks, 8), -1))
    rest = components(s, s.on & (grown < 0), 8)
    piece = torch.where(grown >= 0, keep.take(grown.clamp(max=s.n - 1)), n + keep.take(rest.clamp(max=s.n - 1)))
    keys = lab8[:n].clone()
    keys[keep] = n + lab8[keep] * (2 * n) + piece[: s.n]
    return keys


def instances_torch(
    prob: torch.Tensor,
    *,
    threshold: float = Thresholds.prob,
    min_area_px: float = Thresholds.min_area_px,
    h_px: float = Thresholds.h_px,
    max_hole_px: float | None = None,
    method: str = "watershed",
) -> torch.Tensor:
    """int32 instance labels (0 = background), (B, H, W) or (H, W) as ``prob``, on its device: the instances of
    :func:`pointnuc.infer.instances.instances_from_probability` (``method`` ``watershed`` or ``cc``; see the
    module doc for what is exact)."""
    if prob.ndim not in (2, 3):
        raise InputError(f"probability map must be 2-D or a batch of them, got shape {tuple(prob.shape)}")
    if method not in METHODS:
        raise InputError(f"unknown instance method {method!r}; choose one of {', '.join(METHODS)}")
    single = prob.ndim == 2
    p = (prob[None] if single else prob).float()
    b, h, w = p.shape
    mask = fill_small_holes_torch(p >= threshold, 4 * min_area_px if max_hole_px is None else max_hole_px)
    g = PixelGraph(mask, 8)
    dist = gaussian_scipy(distance(mask)).view(-1)[g.index] if method == "watershed" else None
    keys = _instance_keys(g, dist if dist is not None else p.new_zeros(0, dtype=torch.float64), h_px, method)
    # number each image's instances in key order, the small ones dropped (as _remove_small)
    per_image = (2 * g.n + 2) * (g.n + 1)
    image = g.index // (h * w)
    uniq, inverse, counts = torch.unique(image * per_image + keys, return_inverse=True, return_counts=True)
    keep = (counts >= min_area_px).long()
    rank = torch.cumsum(keep, 0)
    first = torch.searchsorted(uniq, torch.arange(b, device=p.device) * per_image)
    before = torch.cat([rank.new_zeros(1), rank])[first]  # kept instances of the images before
    ids = torch.where(keep > 0, rank - before[torch.div(uniq, per_image, rounding_mode="floor")], 0)
    out = torch.zeros(b * h * w, dtype=torch.int32, device=p.device)
    out[g.index] = ids[inverse].int()
    out = out.view(b, h, w)
    return out[0] if single else out


def tile_labels(fg: torch.Tensor, tiles: Sequence[Tile], ctx: TileContext) -> list[np.ndarray]:
    """Each tile's instance labels (uint16, or int32 beyond 65535 instances; on the CPU) over the box :func:`~pointnuc.infer.polygons.tile_nuclei`
    looks in, from the batch's foreground probability on the device (B, T, T): what ``tile_nuclei`` would compute
    from the same tile (its float16 rounding of the probability included). Tiles whose boxes have the same
    shape go through :func:`instances_torch` together."""
    from pointnuc.infer.polygons import searched

    boxes = [searched(t, ctx.keep_margin)[1].slices() for t in tiles]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (ys, xs) in enumerate(boxes):
        groups.setdefault((ys.stop - ys.start, xs.stop - xs.start), []).append(i)
    p = ctx.params
    out: list[np.ndarray] = [np.zeros(0, np.int32)] * len(tiles)
    for members in groups.values():
        crops = torch.stack([fg[i][boxes[i]] for i in members]).half().float()
        labels = instances_torch(crops, threshold=p.threshold, min_area_px=p.min_area_px, h_px=p.h_px, method=p.method)
        host = labels.cpu().numpy()
        if host.max(initial=0) < 1 << 16:  # (the usual case: half the copy to the worker processes)
            host = host.astype(np.uint16)
        for i, lab in zip(members, host):
            out[i] = lab
    return out
