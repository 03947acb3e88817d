"""Reading pixels: whole-slide images (tiffslide) and plain images (Pillow), at any resolution.

Coordinates are QuPath's full-resolution pixels (x = column, y = row). ``read_region``
reads from the pyramid level closest to (and not coarser than) the requested downsample,
so a small region of a large pyramidal slide never decodes level 0 entirely.

Pixel size comes from the file (tiffslide's ``mpp``, TIFF resolution tags, PNG/JPEG dpi) or
an override. A "resolution" of a screen or printer (anything coarser than
:data:`MAX_PLAUSIBLE_UM` µm/px, e.g. the 72 dpi many tools write by default) is not a
microscope's and is treated as unknown.

Pixels come back as 8-bit RGB, samples wider than 8 bits scaled by the image's real bit
depth (:func:`pointnuc.io.pixels.full_scale`). Only RGB brightfield images are read: the networks and the
stain normalisation are made for H&E scans, so greyscale, channel stacks (fluorescence),
CMYK and palette images are refused with an :class:`ImageReadError` naming what the file
holds (:attr:`Slide.colour_problem`), rather than giving other numbers without a word.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import numpy as np
from PIL import Image

from pointnuc.errors import ImageReadError, PixelSizeError
from pointnuc.io.base import ImageRef
from pointnuc.io.pixels import MAX_PLAUSIBLE_UM, full_scale, plausible_um, to_rgb
from pointnuc.io.tiff import TiffBackend

#: file name endings read through tiffslide (everything else through Pillow)
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff", ".btf")
#: image file endings a project folder may hold
IMAGE_SUFFIXES = TIFF_SUFFIXES + (".png", ".jpg", ".jpeg", ".bmp")
WHITE = 255
#: longest side of a thumbnail (the whole slide at a glance: tissue mask, colour)...
THUMBNAIL_SIZE = 2048
#: ...which needs no finer pixels than this (µm/px): a 20x/40x slide is looked at with 4 µm pixels
THUMBNAIL_UM = 4.0

log = logging.getLogger(__name__)


class RegionReader(Protocol):
    """Anything pixels are read from by box (a :class:`Slide`, or a stand-in in tests)."""

    def read_region(self, x: float, y: float, w: float, h: float, downsample: float = 1.0) -> np.ndarray:
        """uint8 RGB (round(h/ds), round(w/ds), 3) of the full-resolution box (x, y, w, h); white outside."""
        ...


class SlideLike(RegionReader, Protocol):
    """What whole-slide inference uses of a slide (a :class:`Slide` has it all)."""

    width: int  #: full-resolution pixels
    height: int
    pixel_size_um: float | None  #: µm per full-resolution pixel, None when unknown
    level_downsamples: list[float]  #: full-resolution pixels per level pixel, per pyramid level


def checked_pixel_size(um: float, what: str = "--pixel-size") -> float:
    """``um`` when it is a microscope's pixel size (the rule a file's pixel size must pass),
    else a PixelSizeError that says what is expected."""
    value = plausible_um(um)
    if value is None:
        shown = f"{um:g}" if isinstance(um, (int, float)) else repr(um)
        raise PixelSizeError(
            f"{what} {shown}: a pixel size is more than 0 and at most {MAX_PLAUSIBLE_UM:g} µm per pixel "
            "(0.25 for 40x, 0.5 for 20x, 1 for 10x)"
        )
    return value


def _pillow_colour_problem(mode: str) -> str | None:
    """What makes a Pillow image mode other than RGB brightfield, or None."""
    if mode in ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "YCbCr"):
        return None
    if mode in ("1", "L", "LA", "La", "F") or mode.startswith("I"):
        return "a greyscale image (1 channel)"
    return f"a {mode} image"


class _PillowBackend:
    """A PNG, JPEG or BMP, decoded whole on the first read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with Image.open(path) as im:
            self.level_dimensions = [(int(im.width), int(im.height))]
            dpi = im.info.get("dpi")
            self.colour_problem: str | None = _pillow_colour_problem(im.mode)
            # Pillow keeps only the high byte of 16-bit colour PNGs: those are decoded by imagecodecs
            self._wide_png = im.format == "PNG" and any(";16" in str(t.args) for t in im.tile)
        self.pixel_size_um = plausible_um(25400.0 / float(dpi[0])) if dpi and dpi[0] else None
        self._arr: np.ndarray | None = None

    def _load(self) -> np.ndarray:
        if self._arr is None:
            if self._wide_png:
                import imagecodecs

                raw = imagecodecs.png_decode(self.path.read_bytes())
                scale = full_scale(raw.dtype, lambda: float(raw.max()))
                log.info("%s: %s samples read with %g as full scale", self.path.name, raw.dtype.name, scale)
                self._arr = to_rgb(raw, scale)
            else:
                with Image.open(self.path) as im:
                    self._arr = to_rgb(np.asarray(im.convert("RGB")))
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
                    backend = TiffBackend(self.path)
                except Exception:  # noqa: BLE001 - not a TIFF tiffslide understands: maybe Pillow does
                    backend = None
            if backend is None:
                backend = _PillowBackend(self.path)
        except Exception as err:  # noqa: BLE001 - decoders raise many kinds: one line naming the file
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

    def read_region(self, x: float, y: float, w: float, h: float, downsample: float = 1.0) -> np.ndarray:
        """uint8 RGB (round(h/ds), round(w/ds), 3) of the full-res box (x, y, w, h).

        Parts of the box outside the image are white.
        """
        if w < 1 or h < 1 or not downsample > 0:
            raise ValueError(f"bad region {w}x{h} at downsample {downsample}")
        # (int: numpy < 2 rounds its scalars to floats, and a box may come from numpy arithmetic)
        out_w, out_h = max(1, int(round(w / downsample))), max(1, int(round(h / downsample)))  # noqa: RUF046
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
            except Exception as err:  # noqa: BLE001 - decoders raise many kinds: one line naming the file
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
        except Exception as err:  # noqa: BLE001 - any decoder failure is the image's problem
            return _describe(err)
        return None

    def read_thumbnail(self, max_size: int = THUMBNAIL_SIZE) -> tuple[np.ndarray, float]:
        """The whole image with its longer side at most ``max_size`` px, and its downsample (:func:`read_thumbnail`)."""
        return read_thumbnail(self, max_size)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _describe(err: BaseException) -> str:
    """An exception as one line: pointnuc's own message as it is, others with their class."""
    return str(err) if isinstance(err, ImageReadError) else f"{err.__class__.__name__}: {err}"


def read_thumbnail(
    slide: SlideLike, max_size: int = THUMBNAIL_SIZE, *, pixel_size_um: float | None = None,
    min_pixel_um: float = THUMBNAIL_UM, chunk_px: int = 1024,
) -> tuple[np.ndarray, float]:
    """The slide at an integer downsample, longer side <= ``max_size``, read chunk by chunk; and that downsample.

    With ``pixel_size_um`` (of the slide) the pixels are at least ``min_pixel_um`` µm. Memory stays
    bounded whatever the slide's pyramid: each chunk reads at most about ``chunk_px``² pixels of
    the level it comes from.
    """
    ds = max(1, math.ceil(max(slide.width, slide.height) / max_size))
    if pixel_size_um:
        ds = max(ds, int(min_pixel_um // pixel_size_um))
    best_level = getattr(slide, "best_level", None)  # (a stand-in slide may have no pyramid)
    level_ds = slide.level_downsamples[best_level(ds)] if best_level is not None else 1.0
    step = ds * max(1, int(chunk_px * level_ds) // ds)  # full-res chunk side, a multiple of ds
    tw, th = math.ceil(slide.width / ds), math.ceil(slide.height / ds)
    out = np.empty((th, tw, 3), np.uint8)
    for y in range(0, slide.height, step):
        for x in range(0, slide.width, step):
            w, h = min(step, slide.width - x), min(step, slide.height - y)
            w, h = math.ceil(w / ds) * ds, math.ceil(h / ds) * ds
            part = np.asarray(slide.read_region(x, y, w, h, downsample=ds))[..., :3]
            out[y // ds : y // ds + part.shape[0], x // ds : x // ds + part.shape[1]] = part[: th - y // ds, : tw - x // ds]
    return out, float(ds)


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
