"""One synthetic eye: the anatomy both modalities of a case share.

A case's fundus photograph and OCT B-scan are rendered from the same ``Eye``
so that they agree (laterality, where the fovea is, how thick the retina is,
how pigmented the fundus is). Each renderer draws the remaining detail from
its own generator, ``eye.rng(modality)``, so adding a field or a random draw to
one modality never changes the other's pixels.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

_MODALITY_STREAM = {"fundus": 1, "oct": 2, "lesions-fundus": 3, "lesions-oct": 4}


@dataclass(frozen=True)
class Eye:
    seed: int
    laterality: str  # "OD" (right eye: optic disc right of the fovea in the photo) or "OS"
    pigmentation: float  # 0 light .. 1 dark fundus
    fovea_offset: tuple[float, float]  # fovea shift from the standard position, fraction of width/height
    retinal_thickness: float  # scale of all retinal layer thicknesses, ~0.85..1.15
    foveal_pit_depth: float  # 0.6..1.0, how deep the pit is relative to the inner retina
    vessel_density: float  # 0.8..1.2, branching multiplier for the vessel tree
    age: float  # 0 young .. 1 old: fundus reflex / media haze, OCT signal fall-off

    @classmethod
    def sample(cls, seed: int) -> "Eye":
        rng = np.random.default_rng([seed, 0])
        return cls(
            seed=int(seed),
            laterality="OD" if rng.random() < 0.5 else "OS",
            pigmentation=float(rng.uniform(0.0, 1.0)),
            fovea_offset=(float(rng.normal(0, 0.015)), float(rng.normal(0, 0.015))),
            retinal_thickness=float(rng.uniform(0.85, 1.15)),
            foveal_pit_depth=float(rng.uniform(0.6, 1.0)),
            vessel_density=float(rng.uniform(0.8, 1.2)),
            age=float(rng.uniform(0.0, 1.0)),
        )

    def rng(self, stream: str) -> np.random.Generator:
        """An independent generator for one modality's (or its lesions') detail."""
        return np.random.default_rng([self.seed, _MODALITY_STREAM[stream]])


@dataclass
class Rendered:
    """What a phantom renderer returns for one image.

    image:   fundus (H, W, 3) uint8 RGB; OCT (H, W) uint8 grayscale.
    lesions: lesion kind (see ``mmrad.data.symptoms``) -> bool (H, W) mask, one
             non-empty mask for every kind that was asked for.
    anatomy: named bool (H, W) masks of normal anatomy the dataset writers
             need: fundus "fov" and "optic_disc"; OCT "retina" (ILM to RPE).
    """

    image: np.ndarray
    lesions: dict[str, np.ndarray]
    anatomy: dict[str, np.ndarray]


def check_request(modality: str, size: tuple[int, int], lesions: Sequence[str], style: str,
                  styles: Collection[str], kinds: Sequence[str]) -> tuple[int, int, list[str]]:
    """Validate one render request; returns (H, W, the requested kinds in ``kinds`` order).

    The canonical order makes a render independent of the order lesions are asked for.
    """
    if style not in styles:
        raise ValueError(f"unknown {modality} style {style!r}; expected one of {sorted(styles)}")
    requested = list(dict.fromkeys(lesions))
    for kind in requested:
        if kind not in kinds:
            raise ValueError(f"unknown {modality} lesion kind {kind!r}; expected one of {tuple(kinds)}")
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 16:
        raise ValueError(f"{modality} size {size!r} too small (at least 16x16)")
    return h, w, sorted(requested, key=list(kinds).index)
