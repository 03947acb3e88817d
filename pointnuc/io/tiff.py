"""TIFF slides (tiffslide, tifffile): pyramid levels, pixel size, colour checks, tile-parallel reading."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from pointnuc.errors import ImageReadError
from pointnuc.io.pixels import data_max, full_scale, plausible_um, to_rgb

log = logging.getLogger(__name__)


def _tiff_colour_problem(page: Any) -> str | None:
    """What makes a TIFF page other than RGB brightfield, or None."""
    photometric, spp = int(page.photometric), int(page.samplesperpixel)
    if photometric in (2, 6) and spp in (3, 4):  # RGB or YCbCr (JPEG slides), RGBA
        return None
    if photometric in (0, 1):  # min-is-white / min-is-black
        if spp == 1:
            return "a greyscale image (1 channel)"
        return f"a stack of {spp} grey channels (e.g. fluorescence)"
    names = {3: "a palette (indexed-colour) image", 5: "a CMYK image", 8: "a CIELab image"}
    if photometric in names:
        return names[photometric]
    return f"an image of {spp} channels with TIFF photometric {photometric}"


class TiffBackend:
    """A TIFF read through tiffslide: levels addressed in their own pixels, tiles decoded in parallel."""

    def __init__(self, path: Path) -> None:
        import tiffslide

        self.path = path
        self.slide = tiffslide.TiffSlide(str(path))
        self.level_dimensions: list[tuple[int, int]] = [(int(w), int(h)) for w, h in self.slide.level_dimensions]
        mpp = self.slide.properties.get("tiffslide.mpp-x")
        self.pixel_size_um = plausible_um(mpp)
        # level arrays (H, W[, S]) addressed in their own pixels: no rounding through level-0 coordinates
        self.arrays: list[Any] | None = None
        try:
            group = self.slide.zarr_group
            arrays: list[Any] = [group[str(i)] for i in range(len(self.level_dimensions))]
            if all(a.shape[:2] == (hh, ww) and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)))
                   for a, (ww, hh) in zip(arrays, self.level_dimensions)):
                self.arrays = arrays
        except Exception:  # noqa: BLE001 - another layout (e.g. planar): tiffslide's read_region
            self.arrays = None
        # levels whose tiles are decoded here directly (see TileReader); None: through zarr
        self.tiles: list[TileReader | None] = [None] * len(self.level_dimensions)
        self._fd: int | None = None
        # the level TiffPages (None where a level is not one plain page): colour, bit depth, checks
        self.pages: list[Any] = [None] * len(self.level_dimensions)
        try:
            self._find_pages()
        except Exception:  # noqa: BLE001 - an unusual layout: no page metadata, zarr reads every level
            self.pages = [None] * len(self.level_dimensions)
        page0 = self.pages[0]
        self.colour_problem: str | None = _tiff_colour_problem(page0) if page0 is not None else None
        self._scale: float | None = None
        if self.arrays is not None:
            try:
                self._open_tiles(path)
            except Exception:  # noqa: BLE001 - anything unusual: zarr reads every level
                self.tiles = [None] * len(self.level_dimensions)

    def _find_pages(self) -> None:
        import tifffile

        tf = self.slide.ts_tifffile  # (tiffslide's public handle on its TiffFile)
        if not isinstance(tf, tifffile.TiffFile) or not tf.series:
            return
        levels = tf.series[0].levels
        if len(levels) != len(self.level_dimensions):
            return
        for i, lev in enumerate(levels):
            if len(lev.pages) == 1 and isinstance(lev.pages[0], tifffile.TiffPage):
                self.pages[i] = lev.pages[0]

    def _open_tiles(self, path: Path) -> None:
        if not hasattr(os, "pread"):
            return
        for i, (page, (ww, hh)) in enumerate(zip(self.pages, self.level_dimensions)):
            if page is not None:
                self.tiles[i] = TileReader.of(page, (hh, ww))
        if any(t is not None for t in self.tiles):
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def read_raw(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Samples of level ``level`` as stored, in its own coordinates; the box lies inside the level."""
        tiles = self.tiles[level]
        if tiles is not None and self._fd is not None:
            return tiles.read(self._fd, x, y, w, h)
        if self.arrays is not None:
            return np.asarray(self.arrays[level][y : y + h, x : x + w])
        ds = self.level_dimensions[0][0] / self.level_dimensions[level][0]
        dsy = self.level_dimensions[0][1] / self.level_dimensions[level][1]
        loc = (round(x * ds), round(y * dsy))
        return np.asarray(self.slide.read_region(loc, level, (w, h), as_array=True))

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """8-bit RGB pixels of level ``level`` in its own coordinates; the box lies inside the level."""
        raw = self.read_raw(level, x, y, w, h)
        return to_rgb(raw, 255.0 if raw.dtype == np.uint8 else self.scale(raw.dtype))

    def scale(self, dtype: np.dtype) -> float:
        """The full-scale sample value (:func:`full_scale`), found on the first read of wider samples."""
        if self._scale is None:
            page = self.pages[0]
            bits = max_value = None
            if page is not None:
                bits = int(page.bitspersample)
                for name in ("SMaxSampleValue", "MaxSampleValue"):
                    tag = page.tags.get(name)
                    if tag is not None:
                        max_value = float(np.max(tag.value))
                        break
            last = len(self.level_dimensions) - 1
            lw, lh = self.level_dimensions[last]
            self._scale = full_scale(dtype, lambda: data_max(lambda *b: self.read_raw(last, *b), lw, lh),
                                     bits=bits, max_value=max_value)
            log.info("%s: %s samples read with %g as full scale", self.path.name, np.dtype(dtype).name, self._scale)
        return self._scale

    def check(self) -> None:
        """Cheap read check: every level's pixel data lie inside the file, and the last tile or
        strip of each level decodes (where a truncated file fails first)."""
        size = os.path.getsize(self.path)
        for page in self.pages:
            if page is None:
                continue
            ends = [int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts) if int(n) > 0]
            if ends and max(ends) > size:
                raise ImageReadError(
                    f"the file is truncated: it holds {size} bytes but its pixel data reach byte {max(ends)}"
                )
        for level, (w, h) in enumerate(self.level_dimensions):
            self.read_raw(level, w - 1, h - 1, 1, 1)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.slide.close()


class TileReader:
    """One TIFF level read tile by tile (or strip by strip): ``os.pread`` + tifffile's segment decoder.

    Both release the GIL for the heavy part (the file read, the imagecodecs decoder), so
    reader threads run in parallel, where zarr's reads (through one event loop) did not; and
    a damaged segment fails here as one exception, where zarr's event loop also printed one
    "exception was never retrieved" traceback per pending read. Only for the plain layout:
    one page, contiguous samples, 2-D tiles or strips (a strip is a tile as wide as the image).
    """

    def __init__(self, page: Any, shape: tuple[int, int]) -> None:
        self.decode = page.decode
        self.jpegtables = page.jpegtables
        if page.is_tiled:
            self.tw, self.th = int(page.tilewidth), int(page.tilelength)
        else:
            self.tw, self.th = shape[1], min(int(page.rowsperstrip), shape[0])
        self.nx = -(-shape[1] // self.tw)
        self.offsets = np.asarray(page.dataoffsets, np.int64)
        self.counts = np.asarray(page.databytecounts, np.int64)
        self.samples = int(page.samplesperpixel)
        self.dtype = page.dtype
        self.fill = 0  # as zarr fills a missing tile

    @classmethod
    def of(cls, page: Any, shape: tuple[int, int]) -> TileReader | None:
        plain = (
            page.imagedepth == 1 and page.planarconfig == 1 and page.samplesperpixel in (1, 3, 4)
            and (page.imagelength, page.imagewidth) == shape and page.dtype is not None
        )
        if not plain:
            return None
        if page.is_tiled:
            n = -(-shape[0] // page.tilelength) * -(-shape[1] // page.tilewidth)
            ok = page.tiledepth == 1 and len(page.dataoffsets) == n
        else:
            rows = int(page.rowsperstrip or 0)
            # NDPI-style JPEG strips (a shared jpegheader, virtual offsets) stay with tifffile's zarr store
            ok = (rows > 0 and getattr(page, "jpegheader", None) is None
                  and len(page.dataoffsets) == -(-shape[0] // min(rows, shape[0])))
        return cls(page, shape) if ok else None

    def read(self, fd: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.empty((h, w, self.samples), self.dtype)
        tw, th = self.tw, self.th
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                i = ty * self.nx + tx
                n = int(self.counts[i])
                data = os.pread(fd, n, int(self.offsets[i])) if n else None
                if data is not None and len(data) < n:
                    raise ImageReadError(
                        f"the file is truncated: it ends inside the pixel data (segment {i} of {len(self.offsets)})"
                    )
                seg = self.decode(data, i, jpegtables=self.jpegtables)[0]
                y0, x0 = ty * th, tx * tw
                a0, b0, a1, b1 = max(y, y0), max(x, x0), min(y + h, y0 + th), min(x + w, x0 + tw)
                dst = out[a0 - y : a1 - y, b0 - x : b1 - x]
                if seg is None:
                    dst[...] = self.fill
                else:
                    seg = seg.reshape(seg.shape[-3:])  # (depth 1,) length, width, samples
                    dst[...] = seg[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
        return out
