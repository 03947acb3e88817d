"""Training patches: random patch -> random crop, with synchronised augmentation.

Both stages use :class:`PatchDataset`. Each training image comes with a float32 target
array ``(K, H, W)`` (any number of channels). **Ignore convention:** a target value
``< 0`` (we write :data:`IGNORE` = -1) means "no label here"; losses skip those pixels.
Pixels outside ``TrainingImage.valid``, and pixels that fall outside the image after
cropping/augmentation (padding), always come back as :data:`IGNORE`.

One item = one crop of ``crop_size`` from a random ``patch_size`` patch (the paper cuts
16 patches of 250 px per image per epoch and feeds random 224 px crops). Augmentation is
one affine map per item — flip, 90° rotation, a small free rotation, scale and shear —
applied to the image (bilinear), to "label-like" target channels (nearest) and to
"continuous" ones (bilinear), so image and targets stay aligned to the pixel; then the
image alone gets a stain jitter (``DataConfig.stain_jitter``; targets keep the original
colours, which the CRF loss reads).
Randomness comes from ``(seed, epoch, index)``, so a run is reproducible whatever the
number of DataLoader workers, and resuming at epoch e reproduces epoch e.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi

from pointnuc.config import DataConfig
from pointnuc.errors import InputError
from pointnuc.stain import stain_jitter
from pointnuc.train.samples import TrainingImage

IGNORE: float = -1.0  #: target value of unlabeled pixels (any value < 0 is ignored)


@dataclass(frozen=True)
class Augment:
    """Ranges of the random affine augmentation (all off: plain crops)."""

    flips: bool = True  #: random horizontal/vertical flip and 90° rotations
    rotation_deg: float = 15.0  #: extra free rotation, uniform in ±rotation_deg
    scale: tuple[float, float] = (0.85, 1.18)  #: isotropic scale, log-uniform in this range
    shear: float = 0.08  #: shear factor, uniform in ±shear (the "affine" of the paper)
    stain: float = 0.0  #: stain jitter strength (:func:`pointnuc.stain.stain_jitter`; 0 = off)

    @staticmethod
    def none() -> Augment:
        return Augment(flips=False, rotation_deg=0.0, scale=(1.0, 1.0), shear=0.0, stain=0.0)


def random_affine(rng: np.random.Generator, aug: Augment) -> np.ndarray:
    """A random 2x2 matrix mapping crop offsets (dy, dx) to source offsets."""
    a = np.eye(2)
    if aug.flips:
        k = int(rng.integers(4))
        c, s = [1, 0, -1, 0][k], [0, 1, 0, -1][k]
        a = np.array([[c, -s], [s, c]], float) @ a
        if rng.random() < 0.5:
            a = np.array([[1.0, 0.0], [0.0, -1.0]]) @ a
    if aug.rotation_deg > 0:
        t = np.deg2rad(rng.uniform(-aug.rotation_deg, aug.rotation_deg))
        a = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) @ a
    lo, hi = aug.scale
    if hi > lo:
        a = a * float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    if aug.shear > 0:
        a = np.array([[1.0, rng.uniform(-aug.shear, aug.shear)], [0.0, 1.0]]) @ a
    return a


def warp_crop(
    image: np.ndarray,
    targets: np.ndarray,
    valid: np.ndarray,
    centre_yx: tuple[float, float],
    matrix: np.ndarray,
    size: int,
    nearest: Sequence[bool],
) -> tuple[np.ndarray, np.ndarray]:
    """Sample a ``size``² crop centred at ``centre_yx`` (pixel-index coords) through ``matrix``.

    Returns (uint8 image (size, size, 3), float32 targets (K, size, size)); targets are
    IGNORE outside the image and outside ``valid``.
    """
    h, w = image.shape[:2]
    off = np.arange(size, dtype=np.float64) + 0.5 - size / 2.0
    dy, dx = np.meshgrid(off, off, indexing="ij")
    sy = centre_yx[0] + matrix[0, 0] * dy + matrix[0, 1] * dx
    sx = centre_yx[1] + matrix[1, 0] * dy + matrix[1, 1] * dx
    k = targets.shape[0]
    if np.allclose(matrix, np.eye(2)) and float(centre_yx[0] - (size / 2.0 - 0.5)).is_integer() and float(
        centre_yx[1] - (size / 2.0 - 0.5)
    ).is_integer():
        return _plain_crop(image, targets, valid, round(sy[0, 0]), round(sx[0, 0]), size)
    iy = np.rint(sy).astype(np.intp)
    ix = np.rint(sx).astype(np.intp)
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    iyc, ixc = np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1)
    keep = inside & valid[iyc, ixc]
    coords = np.stack([sy, sx])
    img = np.empty((size, size, 3), np.uint8)
    for c in range(3):
        v = ndi.map_coordinates(image[..., c], coords, order=1, mode="mirror", prefilter=False)
        img[..., c] = np.clip(np.rint(v), 0, 255).astype(np.uint8)
    out = np.empty((k, size, size), np.float32)
    for c in range(k):
        t = targets[c]
        near = t[iyc, ixc]
        if nearest[c]:
            out[c] = near
        else:
            v = ndi.map_coordinates(np.maximum(t, 0.0), coords, order=1, mode="nearest", prefilter=False)
            out[c] = np.where(near < 0, IGNORE, v)
    out[:, ~keep] = IGNORE
    return img, out


def _plain_crop(
    image: np.ndarray, targets: np.ndarray, valid: np.ndarray, y0: int, x0: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Crop without resampling; outside the image: reflected image, IGNORE targets."""
    h, w = image.shape[:2]
    img = np.zeros((size, size, 3), np.uint8)
    out = np.full((targets.shape[0], size, size), IGNORE, np.float32)
    ya, yb, xa, xb = max(y0, 0), min(y0 + size, h), max(x0, 0), min(x0 + size, w)
    if ya < yb and xa < xb:
        sl = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
        img[sl] = image[ya:yb, xa:xb]
        t = targets[:, ya:yb, xa:xb].copy()
        t[:, ~valid[ya:yb, xa:xb]] = IGNORE
        out[(slice(None),) + sl] = t
    return img, out


class PatchDataset(torch.utils.data.Dataset):
    """Random augmented crops over training images and their target arrays.

    ``len = len(samples) * patches_per_image``; item ``i`` comes from image
    ``i // patches_per_image``. Yields ``(uint8 image (3, c, c), float32 targets (K, c, c))``
    with ``c = crop_size``; :func:`pointnuc.train.fit.fit` normalises uint8 images on the device.
    ``nearest[k]`` (default all False): resample channel k with nearest neighbour (label-like)
    instead of bilinear (continuous). Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        samples: Sequence[TrainingImage],
        targets: Sequence[np.ndarray],
        data: DataConfig,
        *,
        nearest: Sequence[bool] | None = None,
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        if len(samples) == 0:
            raise InputError("no training images were given")
        if len(samples) != len(targets):
            raise InputError("need one target array per training image")
        self.images = [s.image for s in samples]
        self.valid = [s.valid for s in samples]
        self.targets = [np.asarray(t, np.float32) for t in targets]
        for s, t in zip(samples, self.targets):
            if t.ndim != 3 or t.shape[1:] != s.image.shape[:2]:
                raise InputError(f"targets of {s.name} have shape {t.shape}; expected (K, {s.image.shape[0]}, {s.image.shape[1]})")
            if s.valid.shape != s.image.shape[:2]:
                raise InputError(f"valid mask of {s.name} does not match its image")
        k = self.targets[0].shape[0]
        if any(t.shape[0] != k for t in self.targets):
            raise InputError("all target arrays need the same number of channels")
        self.nearest = tuple(nearest) if nearest is not None else (False,) * k
        if len(self.nearest) != k:
            raise InputError(f"nearest has {len(self.nearest)} entries for {k} target channels")
        self.data = data
        self.augment = augment if augment is not None else Augment(stain=data.stain_jitter)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Fix the random stream of this epoch (same epoch -> same crops)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images) * self.data.patches_per_image

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index`` of the current epoch, or of epoch ``e`` for ``index = (e, i)``."""
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        rng = np.random.default_rng((self.seed, int(epoch), int(index)))
        j = index // self.data.patches_per_image
        image, valid, targets = self.images[j], self.valid[j], self.targets[j]
        h, w = image.shape[:2]
        p, c = self.data.patch_size, self.data.crop_size
        for _attempt in range(8):
            # patch top-left: anywhere it fits; an image smaller than a patch is padded
            py = int(rng.integers(min(0, h - p), max(0, h - p) + 1))
            px = int(rng.integers(min(0, w - p), max(0, w - p) + 1))
            oy, ox = int(rng.integers(0, p - c + 1)), int(rng.integers(0, p - c + 1))
            centre = (py + oy + c / 2.0 - 0.5, px + ox + c / 2.0 - 0.5)
            matrix = random_affine(rng, self.augment)
            img, tgt = warp_crop(image, targets, valid, centre, matrix, c, self.nearest)
            if (tgt >= 0).any():
                break
        img = stain_jitter(img, rng, self.augment.stain)
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.from_numpy(tgt)
