"""IDRiD in its official download layout (parts A and B), read unchanged.

    A. Segmentation/1. Original Images/{a. Training Set, b. Testing Set}/IDRiD_XX.jpg
    A. Segmentation/2. All Segmentation Groundtruths/{a. Training Set, b. Testing Set}/
        {1. Microaneurysms, 2. Haemorrhages, 3. Hard Exudates, 4. Soft Exudates, 5. Optic Disc}/IDRiD_XX_{MA,HE,EX,SE,OD}.tif
    B. Disease Grading/1. Original Images/{a. Training Set, b. Testing Set}/IDRiD_XXX.jpg
    B. Disease Grading/2. Groundtruths/{a. IDRiD_Disease Grading_Training Labels.csv,
                                         b. IDRiD_Disease Grading_Testing Labels.csv}

The paper's split: the healthy training set is every grade-0 image of part B
(134 + 34 = 168), the test set the 81 lesion images of part A. A missing
lesion .tif means that lesion is absent; masks carry the lesion in the red
channel, so "lesion" is red > 0 (a grayscale conversion of pure red is 76 and
must never be thresholded at 128). The optic disc is anatomy, not anomaly.
Grading CSVs in real copies have empty extra columns and header names with
trailing spaces; both are tolerated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mmrad.core.errors import DataError
from mmrad.core.io import find_image, read_image, write_image
from mmrad.core.outputs import atomic_write_text
from mmrad.data import symptoms
from mmrad.data.datasets.base import Sample, check_splits, child

NAME = "idrid"
SEG = "A. Segmentation"
GRADING = "B. Disease Grading"
IMAGES = "1. Original Images"
SEG_GT = "2. All Segmentation Groundtruths"
GRADING_GT = "2. Groundtruths"
SETS = {"train": "a. Training Set", "test": "b. Testing Set"}
CSV_NAMES = {"train": "a. IDRiD_Disease Grading_Training Labels.csv",
             "test": "b. IDRiD_Disease Grading_Testing Labels.csv"}
CSV_COLUMNS = ("Image name", "Retinopathy grade", "Risk of macular edema")
REQUIRED_COLUMNS = CSV_COLUMNS[:2]


def scan(root: Path) -> list[Sample]:
    root = Path(root)
    samples = _scan_segmentation(root) + _scan_grading(root)
    check_splits(root, samples, ("train", "test"))
    return samples


def _scan_segmentation(root: Path) -> list[Sample]:
    """Every part-A image is a lesion image of the test split."""
    part = child(root, SEG)
    samples = []
    for set_key, set_name in SETS.items():
        image_dir = child(child(part, IMAGES), set_name)
        gt_dir = child(child(part, SEG_GT), set_name)
        for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif")):
            files, classes = [], []
            for class_id, (folder, code) in symptoms.IDRID_FOLDERS.items():
                lesion_dir = child(gt_dir, folder, required=False)
                mask = lesion_dir and child(lesion_dir, f"{image.stem}_{code}.tif", required=False)
                if mask is not None:
                    files.append(mask)
                    classes.append(class_id)
            if not files:
                raise DataError(image, "lesion image has no lesion mask (MA, HE, EX or SE)")
            samples.append(Sample(NAME, f"A-{set_key}-{image.stem}", symptoms.FUNDUS, "test", 1,
                                  image, tuple(files), tuple(classes)))
    return samples


def read_grading_csv(path: Path) -> pd.DataFrame:
    """The grading table with clean column names; rejects a table without the needed columns."""
    try:
        table = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(path, "grading CSV is malformed", str(exc)) from exc
    table.columns = [str(c).strip() for c in table.columns]
    table = table.loc[:, [c for c in table.columns if c and not c.startswith("Unnamed:")]]
    for column in REQUIRED_COLUMNS:
        if column not in table.columns:
            raise DataError(path, f"grading CSV lacks required column '{column}'",
                            f"columns: {list(table.columns)}")
    table = table.dropna(how="all")
    table["Image name"] = table["Image name"].str.strip()
    grades = pd.to_numeric(table["Retinopathy grade"].str.strip(), errors="coerce")
    bad = table.index[~grades.isin([0, 1, 2, 3, 4])]
    if len(bad):
        row = bad[0]
        raise DataError(path, "Retinopathy grade must be an integer 0-4",
                        f"row {row + 2}: {table.loc[row, 'Retinopathy grade']!r}")
    table["Retinopathy grade"] = grades.astype(int)
    return table


def _scan_grading(root: Path) -> list[Sample]:
    """Grade-0 part-B images are the healthy training split; graded ones are not used."""
    part = child(root, GRADING)
    samples = []
    for set_key, set_name in SETS.items():
        table = read_grading_csv(child(child(part, GRADING_GT), CSV_NAMES[set_key]))
        image_dir = child(child(part, IMAGES), set_name)
        for name in table.loc[table["Retinopathy grade"] == 0, "Image name"]:
            image = find_image(image_dir, name)
            if image is None:
                raise DataError(image_dir / name, "image listed in the grading CSV is missing")
            samples.append(Sample(NAME, f"B-{set_key}-{name}", symptoms.FUNDUS, "train", 0, image))
    return samples


def load_masks(sample: Sample, height: int, width: int, root: Path) -> dict[int, np.ndarray]:
    masks = {}
    for path, class_id in zip(sample.mask_files, sample.mask_classes):
        array = read_image(path)
        red = array[..., 0] if array.ndim == 3 else array
        if red.shape != (height, width):
            raise DataError(path, "mask size differs from its image",
                            f"mask {red.shape[0]}x{red.shape[1]}, image {height}x{width}")
        masks[class_id] = red > 0
    return masks


def red_tif(mask: np.ndarray) -> np.ndarray:
    """A lesion mask as IDRiD ships it: RGB, lesion pure red."""
    rgb = np.zeros((*mask.shape, 3), np.uint8)
    rgb[mask, 0] = 255
    return rgb


def write_segmentation_image(root: Path, set_key: str, stem: str, image: np.ndarray,
                             lesions: dict[int, np.ndarray], optic_disc: np.ndarray) -> None:
    part = Path(root) / SEG
    write_image(part / IMAGES / SETS[set_key] / f"{stem}.jpg", image)
    gt_dir = part / SEG_GT / SETS[set_key]
    for class_id, mask in lesions.items():
        folder, code = symptoms.IDRID_FOLDERS[class_id]
        write_image(gt_dir / folder / f"{stem}_{code}.tif", red_tif(mask))
    folder, code = symptoms.IDRID_OPTIC_DISC
    write_image(gt_dir / folder / f"{stem}_{code}.tif", red_tif(optic_disc))


def write_grading_image(root: Path, set_key: str, stem: str, image: np.ndarray) -> None:
    write_image(Path(root) / GRADING / IMAGES / SETS[set_key] / f"{stem}.jpg", image)


def write_grading_csv(root: Path, set_key: str, rows: list[tuple[str, int, int]]) -> None:
    """A grading CSV with the real files' quirks: trailing spaces, empty extra columns."""
    header = "Image name,Retinopathy grade,Risk of macular edema ,,,,,,,,"
    lines = [header] + [f"{name},{grade},{edema},,,,,,,," for name, grade, edema in rows]
    atomic_write_text(Path(root) / GRADING / GRADING_GT / CSV_NAMES[set_key], "\r\n".join(lines) + "\r\n")
