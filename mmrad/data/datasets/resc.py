"""RESC (retinal edema OCT B-scans) in the anomaly-detection layouts real copies use.

Layout "nested" (the common AD copy; our synthetic writer uses it):

    RESC/Train/train/good/*.png
    RESC/Val/val/{good,Ungood}/*.png      RESC/Val/val_label/Ungood/*.png
    RESC/Test/test/{good,Ungood}/*.png    RESC/Test/test_label/Ungood/*.png

Layout "flat" (BMAD's RESC, which anomalib's BMAD reader reads, and other copies):

    RESC/train/good/*.png                 or RESC/train/good/img/*.png
    RESC/{val|valid}/{good,Ungood}/img/*.png
    RESC/{val|valid}/Ungood/{label|anomaly_mask}/*.png
    RESC/test/{good,Ungood}/img/*.png     RESC/test/Ungood/{label|anomaly_mask}/*.png

Rules (each breach raises ``DataError`` naming the folder or file):
  * folder names are matched ignoring case and surrounding spaces (BMAD writes
    "ungood", other copies "Ungood");
  * flat layout: a good / Ungood folder holds its images in ``img/`` or directly,
    not both; the validation split is ``val`` or ``valid``, and masks are in
    ``label/`` or ``anomaly_mask/``: both names present is ambiguous, an error;
  * a root matching neither layout is an error listing the accepted ones;
  * an Ungood image has a mask of the same file name; train holds good images
    only; train and test are not empty (val may be absent).

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
# our split name -> the folder names the flat layout may use for it
FLAT = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}
MASK_FOLDERS = ("label", "anomaly_mask")
LABELS = {"good": 0, "Ungood": 1}
LAYOUTS = ("nested RESC/Train/train/good/*.png; "
           "flat RESC/train/good/[img/]*.png with RESC/{val|valid,test}/{good,Ungood}/[img/]*.png")


def layout(root: Path) -> str:
    """The layout of ``root``, "nested" or "flat" (module docstring); else a DataError listing both."""
    outer = child(root, "Train", required=False)
    if outer is not None and child(outer, "train", required=False) is not None:
        return "nested"
    if child(root, "train", required=False) is not None:
        return "flat"
    raise DataError(root, "not a RESC anomaly-detection layout", f"accepted: {LAYOUTS}")


def _one_of(folder: Path, names: tuple[str, ...], what: str) -> Path | None:
    """The entry of ``folder`` named one of ``names`` (ignoring case); None if none, an error if several."""
    found = [entry for name in names if (entry := child(folder, name, required=False)) is not None]
    if len(found) > 1:
        raise DataError(folder, f"ambiguous {what}", f"{' and '.join(e.name for e in found)} both exist")
    return found[0] if found else None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


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
    split_dir = _one_of(root, FLAT[split], f"{split} split folder")
    label_root = split_dir and child(split_dir, label_name, required=False)
    if label_root is None:
        return None, None
    images = child(label_root, "img", required=False)
    if images is None:
        images = label_root
    elif _images(label_root):
        raise DataError(label_root, "images both in img/ and directly in the folder")
    return images, _one_of(label_root, MASK_FOLDERS, "mask folder")


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
            for image in _images(image_dir):
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
