"""RESC (retinal edema OCT B-scans) in the anomaly-detection layouts in use.

Layout "nested" (the common AD copy; our synthetic writer uses it):

    RESC/Train/train/good/*.png
    RESC/Val/val/{good,Ungood}/*.png      RESC/Val/val_label/Ungood/*.png
    RESC/Test/test/{good,Ungood}/*.png    RESC/Test/test_label/Ungood/*.png

Layout "flat" (another copy):

    RESC/{train,valid,test}/{good,Ungood}/img/*.png
    RESC/{valid,test}/Ungood/{label|anomaly_mask}/*.png

Folder names are matched ignoring case. A mask has its image's file name.
Mask values of the original release (255 edema, 191 subretinal fluid, 128
pigment epithelial detachment) become classes 1-3; any other non-zero value
(binarised copies) counts as class 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmrad.core.errors import DataError
from mmrad.core.io import IMAGE_SUFFIXES, read_image, write_image
from mmrad.data import symptoms
from mmrad.data.datasets.base import Sample, check_splits, child

NAME = "resc"
# our split name -> (outer folder, inner folder, label folder) of the nested layout
NESTED = {"train": ("Train", "train", None), "val": ("Val", "val", "val_label"), "test": ("Test", "test", "test_label")}
FLAT = {"train": "train", "val": "valid", "test": "test"}
LABELS = {"good": 0, "Ungood": 1}


def layout(root: Path) -> str:
    outer = child(root, "Train", required=False)
    if outer is not None and child(outer, "train", required=False) is not None:
        return "nested"
    if child(root, "train", required=False) is not None:
        return "flat"
    raise DataError(root, "not a RESC anomaly-detection layout (expected Train/train/good or train/good/img)")


def _folders(root: Path, kind: str, split: str, label_name: str) -> tuple[Path | None, Path | None]:
    """(image folder, mask folder) of one split and label, or None where absent."""
    if kind == "nested":
        outer, inner, label_dir = NESTED[split]
        outer_dir = child(root, outer, required=False)
        if outer_dir is None:
            return None, None
        images = child(child(outer_dir, inner), label_name, required=False)
        masks = None
        if label_dir and label_name == "Ungood":
            masks = child(child(outer_dir, label_dir), label_name, required=False)
        return images, masks
    split_dir = child(root, FLAT[split], required=False)
    label_root = split_dir and child(split_dir, label_name, required=False)
    if label_root is None:
        return None, None
    masks = child(label_root, "label", required=False) or child(label_root, "anomaly_mask", required=False)
    return child(label_root, "img"), masks


def scan(root: Path) -> list[Sample]:
    root = Path(root)
    kind = layout(root)
    samples = []
    for split in NESTED:
        for label_name, label in LABELS.items():
            image_dir, mask_dir = _folders(root, kind, split, label_name)
            if image_dir is None:
                continue
            if split == "train" and label == 1:
                raise DataError(image_dir, "the training split holds normal (good) images only")
            for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                masks: tuple[Path, ...] = ()
                if label == 1:
                    mask = mask_dir and child(mask_dir, image.name, required=False)
                    if mask is None:
                        raise DataError(image, "anomalous (Ungood) image has no mask of the same name")
                    masks = (mask,)
                samples.append(Sample(NAME, image.stem, symptoms.OCT, split, label, image, masks))
    check_splits(root, samples, ("train", "test"))
    return samples


def load_masks(sample: Sample, height: int, width: int, root: Path) -> dict[int, np.ndarray]:
    masks: dict[int, np.ndarray] = {}
    for path in sample.mask_files:
        values = read_image(path, mode="L")
        if values.shape != (height, width):
            raise DataError(path, "mask size differs from its image",
                            f"mask {values.shape[0]}x{values.shape[1]}, image {height}x{width}")
        for value, class_id in symptoms.RESC_LABEL_VALUES.items():
            if class_id != 1 and (values == value).any():
                masks[class_id] = values == value
        other = (values > 0) & ~np.isin(values, [v for v, c in symptoms.RESC_LABEL_VALUES.items() if c != 1])
        if other.any():
            masks[1] = other
    return masks


def write_image_pair(root: Path, split: str, label: int, stem: str, image: np.ndarray,
                     lesions: dict[int, np.ndarray] | None = None) -> None:
    """Write one B-scan (and its mask) in the nested layout."""
    outer, inner, label_dir = NESTED[split]
    label_name = "Ungood" if label else "good"
    write_image(Path(root) / outer / inner / label_name / f"{stem}.png", image)
    if label:
        values = np.zeros(image.shape[:2], np.uint8)
        for value, class_id in sorted(symptoms.RESC_LABEL_VALUES.items()):
            if class_id in lesions:
                values[lesions[class_id]] = value
        write_image(Path(root) / outer / label_dir / label_name / f"{stem}.png", values)
