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

Memory: a few (B, H, W) tensors of int64 / float64 (about 80 bytes a pixel at the peak).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pointnuc.errors import InputError
from pointnuc.models.calibration import Thresholds

#: neighbour offsets (dy, dx) of 4-connectivity
_FOUR = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _shift(x: torch.Tensor, dy: int, dx: int, fill: float | int | bool) -> torch.Tensor:
    """``out[y, x] = x[y + dy, x + dx]`` over the last two dims, ``fill`` beyond the border."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def _neighbour_min(x: torch.Tensor, connectivity: int) -> torch.Tensor:
    """Minimum over each pixel and its 4- or 8-neighbours (float tensor (B, H, W); +inf beyond the border)."""
    if connectivity == 8:
        return -F.max_pool2d(-x[:, None], 3, stride=1, padding=1)[:, 0]
    out = x
    for dy, dx in _FOUR:
        out = torch.minimum(out, _shift(x, dy, dx, float("inf")))
    return out


def components(mask: torch.Tensor, connectivity: int) -> torch.Tensor:
    """Connected components of a bool (B, H, W): each pixel's component root (its first pixel in raster
    order, as a flat index into its image), -1 off the mask. Iterative minimum propagation plus pointer jumping."""
    b, h, w = mask.shape
    n = h * w
    dtype = torch.float32 if n < 2**24 else torch.float64  # flat indices exactly representable
    inf = float("inf")
    idx = torch.arange(n, device=mask.device, dtype=dtype).view(1, h, w).expand(b, h, w)
    lab = torch.where(mask, idx, inf)
    while True:
        new = torch.where(mask, _neighbour_min(lab, connectivity), inf)
        # pointer jumping: a label is the index of a pixel of the same component whose label is no larger
        flat = new.view(b, n)
        jump = torch.gather(flat, 1, flat.nan_to_num(posinf=0).long()).view(b, h, w)
        new = torch.where(mask, torch.minimum(new, jump), inf)
        if torch.equal(new, lab):
            break
        lab = new
    return torch.where(mask, lab, -1.0).long()


def _count_per_root(roots: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(B, H*W) int32: how many pixels of ``where`` have each root (per image)."""
    b, h, w = roots.shape
    n = h * w
    flat = (roots + torch.arange(b, device=roots.device).view(b, 1, 1) * n)[where]
    out = torch.zeros(b * n, dtype=torch.int32, device=roots.device)
    out.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return out.view(b, n)


def _per_root(table: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
    """``table[b, roots[b, y, x]]`` (roots < 0 read index 0: mask them out yourself)."""
    b, h, w = roots.shape
    return torch.gather(table, 1, roots.clamp(min=0).view(b, h * w)).view(b, h, w)


def fill_small_holes_torch(mask: torch.Tensor, max_hole_px: float) -> torch.Tensor:
    """:func:`pointnuc.infer.instances.fill_small_holes` on a batch (exact)."""
    bg = ~mask
    roots = components(bg, 4)
    small = _count_per_root(roots, bg) < max_hole_px
    edge = torch.zeros_like(bg)
    edge[:, 0], edge[:, -1], edge[:, :, 0], edge[:, :, -1] = True, True, True, True
    touching = _count_per_root(roots, bg & edge) > 0
    return mask | (bg & _per_root(small & ~touching, roots))


def distance_sq(mask: torch.Tensor) -> torch.Tensor:
    """Exact squared Euclidean distance of each pixel to the nearest pixel off ``mask`` (int64 (B, H, W); 0 off it).

    Separable: the distance along each column, then the minimum over horizontal offsets ``dx`` of
    ``column² + dx²``, offset by offset, until ``dx²`` exceeds every distance found (no radius cap).
    """
    b, h, w = mask.shape
    big = 1 << 30  # "no background in this column"; big² still fits int64
    iy = torch.arange(h, device=mask.device).view(1, h, 1)
    bg = ~mask
    above = torch.cummax(torch.where(bg, iy, -big), dim=1).values
    below = torch.cummin(torch.where(bg, iy, big).flip(1), dim=1).values.flip(1)
    g = torch.minimum(iy - above, below - iy).clamp(max=big)
    g2 = g * g
    d2 = g2.clone()
    for dx in range(1, w):
        if dx * dx >= int(d2.max()):
            break
        d2[..., dx:] = torch.minimum(d2[..., dx:], g2[..., :-dx] + dx * dx)
        d2[..., :-dx] = torch.minimum(d2[..., :-dx], g2[..., dx:] + dx * dx)
    return d2


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


def _reconstruct(seed: torch.Tensor, limit: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Greyscale reconstruction by dilation (8-connectivity) of ``seed`` under ``limit``, within ``region`` only."""
    ninf = float("-inf")
    rec = torch.where(region, seed, ninf)
    while True:
        new = torch.where(region, torch.minimum(F.max_pool2d(rec[:, None], 3, stride=1, padding=1)[:, 0], limit), ninf)
        new = torch.maximum(new, rec)
        if torch.equal(new, rec):
            return rec
        rec = new


def _flood_level(value: torch.Tensor, markers: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Each pixel's flood level from the markers (4-connectivity, within ``region``): the lowest achievable
    highest ``value`` on a path from a marker; +inf where no marker reaches."""
    inf = float("inf")
    level = torch.where(markers, value, inf)
    while True:
        reach = torch.where(region, _neighbour_min(level, 4), inf)
        new = torch.where(markers, level, torch.minimum(level, torch.maximum(value, reach)))
        if torch.equal(new, level):
            return level
        level = new


def _flood_labels(level: torch.Tensor, labels: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Grow marker ``labels`` (>= 0; -1 unlabelled) over ``region``: each pixel takes the label of its neighbour
    of lowest flood level, once that one is labelled (ties: the smaller label)."""
    inf = float("inf")
    lowest = torch.full_like(level, inf)
    for dy, dx in _FOUR:
        lowest = torch.minimum(lowest, torch.where(_shift(region, dy, dx, False), _shift(level, dy, dx, inf), inf))
    big = torch.iinfo(torch.int64).max
    while True:
        todo = region & (labels < 0)
        best = torch.full_like(labels, big)
        for dy, dx in _FOUR:
            lab = _shift(labels, dy, dx, -1)
            ok = (lab >= 0) & (_shift(level, dy, dx, inf) == lowest)
            best = torch.where(ok, torch.minimum(best, lab), best)
        grow = todo & (best < big)
        if not bool(grow.any()):
            return labels
        labels = torch.where(grow, best, labels)


def _watershed_keys(dist: torch.Tensor, mask: torch.Tensor, h_px: float) -> torch.Tensor:
    """Instance keys (int64 (B, H, W), -1 off the mask) of :func:`pointnuc.infer.instances._watershed`,
    ordered as its label numbers: whole components by their root, then the pieces of split ones."""
    b, h, w = mask.shape
    n = h * w
    lab8 = components(mask, 8)
    peak = mask & (dist >= F.max_pool2d(dist[:, None], 3, stride=1, padding=1)[:, 0])
    plat = components(peak, 8)
    iflat = torch.arange(n, device=mask.device).view(1, h, w)
    n_plat = _count_per_root(lab8, peak & (plat == iflat))
    lab4 = components(mask, 4)
    n_four = _count_per_root(lab8, mask & (lab4 == iflat))
    multi = mask & _per_root((n_plat > 1) | (n_four > 1), lab8)
    keys = torch.where(mask, lab8, -1)
    if not bool(multi.any()):
        return keys
    # h-maxima of each split component (skimage.morphology.h_maxima on its own crop)
    cmax = torch.zeros(b * n, dtype=dist.dtype, device=dist.device)
    flat_root = (lab8 + torch.arange(b, device=dist.device).view(b, 1, 1) * n)[multi]
    cmax.scatter_reduce_(0, flat_root, dist[multi], "amax")
    flat_ok = _per_root((cmax >= h_px).view(b, n), lab8)  # h > ptp(crop) = the component's maximum: no maxima
    seed = dist - h_px - (2 * float(np.finfo(np.float64).resolution)) * dist.abs()
    rec = _reconstruct(seed, dist, multi)
    marks = multi & flat_ok & ((dist - rec) >= h_px)
    marker_root = components(marks, 8)
    # watershed of -dist from the markers within each component, then the pieces no marker reached
    level = _flood_level(-dist, marks, multi)
    grown = _flood_labels(level, torch.where(marks, marker_root, -1), multi)
    rest = components(multi & (grown < 0), 8)
    piece = torch.where(grown >= 0, grown, n + rest)
    return torch.where(multi, n + lab8 * (2 * n) + piece, keys)


def instances_torch(
    prob: torch.Tensor,
    *,
    threshold: float = Thresholds.prob,
    min_area_px: float = Thresholds.min_area_px,
    h_px: float = Thresholds.h_px,
    max_hole_px: float | None = None,
) -> torch.Tensor:
    """int32 instance labels (0 = background), (B, H, W) or (H, W) as ``prob``, on its device: the watershed
    instances of :func:`pointnuc.infer.instances.instances_from_probability` (see the module doc for what is exact)."""
    if prob.ndim not in (2, 3):
        raise InputError(f"probability map must be 2-D or a batch of them, got shape {tuple(prob.shape)}")
    single = prob.ndim == 2
    p = (prob[None] if single else prob).float()
    b, h, w = p.shape
    mask = fill_small_holes_torch(p >= threshold, 4 * min_area_px if max_hole_px is None else max_hole_px)
    dist = gaussian_scipy(distance_sq(mask).double().sqrt())
    dist = torch.where(mask, dist, 0.0)
    keys = _watershed_keys(dist, mask, h_px)
    # number the instances of each image in key order, dropping small ones (as _remove_small)
    per_image = (2 * h * w + 1) * h * w
    img = torch.arange(b, device=p.device).view(b, 1, 1) * per_image
    fg = keys >= 0
    uniq, inverse, counts = torch.unique((keys + img)[fg], return_inverse=True, return_counts=True)
    keep = (counts >= min_area_px).long()
    rank = torch.cumsum(keep, 0)
    first = torch.searchsorted(uniq, torch.arange(b, device=p.device) * per_image)
    before = torch.where(first > 0, rank[(first - 1).clamp(min=0)], 0) if uniq.numel() else first
    which = torch.div(uniq, per_image, rounding_mode="floor")
    ids = torch.where(keep > 0, rank - before[which], 0) if uniq.numel() else rank
    out = torch.zeros((b, h, w), dtype=torch.int32, device=p.device)
    out[fg] = ids[inverse].int()
    return out[0] if single else out
