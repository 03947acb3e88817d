"""Colour deconvolution as QuPath does it: stain vectors, and optical densities per stain.

``pointnuc.measurements`` measures each nucleus's stains with these; ``pointnuc.stain`` (colour
normalisation for the networks) is a different use of the same idea.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stains:
    """Colour deconvolution stains as QuPath's ``ColorDeconvolutionStains``: up to three stain
    vectors (RGB optical densities, normalised to length 1; a missing third is the residual, the
    cross product of the first two) and the background (white) value of each channel."""

    name: str
    stain_names: tuple[str, ...]  #: one per vector, e.g. ("Hematoxylin", "Eosin", "Residual")
    vectors: tuple[tuple[float, float, float], ...]  #: three unit vectors, rows of the stain matrix
    residual: tuple[bool, ...]  #: which of the three is a residual (not measured)
    background: tuple[float, float, float] = (255.0, 255.0, 255.0)

    @classmethod
    def make(cls, name: str, stains: Sequence[tuple[str, Sequence[float]]],
             background: Sequence[float] = (255.0, 255.0, 255.0),
             residual: Sequence[bool] | None = None) -> Stains:
        """Stains from two or three (name, RGB vector) pairs; two get QuPath's residual third."""
        if len(stains) not in (2, 3):
            raise ValueError("colour deconvolution needs two or three stain vectors")
        vecs = [np.asarray(v, np.float64) for _, v in stains]
        names = [n for n, _ in stains]
        flags = list(residual) if residual is not None else [False] * len(stains)
        if len(stains) == 2:
            vecs.append(np.cross(vecs[0], vecs[1]))
            names.append("Residual")
            flags.append(True)
        unit = [tuple(float(x) for x in v / np.linalg.norm(v)) for v in vecs]
        return cls(name, tuple(names), tuple(unit), tuple(bool(f) for f in flags),  # type: ignore[arg-type]
                   tuple(float(b) for b in background))  # type: ignore[arg-type]

    @property
    def measured(self) -> tuple[str, ...]:
        """The channel names QuPath measures: ``"<stain> OD"`` of each stain that is not a residual."""
        return tuple(f"{n} OD" for n, r in zip(self.stain_names, self.residual) if not r)

    def deconvolve(self, rgb: np.ndarray) -> np.ndarray:
        """(N, k) float32 optical densities of the measured stains of (N, 3) uint8 pixels, as QuPath's
        ``ColorTransformer``: per channel ``max(0, -log10(max(v, 1) / background))`` (a look-up table),
        then times the inverse stain matrix."""
        luts = [np.maximum(0.0, -np.log10(np.maximum(np.arange(256), 1) / b)) for b in self.background]
        od = np.stack([lut[rgb[:, c]] for c, lut in enumerate(luts)], axis=1)
        inv = np.linalg.inv(np.asarray(self.vectors, np.float64))
        keep = [i for i, r in enumerate(self.residual) if not r]
        return (od @ inv[:, keep]).astype(np.float32)


#: QuPath 0.6.0's "H&E default" (``ColorDeconvolutionStains.makeDefaultColorDeconvolutionStains(H_E)``):
#: hematoxylin (0.65, 0.70, 0.29) from Ruifrok & Johnston, eosin (0.2159, 0.8012, 0.5581), a residual
#: third, white 255 in each channel. What QuPath sets for an image typed *Brightfield (H&E)*.
HE_DEFAULT = Stains.make("H&E default", [("Hematoxylin", (0.65, 0.70, 0.29)), ("Eosin", (0.2159, 0.8012, 0.5581))])
