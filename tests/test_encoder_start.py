"""Where the encoder starts: a given file, torch's cache, torchvision's download, or random.

No network is used: the download address is replaced by a local ``file:`` URL whose
name carries the file's own hash prefix, as torchvision's names do.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch

from pointnuc.errors import InputError
from pointnuc.models import net


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache for the test."""
    d = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(d))
    return d


def _served_weights(tmp_path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """A resnet18 state dict saved under a torchvision-style name; its file URL and the state."""
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    src = tmp_path / "served" / "tmp.pth"
    src.parent.mkdir()
    torch.save(state, src)
    prefix = hashlib.sha256(src.read_bytes()).hexdigest()[:8]
    named = src.with_name(f"resnet18-{prefix}.pth")
    src.rename(named)
    return named.as_uri(), state


def test_download_goes_to_torch_cache_once_and_is_used(hub: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    url, state = _served_weights(tmp_path)
    monkeypatch.setattr(net, "imagenet_url", lambda encoder: url)
    with caplog.at_level(logging.WARNING, logger="pointnuc"):
        start = net.resolve_encoder_start("resnet18", progress=False)
    assert start.kind == "imagenet" and start.source.startswith("downloaded")
    assert start.file == hub / "checkpoints" / Path(url).name and start.file.is_file()
    assert start.sha256 == hashlib.sha256(start.file.read_bytes()).hexdigest()
    assert sum("downloading" in r.message for r in caplog.records) == 1
    # the network is built from exactly those weights
    model = net.build_network(1, "resnet18", start.file)
    assert torch.equal(model.stages[0][0].weight, state["conv1.weight"])
    # a second training finds the cache and downloads nothing
    monkeypatch.setattr(net, "_download", lambda *a, **k: pytest.fail("downloaded twice"))
    again = net.resolve_encoder_start("resnet18", progress=False)
    assert again.kind == "imagenet" and again.source == "torchvision cache" and again.file == start.file


def test_offline_never_downloads(hub: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(net, "_download", lambda *a, **k: pytest.fail("--offline downloaded"))
    with caplog.at_level(logging.WARNING, logger="pointnuc"):
        start = net.resolve_encoder_start("resnet34", offline=True)
    assert start.kind == "random" and start.file is None
    assert [r.message for r in caplog.records if "random initialisation" in r.message]


def test_no_network_falls_back_to_random_in_one_line(hub: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(net, "imagenet_url", lambda encoder: (tmp_path / "nowhere" / "resnet34-b627a593.pth").as_uri())
    with caplog.at_level(logging.WARNING, logger="pointnuc"):
        start = net.resolve_encoder_start("resnet34", progress=False)
    assert start.kind == "random" and start.source.startswith("download failed")
    fallback = [r.message for r in caplog.records if "could not download" in r.message]
    assert len(fallback) == 1 and "\n" not in fallback[0]
    assert not list((hub / "checkpoints").glob("*.pth")), "a failed download must leave nothing in the cache"


def test_a_damaged_download_is_not_kept(hub: Path, tmp_path: Path, monkeypatch) -> None:
    url, _ = _served_weights(tmp_path)
    served = Path(url.removeprefix("file://"))
    served.write_bytes(served.read_bytes()[:-10] + b"0123456789")  # the name's hash prefix no longer matches
    monkeypatch.setattr(net, "imagenet_url", lambda encoder: served.as_uri())
    start = net.resolve_encoder_start("resnet18", progress=False)
    assert start.kind == "random"
    assert not (hub / "checkpoints" / served.name).exists()


def test_given_file_wins_and_a_missing_one_is_an_error(hub: Path, tmp_path: Path, monkeypatch) -> None:
    url, _ = _served_weights(tmp_path)
    monkeypatch.setattr(net, "_download", lambda *a, **k: pytest.fail("downloaded despite --weights"))
    given = Path(url.removeprefix("file://"))
    start = net.resolve_encoder_start("resnet18", given)
    assert (start.kind, start.file) == ("imagenet", given) and start.source.startswith("file given")
    with pytest.raises(InputError, match="not found"):
        net.resolve_encoder_start("resnet18", tmp_path / "missing.pth")


def test_tiny_encoder_starts_random_without_looking(monkeypatch) -> None:
    monkeypatch.setattr(net, "_download", lambda *a, **k: pytest.fail("looked for tiny weights"))
    start = net.resolve_encoder_start("tiny")
    assert start.kind == "random" and start.file is None
    assert start.to_json()["file"] is None
