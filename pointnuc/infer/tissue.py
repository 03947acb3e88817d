"""Where the tissue is, from a slide thumbnail: empty glass is never sent to the network.

Background in brightfield H&E is bright and grey (glass), or black (scanner padding).
Everything else — stained tissue, but also pen marks and debris — counts as tissue; a
false "tissue" costs a few tiles, a false "background" loses nuclei. So the mask errs
towards tissue:

- a pixel is glass only when it looks like *this slide's* glass: the thumbnail's own glass
  colour is measured, and any pixel that differs from it by more than the glass's own
  spread is tissue. On a coarse thumbnail (4-16 µm pixels) a thin septum of fat or a lone
  nucleus is a faint tint of a glass pixel, which fixed saturation/brightness thresholds
  miss (a 512 px tile of fat gave an empty mask, and 0 nuclei);
- nothing thin is opened away;
- specks smaller than a few nuclei (dust on the glass) go, but sparse tissue does not: fat's septa
  join its nuclei into one large piece;
- the mask grows by a margin, so a nucleus at the tissue's edge is inside it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: below this share of glass-looking pixels the thumbnail has no glass to measure: all of it is tissue
MIN_GLASS_SHARE = 0.01
#: a pixel this many grey levels (of 255) from the glass colour is tissue, however uniform the glass...
MIN_GLASS_TOLERANCE = 6.0
#: ...or this many times the glass's robust spread (MAD x 1.4826), where the glass is less even
GLASS_SPREAD_FACTOR = 4.0


def tissue_mask(
    thumbnail: np.ndarray,
    *,
    downsample: float,
    pixel_size_um: float | None,
    min_saturation: float = 0.07,
    max_brightness: float = 0.86,
    min_area_um2: float = 300.0,
    margin_um: float = 20.0,
) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail (h, w, 3).

    Glass-looking pixels (HSV saturation < ``min_saturation`` and value >= ``max_brightness``,
    not black padding) give the slide's glass colour and spread; a pixel is tissue when it is
    not black padding and either fails that glass test or differs from the glass colour by
    more than its tolerance (see the module doc). Without enough glass to measure, every
    non-black pixel is tissue. Specks (8-connected) smaller than ``min_area_um2`` (a 17 µm
    square: dust) go; the rest grows by ``margin_um``. ``downsample``: full-resolution pixels
    per thumbnail pixel; ``pixel_size_um``: of the full resolution (None: 0.25 µm/px is
    assumed for the two sizes only).
    """
    rgb = np.asarray(thumbnail)[..., :3]
    vmax = rgb.max(axis=-1).astype(np.int16)  # small integer work: a few bytes per thumbnail pixel
    vmin = rgb.min(axis=-1).astype(np.int16)
    # saturation (vmax - vmin) / vmax >= s  <=>  (vmax - vmin) * 1000 >= s * 1000 * vmax, in integers
    coloured = (vmax - vmin).astype(np.int32) * 1000 >= round(min_saturation * 1000) * vmax.astype(np.int32)
    padding = vmax <= 0.08 * 255
    glassy = ~coloured & (vmax >= max_brightness * 255) & ~padding
    mask = ~glassy & ~padding
    if glassy.mean() >= MIN_GLASS_SHARE:
        glass = rgb[glassy]
        if len(glass) > 200_000:  # the median of a sample is as good and much faster
            glass = glass[:: len(glass) // 100_000]
        ref = np.median(glass, axis=0)
        spread = 1.4826 * np.median(np.abs(glass - ref), axis=0)
        tol = max(MIN_GLASS_TOLERANCE, GLASS_SPREAD_FACTOR * float(spread.max()))
        off = np.abs(rgb.astype(np.float32) - ref.astype(np.float32)).max(axis=-1)
        mask |= glassy & (off > tol)
    else:
        mask = ~padding  # no glass seen: the whole thumbnail is tissue (a crop inside the tissue)
    um_per_px = float(downsample) * float(pixel_size_um or 0.25)
    min_px = min_area_um2 / (um_per_px * um_per_px)
    if min_px > 1 and mask.any():
        lab, _ = ndi.label(mask, structure=np.ones((3, 3), bool))
        sizes = np.bincount(lab.ravel())
        keep = sizes >= min_px
        keep[0] = False
        mask = keep[lab]
    grow = int(np.ceil(margin_um / um_per_px))
    if grow > 0 and mask.any():
        mask = ndi.binary_dilation(mask, structure=ndi.generate_binary_structure(2, 1), iterations=grow)
    return mask
