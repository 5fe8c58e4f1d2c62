"""Reading a prepared dataset (``mmrad.data.prepare``'s manifest and cache) as arrays, split by split.

* ``load_split``: the images and bit masks of one split, modality by modality,
  aligned by case (what evaluation, the baselines and the MLflow input example
  read);
* ``load_training_images``: the healthy training images per modality (what
  training reads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mmrad.core.errors import DataError
from mmrad.data.prepare import read_manifest
from mmrad.data.symptoms import MODALITIES


@dataclass
class SplitData:
    """A prepared split, modality by modality, aligned by case."""

    dataset: str
    case_ids: list[str]
    labels: np.ndarray  # (N,) case level
    images: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (N, S, S, 3) uint8
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (N, S, S) uint16 bit masks


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def load_split(prepared: str | Path, split: str = "test") -> SplitData:
    """Images and bit masks of one split; paired datasets give both modalities per case."""
    prepared = Path(prepared)
    frame = read_manifest(prepared)
    frame = frame[frame.split == split]
    if frame.empty:
        raise DataError(prepared / "manifest.parquet", f"split '{split}' is empty")
    modalities = sorted(frame.modality.unique(), key=MODALITIES.index)
    cases = sorted(frame.case_id.unique())
    by_key = frame.set_index(["case_id", "modality"])
    if len(by_key) != len(cases) * len(modalities):
        raise DataError(prepared / "manifest.parquet", "test cases must all have the same modalities")
    labels = frame.groupby("case_id").label.first().loc[cases].to_numpy(np.int64)
    data = SplitData(str(frame.dataset.iloc[0]), cases, labels)
    for modality in modalities:
        rows = [by_key.loc[(c, modality)] for c in cases]
        data.images[modality] = np.stack([_rgb(prepared / r.cache_image) for r in rows])
        size = data.images[modality].shape[1:3]
        data.masks[modality] = np.stack([
            np.zeros(size, np.uint16) if not isinstance(r.cache_mask, str)
            else np.asarray(Image.open(prepared / r.cache_mask), dtype=np.uint16) for r in rows])
    return data


def load_training_images(prepared: str | Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Healthy training images of a prepared dataset, per modality: {modality: (N, S, S, 3) uint8}.

    A paired dataset (MMR) gives both modalities of every case, aligned by
    case; a single-modal one (IDRiD, RESC) gives its one modality (Fig. 5b).
    """
    prepared = Path(prepared)
    frame = read_manifest(prepared)
    train = frame[(frame.split == "train") & (frame.label == 0)]
    modalities = [m for m in MODALITIES if m in set(train.modality)]
    by_case = {cid: group.set_index("modality") for cid, group in train.groupby("case_id", sort=True)}
    incomplete = [cid for cid, g in by_case.items() if set(g.index) != set(modalities)]
    if not by_case or incomplete:
        raise DataError(prepared / "manifest.parquet", "training needs healthy cases with every modality",
                        f"{len(by_case)} cases, incomplete: {incomplete[:5]}")
    images = {m: np.stack([_rgb(prepared / g.loc[m, "cache_image"]) for g in by_case.values()]) for m in modalities}
    return images, list(by_case)
