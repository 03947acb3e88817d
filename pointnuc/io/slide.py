"""Reading pixels: whole-slide images (tiffslide) and plain images (Pillow), at any resolution.

Coordinates are QuPath's full-resolution pixels (x = column, y = row). ``read_region``
reads from the pyramid level closest to (and not coarser than) the requested downsample,
so a small region of a large pyramidal slide never decodes level 0 entirely.

Pixel size comes from the file (tiffslide's ``mpp``, TIFF resolution tags, PNG/JPEG dpi) or
an override. A "resolution" of a screen or printer (anything coarser than
:data:`MAX_PLAUSIBLE_UM` µm/px, e.g. the 72 dpi many tools write by default) is not a
microscope's and is treated as unknown.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image

from pointnuc.errors import ImageReadError, PixelSizeError
from pointnuc.io.base import ImageRef

#: file name endings read through tiffslide (everything else through Pillow)
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff", ".btf")
#: image file endings a project folder may hold
IMAGE_SUFFIXES = TIFF_SUFFIXES + (".png", ".jpg", ".jpeg", ".bmp")
#: coarser pixel sizes than this (µm/px) are screen/print dpi, not a microscope's
MAX_PLAUSIBLE_UM = 20.0
WHITE = 255


def _plausible(um: float | None) -> float | None:
    if um is None:
        return None
    try:
        um = float(um)
    except (TypeError, ValueError):
        return None
    return um if math.isfinite(um) and 0 < um <= MAX_PLAUSIBLE_UM else None


def checked_pixel_size(um: float, what: str = "--pixel-size") -> float:
    """``um`` when it is a microscope's pixel size (the rule a file's pixel size must pass),
    else a PixelSizeError that says what is expected."""
    value = _plausible(um)
    if value is None:
        shown = f"{um:g}" if isinstance(um, (int, float)) else repr(um)
        raise PixelSizeError(
            f"{what} {shown}: a pixel size is more than 0 and at most {MAX_PLAUSIBLE_UM:g} µm per pixel "
            "(0.25 for 40x, 0.5 for 20x, 1 for 10x)"
        )
    return value


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] > 3:
        arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


class _TiffBackend:
    def __init__(self, path: Path) -> None:
        import tiffslide

        self.slide = tiffslide.TiffSlide(str(path))
        self.level_dimensions: list[tuple[int, int]] = [tuple(map(int, d)) for d in self.slide.level_dimensions]
        mpp = self.slide.properties.get("tiffslide.mpp-x")
        self.pixel_size_um = _plausible(mpp)
        # level arrays (H, W[, S]) addressed in their own pixels: no rounding through level-0 coordinates
        self.arrays: list[Any] | None = None
        try:
            group = self.slide.zarr_group
            arrays = [group[str(i)] for i in range(len(self.level_dimensions))]
            if all(a.shape[:2] == (hh, ww) and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)))
                   for a, (ww, hh) in zip(arrays, self.level_dimensions)):
                self.arrays = arrays
        except Exception:  # another layout (e.g. planar): fall back to tiffslide's read_region
            self.arrays = None
        # levels whose tiles are decoded here directly (see _TileReader); None: through zarr
        self.tiles: list[_TileReader | None] = [None] * len(self.level_dimensions)
        self._fd: int | None = None
        if self.arrays is not None:
            try:
                self._open_tiles(path)
            except Exception:  # anything unusual: zarr reads every level
                self.tiles = [None] * len(self.level_dimensions)

    def _open_tiles(self, path: Path) -> None:
        import tifffile

        tf = getattr(self.slide, "_tifffile", None)
        if not hasattr(os, "pread") or not isinstance(tf, tifffile.TiffFile) or not tf.series:
            return
        levels = tf.series[0].levels
        if len(levels) != len(self.level_dimensions):
            return
        for i, (lev, (ww, hh)) in enumerate(zip(levels, self.level_dimensions)):
            if len(lev.pages) != 1 or lev.pages[0] is None:
                continue
            page = lev.pages[0]
            if isinstance(page, tifffile.TiffPage):
                self.tiles[i] = _TileReader.of(page, (hh, ww))
        if any(t is not None for t in self.tiles):
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels of level ``level`` in its own coordinates; the box lies inside the level."""
        tiles = self.tiles[level] if self._fd is not None else None
        if tiles is not None:
            return _to_rgb(tiles.read(self._fd, x, y, w, h))
        if self.arrays is not None:
            return _to_rgb(np.asarray(self.arrays[level][y : y + h, x : x + w]))
        ds = self.level_dimensions[0][0] / self.level_dimensions[level][0]
        dsy = self.level_dimensions[0][1] / self.level_dimensions[level][1]
        loc = (int(round(x * ds)), int(round(y * dsy)))
        return _to_rgb(self.slide.read_region(loc, level, (w, h), as_array=True))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.slide.close()


class _TileReader:
    """One tiled TIFF level read tile by tile: ``os.pread`` + tifffile's segment decoder.

    Both release the GIL for the heavy part (the file read, the imagecodecs decoder), so
    reader threads run in parallel, where zarr's reads (through one event loop) did not.
    Only for the plain layout: one page, contiguous samples, 2-D tiles.
    """

    def __init__(self, page: Any, shape: tuple[int, int]) -> None:
        self.decode = page.decode
        self.jpegtables = page.jpegtables
        self.tw, self.th = int(page.tilewidth), int(page.tilelength)
        self.nx = -(-shape[1] // self.tw)
        self.offsets = np.asarray(page.dataoffsets, np.int64)
        self.counts = np.asarray(page.databytecounts, np.int64)
        self.samples = int(page.samplesperpixel)
        self.dtype = page.dtype
        self.fill = 0  # as zarr fills a missing tile

    @classmethod
    def of(cls, page: Any, shape: tuple[int, int]) -> "_TileReader | None":
        ok = (
            page.is_tiled and page.tiledepth == 1 and page.imagedepth == 1 and page.planarconfig == 1
            and page.samplesperpixel in (1, 3, 4) and (page.imagelength, page.imagewidth) == shape
            and page.dtype is not None and len(page.dataoffsets) == -(-shape[0] // page.tilelength) * -(-shape[1] // page.tilewidth)
        )
        return cls(page, shape) if ok else None

    def read(self, fd: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.empty((h, w, self.samples), self.dtype)
        tw, th = self.tw, self.th
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                i = ty * self.nx + tx
                n = int(self.counts[i])
                data = os.pread(fd, n, int(self.offsets[i])) if n else None
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


class _PillowBackend:
    def __init__(self, path: Path) -> None:
        self.path = path
        with Image.open(path) as im:
            self.level_dimensions = [(int(im.width), int(im.height))]
            dpi = im.info.get("dpi")
        self.pixel_size_um = _plausible(25400.0 / float(dpi[0])) if dpi and dpi[0] else None
        self._arr: np.ndarray | None = None

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._arr is None:
            with Image.open(self.path) as im:
                self._arr = _to_rgb(np.asarray(im.convert("RGB")))
        return self._arr[y : y + h, x : x + w].copy()  # callers own what they get

    def close(self) -> None:
        self._arr = None


class Slide:
    """An open image: size, pixel size, pyramid levels and region reading."""

    def __init__(self, path: Path, pixel_size_um: float | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ImageReadError(f"image file not found: {self.path}")
        if pixel_size_um is not None:
            checked_pixel_size(pixel_size_um)
        backend: Any = None
        try:
            if self.path.suffix.lower() in TIFF_SUFFIXES:
                try:
                    backend = _TiffBackend(self.path)
                except Exception:  # not a TIFF tiffslide understands: maybe Pillow does
                    backend = None
            if backend is None:
                backend = _PillowBackend(self.path)
        except Exception as err:
            raise ImageReadError(f"cannot read image {self.path}: {err.__class__.__name__}: {err}") from None
        self._backend = backend
        self.level_dimensions: list[tuple[int, int]] = backend.level_dimensions
        self.width, self.height = self.level_dimensions[0]
        if self.width < 1 or self.height < 1:
            raise ImageReadError(f"image {self.path} has no pixels")
        #: full-res pixels per level pixel, per level
        self.level_downsamples: list[float] = [self.width / w for w, _ in self.level_dimensions]
        self.file_pixel_size_um: float | None = backend.pixel_size_um
        self.pixel_size_um: float | None = float(pixel_size_um) if pixel_size_um is not None else backend.pixel_size_um

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (1% slack)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.01 and d >= self.level_downsamples[best]:
                best = i
        return best

    def read_region(self, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        """uint8 RGB (round(h/ds), round(w/ds), 3) of the full-res box (x, y, w, h).

        Parts of the box outside the image are white.
        """
        if w < 1 or h < 1 or not downsample > 0:
            raise ValueError(f"bad region {w}x{h} at downsample {downsample}")
        out_w, out_h = max(1, int(round(w / downsample))), max(1, int(round(h / downsample)))
        level = self.best_level(downsample)
        lw, lh = self.level_dimensions[level]
        sx, sy = self.width / lw, self.height / lh
        fx0, fy0, fx1, fy1 = x / sx, y / sy, (x + w) / sx, (y + h) / sy
        ix0, iy0 = math.floor(fx0 + 1e-9), math.floor(fy0 + 1e-9)
        ix1, iy1 = math.ceil(fx1 - 1e-9), math.ceil(fy1 - 1e-9)
        cx0, cy0, cx1, cy1 = max(ix0, 0), max(iy0, 0), min(ix1, lw), min(iy1, lh)
        part = None
        if cx1 > cx0 and cy1 > cy0:
            try:
                part = self._backend.read(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
            except Exception as err:
                raise ImageReadError(f"cannot read pixels of {self.path}: {err.__class__.__name__}: {err}") from None
        if part is not None and part.shape[:2] == (iy1 - iy0, ix1 - ix0):
            buf = part  # the box lies inside the level: no white margin to add
        else:
            buf = np.full((iy1 - iy0, ix1 - ix0, 3), WHITE, np.uint8)
            if part is not None:
                buf[cy0 - iy0 : cy0 - iy0 + part.shape[0], cx0 - ix0 : cx0 - ix0 + part.shape[1]] = part
        exact = (
            abs(fx0 - ix0) < 1e-6 and abs(fy0 - iy0) < 1e-6 and buf.shape[1] == out_w and buf.shape[0] == out_h
        )
        if exact:
            return buf
        box = (fx0 - ix0, fy0 - iy0, fx1 - ix0, fy1 - iy0)
        img = Image.fromarray(buf).resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
        return np.asarray(img)

    def read_thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        """The whole image with its longer side at most ``max_size`` px, and its downsample."""
        ds = max(1.0, max(self.width, self.height) / float(max_size))
        return self.read_region(0, 0, self.width, self.height, downsample=ds), ds

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_slide(path: Path, pixel_size_um: float | None = None) -> Slide:
    """Open an image file; ``pixel_size_um`` overrides the file's pixel size."""
    return Slide(Path(path), pixel_size_um)


def pixel_size_or_error(source: Slide | ImageRef, override: float | None = None) -> float:
    """The pixel size to use for an open slide or a project image (override first), or a
    PixelSizeError telling how to give one."""
    if override is not None:
        return float(override)
    if source.pixel_size_um is None:
        name = source.name if isinstance(source, ImageRef) else source.path.name
        raise PixelSizeError(
            f"image {name!r} has no pixel size; pass --pixel-size (µm per pixel, e.g. 0.25 for 40x, 0.5 for 20x)"
        )
    return float(source.pixel_size_um)
