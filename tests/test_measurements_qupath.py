"""pointnuc's measurements against QuPath 0.6.0's own cell detection, on QuPath's own cells.

QuPath's ``WatershedCellDetection`` runs (through tests/qupath_kit.py) on a 200 x 200 crop of the
README example (H&E, stored as 0.5 µm/px so QuPath measures at full resolution, downsample 1);
pointnuc then measures QuPath's own nucleus and cell outlines on the same pixels
(:func:`pointnuc.measurements.measure`, H&E default stains) and the two are compared.

Two runs, because QuPath measures stains over its label image and shape over its ImageJ ROI:

- ``smoothBoundaries=False``: the outlines QuPath writes are the traced pixel edges of its labels, so
  the pixels inside them are exactly the pixels QuPath measured. Everything pixel-based must agree
  to 32-bit float precision (rel. 1e-5): area, calipers, eccentricity, area ratio and every stain
  statistic. Not the perimeter: ImageJ measures a traced outline with its corners cut
  (Σ steps - corners·(2 - √2)), pointnuc the polygon as written.
- QuPath's defaults (smoothed outlines, as users get them): QuPath's labels are still the unsmoothed
  pixels but its outlines are smoothed and simplified, so pointnuc (pixels inside the written outline)
  differs by the pixels along the edge (nuclei here are ~40 px, so one edge pixel is ~2.5%).
  Tolerances (largest difference seen on this crop, plus a margin): perimeter and area ratio 3%,
  calipers 10%; area, circularity, eccentricity and OD means 15%, OD std devs 25%, OD sums 25%
  (the pixel count differs too), on every object, and at most 5% (sums 8%) on the median; min, max
  and range within 0.25 OD (an edge pixel can be the extreme) and their median difference below 1e-3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely

from pointnuc.io.slide import open_slide
from pointnuc.measurements import measure, measurement_names

pytestmark = pytest.mark.qupath

EXAMPLE = Path(__file__).resolve().parents[1] / "examples/monuseg-B0-5711/TCGA-B0-5711-01Z-00-DX1.tif"

RUN = """
from pathlib import Path
from qupath_kit import _java, watershed
jp = _java()
answer({s: watershed(jp, Path(IMAGE), {"smoothBoundaries": s == "smooth"}) for s in ("traced", "smooth")})
"""


@pytest.fixture(scope="module")
def qupath_cells(qupath_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    import tifffile
    from qupath_kit import python_with_qupath
    from synth import write_tiff

    crop = tmp_path_factory.mktemp("meas") / "crop.tif"
    write_tiff(crop, np.ascontiguousarray(tifffile.imread(EXAMPLE)[300:500, 300:500, :3]), 0.5)
    return crop, python_with_qupath(f"IMAGE = {str(crop)!r}\n" + RUN)


def _ours_and_theirs(crop: Path, run: dict) -> tuple[list[dict], list[dict]]:
    cells = [shapely.from_wkb(bytes.fromhex(c["wkb"])) for c in run["cells"]]
    nuclei = [shapely.from_wkb(bytes.fromhex(c["nucleus_wkb"])) for c in run["cells"]]
    with open_slide(crop) as pixels:
        ours = measure(nuclei, cells, pixel_size_um=0.5, pixels=pixels)
    return ours, [c["measurements"] for c in run["cells"]]


def _column(rows: list[dict], name: str) -> np.ndarray:
    return np.array([r[name] for r in rows], np.float64)


def test_names_are_qupaths_in_its_order(qupath_cells: tuple[Path, dict]) -> None:
    crop, runs = qupath_cells
    for run in runs.values():
        assert run["ok"] and len(run["cells"]) >= 30
        ours, theirs = _ours_and_theirs(crop, run)
        assert all(list(t) == measurement_names(cells=True) for t in theirs)
        assert all(list(o) == list(t) for o, t in zip(ours, theirs))


def test_same_pixels_give_qupaths_values(qupath_cells: tuple[Path, dict]) -> None:
    crop, runs = qupath_cells
    ours, theirs = _ours_and_theirs(crop, runs["traced"])
    for name in measurement_names(cells=True):
        if name.endswith(("Perimeter", "Circularity")):  # ImageJ's corner-cut perimeter of a traced outline
            continue
        mine, qp = _column(ours, name), _column(theirs, name)
        assert mine == pytest.approx(qp, rel=1e-5, abs=1e-6), name


def test_smoothed_outlines_agree_within_edge_pixels(qupath_cells: tuple[Path, dict]) -> None:
    crop, runs = qupath_cells
    ours, theirs = _ours_and_theirs(crop, runs["smooth"])
    for name in measurement_names(cells=True):
        mine, qp = _column(ours, name), _column(theirs, name)
        diff = np.abs(mine - qp)
        rel = diff / np.maximum(np.abs(qp), 1e-9)
        if name.endswith((" max", " min", " range")):
            assert diff.max() < 0.25 and np.median(diff) < 1e-3, (name, diff.max(), np.median(diff))
        elif name.endswith(("Perimeter", "area ratio")):
            assert rel.max() < 0.03, (name, rel.max())
        elif name.endswith("caliper"):
            assert rel.max() < 0.10, (name, rel.max())
        elif name.endswith(" sum"):  # a sum over pixels: the pixel count's difference too
            assert rel.max() < 0.25 and np.median(rel) < 0.08, (name, rel.max(), np.median(rel))
        else:  # area, circularity, eccentricity, OD means and std devs
            bound = 0.25 if name.endswith("std dev") else 0.15
            assert rel.max() < bound and np.median(rel) < 0.05, (name, rel.max(), np.median(rel))
