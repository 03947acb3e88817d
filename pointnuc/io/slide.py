"""Reading pixels: whole-slide images (tiffslide) and plain images (Pillow), at any resolution.

Coordinates are QuPath's full-resolution pixels (x = column, y = row). ``read_region``
reads from the pyramid level closest to (and not coarser than) the requested downsample,
so a small region of a large pyramidal slide never decodes level 0 entirely.

Pixel size comes from the file (tiffslide's ``mpp``, TIFF resolution tags, PNG/JPEG dpi) or
an override. A "resolution" of a screen or printer (anything coarser than
:data:`MAX_PLAUSIBLE_UM` µm/px, e.g. the 72 dpi many tools write by default) is not a
microscope's and is treated as unknown.

Pixels come back as 8-bit RGB, samples wider than 8 bits scaled by the image's real bit
depth (:func:`full_scale`). Only RGB brightfield images are read: the networks and the
stain normalisation are made for H&E scans, so greyscale, channel stacks (fluorescence),
CMYK and palette images are refused with an :class:`ImageReadError` naming what the file
holds (:attr:`Slide.colour_problem`), rather than giving other numbers without a word.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
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
#: bit depths tried for integer samples whose file gives no maximum (see :func:`full_scale`)
BIT_DEPTHS = (8, 10, 12, 14, 16)
#: the data maximum is taken over the coarsest level when it has at most this many pixels, else over a sample of it
_MAX_SCAN_PX = 4096 * 4096

log = logging.getLogger(__name__)


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


def full_scale(dtype: np.dtype, data_max: Callable[[], float], *, bits: int | None = None,
               max_value: float | None = None) -> float:
    """The sample value that becomes 255 (full brightness) in the 8-bit RGB pointnuc works on.

    8-bit samples: 255. Wider integers, first rule that applies:

    1. the file's maximum sample value (TIFF ``SMaxSampleValue`` / ``MaxSampleValue``);
    2. its bit depth when below the container's (TIFF ``BitsPerSample`` 12 read into 16-bit
       samples: 4095);
    3. the smallest ``2**b - 1``, ``b`` in :data:`BIT_DEPTHS`, that holds the data's maximum
       (``data_max()``): cameras write 12 or 14 bits into files that say 16. A brightfield
       image's background is close to full scale, so its maximum gives the depth away.

    Floats: 1.0 when the data lie within [0, 1], else 255.
    """
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return 255.0
    if dtype.kind == "f":
        return 1.0 if data_max() <= 1.0 else 255.0
    if max_value is not None and max_value > 0:
        return float(max_value)
    container = 8 * dtype.itemsize - (1 if dtype.kind == "i" else 0)
    if bits is not None and 8 <= bits < container:
        return float(2**bits - 1)
    peak = data_max()
    for b in BIT_DEPTHS:
        if peak <= 2**b - 1:
            return float(2**b - 1)
    return float(2**container - 1)


def _to_rgb(arr: np.ndarray, scale: float = 255.0) -> np.ndarray:
    """(H, W, 3) uint8 from (H, W[, S]) samples, ``scale`` becoming 255 (see :func:`full_scale`)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] > 3:
        arr = arr[:, :, :3]  # RGBA: the alpha channel is not colour
    if arr.dtype == np.uint8 and scale == 255.0:
        return arr
    out = arr.astype(np.float32) * np.float32(255.0 / scale) + np.float32(0.5)
    return np.clip(out, 0, 255).astype(np.uint8)


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


def _pillow_colour_problem(mode: str) -> str | None:
    """What makes a Pillow image mode other than RGB brightfield, or None."""
    if mode in ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "YCbCr"):
        return None
    if mode in ("1", "L", "LA", "La", "F") or mode.startswith("I"):
        return "a greyscale image (1 channel)"
    return f"a {mode} image"


def _data_max(read: Callable[[int, int, int, int], np.ndarray], w: int, h: int) -> float:
    """Largest sample of a level read by ``read(x, y, w, h)``: all of it, or an 8 x 8 grid of
    256-px windows when it is larger than :data:`_MAX_SCAN_PX` (a slide's background is everywhere)."""
    if w * h <= _MAX_SCAN_PX:
        return float(np.max(read(0, 0, w, h)))
    size = 256
    xs = np.linspace(0, w - size, 8).astype(int)
    ys = np.linspace(0, h - size, 8).astype(int)
    return max(float(np.max(read(int(x), int(y), size, size))) for y in ys for x in xs)


class _TiffBackend:
    def __init__(self, path: Path) -> None:
        import tiffslide

        self.path = path
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
        # the level TiffPages (None where a level is not one plain page): colour, bit depth, checks
        self.pages: list[Any] = [None] * len(self.level_dimensions)
        try:
            self._find_pages()
        except Exception:  # an unusual layout: no page metadata, zarr reads every level
            self.pages = [None] * len(self.level_dimensions)
        page0 = self.pages[0]
        self.colour_problem: str | None = _tiff_colour_problem(page0) if page0 is not None else None
        self._scale: float | None = None
        if self.arrays is not None:
            try:
                self._open_tiles(path)
            except Exception:  # anything unusual: zarr reads every level
                self.tiles = [None] * len(self.level_dimensions)

    def _find_pages(self) -> None:
        import tifffile

        tf = getattr(self.slide, "_tifffile", None)
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
                self.tiles[i] = _TileReader.of(page, (hh, ww))
        if any(t is not None for t in self.tiles):
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def read_raw(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Samples of level ``level`` as stored, in its own coordinates; the box lies inside the level."""
        tiles = self.tiles[level] if self._fd is not None else None
        if tiles is not None:
            return tiles.read(self._fd, x, y, w, h)
        if self.arrays is not None:
            return np.asarray(self.arrays[level][y : y + h, x : x + w])
        ds = self.level_dimensions[0][0] / self.level_dimensions[level][0]
        dsy = self.level_dimensions[0][1] / self.level_dimensions[level][1]
        loc = (int(round(x * ds)), int(round(y * dsy)))
        return np.asarray(self.slide.read_region(loc, level, (w, h), as_array=True))

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """8-bit RGB pixels of level ``level`` in its own coordinates; the box lies inside the level."""
        raw = self.read_raw(level, x, y, w, h)
        return _to_rgb(raw, 255.0 if raw.dtype == np.uint8 else self.scale(raw.dtype))

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
            self._scale = full_scale(dtype, lambda: _data_max(lambda *b: self.read_raw(last, *b), lw, lh),
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


class _TileReader:
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
    def of(cls, page: Any, shape: tuple[int, int]) -> "_TileReader | None":
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


class _PillowBackend:
    def __init__(self, path: Path) -> None:
        self.path = path
        with Image.open(path) as im:
            self.level_dimensions = [(int(im.width), int(im.height))]
            dpi = im.info.get("dpi")
            self.colour_problem: str | None = _pillow_colour_problem(im.mode)
            # Pillow keeps only the high byte of 16-bit colour PNGs: those are decoded by imagecodecs
            self._wide_png = im.format == "PNG" and any(";16" in str(t.args) for t in im.tile)
        self.pixel_size_um = _plausible(25400.0 / float(dpi[0])) if dpi and dpi[0] else None
        self._arr: np.ndarray | None = None

    def _load(self) -> np.ndarray:
        if self._arr is None:
            if self._wide_png:
                import imagecodecs

                raw = imagecodecs.png_decode(self.path.read_bytes())
                scale = full_scale(raw.dtype, lambda: float(raw.max()))
                log.info("%s: %s samples read with %g as full scale", self.path.name, raw.dtype.name, scale)
                self._arr = _to_rgb(raw, scale)
            else:
                with Image.open(self.path) as im:
                    self._arr = _to_rgb(np.asarray(im.convert("RGB")))
        return self._arr

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._load()[y : y + h, x : x + w].copy()  # callers own what they get

    def check(self) -> None:
        """The whole image decodes (Pillow images are small enough to read whole)."""
        self._load()

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
        #: why the image is not RGB brightfield (then its pixels are refused), or None
        self.colour_problem: str | None = backend.colour_problem

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
        if self.colour_problem is not None:
            raise ImageReadError(self._not_brightfield())
        part = None
        if cx1 > cx0 and cy1 > cy0:
            try:
                part = self._backend.read(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
            except Exception as err:
                raise ImageReadError(f"cannot read pixels of {self.path}: {_describe(err)}") from None
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

    def _not_brightfield(self) -> str:
        return (f"{self.path} is {self.colour_problem}; pointnuc reads RGB brightfield (H&E) images only, "
                "as its networks and stain normalisation are made for them")

    def problem(self) -> str | None:
        """Why this image cannot be used, from a cheap read check (see the backends' ``check``), or None.

        Not RGB brightfield; a TIFF truncated or damaged where its pixel data end; an image
        Pillow cannot decode.
        """
        if self.colour_problem is not None:
            return f"{self.colour_problem}; pointnuc reads RGB brightfield images only"
        try:
            self._backend.check()
        except Exception as err:
            return _describe(err)
        return None

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


def _describe(err: BaseException) -> str:
    """An exception as one line: pointnuc's own message as it is, others with their class."""
    return str(err) if isinstance(err, ImageReadError) else f"{err.__class__.__name__}: {err}"


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
