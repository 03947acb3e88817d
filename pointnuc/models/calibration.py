"""What training measures besides the weights, as a model folder records it: the thresholds tuned on
held-back data and the colour reference every image is normalised to.

Torch-free: whole-slide post-processing workers read the thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from pointnuc.errors import ModelFormatError

if TYPE_CHECKING:
    from pointnuc.config import TrainConfig


@dataclass(frozen=True)
class Thresholds:
    """How probability maps become detections (stage 1) and nuclei (stage 2), in working pixels.

    These defaults are the only ones: what any reader assumes where a model records no value
    and its configuration says nothing either (:meth:`for_config`).
    """

    detection_prob: float = 0.5  #: stage 1: detector probability a detection rises above
    detection_min_area_px: float = 0.0  #: stage 1: smallest detection component (working px²)
    prob: float = 0.5  #: stage 2: nucleus probability threshold
    min_area_px: float = 5.0  #: stage 2: smaller instances are dropped (working px²)
    h_px: float = 1.0  #: stage 2 watershed: depth of a distance maximum that seeds its own nucleus (working px)

    @classmethod
    def for_config(cls, config: TrainConfig, **tuned: float) -> Thresholds:
        """The ``tuned`` values, the rest as training derives them from ``config`` (minimum area and
        watershed depth from their µm at the working pixel size)."""
        seg, px = config.segmentation, config.data.pixel_size_um
        return cls(**{"min_area_px": seg.min_area_um2 / px**2, "h_px": seg.watershed_h_um / px, **tuned})

    @classmethod
    def from_json(cls, doc: Any, config: TrainConfig | None = None) -> Thresholds:
        """The ``thresholds`` of ``pointnuc-model.json``; values it lacks (older folders) as
        :meth:`for_config` gives them, or the defaults without ``config``. Unknown keys are ignored."""
        if doc is not None and not isinstance(doc, Mapping):
            raise ModelFormatError("the model's thresholds are damaged (not a mapping)")
        names = {f.name for f in fields(cls)}
        try:
            given = {k: float(v) for k, v in (doc or {}).items() if k in names}
        except (TypeError, ValueError):
            raise ModelFormatError(f"the model's thresholds are damaged ({dict(doc or {})})") from None
        if not all(math.isfinite(v) for v in given.values()):
            raise ModelFormatError(f"the model's thresholds are damaged ({given})")
        return cls.for_config(config, **given) if config is not None else replace(cls(), **given)

    def to_json(self) -> dict[str, float]:
        return asdict(self)


_REFERENCE_KEYS = ("mean", "std", "stain")


@dataclass(frozen=True)
class ColourReference(Mapping[str, list[float]]):
    """The colour target of a model (:mod:`pointnuc.stain`): the training images' mean CIE LAB mean and
    std (Reinhard), and their mean stain statistics after Reinhard (None without the stain step).

    Also a read-only mapping (``ref["mean"]``, ``ref.get("stain")``), the form :mod:`pointnuc.stain`
    reads and ``pointnuc-model.json`` holds.
    """

    mean: tuple[float, ...]  #: L, a, b
    std: tuple[float, ...]  #: L, a, b
    stain: tuple[float, ...] | None = None  #: H p50, H p99, E p50, E p99 (optical density)

    @classmethod
    def from_json(cls, doc: Any) -> ColourReference:
        """From its mapping form (what :func:`pointnuc.stain.colour_reference` returns and the model JSON holds)."""
        try:
            mean, std = (tuple(float(v) for v in doc[k]) for k in ("mean", "std"))
            stain = tuple(float(v) for v in doc["stain"]) if doc.get("stain") else None
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ModelFormatError("the model's colour reference is damaged (needs 'mean' and 'std' lists)") from None
        if len(mean) != 3 or len(std) != 3 or (stain is not None and len(stain) != 4):
            raise ModelFormatError("the model's colour reference is damaged (3 LAB means and stds, 4 stain statistics)")
        return cls(mean, std, stain)

    def to_json(self) -> dict[str, list[float]]:
        return dict(self.items())

    def __getitem__(self, key: str) -> list[float]:
        value = getattr(self, key) if key in _REFERENCE_KEYS else None
        if value is None:
            raise KeyError(key)
        return list(value)

    def __iter__(self) -> Iterator[str]:
        return (k for k in _REFERENCE_KEYS if getattr(self, k) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)
