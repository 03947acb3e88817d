"""Where the tissue is, from a slide thumbnail: empty glass is never sent to the network.

Background in brightfield H&E is bright and grey (glass), or black (scanner padding).
Everything else — stained tissue, but also pen marks and dust — counts as tissue; a
false "tissue" costs a few tiles, a false "background" would lose nuclei, so the mask
is cleaned of specks and then grown by a margin.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def tissue_mask(
    thumbnail: np.ndarray,
    *,
    downsample: float,
    pixel_size_um: float | None,
    min_saturation: float = 0.07,
    max_brightness: float = 0.86,
    min_area_um2: float = 2000.0,
    margin_um: float = 20.0,
) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail (h, w, 3).

    A pixel is tissue when it is coloured (HSV saturation >= ``min_saturation``) or
    darker than glass (value < ``max_brightness``), and not black padding. Specks
    smaller than ``min_area_um2`` go; the rest grows by ``margin_um``. ``downsample``:
    full-resolution pixels per thumbnail pixel; ``pixel_size_um``: of the full
    resolution (None: 0.25 µm/px is assumed for the two area/margin sizes only).
    """
    rgb = np.asarray(thumbnail)[..., :3]
    vmax = rgb.max(axis=-1).astype(np.int16)  # uint8 work: a few bytes per thumbnail pixel
    vmin = rgb.min(axis=-1).astype(np.int16)
    # saturation (vmax - vmin) / vmax >= s  <=>  (vmax - vmin) * 255 >= s * 255 * vmax, in integers
    coloured = (vmax - vmin).astype(np.int32) * 1000 >= int(round(min_saturation * 1000)) * vmax.astype(np.int32)
    mask = (coloured | (vmax < max_brightness * 255)) & (vmax > 0.08 * 255)
    um_per_px = float(downsample) * float(pixel_size_um or 0.25)
    min_px = min_area_um2 / (um_per_px * um_per_px)
    mask = ndi.binary_opening(mask, structure=np.ones((2, 2), bool)) if min_px > 4 else mask
    if min_px >= 1 and mask.any():
        lab, n = ndi.label(mask)
        sizes = np.bincount(lab.ravel())
        keep = sizes >= min_px
        keep[0] = False
        mask = keep[lab]
    grow = int(np.ceil(margin_um / um_per_px))
    if grow > 0 and mask.any():
        mask = ndi.binary_dilation(mask, structure=ndi.generate_binary_structure(2, 1), iterations=grow)
    return mask


def tissue_fraction(mask: np.ndarray) -> float:
    """Share of the thumbnail that is tissue."""
    return float(np.mean(mask)) if mask.size else 0.0
