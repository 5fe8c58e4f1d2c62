"""What every dataset reader returns, and folder look-ups that forgive case and spaces."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmrad.core.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image of one case, as found on disk (nothing decoded yet).

    ``label`` is the case-level truth (0 normal, 1 anomalous): in MMR a case is
    anomalous when either modality shows a symptom, so an anomalous case can
    have one modality with no lesion. ``mask_files`` are the annotation files
    (LabelMe JSON, IDRiD .tif, RESC .png); empty means no lesion in this image.
    ``mask_classes`` gives, for IDRiD, the class id of each mask file.
    """

    dataset: str
    case_id: str
    modality: str
    split: str
    label: int
    image: Path
    mask_files: tuple[Path, ...] = ()
    mask_classes: tuple[int, ...] = field(default=())


def child(folder: Path, name: str, required: bool = True) -> Path | None:
    """The entry of ``folder`` called ``name``, ignoring case and surrounding spaces.

    Real downloads differ in letter case ("Ungood" / "ungood", "Train" /
    "train") and sometimes carry trailing spaces in folder names.
    """
    wanted = name.strip().lower()
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if entry.name.strip().lower() == wanted:
                return entry
    if required:
        raise DataError(folder / name, "required folder or file is missing")
    return None


def check_mask_size(path: Path, mask: np.ndarray, height: int, width: int) -> None:
    if mask.shape[:2] != (height, width):
        raise DataError(path, "mask size differs from its image",
                        f"mask {mask.shape[0]}x{mask.shape[1]}, image {height}x{width}")


def check_splits(root: Path, samples: list[Sample], required: tuple[str, ...]) -> None:
    """Each required split has samples; an empty split is an error, not a silent skip."""
    for split in required:
        if not any(s.split == split for s in samples):
            raise DataError(root, f"split '{split}' is empty")
