"""The compact CPU encoders (issue #28): their size, that they train, and that a model with one loads back."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from synth import label_points, render_nuclei

from pointnuc.config import ENCODERS, profile_config
from pointnuc.models.net import SLIM_ENCODERS, build_network, resolve_encoder_start


def _macs(net: torch.nn.Module, size: int) -> float:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    return fc.get_total_flops() / 2


def test_slim_encoders_are_known_and_at_least_5x_cheaper_than_resnet34() -> None:
    assert set(SLIM_ENCODERS) <= set(ENCODERS)
    ref = _macs(build_network(2, "resnet34", pretrained=False).eval(), 128)
    for name in SLIM_ENCODERS:
        net = build_network(2, name, pretrained=False).eval()
        assert ref / _macs(net, 128) >= 5.0, name
        # any window that is a multiple of 32 (tiles are), also not square: logits at full size
        assert net(torch.zeros(1, 3, 96, 160)).shape == (1, 2, 96, 160)
        assert resolve_encoder_start(name, offline=True).kind == "random"  # no ImageNet weights to look for


def test_cpu_profile_is_quick_with_the_slim_encoder() -> None:
    cpu, quick = profile_config("cpu"), profile_config("quick")
    assert cpu.encoder == "slim"
    assert cpu.replace(encoder=quick.encoder, profile="quick") == quick


@pytest.mark.parametrize("name", sorted(SLIM_ENCODERS))
def test_slim_encoder_trains_a_step(name: str) -> None:
    torch.manual_seed(0)
    net = build_network(2, name, pretrained=False).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.randn(2, 3, 64, 64), (torch.rand(2, 64, 64) > 0.5).long()
    before = [p.detach().clone() for p in net.parameters()]
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_segmenter_with_slim_encoder_trains_and_loads_back(tmp_path: Path) -> None:
    from pointnuc.models.bundle import ModelLayout
    from pointnuc.train.samples import TrainingImage
    from pointnuc.train.segment import train_segmenter

    torch.manual_seed(0)
    torch.set_num_threads(1)
    img, gt = render_nuclei((96, 96), 8, 7.0, seed=4)
    pts = label_points(gt)
    sample = TrainingImage("s", "s", img, pts[:2], pts[5:], np.ones(gt.shape, bool))
    cfg = profile_config("tiny", encoder="slim", **{"segmentation.epochs": 1, "segmentation.crf_epochs": 0})
    res = train_segmenter([sample], {"s": pts[:5]}, cfg, ModelLayout(tmp_path / "m"), device="cpu", progress=False)
    assert res.model.encoder_name == "slim" and len(res.history["segmentation"].losses) == 1
    again = build_network(2, "slim", pretrained=False)
    again.load_state_dict(res.model.state_dict())  # same architecture, every tensor fits


@pytest.mark.parametrize("encoder", ["slim", "resnet18"])
def test_folding_batch_norms_keeps_the_outputs(encoder: str) -> None:
    """Batch norms folded into their convolutions (segment's copy of the network): the same logits, and no
    batch norm left."""
    from pointnuc.models.net import fuse_batchnorm

    torch.manual_seed(0)
    net = build_network(2, encoder, pretrained=False)
    for m in net.modules():  # running statistics and affine weights that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        before = net(x)
        fused = fuse_batchnorm(net)
        after = fused(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_doubling_on_the_cpu_is_bilinear_interpolation() -> None:
    """Inference on the CPU doubles the decoder's features by a transposed convolution (:func:`_double`): the
    values ``F.interpolate`` gives, at the edges too, in either memory format, odd and tiny sizes."""
    import torch.nn.functional as F

    from pointnuc.models.net import _upsample

    gen = torch.Generator().manual_seed(0)
    for shape in [(1, 12, 37, 52), (2, 5, 8, 8), (1, 3, 1, 1), (1, 4, 2, 3)]:
        x = torch.rand(*shape, generator=gen)
        ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        with torch.inference_mode():
            for y in (x, x.to(memory_format=torch.channels_last)):
                out = _upsample(y, ref.shape[-2:])
                assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-6), shape


def test_slim_blocks_are_torchvision_basic_blocks() -> None:
    """The compact encoders' own BasicBlock (no torchvision import when a model loads) has torchvision's
    parameter names and computes what torchvision's does: models saved before load and give the same output."""
    import sys as _sys

    from torchvision.models.resnet import BasicBlock as TorchvisionBlock

    import pointnuc.models.net as net_module

    ours = build_network(2, "slim", pretrained=False).eval()
    saved = net_module.BasicBlock
    try:
        net_module.BasicBlock = TorchvisionBlock  # type: ignore[misc,assignment]
        theirs = build_network(2, "slim", pretrained=False).eval()
    finally:
        net_module.BasicBlock = saved  # type: ignore[misc]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    assert "torchvision" in _sys.modules  # (imported by this test; a segment of a slim model does not)
