"""Whole-slide segmentation: a pyramidal TIFF with nuclei on tile seams, a deterministic stand-in network."""

from __future__ import annotations

import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Self

import numpy as np
import pytest
import shapely
import torch
from torch import nn

from pointnuc.config import profile_config
from pointnuc.errors import InputError, PixelSizeError
from pointnuc.infer.slide_tiles import plan_slide, working_halo
from pointnuc.infer.tiling import make_grid
from pointnuc.infer.wsi import segment_slide
from pointnuc.models.bundle import ModelInfo
from pointnuc.models.net import IMAGENET_MEAN, IMAGENET_STD
from pointnuc.stain import colour_apply as normalise_tile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_slide import SynthSlide, random_discs, render, write_slide

PX = 0.25  # slide µm/px (40x); the model works at 0.5 µm/px -> downsample 2
W, H, TISSUE_X1 = 3072, 2560, 2100
TILE = 256


class DarknessNet(nn.Module):
    """Stand-in segmenter: nucleus logit from local darkness (deterministic, no training)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x * self.std + self.mean
        dark = 1.0 - self.pool(rgb.mean(1, keepdim=True))
        logit = 30.0 * (dark - 0.45)
        return torch.cat([torch.zeros_like(logit), logit], dim=1)


def _info(norm: dict | None = None) -> ModelInfo:
    return ModelInfo(config=profile_config("tiny", **{"data.pixel_size_um": 0.5}), norm_reference=norm)


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSlide]:
    seam = 2 * (TILE - 2 * 64)  # full-res period of the core seams (halo 64 at 0.5 µm/px)
    rng = np.random.default_rng(7)
    forced = [(k * seam + rng.uniform(-3, 3), rng.uniform(100, H - 100)) for k in range(1, TISSUE_X1 // seam)]
    forced += [(rng.uniform(100, TISSUE_X1 - 100), m * seam + rng.uniform(-3, 3)) for m in range(1, H // seam)]
    forced += [(k * seam, m * seam) for k in range(1, TISSUE_X1 // seam, 2) for m in range(1, H // seam, 2)]
    centres, radii = random_discs(W, H, TISSUE_X1, 1500, 8.0, 14.0, seed=1, forced=forced)
    truth = SynthSlide(W, H, centres, radii, TISSUE_X1)
    path = tmp_path_factory.mktemp("wsi") / "slide.tif"
    write_slide(path, truth, PX)
    return path, truth


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PeakRSS:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 2 ms."""

    def __enter__(self) -> Self:
        self.base = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def test_seams_no_duplicates_no_cuts_bounded_memory(slide_file: tuple[Path, SynthSlide]) -> None:
    from pointnuc.io.slide import open_slide

    path, truth = slide_file
    net, info = DarknessNet(), _info()
    with open_slide(path) as slide:
        assert slide.pixel_size_um == pytest.approx(PX) and len(slide.level_downsamples) >= 2
        tracemalloc.start()
        part = segment_slide(slide, net, info, region=shapely.box(0, 0, 700, 900), tile_size=TILE, batch_size=4, progress=False)
        part_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        tracemalloc.start()
        with PeakRSS() as mem:
            res = segment_slide(slide, net, info, tile_size=TILE, batch_size=4, progress=False)
        traced_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    assert res.downsample == pytest.approx(2.0) and res.halo == 64
    assert 0 < res.n_tiles < res.n_tiles_total  # the glass on the right was skipped
    got = shapely.get_coordinates(shapely.centroid(np.array([n.polygon for n in res.nuclei], dtype=object)))
    # match each nucleus to its nearest disc: every disc exactly once, nothing else
    d2 = ((got[:, None, :] - truth.centres[None, :, :]) ** 2).sum(-1)
    nearest = d2.argmin(1)
    assert np.sqrt(d2[np.arange(len(got)), nearest]).max() < 2.0
    counts = np.bincount(nearest, minlength=len(truth.centres))
    assert counts.max() == 1, f"{(counts > 1).sum()} discs found twice"
    assert counts.min() == 1, f"{(counts == 0).sum()} discs missed"
    assert res.n_nuclei == len(truth.centres)
    # none is cut: area close to the disc's (pixel quantisation at 2 µm radius costs up to ~20%; a half disc is 50%)
    areas = np.array([n.polygon.area for n in res.nuclei])
    ratio = areas / (np.pi * truth.radii[nearest] ** 2)
    assert 0.7 < ratio.min() and ratio.max() < 1.3
    on_seam = np.abs(((truth.centres[nearest] + 128) % 256) - 128).min(1) < 3
    assert on_seam.sum() >= 20  # the seam discs were really there and really found
    assert all(n.polygon.is_valid and n.measurements["Nucleus: Area"] > 0 for n in res.nuclei)
    # memory: bounded by the tile batch, not by the area. tracemalloc counts every numpy/Python
    # byte exactly (it grows with batch size and workers); a corner of the slide and the whole
    # slide (over 3x the tiles) must peak alike (the run's fixed costs, thumbnail and first-call
    # allocations, are ~20 MiB at this small scale). The process RSS (allocator arenas per
    # thread, torch) is too noisy on a shared machine to assert on; it is only printed.
    print(f"peak +{traced_mb:.1f} MiB traced ({part_mb:.1f} for {part.n_tiles} tiles), RSS +{mem.peak - mem.base:.1f} MiB, "
          f"{res.seconds:.1f} s, {res.n_tiles} tiles")
    assert res.n_tiles > 3 * part.n_tiles
    assert traced_mb < 1.3 * part_mb + 2.0, f"traced peak {traced_mb:.1f} MiB vs {part_mb:.1f} MiB for a corner"
    assert traced_mb < 48, f"traced peak {traced_mb:.1f} MiB"  # a few batches of 256² tiles and their polygon work


def test_region_keeps_nuclei_by_centroid(slide_file: tuple[Path, SynthSlide]) -> None:
    from pointnuc.io.slide import open_slide

    path, truth = slide_file
    region = shapely.Polygon([(300, 300), (1100, 350), (900, 1000), (350, 900)])
    found: list = []
    with open_slide(path) as slide:
        res = segment_slide(slide, DarknessNet(), _info(), region=region, tile_size=TILE, progress=False, sink=found.extend)
    assert res.nuclei == [] and res.n_nuclei == len(found)
    inside = shapely.contains_xy(region, truth.centres[:, 0], truth.centres[:, 1])
    got = shapely.get_coordinates(shapely.centroid(np.array([n.polygon for n in found], dtype=object)))
    assert len(found) == inside.sum()
    assert shapely.contains_xy(region, got[:, 0], got[:, 1]).all()
    assert res.n_tiles < 30  # only tiles near the region were read


def test_non_integer_downsample_seams(slide_file: tuple[Path, SynthSlide]) -> None:
    """A 0.2527 µm/px scan (Aperio 40x) read for a 0.5 µm/px model: still each disc once."""
    from pointnuc.io.slide import open_slide

    path, truth = slide_file
    region = shapely.box(200, 200, 1500, 1300)
    with open_slide(path, pixel_size_um=0.2527) as slide:
        res = segment_slide(slide, DarknessNet(), _info(), region=region, tile_size=TILE, progress=False)
    assert res.downsample == pytest.approx(0.5 / 0.2527) and res.n_tiles > 20
    got = shapely.get_coordinates(shapely.centroid(np.array([n.polygon for n in res.nuclei], dtype=object)))
    d2 = ((got[:, None, :] - truth.centres[None, :, :]) ** 2).sum(-1)
    nearest = d2.argmin(1)
    assert np.sqrt(d2.min(1)).max() < 2.5
    assert np.bincount(nearest).max() == 1  # no disc twice
    inside = shapely.contains_xy(region, truth.centres[:, 0], truth.centres[:, 1])
    assert abs(len(got) - inside.sum()) <= 2  # (a disc centred on the region's edge may go either way)


def test_worker_processes_give_the_same_nuclei(slide_file: tuple[Path, SynthSlide]) -> None:
    """The GPU path's polygon work in spawned processes gives what the threads give."""
    from pointnuc.io.slide import open_slide

    path, _ = slide_file
    region = shapely.box(0, 0, 1200, 900)
    with open_slide(path) as slide:
        a = segment_slide(slide, DarknessNet(), _info(), region=region, tile_size=TILE, progress=False)
        b = segment_slide(slide, DarknessNet(), _info(), region=region, tile_size=TILE, progress=False, post_processes=2)
    key = lambda n: (round(n.polygon.centroid.x, 3), round(n.polygon.centroid.y, 3))
    assert a.n_nuclei == b.n_nuclei > 50
    assert sorted(map(key, a.nuclei)) == sorted(map(key, b.nuclei))
    # sent back as arrays, rebuilt alike: same outlines and measurements, in the same order
    for x, y in zip(a.nuclei, b.nuclei):
        assert shapely.equals_exact(x.polygon, y.polygon, 0) and x.measurements == y.measurements
        assert abs(x.score - y.score) < 1e-3  # (probabilities travel as float16)
    assert a.timings["post"] > 0 and b.timings["post"] > 0  # the workers' busy time is counted too
    assert 0 < a.start_seconds < a.seconds and 0 < b.start_seconds < b.seconds  # the fixed start, part of the whole


def test_instances_on_the_device_give_the_same_nuclei(slide_file: tuple[Path, SynthSlide]) -> None:
    """Instance labels computed in torch for the batch (the CUDA default), here on the CPU, in threads and in
    worker processes: the nuclei of the numpy path (tests/test_instances_torch.py: exact but where floods tie)."""
    from pointnuc.evaluate import polygons_to_labels
    from pointnuc.io.slide import open_slide
    from pointnuc.metrics import aji

    path, _ = slide_file
    region = shapely.box(0, 0, 1200, 900)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (small tensor operations, on a machine whose two cores run other work: 8 s -> 0.4 s)
    try:
        with open_slide(path) as slide:
            runs = [segment_slide(slide, DarknessNet(), _info(), region=region, tile_size=TILE, progress=False, **kw)
                    for kw in ({}, {"instances_on_device": True}, {"instances_on_device": True, "post_processes": 2})]
    finally:
        torch.set_num_threads(threads)
    from pointnuc.infer.wsi import SegmentSettings

    # off by default (the numpy path) until a GPU measurement says the device path pays
    assert SegmentSettings().for_device().instances_on_device is False
    assert SegmentSettings(device="cuda").for_device().instances_on_device is False
    assert SegmentSettings(device="cuda", instances_on_device=True).for_device().instances_on_device is True
    rasters = [polygons_to_labels([n.polygon for n in r.nuclei], (900, 1200)) for r in runs]
    assert runs[0].n_nuclei > 50
    for r, lab in zip(runs[1:], rasters[1:]):
        assert r.n_nuclei == runs[0].n_nuclei and aji(rasters[0], lab) == 1.0
        for x, y in zip(runs[0].nuclei, r.nuclei):
            assert shapely.equals_exact(x.polygon, y.polygon, 0) and x.measurements == y.measurements


def test_cpu_default_fits_the_tile_to_the_image_with_the_same_nuclei(slide_file: tuple[Path, SynthSlide]) -> None:
    """The CPU default (one tile fitted to a small area, batch by pixels) finds what a grid of small tiles finds."""
    from pointnuc.io.slide import open_slide

    path, _ = slide_file
    region = shapely.box(0, 0, 1200, 900)
    with open_slide(path) as slide:
        small = segment_slide(slide, DarknessNet(), _info(), region=region, tile_size=TILE, batch_size=4, progress=False)
        fitted = segment_slide(slide, DarknessNet(), _info(), region=region, progress=False)
    assert small.n_tiles > 4 and fitted.n_tiles == 1 and fitted.tile_size > TILE
    assert fitted.n_nuclei == small.n_nuclei > 50
    key = lambda n: (round(n.polygon.centroid.x, 3), round(n.polygon.centroid.y, 3))
    pairs = zip(sorted(small.nuclei, key=key), sorted(fitted.nuclei, key=key))
    assert all(shapely.equals_exact(a.polygon, b.polygon, 1e-6) and a.measurements == b.measurements for a, b in pairs)


def test_pixel_size_missing_or_given(tmp_path: Path) -> None:
    from pointnuc.io.slide import open_slide

    c, r = random_discs(600, 500, 600, 20, 8, 12, seed=2)
    truth = SynthSlide(600, 500, c, r, 600)
    path = tmp_path / "nopx.tif"
    import tifffile

    tifffile.imwrite(path, render(truth, 0, 0, 600, 500), photometric="rgb")
    with open_slide(path) as slide:
        assert slide.pixel_size_um is None
        with pytest.raises(PixelSizeError):
            segment_slide(slide, DarknessNet(), _info(), progress=False)
        res = segment_slide(slide, DarknessNet(), _info(), pixel_size_um=0.5, tile_size=TILE, progress=False)
    assert res.downsample == 1.0 and res.n_nuclei == len(c)


def test_plan_errors_and_halo() -> None:
    info = _info()
    assert working_halo(info) == 64  # 4 r1 = 22 px at 0.5 µm/px + 32 px context -> 64
    assert working_halo(ModelInfo(config=profile_config("paper"))) == 80  # 44 + 32 -> 80 at 0.25 µm/px

    class Blank:
        width, height, pixel_size_um = 1000, 800, 0.5

        level_downsamples = [1.0]

        def read_region(self, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
            return np.full((round(h / downsample), round(w / downsample), 3), 245, np.uint8)

    with pytest.raises(InputError):
        plan_slide(Blank(), info, region=shapely.box(5000, 5000, 6000, 6000), tile_size=TILE)
    plan = plan_slide(Blank(), info, tile_size=TILE)
    assert len(plan.grid) == len(make_grid(800, 1000, tile_size=TILE, halo=64)) and plan.tiles == ()  # all glass


def test_normalise_tile_matches_stain_with_own_stats() -> None:
    from pointnuc.stain import lab_stats, reinhard_normalize

    rng = np.random.default_rng(0)
    img = rng.integers(60, 250, (40, 50, 3), dtype=np.uint8)
    ref = {"mean": [60.0, 20.0, -10.0], "std": [15.0, 8.0, 6.0]}
    a = normalise_tile(img, lab_stats(img), ref)
    b = reinhard_normalize(img, ref)
    assert np.abs(a.astype(int) - b).max() <= 1


def test_tissue_mask_hand_case() -> None:
    from pointnuc.infer.tissue import tissue_mask

    thumb = np.full((40, 60, 3), 242, np.uint8)  # glass
    thumb[5:25, 5:30] = (220, 160, 200)  # pink tissue, 20 x 25 px
    thumb[30:40, 50:60] = 0  # black scanner padding
    thumb[35, 10] = (120, 60, 140)  # a dark speck: 1 px
    # 16 µm thumbnail pixels: min area 2000 µm² = 7.8 px -> the speck goes; margin 20 µm -> 2 px
    m = tissue_mask(thumb, downsample=64, pixel_size_um=0.25)
    assert m[15, 15] and not m[35, 10] and not m[35, 55] and not m[0, 59]
    assert m[3, 15] and m[15, 31] and not m[15, 33]  # grown by 2 px (4-connected steps)
    assert not tissue_mask(np.full((10, 10, 3), 250, np.uint8), downsample=64, pixel_size_um=0.25).any()


def test_simplified_polygons_look_the_same() -> None:
    from pointnuc.infer.polygons import InstanceParams, TileContext, tile_nuclei

    g = make_grid(200, 200, tile_size=256, halo=64)
    yy, xx = np.mgrid[:256, :256]
    prob = np.zeros((256, 256), np.float32)
    for cy, cx, r in [(100, 90, 7.3), (140, 150, 5.1), (90, 160, 9.7)]:
        prob[(yy - cy) ** 2 + ((xx - cx) / 1.3) ** 2 <= r * r] = 0.9
    # the pixel staircase (benchmarks/outlines.py's "before"; sub-pixel outlines: tests/test_outlines.py)
    ctx = TileContext((0, 0), 2.0, 0.25, InstanceParams(), outline="pixels")
    exact, _ = tile_nuclei(prob, g.tiles[0], TileContext((0, 0), 2.0, 0.25, InstanceParams(), simplify_px=0.0,
                                                         outline="pixels"))
    simple, _ = tile_nuclei(prob, g.tiles[0], ctx)
    assert len(exact) == len(simple) == 3
    for a, b in zip(exact, simple):
        assert len(b.polygon.exterior.coords) < 0.6 * len(a.polygon.exterior.coords)  # far fewer vertices
        # no visible change: within 0.75 working px (1.5 full-res px) everywhere; area within 5 %
        # (the staircase itself is uncertain by ~1/r = 20 % of the area for r = 5 px)
        assert a.polygon.hausdorff_distance(b.polygon) <= 0.75 * 2.0 + 1e-9
        assert abs(b.polygon.area / a.polygon.area - 1) < 0.05


def test_read_failure_half_way_is_reported(slide_file: tuple[Path, SynthSlide]) -> None:
    from pointnuc.errors import ImageReadError
    from pointnuc.io.slide import open_slide

    path, _ = slide_file

    class Failing:
        """A slide that fails after some reads (as a damaged file would)."""

        def __init__(self, slide) -> None:
            self.s, self.n = slide, 0
            self.width, self.height, self.pixel_size_um = slide.width, slide.height, slide.pixel_size_um
            self.level_downsamples = slide.level_downsamples

        def best_level(self, ds: float) -> int:
            return self.s.best_level(ds)

        def read_region(self, *a, **k):
            self.n += 1
            if self.n > 12:
                raise ImageReadError("cannot read pixels of slide.tif: corrupt tile")
            return self.s.read_region(*a, **k)

    before = threading.active_count()
    with open_slide(path) as slide, pytest.raises(ImageReadError):
        segment_slide(Failing(slide), DarknessNet(), _info(), tile_size=TILE, progress=False)
    assert threading.active_count() <= before  # no reader/post threads left behind


def test_pointnuc_segment_cli_on_a_pyramidal_tiff(
    slide_file: tuple[Path, SynthSlide], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pointnuc segment`` on a project holding the pyramidal TIFF: each disc once, whole, in the GeoJSON."""
    import shutil

    from click.testing import CliRunner

    from pointnuc.cli import main
    from pointnuc.io.geojson import read_nuclei
    from pointnuc.models import bundle
    from pointnuc.models.net import UNet

    path, truth = slide_file
    proj = tmp_path / "project"
    proj.mkdir()
    shutil.copy(path, proj / "slide.tif")
    model = tmp_path / "model"
    bundle.save_info(model, _info())
    bundle.save_weights(bundle.ModelLayout(model).segmenter, UNet(2, "tiny"))
    # the random tiny U-Net's output means nothing: the deterministic stand-in does the segmenting
    monkeypatch.setattr(bundle, "load_network", lambda *a, **k: DarknessNet())
    res = CliRunner().invoke(main, ["segment", str(proj), "--model", str(model), "--no-progress"])
    assert res.exit_code == 0, res.output
    files = sorted((proj / "pointnuc-geojson").glob("*.geojson"))
    assert [f.name for f in files] == ["slide.geojson"]
    nuclei = read_nuclei(files[0])
    got = shapely.get_coordinates(shapely.centroid(np.array([n.polygon for n in nuclei], dtype=object)))
    d2 = ((got[:, None, :] - truth.centres[None, :, :]) ** 2).sum(-1)
    nearest = d2.argmin(1)
    assert np.sqrt(d2.min(1)).max() < 2.0
    assert len(nuclei) == len(truth.centres) and np.bincount(nearest).max() == 1
    ratio = np.array([n.polygon.area for n in nuclei]) / (np.pi * truth.radii[nearest] ** 2)
    assert 0.7 < ratio.min() and ratio.max() < 1.3


def test_colour_normalisation_on_device_matches_reader_threads(slide_file: tuple[Path, SynthSlide]) -> None:
    """The GPU path normalises the batch with torch: same pixels (±1) and the same nuclei as numpy."""
    from pointnuc.io.slide import open_slide
    from pointnuc.stain import colour_apply_torch as normalise_tiles_torch
    from pointnuc.stain import lab_stats

    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    ref = {"mean": [60.0, 22.0, -14.0], "std": [15.0, 8.0, 6.0]}
    src = lab_stats(imgs[0])
    a = np.stack([normalise_tile(i, src, ref) for i in imgs])
    b = normalise_tiles_torch(torch.from_numpy(imgs), src, ref).numpy()
    assert np.abs(a.astype(int) - b).max() <= 1
    # with the stain step (a pale source stretched to a darker reference): the torch path starts from
    # Reinhard pixels that may differ by one grey level, which the stretch can widen in dark pixels
    ref_s = {**ref, "stain": [0.28, 1.8, 0.30, 0.9]}
    src_s = (*src, [0.4, 0.95, 0.32, 0.5])
    a = np.stack([normalise_tile(i, src_s, ref_s) for i in imgs]).astype(int)
    b = normalise_tiles_torch(torch.from_numpy(imgs), src_s, ref_s).numpy()
    assert not np.array_equal(a, np.stack([normalise_tile(i, src, ref) for i in imgs]))  # the step did something
    assert np.mean(np.abs(a - b) <= 1) > 0.99 and np.abs(a - b).max() <= 8

    path, _ = slide_file
    region = shapely.box(0, 0, 700, 600)
    info = _info(norm={"mean": [55.0, 30.0, -15.0], "std": [18.0, 10.0, 8.0]})
    with open_slide(path) as slide:
        r1 = segment_slide(slide, DarknessNet(), info, region=region, tile_size=TILE, progress=False)
        r2 = segment_slide(slide, DarknessNet(), info, region=region, tile_size=TILE, progress=False, normalise_on_device=True)
    assert r1.n_nuclei == r2.n_nuclei > 30
    c1 = shapely.get_coordinates(shapely.centroid(np.array([n.polygon for n in r1.nuclei], dtype=object)))
    c2 = shapely.get_coordinates(shapely.centroid(np.array([n.polygon for n in r2.nuclei], dtype=object)))
    assert np.abs(np.sort(c1, axis=0) - np.sort(c2, axis=0)).max() < 0.5


def test_search_box_keeps_the_same_nuclei() -> None:
    from scipy import ndimage as ndi

    from pointnuc.infer.polygons import InstanceParams, TileContext, search_box, tile_nuclei

    g = make_grid(300, 300, tile_size=256, halo=64)  # cores of 128: 3 x 3 tiles
    mid = g.tiles[4]
    small = search_box(mid, 26)
    assert small.valid.height == small.valid.width == 128 + 2 * 26 and small.image_edges == (False,) * 4
    corner = search_box(g.tiles[0], 26)
    assert corner.valid.y0 == 0 and corner.image_edges[:2] == (True, True) and corner.image_edges[2:] == (False, False)
    # blobs up to 19 px wide (less than the 26 px margin) everywhere, many across the box edges
    lab = np.zeros((256, 256), np.int32)
    yy, xx = np.mgrid[:256, :256]
    rng = np.random.default_rng(3)
    for _ in range(400):
        cy, cx, r = rng.uniform(0, 256), rng.uniform(0, 256), rng.uniform(3, 9)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if not ndi.binary_dilation(lab > 0, iterations=2)[disc].any():
            lab[disc] = 1
    prob = ndi.gaussian_filter(lab.astype(float), 1.0)
    for method in ("cc", "watershed"):
        params = InstanceParams(threshold=0.5, min_area_px=5, method=method)
        full, _ = tile_nuclei(prob, mid, TileContext((0, 0), 2.0, 0.25, params))
        cut, _ = tile_nuclei(prob, mid, TileContext((0, 0), 2.0, 0.25, params, keep_margin=26))
        assert len(full) > 10
        assert sorted(n.polygon.wkt for n in full) == sorted(n.polygon.wkt for n in cut)


def test_inference_colour_stats_are_the_training_stats_on_a_small_image(tmp_path: Path) -> None:
    """On an image of a few tiles, segment uses exactly the colour statistics training used
    (full working-resolution pixels), not a blurred thumbnail's."""
    from PIL import Image

    from pointnuc.infer.slide_tiles import sampled_colour_stats
    from pointnuc.io.slide import open_slide
    from pointnuc.stain import colour_stats, lab_stats

    rng = np.random.default_rng(3)
    img = rng.integers(40, 250, (300, 600, 3), dtype=np.uint8)
    img[100:180, 50:300] = (90, 60, 150)  # some structure, so blurring would shrink the spread
    Image.fromarray(img).save(tmp_path / "im.png")
    info = _info()  # works at 0.5 µm/px
    with open_slide(tmp_path / "im.png", pixel_size_um=0.5) as slide:
        plan = plan_slide(slide, info, tile_size=512, pixel_size_um=0.5, tissue=False)
        assert len(plan.tiles) <= 8
        m, s, stain = sampled_colour_stats(slide, plan)
        ref = {"mean": [60.0, 20.0, -10.0], "std": [15.0, 8.0, 6.0], "stain": [0.28, 1.8, 0.3, 0.9]}
        with_stain = sampled_colour_stats(slide, plan, ref=ref)
    em, es = lab_stats(img)
    np.testing.assert_allclose(m, em, atol=0.05)  # float32 sums over 180k pixels
    np.testing.assert_allclose(s, es, atol=0.05)
    assert stain is None  # a model without the stain step needs none
    np.testing.assert_allclose(with_stain[2], colour_stats(img, ref)[2], atol=0.02)


def test_fast_normalise_tile_within_one_grey_level_of_scikit_image() -> None:
    from helpers import reinhard_apply_skimage as _normalise_tile_skimage

    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (128, 96, 3), dtype=np.uint8)
    ref = {"mean": [62.0, 25.0, -12.0], "std": [16.0, 9.0, 7.0]}
    for src in ((np.array([70.0, 20.0, -10.0]), np.array([15.0, 10.0, 8.0])),
                (np.array([80.0, 30.0, -20.0]), np.array([5.0, 4.0, 3.0]))):  # strong stretch: out of gamut
        a, b = normalise_tile(img, src, ref), _normalise_tile_skimage(img, src, ref)
        assert a.dtype == np.uint8 and a.shape == img.shape
        assert np.abs(a.astype(int) - b).max() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_colour_normalisation_on_cuda_matches_numpy() -> None:
    """The GPU path on a real CUDA device: numpy's pixels (±1), with and without the stain step.

    CPU and CUDA float arithmetic round differently; the stain stretch widens that in dark pixels
    (up to 3 grey levels between torch on the CPU and on an H200), so both get numpy's bound."""
    from pointnuc.stain import colour_apply_torch as normalise_tiles_torch
    from pointnuc.stain import lab_stats

    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    ref = {"mean": [60.0, 22.0, -14.0], "std": [15.0, 8.0, 6.0], "stain": [0.28, 1.8, 0.30, 0.9]}
    for src in (lab_stats(imgs[0]), (*lab_stats(imgs[0]), [0.4, 0.95, 0.32, 0.5])):
        a = np.stack([normalise_tile(i, src, ref) for i in imgs]).astype(int)
        on_cpu = normalise_tiles_torch(torch.from_numpy(imgs), src, ref).numpy()
        on_gpu = normalise_tiles_torch(torch.from_numpy(imgs).cuda(), src, ref).cpu().numpy()
        assert np.mean(np.abs(a - on_gpu) <= 1) > 0.99 and np.abs(a - on_gpu).max() <= 8
        assert np.abs(on_cpu.astype(int) - on_gpu).max() <= 8


def test_tile_batch_flip_tta() -> None:
    """``tta``: the mean of the four flipped predictions, each flipped back; so a flipped batch gives the flipped result."""
    from pointnuc.infer.predict import predict_batch as _predict_batch
    from pointnuc.models.net import build_network

    torch.manual_seed(0)
    net = build_network(2, "tiny", pretrained=False).eval()
    batch = np.random.default_rng(1).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    tta = _predict_batch(net, batch, cpu, False, tta=True)
    plain = [_predict_batch(net, np.ascontiguousarray(batch[:, ::fy, ::fx]), cpu, False)[:, ::fy, ::fx]
             for fy in (1, -1) for fx in (1, -1)]
    assert tta.shape == (2, 32, 48)
    np.testing.assert_allclose(tta, np.mean(plain, axis=0), atol=1e-6)
    assert not np.allclose(tta, plain[0], atol=1e-4)  # this network is not flip-invariant: the flips matter
    flipped = _predict_batch(net, np.ascontiguousarray(batch[:, :, ::-1]), cpu, False, tta=True)
    np.testing.assert_allclose(flipped[:, :, ::-1], tta, atol=1e-6)


@pytest.mark.parametrize("encoder", ["tiny", "slim"])
def test_channels_last_network_on_the_cpu_gives_the_same_probabilities(encoder: str) -> None:
    """The CPU path converts the network to channels-last (faster); the probabilities stay those of the plain layout."""
    from pointnuc.infer.predict import predict_batch as _predict_batch
    from pointnuc.infer.predict import probabilities
    from pointnuc.models.net import build_network, preprocess

    torch.manual_seed(0)
    net = build_network(2, encoder, pretrained=False).eval()
    for p in net.modules():  # BatchNorm statistics away from (0, 1), as after training
        if isinstance(p, nn.BatchNorm2d):
            p.running_mean.uniform_(-0.5, 0.5)
            p.running_var.uniform_(0.5, 2.0)
    batch = np.random.default_rng(2).integers(0, 256, (2, 96, 128, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    with torch.no_grad():  # the plain layout throughout, as before
        plain = probabilities(net, preprocess(batch), activation="auto", amp=False, channels_last=False)[:, 1].numpy()
    fast = _predict_batch(net.to(memory_format=torch.channels_last), batch, cpu, False)
    assert np.abs(plain - fast).max() < 1e-5
    assert plain.std() > 1e-3  # not a constant map


def test_bf16_on_the_cpu_where_native_and_close_to_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """amp defaults on for a CPU with native bf16 only; its probabilities stay within a few hundredths of fp32."""
    from pointnuc.infer import wsi
    from pointnuc.infer.predict import predict_batch as _predict_batch
    from pointnuc.models.net import build_network

    for native in (True, False):
        monkeypatch.setattr(wsi, "cpu_has_native_bf16", lambda native=native: native)
        assert wsi.SegmentSettings().for_device().amp is native
        assert wsi.SegmentSettings(amp=False).for_device().amp is False
    torch.manual_seed(0)
    net = build_network(2, "slim", pretrained=False).eval().to(memory_format=torch.channels_last)
    batch = np.random.default_rng(3).integers(0, 256, (1, 96, 128, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    fp32, bf16 = _predict_batch(net, batch, cpu, False), _predict_batch(net, batch, cpu, True)
    assert fp32.dtype == bf16.dtype == np.float32 and not np.array_equal(fp32, bf16)  # bf16 really ran
    assert np.abs(fp32 - bf16).max() < 0.05
