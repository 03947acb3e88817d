"""Stage 1 plumbing: patch dataset, fit loop (resume, NaN, fingerprint), detector training."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pointnuc.config import DataConfig, profile_config
from pointnuc.errors import InputError, TrainingError
from pointnuc.models.net import build_network
from pointnuc.train.data import IGNORE, Augment, PatchDataset, warp_crop
from pointnuc.train.fit import FitSettings, fit, resolve_device
from pointnuc.train.losses import weighted_mse
from pointnuc.train.samples import TrainingImage, points_between

torch.set_num_threads(1)


def _sample(h: int = 40, w: int = 50, name: str = "a") -> TrainingImage:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    valid = np.ones((h, w), bool)
    return TrainingImage(name=name, image_name=name, image=img, points=np.zeros((0, 2)), holdout=np.zeros((0, 2)), valid=valid)


# --- data -----------------------------------------------------------------------------


def test_warp_identity_is_exact_crop_and_pads_with_ignore() -> None:
    s = _sample()
    tgt = np.arange(40 * 50, dtype=np.float32).reshape(1, 40, 50)
    # crop of 32 whose top-left is (-4, 30): rows -4..27, cols 30..61 -> cols >= 50 padded
    img, out = warp_crop(s.image, tgt, s.valid, (-4 + 15.5, 30 + 15.5), np.eye(2), 32, [False])
    assert np.array_equal(img[4:, :20], s.image[0:28, 30:50])
    assert np.array_equal(out[0, 4:, :20], tgt[0, 0:28, 30:50])
    assert (out[0, :4] == IGNORE).all() and (out[0, :, 20:] == IGNORE).all()


def test_warp_flip_matches_numpy_and_keeps_alignment() -> None:
    s = _sample()
    tgt = np.stack([np.arange(40 * 50, dtype=np.float32).reshape(40, 50)])
    flip = np.array([[1.0, 0.0], [0.0, -1.0]])  # dx -> -dx: horizontal flip
    img, out = warp_crop(s.image, tgt, s.valid, (5 + 15.5, 10 + 15.5), flip, 32, [True])
    assert np.array_equal(img, s.image[5:37, 10:42][:, ::-1])
    assert np.array_equal(out[0], tgt[0, 5:37, 10:42][:, ::-1])
    rot = np.array([[0.0, -1.0], [1.0, 0.0]])  # a 90° rotation
    img, out = warp_crop(s.image, tgt, s.valid, (5 + 15.5, 10 + 15.5), rot, 32, [True])
    assert np.array_equal(out[0], np.rot90(tgt[0, 5:37, 10:42], 1)) or np.array_equal(out[0], np.rot90(tgt[0, 5:37, 10:42], -1))
    # image and target move together: find each target value's source pixel in the image
    flat = out[0].astype(int).ravel()
    assert np.array_equal(img.reshape(-1, 3), s.image.reshape(-1, 3)[flat])


def test_invalid_pixels_come_back_ignored_and_nearest_keeps_labels() -> None:
    s = _sample(64, 64)
    s.valid[:, :32] = False
    tgt = np.stack([np.full((64, 64), 0.5, np.float32), (np.arange(64 * 64) % 3).reshape(64, 64).astype(np.float32)])
    ds = PatchDataset([s], [tgt], DataConfig(patch_size=64, crop_size=32, patches_per_image=6), nearest=[False, True], seed=1)
    for i in range(len(ds)):
        img, out = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and out.shape == (2, 32, 32)
        assert set(np.unique(out[1].numpy())) <= {IGNORE, 0.0, 1.0, 2.0}  # nearest: no blended labels
        lin = out[0].numpy()
        assert np.all((lin == IGNORE) | np.isclose(lin, 0.5, atol=1e-5))
    a, b = ds[3], ds[3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # deterministic per (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], a[0])


def test_stain_jitter_changes_only_the_stain_amounts() -> None:
    from pointnuc.stain import HED_FROM_RGB, RGB_FROM_HED, stain_jitter

    # a pure-haematoxylin gradient: optical density c * H for c in 0.2 .. 1.5
    c = np.linspace(0.2, 1.5, 64, dtype=np.float32)
    od = c[:, None, None] * RGB_FROM_HED[0][None, None, :] * np.ones((64, 8, 1), np.float32)
    img = np.clip(np.rint(255 * np.exp(-od)), 0, 255).astype(np.uint8)
    assert stain_jitter(img, np.random.default_rng(0), 0.0) is img
    near = stain_jitter(img, np.random.default_rng(0), 1e-9)
    assert np.abs(near.astype(int) - img).max() <= 1  # the deconvolution round trip is lossless
    rng_draw = np.random.default_rng(5)
    alpha = rng_draw.uniform(0.9, 1.1, 3)
    beta = rng_draw.uniform(-0.1, 0.1, 3) * 0.2
    out = stain_jitter(img, np.random.default_rng(5), 0.1)

    def stains(u8: np.ndarray) -> np.ndarray:
        return (-np.log(np.maximum(u8.astype(np.float32), 1) / 255.0)) @ HED_FROM_RGB

    before, after = stains(img), stains(out)
    # haematoxylin scaled and shifted as drawn; eosin and residual stay near their shift (8-bit rounding: 0.01)
    np.testing.assert_allclose(after[..., 0], before[..., 0] * alpha[0] + beta[0], atol=0.03)
    assert np.abs(after[..., 1:] - before[..., 1:] * alpha[1:] - beta[1:]).max() < 0.03
    assert not np.array_equal(out, img)


def test_patch_dataset_stain_jitter_leaves_targets_alone() -> None:
    s = _sample(64, 64)
    tgt = np.random.default_rng(1).random((2, 64, 64)).astype(np.float32)
    plain = PatchDataset([s], [tgt], DataConfig(patch_size=64, crop_size=32, patches_per_image=2, stain_jitter=0.0), seed=3)
    jit = PatchDataset([s], [tgt], DataConfig(patch_size=64, crop_size=32, patches_per_image=2, stain_jitter=0.2), seed=3)
    (a, ta), (b, tb) = plain[1], jit[1]
    assert torch.equal(ta, tb)  # same geometry, same targets (the CRF loss reads the original colours there)
    assert not torch.equal(a, b) and (a.int() - b.int()).abs().float().mean() < 40


def test_targets_teach_nothing_at_held_back_points() -> None:
    """A held-back nucleus in a labeled point's background ring, or where background propagates, stays ignored."""
    from pointnuc.train.detect import Radii, initial_mask, self_training_mask

    radii = Radii(r1=3.0, r2=6.0, sigma=1.0)
    s = TrainingImage(name="a", image_name="a", image=np.zeros((20, 30, 3), np.uint8), points=np.array([[10.5, 10.5]]),
                      holdout=np.array([[15.5, 10.5], [25.5, 10.5]]), valid=np.ones((20, 30), bool))
    for variant in ("GM", "ext-GM"):
        m0 = initial_mask(s, variant, radii)
        assert m0[10, 10] == pytest.approx(1.0)  # the labeled point still teaches
        assert (m0[10, 13:18] == -1).all()  # ring of the labeled point (D = 3..5) over the held-back nucleus
    m0 = initial_mask(s, "ext-GM", radii)
    assert m0[10, 12] > 0 and m0[10, 18] == -1  # outside r1 of the held-back point and beyond r2: Eq. 1
    assert m0[5, 10] == 0.0  # ring pixel (D = 5) away from any held-back point
    prob = np.full((20, 30), 0.01, np.float32)  # p < 0.1 everywhere: background propagates
    m1 = self_training_mask(s, "ST-bg", radii, m0, prob, np.zeros((0, 2)), 0.1, 0.7)
    assert m1[10, 25] == -1 and m1[10, 15] == -1  # both held-back nuclei ignored, not background
    assert m1[2, 2] == 0.0 and m1[10, 10] == pytest.approx(1.0)
    m2 = self_training_mask(s, "ST-nu", radii, m0, prob, np.array([[25.5, 10.5]]), 0.1, 0.7)
    assert m2[10, 25] == -1  # a detected held-back nucleus is not added as a positive either


def test_rescaled_sample_keeps_full_resolution_places(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 1 at twice the pixel size: 2x2 means, nearest masks and labels, points where they were."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from harness import labels_like  # a benchmark's ground truth, carried beside its samples

    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    valid = np.zeros((4, 6), bool)
    valid[:2, :4] = True
    lab = np.kron(np.array([[1, 2, 3], [4, 5, 6]], np.int32), np.ones((2, 2), np.int32))
    s = TrainingImage(name="a", image_name="a", image=img, points=np.array([[1.0, 1.0], [5.5, 3.5]]),
                      holdout=np.array([[3.0, 2.0]]), valid=valid, origin_xy=(10.0, 20.0), scale=0.5)
    t = s.rescaled(2.0)
    assert t.image.shape == (2, 3, 3) and t.scale == 1.0 and t.origin_xy == (10.0, 20.0)
    assert np.abs(t.image - img.reshape(2, 2, 3, 2, 3).mean((1, 3))).max() <= 0.5
    assert np.array_equal(t.valid, [[True, True, False], [False, False, False]])
    assert np.array_equal(labels_like(lab, t), [[1, 2, 3], [4, 5, 6]])
    assert np.allclose(t.to_full_res(t.points), s.to_full_res(s.points))
    assert np.allclose(t.to_full_res(t.holdout), s.to_full_res(s.holdout))
    assert np.allclose(points_between({"a": t.points}, [t], [s])["a"], s.points)  # stage 1's points back for stage 2
    assert s.rescaled(1.0) is s


def test_detection_pixel_size_gives_stage_1_its_own_config() -> None:
    quick = profile_config("quick")
    assert quick.data.pixel_size_um == 0.25 and quick.for_detection().data.pixel_size_um == 0.5
    assert quick.for_detection().segmentation == quick.segmentation
    paper = profile_config("paper")
    assert paper.for_detection() is paper
    with pytest.raises(InputError, match="detection.pixel_size_um"):
        profile_config("paper", **{"detection.pixel_size_um": -1.0})


def test_small_image_is_padded() -> None:
    s = _sample(20, 20)
    ds = PatchDataset([s], [np.zeros((1, 20, 20), np.float32)], DataConfig(patch_size=64, crop_size=32, patches_per_image=3),
                      augment=Augment.none())
    for i in range(len(ds)):
        _img, out = ds[i]
        assert 0 < (out >= 0).sum() <= 400  # labelled pixels only where the 20x20 image is


# --- loss and fit ---------------------------------------------------------------------


def test_weighted_mse_by_hand() -> None:
    logits = torch.zeros(1, 1, 1, 3)  # p = 0.5 everywhere
    targets = torch.tensor([[[[1.0, 0.0, -1.0]]]])
    # (10 * 0.25 + 1 * 0.25) / 2 non-ignored pixels
    assert weighted_mse(logits, targets).item() == pytest.approx(1.375)


def _toy_dataset() -> PatchDataset:
    rng = np.random.default_rng(0)
    samples, targets = [], []
    for k in range(2):
        img = np.full((64, 64, 3), 220, np.uint8)
        t = np.zeros((1, 64, 64), np.float32)
        for _ in range(5):
            y, x = rng.integers(8, 56, 2)
            img[y - 3 : y + 4, x - 3 : x + 4] = 60
            t[0, y - 2 : y + 3, x - 2 : x + 3] = 1.0
        samples.append(TrainingImage(f"s{k}", f"s{k}", img, np.zeros((0, 2)), np.zeros((0, 2)), np.ones((64, 64), bool)))
        targets.append(t)
    return PatchDataset(samples, targets, DataConfig(patch_size=64, crop_size=32, patches_per_image=4), seed=0)


@pytest.mark.parametrize("schedule, ema", [("constant", 0.0), ("cosine", 0.9)])
def test_fit_resume_equals_uninterrupted(tmp_path: Path, schedule: str, ema: float) -> None:
    ds = _toy_dataset()
    settings = FitSettings(epochs=3, lr=1e-2, batch_size=4, seed=3, schedule=schedule, ema=ema)
    kw = {"device": "cpu", "stage_name": "toy", "progress": False, "num_workers": 0}
    torch.manual_seed(0)
    m1 = build_network(1, "tiny")
    h1 = fit(m1, ds, weighted_mse, settings, checkpoint_dir=tmp_path / "a", resume=False, **kw)
    torch.manual_seed(0)
    m2 = build_network(1, "tiny")

    def interrupt(epoch: int, model: torch.nn.Module) -> None:
        if epoch == 3:
            raise KeyboardInterrupt  # stopped in epoch 3: the checkpoint holds epoch 2

    with pytest.raises(KeyboardInterrupt):
        fit(m2, ds, weighted_mse, settings, checkpoint_dir=tmp_path / "b", resume=False, on_epoch_end=interrupt,
            checkpoint_interval_s=0.0, **kw)
    torch.manual_seed(1)
    m3 = build_network(1, "tiny")  # other init: everything must come from the checkpoint
    h3 = fit(m3, ds, weighted_mse, settings, checkpoint_dir=tmp_path / "b", resume=True, **kw)
    assert len(h3.epochs) == 3
    assert h3.losses == pytest.approx(h1.losses, rel=1e-4)
    for a, b in zip(m1.state_dict().values(), m3.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert h1.losses[-1] < h1.losses[0]
    with pytest.raises(TrainingError, match="another configuration"):
        fit(build_network(1, "tiny"), ds, weighted_mse, replace(settings, epochs=4, lr=1e-3),
            checkpoint_dir=tmp_path / "b", resume=True, **kw)


def test_scheduled_lr_by_hand():
    from pointnuc.errors import InputError
    from pointnuc.train.fit import scheduled_lr

    assert scheduled_lr(1e-3, "constant", 7, 10) == 1e-3
    assert scheduled_lr(1e-3, "cosine", 0, 10) == pytest.approx(1e-3)
    assert scheduled_lr(1e-3, "cosine", 5, 10) == pytest.approx(5e-4)  # half way: (1 + cos π/2) / 2
    assert scheduled_lr(1e-3, "cosine", 10, 10) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(InputError):
        scheduled_lr(1e-3, "step", 0, 10)


def test_ema_update_by_hand() -> None:
    from pointnuc.train.fit import ema_decay, ema_update

    net = torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        net.weight.fill_(1.0)
    net.num_batches_tracked.fill_(7)
    avg = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    ema_update(avg, net, 0.9)
    assert torch.allclose(avg["weight"], torch.full((2,), 0.1))  # 0.9 * 0 + 0.1 * 1
    assert torch.allclose(avg["running_var"], torch.full((2,), 0.1))  # BatchNorm statistics are averaged too
    assert int(avg["num_batches_tracked"]) == 7  # integers are copied
    assert ema_decay(0.99, 0) == pytest.approx(0.1) and ema_decay(0.99, 10_000) == 0.99


def test_fit_nan_stops_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    ds = _toy_dataset()
    calls = {"n": 0}

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        base = weighted_mse(logits, targets)
        return base * float("nan") if calls["n"] > 2 else base  # epoch 1 (2 batches) fine, then NaN

    with pytest.raises(TrainingError, match="loss became nan"):
        fit(build_network(1, "tiny"), ds, loss, FitSettings(epochs=3, lr=1e-3, batch_size=4, seed=0), device="cpu",
            checkpoint_dir=tmp_path, stage_name="toy", resume=False, progress=False, num_workers=0,
            checkpoint_interval_s=0)
    state = torch.load(tmp_path / "toy.pt", weights_only=False)
    assert state["epoch"] == 1


def test_fit_checkpoints_at_most_once_per_interval_and_after_the_last_epoch(tmp_path: Path) -> None:
    saved: list[int] = []

    def hook(epoch: int, model: torch.nn.Module) -> None:
        ckpt = tmp_path / "toy.pt"
        saved.append(torch.load(ckpt, weights_only=False)["epoch"] if ckpt.is_file() else 0)

    fit(build_network(1, "tiny"), _toy_dataset(), weighted_mse, FitSettings(epochs=3, lr=1e-3, batch_size=4, seed=0), device="cpu",
        checkpoint_dir=tmp_path, stage_name="toy", resume=False, progress=False, num_workers=0,
        on_epoch_end=hook, checkpoint_interval_s=3600)
    assert saved == [0, 0, 0]  # the hook runs before the epoch's save: none saved within the hour...
    assert torch.load(tmp_path / "toy.pt", weights_only=False)["epoch"] == 3  # ...but the last epoch always is


def test_best_state_is_kept(tmp_path: Path) -> None:
    ds = _toy_dataset()
    scores = {1: 0.5, 2: 0.9, 3: 0.1}
    snap: dict[int, torch.Tensor] = {}

    def hook(epoch: int, model: torch.nn.Module) -> dict[str, float]:
        snap[epoch] = next(iter(model.parameters())).detach().clone()
        return {"score": scores[epoch]}

    m = build_network(1, "tiny")
    h = fit(m, ds, weighted_mse, FitSettings(epochs=3, lr=1e-2, batch_size=4, seed=0), device="cpu", checkpoint_dir=tmp_path,
            stage_name="toy", resume=False, progress=False, on_epoch_end=hook, num_workers=0)
    assert h.best_epoch == 2 and h.best_score == 0.9
    assert torch.equal(next(iter(m.parameters())), snap[2])


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


# --- stage 1 end to end -----------------------------------------------------------------


def _synthetic(seed: int, n: int = 18, size: int = 128, n_train: int = 8, n_hold: int = 3) -> tuple[TrainingImage, np.ndarray]:
    """Pink background with ``n`` dark discs of radius 4.5 px; returns the sample and all centres."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (235, 200, 215)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    centres: list[np.ndarray] = []
    for _ in range(20000):
        c = rng.uniform(6, size - 6, 2)
        if all(np.hypot(*(c - d)) > 12 for d in centres):
            centres.append(c)
        if len(centres) == n:
            break
    assert len(centres) == n, "test image too small for that many nuclei"
    for x, y in centres:
        img[(xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 < 4.5**2] = (90, 50, 130)
    c = np.array(centres)
    s = TrainingImage(f"s{seed}", f"s{seed}", img, c[:n_train], c[n_train : n_train + n_hold], np.ones((size, size), bool))
    return s, c


def _tiny_config(**kw: object):  # r1 = 1 µm / 0.25 µm/px = 4 px
    return profile_config("tiny", **{"data.nucleus_radius_um": 1.0, "data.pixel_size_um": 0.25, "detection.epochs": 6,
                                     "detection.lr": 3e-3, **kw})


def test_train_detector_tiny_finds_the_blobs(tmp_path: Path) -> None:
    import json

    from pointnuc.metrics import detection_counts, detection_scores
    from pointnuc.models.bundle import ModelLayout
    from pointnuc.train.detect import load_points, train_detector

    data = [_synthetic(s) for s in range(4)]
    layout = ModelLayout(tmp_path / "model")
    res = train_detector([d[0] for d in data], _tiny_config(), layout, device="cpu", progress=False)
    losses = res.history["round0"].losses
    assert losses[-1] < 0.5 * losses[0]
    assert set(res.history) == {"round0", "round1"}  # ST-bg, 1 round in the tiny profile
    sc = detection_scores([detection_counts(res.points[s.name], c, 4.0) for s, c in data])
    assert sc["F1"] >= 0.9 and sc["mu_d"] < 2.0
    assert 0.05 <= res.threshold <= 0.85
    assert layout.detector.is_file()
    saved = load_points(layout, "s0")
    assert np.allclose(saved, res.points["s0"], atol=1e-3)  # scale 1, origin 0
    assert json.loads((layout.points / "s0.json").read_text())["image_name"] == "s0"


def test_train_detector_bad_input(tmp_path: Path) -> None:
    from pointnuc.models.bundle import ModelLayout
    from pointnuc.train.detect import MIN_POINTS, train_detector

    s, _ = _synthetic(0)
    layout = ModelLayout(tmp_path)
    none = TrainingImage("n", "n", s.image, np.zeros((0, 2)), np.zeros((0, 2)), s.valid)
    with pytest.raises(TrainingError, match="no points"):
        train_detector([none], _tiny_config(), layout, device="cpu", progress=False)
    few = TrainingImage("f", "f", s.image, s.points[:5], s.holdout[:2], s.valid)
    assert 7 < MIN_POINTS
    with pytest.raises(TrainingError, match="only 7 points"):
        train_detector([few], _tiny_config(), layout, device="cpu", progress=False)
    empty = TrainingImage("e", "e", np.zeros((0, 0, 3), np.uint8), np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 0), bool))
    with pytest.raises(TrainingError, match="any pixels"):
        train_detector([empty], _tiny_config(), layout, device="cpu", progress=False)


def test_train_detector_small_image_and_empty_region(tmp_path: Path) -> None:
    from pointnuc.models.bundle import ModelLayout
    from pointnuc.train.detect import train_detector

    s, _ = _synthetic(1, n=5, size=40, n_train=4, n_hold=1)  # 40 px < the 64 px crop: padded
    s2, _ = _synthetic(2, n=8, size=48, n_train=7, n_hold=1)
    empty = TrainingImage("e", "e", np.zeros((8, 8, 3), np.uint8), np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((8, 8), bool))
    res = train_detector([s, s2, empty], _tiny_config(**{"detection.epochs": 2, "detection.variant": "ext-GM"}),
                         ModelLayout(tmp_path), device="cpu", progress=False)
    assert set(res.points) == {"s1", "s2"}  # the region without pixels was skipped
    assert set(res.history) == {"round0"}  # ext-GM: no self-training


@pytest.mark.slow
def test_stage1_on_one_monuseg_image(shared: Path, tmp_path: Path) -> None:
    """Tiny encoder on one real image (0.5 µm/px, 10% points): loss falls, detections are real nuclei."""
    from PIL import Image

    from pointnuc.metrics import detection_counts, detection_scores, gt_points_from_labels
    from pointnuc.models.bundle import ModelLayout
    from pointnuc.train.detect import train_detector

    d = shared / "data" / "monuseg" / "train"
    name = "TCGA-A7-A13E-01Z-00-DX1"
    img = np.asarray(Image.open(d / f"{name}.png").convert("RGB").resize((500, 500), Image.BOX))
    gt = gt_points_from_labels(np.asarray(Image.open(d / f"{name}_label.png")))
    rng = np.random.default_rng(0)
    pts = gt[rng.choice(len(gt), len(gt) // 10, replace=False)] / 2.0
    s = TrainingImage(name, name, img, pts[:-6], pts[-6:], np.ones((500, 500), bool), scale=2.0)
    cfg = profile_config("tiny", **{"data.pixel_size_um": 0.5, "data.patch_size": 160, "data.crop_size": 128,
                                    "data.patches_per_image": 16, "detection.epochs": 15, "detection.rounds": 1,
                                    "detection.lr": 3e-3})
    res = train_detector([s], cfg, ModelLayout(tmp_path), device="cpu", progress=False)
    assert res.history["round0"].losses[-1] < res.history["round0"].losses[0]
    sc = detection_scores([detection_counts(s.to_full_res(res.points[name]), gt, 11.0)])
    assert sc["F1"] > 0.5, sc


def test_train_detector_resume_reuses_finished_rounds(tmp_path: Path) -> None:
    from pointnuc.models.bundle import ModelLayout
    from pointnuc.train.detect import train_detector

    data = [_synthetic(s)[0] for s in range(2)]
    cfg = _tiny_config(**{"detection.epochs": 2})
    layout = ModelLayout(tmp_path)
    first = train_detector(data, cfg, layout, device="cpu", progress=False)
    again = train_detector(data, cfg, layout, device="cpu", progress=False, resume=True)  # nothing left to train
    assert again.history["round1"].losses == first.history["round1"].losses
    for name in first.points:
        assert np.allclose(again.points[name], first.points[name])
    with pytest.raises(TrainingError, match="another configuration"):
        train_detector(data, cfg.replace(**{"detection.lr": 1e-4}), layout, device="cpu", progress=False, resume=True)


def test_points_only_tuning_rejects_weak_false_blobs() -> None:
    """10 true nuclei (peak 0.9; 5 held back) and 10 spurious blobs (peak 0.3).

    Below 0.3: 20 detections, recall 1 -> N_true <= 20; at 0.3..0.85: 10 detections, recall 1
    -> N_true estimate = 10, estimated F1 = 2*10/(10+10) = 1 against 2*10/(20+10) = 0.67.
    """
    from pointnuc.train.selection import tune_on_points

    prob = np.zeros((40, 200), np.float32)
    true_xy = []
    for i in range(10):
        prob[5:8, 5 + 20 * i : 8 + 20 * i] = 0.9  # 3x3 blob, centre pixel (6, 6 + 20 i)
        prob[30:33, 5 + 20 * i : 8 + 20 * i] = 0.3
        true_xy.append((6.5 + 20 * i, 6.5))
    hold = np.array(true_xy[::2])
    s = TrainingImage("p", "p", np.zeros((40, 200, 3), np.uint8), np.zeros((0, 2)), hold, np.ones((40, 200), bool))
    t = tune_on_points([prob], [s], r1=3.0)
    assert 0.3 <= t.threshold < 0.9
    assert t.n_detections == 10 and t.score == pytest.approx(1.0)
    assert t.table[0]["n_true_est"] == pytest.approx(10.0)


def test_points_only_tuning_counts_only_images_with_held_back_points() -> None:
    """Image A holds back all of its 10 nuclei: 8 peak at 0.9, 2 at 0.32, and 2 spurious blobs peak
    at 0.32. Image B (trained on, nothing held back) has 10 blobs at 0.9 and 20 at 0.32.

    A alone: up to 0.30, 12 detections and recall 1; above, 8 and recall 0.8 -> N_true = min(12, 10) = 10,
    estimated F1 2*10/(12+10) = 0.909 against 2*8/(8+10) = 0.889: the low thresholds win, as they
    truly do on A (F1 0.909 against 0.889). Counting B's detections (42 and 18) would give
    N_true = 22.5 and pick the high thresholds (0.70 against 0.89).
    """
    from pointnuc.train.selection import tune_on_points

    def blobs(values: list[float]) -> np.ndarray:
        prob = np.zeros((20, 20 * len(values)), np.float32)
        for i, v in enumerate(values):
            prob[5:8, 5 + 20 * i : 8 + 20 * i] = v
        return prob

    a_values = [0.9] * 8 + [0.32] * 4  # the last two are the spurious blobs
    nuclei = np.array([(6.5 + 20 * i, 6.5) for i in range(10)])
    img = lambda p: np.zeros((*p.shape, 3), np.uint8)
    pa, pb = blobs(a_values), blobs([0.9] * 10 + [0.32] * 20)
    a = TrainingImage("a", "a", img(pa), np.zeros((0, 2)), nuclei, np.ones(pa.shape, bool))
    b = TrainingImage("b", "b", img(pb), nuclei[:1], np.zeros((0, 2)), np.ones(pb.shape, bool))
    t = tune_on_points([pa, pb], [a, b], r1=3.0)
    assert t.threshold <= 0.3 and t.n_detections == 12
    assert t.score == pytest.approx(2 * 10 / 22)
    assert t.table[0]["n_true_est"] == pytest.approx(10.0)


def test_points_only_tuning_leaves_out_clicked_nuclei() -> None:
    """One trained-on image: 20 clicked nuclei (found at 0.9), 10 unclicked ones, all held back
    (8 peak at 0.9, 2 at 0.32), and 4 spurious blobs at 0.32.

    On the unclicked nuclei, the only ones a new image has: up to 0.30, 14 detections and recall 1
    (true F1 2*10/24 = 0.833); above, 8 and recall 0.8 (true F1 2*8/18 = 0.889). Leaving the 20
    detections of clicked nuclei out: N_true = min(14, 10) = 10 and the estimates are exact, so the
    high thresholds win. Counting them (34 and 28 detections): N_true = min(34, 35) = 34 and an
    estimated F1 of 1.0 for the low thresholds, which would win.
    """
    from pointnuc.train.selection import tune_on_points

    values = [0.9] * 20 + [0.9] * 8 + [0.32] * 2 + [0.32] * 4
    prob = np.zeros((20, 20 * len(values)), np.float32)
    for i, v in enumerate(values):
        prob[5:8, 5 + 20 * i : 8 + 20 * i] = v
    xy = np.array([(6.5 + 20 * i, 6.5) for i in range(len(values))])
    s = TrainingImage("a", "a", np.zeros((*prob.shape, 3), np.uint8), xy[:20], xy[20:30], np.ones(prob.shape, bool))
    t = tune_on_points([prob], [s], r1=3.0)
    assert t.threshold > 0.32 and t.n_detections == 28
    assert t.table[0]["n_true_est"] == pytest.approx(10.0)
    assert t.score == pytest.approx(2 * 8 / 18)
    low = next(r for r in t.table if r["threshold"] <= 0.3 and r["min_area_px"] == 0)
    assert low["n_unclicked"] == 14 and low["score"] == pytest.approx(2 * 10 / 24)


def test_points_only_tuning_with_few_held_back_points() -> None:
    """A small project holds back 3 points. Found all three: tuned as usual (need = 3, not 5).
    Found none: the most sensitive setting, not a threshold that detects nothing."""
    from pointnuc.train.selection import DETECTION_THRESHOLDS as THRESHOLDS
    from pointnuc.train.selection import tune_on_points

    prob = np.zeros((40, 200), np.float32)
    true_xy = []
    for i in range(10):
        prob[5:8, 5 + 20 * i : 8 + 20 * i] = 0.9
        true_xy.append((6.5 + 20 * i, 6.5))
    hold = np.array(true_xy[:3])
    s = TrainingImage("p", "p", np.zeros((40, 200, 3), np.uint8), np.zeros((0, 2)), hold, np.ones((40, 200), bool))
    t = tune_on_points([prob], [s], r1=3.0)
    assert t.threshold < 0.9 and t.n_detections == 10 and t.score == pytest.approx(1.0)
    weak = np.full((40, 200), 0.02, np.float32)
    weak[30:33, 100:103] = 0.5  # one blob far from every held-back point
    t = tune_on_points([weak], [s], r1=3.0)
    assert t.threshold == THRESHOLDS[0] and t.min_area_px == 0.0 and t.score == 0.0


def test_points_only_tuning_looks_below_the_grid_only_from_its_floor() -> None:
    """10 held-back nuclei: 3 peak at 0.9, 4 at 0.06, 3 at 0.04 (a detector whose probabilities shrank).

    On the grid: 0.05 finds 7 (recall 0.7), 0.10..0.85 find 3 (recall 0.3), N_true = 10, estimated F1
    14/17 against 6/13: the floor 0.05. Below it 0.03 finds all 10 (F1 1.0) and is chosen. Without the
    0.04 nuclei the lower thresholds gain nothing and the tie keeps 0.05. With the weak nuclei at 0.3
    the choice lies above the floor and nothing below it is tried.
    """
    from pointnuc.train.selection import DETECTION_THRESHOLDS, FLOOR_THRESHOLDS, tune_on_points

    def case(values: list[float]) -> tuple[np.ndarray, TrainingImage]:
        prob = np.zeros((20, 20 * len(values)), np.float32)
        for i, v in enumerate(values):
            prob[5:8, 5 + 20 * i : 8 + 20 * i] = v
        hold = np.array([(6.5 + 20 * i, 6.5) for i in range(len(values))])
        return prob, TrainingImage("a", "a", np.zeros((*prob.shape, 3), np.uint8), np.zeros((0, 2)), hold,
                                   np.ones(prob.shape, bool))

    prob, s = case([0.9] * 3 + [0.06] * 4 + [0.04] * 3)
    t = tune_on_points([prob], [s], r1=3.0)
    assert t.threshold == FLOOR_THRESHOLDS[-1] and t.n_detections == 10 and t.score == pytest.approx(1.0)
    assert {r["threshold"] for r in t.table} == set(FLOOR_THRESHOLDS) | set(DETECTION_THRESHOLDS)
    floor = next(r for r in t.table if r["threshold"] == DETECTION_THRESHOLDS[0] and r["min_area_px"] == 0)
    assert floor["n_detections"] == 7 and floor["score"] == pytest.approx(14 / 17)

    prob, s = case([0.9] * 3 + [0.06] * 4)  # the floor is the best: below it nothing is gained, the tie keeps 0.05
    t = tune_on_points([prob], [s], r1=3.0)
    assert t.threshold == DETECTION_THRESHOLDS[0] and t.n_detections == 7 and t.score == pytest.approx(1.0)

    prob, s = case([0.9] * 3 + [0.3] * 4)  # chosen above the floor: the grid alone
    t = tune_on_points([prob], [s], r1=3.0)
    assert DETECTION_THRESHOLDS[0] < t.threshold < 0.3 and t.n_detections == 7
    assert min(r["threshold"] for r in t.table) == DETECTION_THRESHOLDS[0]
