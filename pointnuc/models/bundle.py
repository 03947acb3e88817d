"""A trained model as a self-describing folder: its description (``pointnuc-model.json``) and weights.

Where each file lies: :mod:`pointnuc.models.layout`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pointnuc
from pointnuc.config import TrainConfig
from pointnuc.errors import ModelFormatError
from pointnuc.fileio import atomic_write, sha256_file, write_text_atomic
from pointnuc.models.calibration import ColourReference, Thresholds
from pointnuc.models.layout import MODEL_JSON, WEIGHT_FILES, ModelLayout
from pointnuc.models.net import UNet, build_network

FORMAT_NAME = "pointnuc-model"
FORMAT_VERSION = 1

log = logging.getLogger(__name__)

#: ModelInfo's thresholds when none are given: replaced by those training derives from the config
_FROM_CONFIG = Thresholds()


@dataclass
class ModelInfo:
    """What ``pointnuc-model.json`` holds."""

    config: TrainConfig
    norm_reference: ColourReference | None = None  #: the colour every image is normalised to (pointnuc.stain)
    #: tuned on held-back data; by default as training derives them from ``config`` (:meth:`Thresholds.for_config`)
    thresholds: Thresholds = _FROM_CONFIG
    provenance: dict[str, Any] = field(default_factory=dict)  #: data, seed, device, times, versions
    metrics: dict[str, Any] = field(default_factory=dict)  #: validation scores used for selection
    #: SHA-256 per weights file name as last saved; None: a folder from before checksums were recorded
    weights_sha256: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.thresholds is _FROM_CONFIG:
            self.thresholds = Thresholds.for_config(self.config)
        if self.norm_reference is not None and not isinstance(self.norm_reference, ColourReference):
            self.norm_reference = ColourReference.from_json(self.norm_reference)  # its mapping form, as JSON holds it

    @property
    def pixel_size_um(self) -> float:
        return self.config.data.pixel_size_um

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "pointnuc_version": pointnuc.__version__,
            "saved": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "pixel_size_um": self.pixel_size_um,
            "config": self.config.to_dict(),
            "norm_reference": None if self.norm_reference is None else self.norm_reference.to_json(),
            "thresholds": self.thresholds.to_json(),
            "metrics": self.metrics,
            "provenance": self.provenance,
        }


def save_info(root: Path, info: ModelInfo) -> None:
    """Write ``pointnuc-model.json`` atomically, with the SHA-256 of the weights files now in the folder.

    Checksums are taken here, from the files, so the description always vouches for the
    weights saved before it (hashing a ResNet-34's ~100 MB takes a fraction of a second).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    layout = ModelLayout(root)
    info.weights_sha256 = {n: sha256_file(root / n) for n in WEIGHT_FILES if (root / n).is_file()}
    doc = {**info.to_json(), "weights_sha256": info.weights_sha256}
    write_text_atomic(layout.meta, json.dumps(doc, indent=1, default=_json_default))


def load_info(root: Path) -> ModelInfo:
    """Read a model folder's description; unknown or damaged folders fail clearly."""
    layout = ModelLayout(Path(root))
    if not layout.root.is_dir():
        raise ModelFormatError(f"model folder not found: {layout.root}")
    if not layout.meta.is_file():
        raise ModelFormatError(f"{layout.root} is not a pointnuc model folder (no {MODEL_JSON})")
    try:
        d = json.loads(layout.meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFormatError(f"{layout.meta} is damaged ({err.__class__.__name__}: {err})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{layout.meta} is not a pointnuc model description")
    if not isinstance(d.get("config"), dict):
        raise ModelFormatError(f"{layout.meta} is damaged (no training configuration)")
    if d.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(
            f"{layout.root} has model format {d.get('format_version')!r}; this pointnuc "
            f"({pointnuc.__version__}) reads format {FORMAT_VERSION}"
        )
    config = TrainConfig.from_dict(d["config"])
    try:
        ref = ColourReference.from_json(d["norm_reference"]) if d.get("norm_reference") else None
        thresholds = Thresholds.from_json(d.get("thresholds"), config)
    except ModelFormatError as err:
        raise ModelFormatError(f"{layout.meta}: {err}") from None
    return ModelInfo(
        config=config,
        norm_reference=ref,
        thresholds=thresholds,
        provenance=dict(d.get("provenance") or {}),
        metrics=dict(d.get("metrics") or {}),
        weights_sha256=dict(d["weights_sha256"]) if isinstance(d.get("weights_sha256"), dict) else None,
    )


def save_weights(path: Path, model: torch.nn.Module) -> None:
    """Save a state_dict atomically (a crash never leaves a half-written file)."""
    state = model.state_dict()
    atomic_write(path, lambda f: torch.save(state, f))


def load_network(root: Path, which: str = "segmenter", info: ModelInfo | None = None) -> UNet:
    """Build the stage's network from the folder's config and load its weights (CPU)."""
    info = info or load_info(root)
    path = ModelLayout(Path(root)).segmenter if which == "segmenter" else ModelLayout(Path(root)).detector
    if not path.is_file():
        raise ModelFormatError(f"{root} has no {path.name}: was training finished?")
    check_weights(path, info)
    net = build_network(2 if which == "segmenter" else 1, info.config.encoder, pretrained=False)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as err:  # noqa: BLE001  (a damaged file or another architecture: both the user's to fix)
        raise ModelFormatError(f"{path} cannot be loaded ({err.__class__.__name__}); the file is damaged or from another model") from None
    return net


def check_weights(path: Path, info: ModelInfo) -> None:
    """A ModelFormatError when a weights file is not the one its model description recorded.

    A damaged file (flipped bytes) can still load as a network that finds nothing; only its
    checksum tells. A folder from before checksums were recorded, or a file saved after the
    description, is loaded with a warning.
    """
    recorded = (info.weights_sha256 or {}).get(path.name)
    if recorded is None:
        why = "an older model folder" if info.weights_sha256 is None else "saved after the model description"
        log.warning("%s has no recorded checksum (%s): loaded without checking that it is intact", path, why)
        return
    if sha256_file(path) != recorded:
        raise ModelFormatError(
            f"{path} is damaged: its SHA-256 differs from the one recorded in {MODEL_JSON}; "
            "copy the model folder again or retrain"
        )


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
