"""Slide reading: levels, regions at a downsample, padding, pixel size, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from synth_slide import direct_and_zarr_reads

from pointnuc.errors import ImageReadError, PixelSizeError
from pointnuc.io.slide import open_slide, pixel_size_or_error


@pytest.fixture
def base() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)


@pytest.fixture
def pyramid(tmp_path: Path, base: np.ndarray) -> Path:
    """A tiled pyramidal TIFF (levels 1, 2, 4) at 0.5 µm/px."""
    p = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(p) as tw:
        tw.write(base, tile=(128, 128), subifds=2, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER",
                 photometric="rgb")
        for k in (2, 4):
            tw.write(base[::k, ::k], tile=(128, 128), subfiletype=1, photometric="rgb")
    return p


def test_pyramid_levels_pixel_size_and_exact_crops(pyramid: Path, base: np.ndarray):
    with open_slide(pyramid) as s:
        assert (s.width, s.height) == (400, 300)
        assert s.level_downsamples == [1.0, 2.0, 4.0]
        assert s.pixel_size_um == pytest.approx(0.5)
        assert np.array_equal(s.read_region(10, 20, 100, 50), base[20:70, 10:110])
        # downsample 4 reads level 2 exactly (no resampling)
        assert s.best_level(4.0) == 2
        assert np.array_equal(s.read_region(0, 0, 400, 300, downsample=4), base[::4, ::4])
        # a downsample between levels reads the finer level and resamples
        assert s.best_level(3.0) == 1
        assert s.read_region(0, 0, 400, 300, downsample=3).shape == (100, 133, 3)


def test_region_beyond_image_is_white(pyramid: Path, base: np.ndarray):
    with open_slide(pyramid) as s:
        a = s.read_region(390, 290, 20, 20)
        assert a.shape == (20, 20, 3) and a.dtype == np.uint8
        assert np.array_equal(a[:10, :10], base[290:300, 390:400])
        assert (a[10:, :] == 255).all() and (a[:, 10:] == 255).all()
        b = s.read_region(-50, -50, 20, 20)
        assert (b == 255).all()


def test_downsampled_region_of_constant_image_keeps_value(tmp_path: Path):
    arr = np.full((64, 64, 3), 77, np.uint8)
    p = tmp_path / "flat.png"
    Image.fromarray(arr).save(p)
    with open_slide(p) as s:
        out = s.read_region(8, 8, 30, 30, downsample=1.5)
        assert out.shape == (20, 20, 3) and (out == 77).all()
        thumb, ds = s.read_thumbnail(16)
        assert thumb.shape == (16, 16, 3) and ds == pytest.approx(4.0)


def test_pixel_size_override_and_error(tmp_path: Path):
    p = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p)  # no pHYs: no pixel size
    with open_slide(p) as s:
        assert s.pixel_size_um is None
        with pytest.raises(PixelSizeError, match="--pixel-size"):
            pixel_size_or_error(s)
        assert pixel_size_or_error(s, 0.25) == 0.25
    with open_slide(p, pixel_size_um=0.3) as s:
        assert s.pixel_size_um == 0.3


def test_screen_dpi_is_not_a_pixel_size(tmp_path: Path):
    p = tmp_path / "dpi.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p, dpi=(72, 72))
    with open_slide(p) as s:
        assert s.pixel_size_um is None
    q = tmp_path / "micro.tif"
    tifffile.imwrite(q, np.zeros((8, 8, 3), np.uint8), resolution=(40000, 40000), resolutionunit="CENTIMETER",
                     photometric="rgb")
    with open_slide(q) as s:
        assert s.pixel_size_um == pytest.approx(0.25)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_missing_and_corrupt_files(tmp_path: Path):
    with pytest.raises(ImageReadError, match="not found"):
        open_slide(tmp_path / "nope.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(ImageReadError, match="bad.tif"), open_slide(bad) as s:
        s.read_region(0, 0, 4, 4)
    png = tmp_path / "trunc.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 9).save(png)
    png.write_bytes(png.read_bytes()[:60])
    with pytest.raises(ImageReadError, match="trunc.png"), open_slide(png) as s:
        s.read_region(0, 0, 64, 64)


def test_fixture_tiff_matches_png(shared: Path):
    fx = shared / "fixtures/qupath-0.6.0/points-project/images/TCGA-A7-A13E-01Z-00-DX1.tif"
    png = np.array(Image.open(shared / "data/monuseg/train/TCGA-A7-A13E-01Z-00-DX1.png").convert("RGB"))
    with open_slide(fx) as s:
        assert s.pixel_size_um == pytest.approx(0.25)
        assert np.array_equal(s.read_region(100, 200, 64, 32), png[200:232, 100:164])


def test_odd_sized_pyramid_reads_level_pixels_exactly(tmp_path: Path):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (301, 401, 3), dtype=np.uint8)
    lvl1 = base[::2, ::2][:150, :200]
    p = tmp_path / "odd.tif"
    with tifffile.TiffWriter(p) as tw:
        tw.write(base, tile=(64, 64), subifds=1, photometric="rgb")
        tw.write(lvl1, tile=(64, 64), subfiletype=1, photometric="rgb")
    with open_slide(p) as s:
        assert s.level_dimensions == [(401, 301), (200, 150)] and s.pixel_size_um is None
        assert np.array_equal(s.read_region(0, 0, 401, 301, downsample=401 / 200), lvl1)
        # a box deep inside level 1, in full-res coordinates
        ds = 401 / 200
        x, y = 100 * ds, 60 * ds
        out = s.read_region(round(x), round(y), round(40 * ds), round(30 * ds), downsample=ds)
        assert out.shape == (30, 40, 3)


@pytest.mark.parametrize("compression", [None, "jpeg", "zlib"])
def test_direct_tile_reads_equal_zarr_reads(tmp_path: Path, compression: str | None):
    """Tiles decoded directly (threads run in parallel) give zarr's pixels, at every level and any box."""
    rng = np.random.default_rng(2)
    base = np.repeat(np.repeat(rng.integers(0, 256, (76, 101, 3), dtype=np.uint8), 4, 0), 4, 1)[:301, :401]
    p = tmp_path / "direct.tif"
    with tifffile.TiffWriter(p) as tw:
        tw.write(base, tile=(64, 64), subifds=1, photometric="rgb", compression=compression)
        tw.write(base[::4, ::4], tile=(64, 64), subfiletype=1, photometric="rgb", compression=compression)
    with open_slide(p) as s:
        backend = s._backend
        assert all(t is not None for t in backend.tiles), "the plain tiled layout is read directly"
        boxes = [(0, 0, 401, 301, 1.0), (-20, 30, 200, 300, 1.0), (63, 64, 130, 70, 2.0), (10, 5, 380, 290, 4.0),
                 (7, 9, 301, 201, 3.3)]
        direct, via_zarr = direct_and_zarr_reads(s, boxes)
    for a, b in zip(direct, via_zarr):
        assert np.array_equal(a, b)
