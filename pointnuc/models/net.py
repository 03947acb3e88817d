"""U-Net with a ResNet encoder (paper: ResNet-34 conv layers, ImageNet-pretrained).

Where the encoder starts is decided once per training by :func:`resolve_encoder_start`:
a weights file the user gives, else torchvision's ImageNet file in torch's cache, else
(when online and not ``offline``) torchvision's download into that cache, else random
initialisation with one line saying so. The model folder records which start it had.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pointnuc.fileio import sha256_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED_ENCODERS = ("resnet34", "resnet18")


def imagenet_url(encoder: str) -> str:
    """torchvision's download address of the ImageNet weights of ``encoder`` (its file name carries a hash prefix)."""
    import torchvision

    enum = getattr(torchvision.models, encoder.replace("resnet", "ResNet") + "_Weights")
    return str(enum.IMAGENET1K_V1.url)


def _cache_file(url: str) -> Path:
    """Where torchvision keeps the file of ``url``: torch's hub cache, by the URL's file name."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def find_imagenet_weights(encoder: str, weights: Path | None = None) -> Path | None:
    """The local ImageNet weights file for ``encoder``: ``weights`` if given, else torchvision's cache."""
    if weights is not None:
        return Path(weights)
    if encoder not in PRETRAINED_ENCODERS:
        return None
    cand = _cache_file(imagenet_url(encoder))
    return cand if cand.is_file() else None


@dataclass(frozen=True)
class EncoderStart:
    """Where a training's encoder started; saved in the model's provenance."""

    kind: str  #: "imagenet" or "random"
    source: str  #: the file given, "torchvision cache", "downloaded", or why random
    file: Path | None = None  #: the weights file used (None: random initialisation)
    sha256: str | None = None  #: of that file

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["file"] = str(self.file) if self.file is not None else None
        return d


def _download(url: str, dest: Path, progress: bool) -> None:
    """torchvision's download (checks the hash prefix in the file name) to ``dest``, atomically."""
    name = dest.name
    prefix = name.rsplit("-", 1)[-1].split(".")[0] if "-" in name else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(dest), hash_prefix=prefix, progress=progress)


def resolve_encoder_start(
    encoder: str, weights: Path | None = None, *, offline: bool = False, progress: bool = True
) -> EncoderStart:
    """Find (or fetch once) the ImageNet weights for ``encoder``; never fails for want of a network.

    Order: ``weights`` (must exist), torch's cache, torchvision's download when not
    ``offline`` (one line says so; any failure falls back), random initialisation.
    """
    if encoder not in PRETRAINED_ENCODERS:
        return EncoderStart("random", f"the {encoder!r} encoder has no pretrained weights")
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            from pointnuc.errors import InputError

            raise InputError(f"encoder weights file not found: {weights}")
        return EncoderStart("imagenet", f"file given: {weights}", weights, sha256_file(weights))
    url = imagenet_url(encoder)
    cached = _cache_file(url)
    if cached.is_file():
        return EncoderStart("imagenet", "torchvision cache", cached, sha256_file(cached))
    if offline:
        log.warning("--offline: no ImageNet weights for %s in %s; the encoder starts from random initialisation",
                    encoder, cached.parent)
        return EncoderStart("random", "offline, none cached")
    log.warning("downloading torchvision's ImageNet weights for %s into %s (once; --offline skips this)",
                encoder, cached.parent)
    try:
        _download(url, cached, progress)
    except Exception as err:  # noqa: BLE001 (no network, proxy, hash mismatch: training goes on from random weights)
        log.warning("could not download the ImageNet weights (%s); the encoder starts from random initialisation",
                    str(err).splitlines()[0] if str(err) else err.__class__.__name__)
        return EncoderStart("random", f"download failed: {err.__class__.__name__}")
    return EncoderStart("imagenet", f"downloaded from {url}", cached, sha256_file(cached))


class _Up(nn.Module):
    def __init__(self, c_in: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c_in + c_skip, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = _upsample(x, skip.shape[-2:])
        return self.conv(torch.cat([x, skip.to(x.dtype)], dim=1))


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize in ``x``'s own dtype: under autocast (bf16 on the CPU, fp16 on CUDA) the features are
    not cast to float32 and back around it and the concatenation after it (0.17 -> 0.15 s for the ``slim``
    U-Net on a 1024-px tile, 2 CPU threads, bf16). Inference on the CPU doubles the size by :func:`_double`."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        if x.device.type == "cpu" and not torch.is_grad_enabled() and tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return _double(x)
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _double(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)`` as one depthwise transposed
    convolution (each output pixel 3/4 of its nearer and 1/4 of its farther input row and column, the edge
    repeated): the same values to float rounding, and 1.3-1.8x faster on the CPU, where the decoder's last
    resize (12 channels to the whole tile) took a quarter of the ``slim`` U-Net's time."""
    c = x.shape[1]
    k = torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=x.dtype)
    w = (k[:, None] * k[None, :]).expand(c, 1, 4, 4).contiguous()
    if x.is_contiguous(memory_format=torch.channels_last):
        w = w.to(memory_format=torch.channels_last)
    return F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), w, stride=2, padding=3, groups=c)


def _tiny_encoder() -> tuple[nn.ModuleList, list[int]]:
    """A small 5-level encoder with ResNet's strides, for tests (seconds on a CPU)."""

    def block(ci: int, co: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(ci, co, 3, stride, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True))

    chans = [8, 8, 16, 16, 32]
    stages = nn.ModuleList(
        [block(3, 8, 2), nn.Sequential(nn.MaxPool2d(2), block(8, 8, 1)), block(8, 16, 2), block(16, 16, 2), block(16, 32, 2)]
    )
    return stages, chans


#: Compact encoders for CPU inference (no pretrained weights): ResNet's BasicBlocks and five stride-2
#: stages, narrower and with a 3x3 stem. name -> (channels of the five stages, blocks in stages 2-5).
SLIM_ENCODERS: dict[str, tuple[tuple[int, int, int, int, int], tuple[int, int, int, int]]] = {
    "slim18": ((32, 32, 64, 128, 256), (2, 2, 2, 2)),  # ResNet-18's layout at half its width
    "slim": ((24, 24, 48, 96, 192), (1, 2, 2, 1)),
}


class BasicBlock(nn.Module):
    """ResNet's basic block, as torchvision's (the same parameter names, so the same state dicts): defined here so
    that a compact model loads without importing torchvision (1.5 s of ``segment``'s start on a 2-core VM)."""

    def __init__(self, ci: int, co: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ci, co, 3, stride, 1, bias=False)
        self.bn1: nn.Module = nn.BatchNorm2d(co)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(co, co, 3, 1, 1, bias=False)
        self.bn2: nn.Module = nn.BatchNorm2d(co)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _slim_encoder(encoder: str) -> tuple[nn.ModuleList, list[int]]:
    """A narrow ResNet (:data:`SLIM_ENCODERS`): a 3x3 stride-2 stem, then BasicBlock stages at /4 ... /32."""
    chans, blocks = SLIM_ENCODERS[encoder]

    def layer(ci: int, co: int, n: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or ci != co:
            down = nn.Sequential(nn.Conv2d(ci, co, 1, stride, bias=False), nn.BatchNorm2d(co))
        return nn.Sequential(BasicBlock(ci, co, stride, down), *[BasicBlock(co, co) for _ in range(n - 1)])

    stem = nn.Sequential(nn.Conv2d(3, chans[0], 3, 2, 1, bias=False), nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True))
    stages = nn.ModuleList(
        [
            stem,  # /2
            nn.Sequential(nn.MaxPool2d(3, 2, 1), layer(chans[0], chans[1], blocks[0], 1)),  # /4
            layer(chans[1], chans[2], blocks[1], 2),  # /8
            layer(chans[2], chans[3], blocks[2], 2),  # /16
            layer(chans[3], chans[4], blocks[3], 2),  # /32
        ]
    )
    return stages, list(chans)


def _resnet_encoder(encoder: str, weights_file: Path | None) -> tuple[nn.ModuleList, list[int]]:
    import torchvision

    net = getattr(torchvision.models, encoder)(weights=None)
    if weights_file is not None:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    stages = nn.ModuleList(
        [
            nn.Sequential(net.conv1, net.bn1, net.relu),  # /2, 64
            nn.Sequential(net.maxpool, net.layer1),  # /4, 64
            net.layer2,  # /8, 128
            net.layer3,  # /16, 256
            net.layer4,  # /32, 512
        ]
    )
    return stages, [64, 64, 128, 256, 512]


class UNet(nn.Module):
    """U-Net: ResNet encoder, 4 upsampling blocks, full-resolution head; returns logits."""

    def __init__(self, out_channels: int, encoder: str = "resnet34", weights_file: Path | None = None) -> None:
        super().__init__()
        self.encoder_name = encoder
        if encoder == "tiny":
            self.stages, ch = _tiny_encoder()
        elif encoder in SLIM_ENCODERS:
            self.stages, ch = _slim_encoder(encoder)
        else:
            self.stages, ch = _resnet_encoder(encoder, weights_file)
        dec = [max(c // 2, 8) for c in ch]
        self.up4 = _Up(ch[4], ch[3], dec[3])
        self.up3 = _Up(dec[3], ch[2], dec[2])
        self.up2 = _Up(dec[2], ch[1], dec[1])
        self.up1 = _Up(dec[1], ch[0], dec[0])
        self.head = nn.Sequential(
            nn.Conv2d(dec[0] + 3, dec[0], 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(dec[0], out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        h = x
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        d = self.up4(feats[4], feats[3])
        d = self.up3(d, feats[2])
        d = self.up2(d, feats[1])
        d = self.up1(d, feats[0])
        d = _upsample(d, x.shape[-2:])
        return self.head(torch.cat([d, x.to(d.dtype)], dim=1))


def build_network(out_channels: int, encoder: str = "resnet34", weights: Path | None = None, *, pretrained: bool = True) -> UNet:
    """The U-Net, with ImageNet encoder weights from ``weights`` or torch's cache when ``pretrained``.

    ``pretrained=False`` skips the lookup (used when weights will be loaded from a model folder).
    What to download, and the line that says the encoder starts at random, belong to
    :func:`resolve_encoder_start`, called once per training.
    """
    weights_file = find_imagenet_weights(encoder, weights) if (pretrained and encoder in PRETRAINED_ENCODERS) else None
    if pretrained and encoder in PRETRAINED_ENCODERS and weights_file is None:
        log.debug("no ImageNet weights for %s found locally; random initialisation", encoder)
    if weights_file is not None and not weights_file.is_file():
        from pointnuc.errors import InputError

        raise InputError(f"encoder weights file not found: {weights_file}")
    return UNet(out_channels, encoder, weights_file)


def transfer_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy into ``model`` every tensor of ``state`` whose name and shape match, zero the rest; return the rest's names.

    Used to start the segmenter from the detector: the two U-Nets differ only in the
    number of output channels, so everything but the last layer carries over. The last
    layer starts at zero (every logit 0), so its first, large gradients do not reach and
    shake the features carried over (with a random last layer the first epoch's loss was ×10).
    """
    own = model.state_dict()
    shared = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    rest = sorted(set(own) - set(shared))
    model.load_state_dict({**shared, **{k: torch.zeros_like(own[k]) for k in rest}})
    return rest


def preprocess(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB (B, H, W, 3) or (H, W, 3) -> float (B, 3, H, W), ImageNet-normalised."""
    t = torch.as_tensor(images)
    if t.ndim == 3:
        t = t[None]
    t = t.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=t.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=t.device).view(1, 3, 1, 1)
    return (t - mean) / std


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` (in evaluation mode, changed in place) with every batch norm that follows a convolution folded
    into it: the same outputs (to float rounding), one pass less over each feature map (about 6 % of the
    ``slim`` U-Net's CPU time). For inference only: the folded network cannot be trained on."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            for k in range(len(m) - 1):
                conv, bn = m[k], m[k + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    m[k], m[k + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
        elif hasattr(m, "conv1") and hasattr(m, "bn1"):  # a ResNet block (ours, torchvision's BasicBlock, Bottleneck)
            for i in (1, 2, 3):
                c, b = getattr(m, f"conv{i}", None), getattr(m, f"bn{i}", None)
                if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    setattr(m, f"conv{i}", fuse_conv_bn_eval(c, b))
                    setattr(m, f"bn{i}", nn.Identity())
    return model
