"""The MMR layout: paired fundus + OCT cases, LabelMe annotations per modality.

MMR has no public release, so this project defines its layout (docs/data.md):

    MMR/
      train/normal/<case_id>/fundus.jpg   oct.png
      test/normal/<case_id>/fundus.jpg    oct.png
      test/anomaly/<case_id>/fundus.jpg   fundus.json   oct.png   oct.json

* one folder per case; the split and the case label are the two folder levels
  above it (names matched ignoring case), the paper's split being
  199 train/normal, 67 test/normal, 104 test/anomaly;
* ``fundus`` and ``oct`` are the image stems, any common image suffix;
* ``fundus.json`` / ``oct.json`` are LabelMe files whose labels are the numeric
  symptom ids of Table 1 (fundus 1-9, OCT 1-8). An anomalous case needs at
  least one of them; a modality without a JSON shows no symptom (the case is
  anomalous through the other modality). Normal cases carry no annotation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmrad.core.errors import DataError
from mmrad.core.io import find_image, write_image
from mmrad.data import symptoms
from mmrad.data.datasets import labelme
from mmrad.data.datasets.base import Sample, check_splits, child

NAME = "mmr"
LABEL_FOLDERS = {"normal": 0, "anomaly": 1}
IMAGE_SUFFIX = {symptoms.FUNDUS: ".jpg", symptoms.OCT: ".png"}


def scan(root: Path) -> list[Sample]:
    root = Path(root)
    samples: list[Sample] = []
    for split, label_names in (("train", ("normal",)), ("test", ("normal", "anomaly"))):
        split_dir = child(root, split)
        if split == "train" and child(split_dir, "anomaly", required=False) is not None:
            raise DataError(split_dir / "anomaly", "the training split holds normal cases only")
        for label_name in label_names:
            label_dir = child(split_dir, label_name)
            for case_dir in sorted(p for p in label_dir.iterdir() if p.is_dir()):
                samples.extend(_scan_case(case_dir, split, LABEL_FOLDERS[label_name]))
    check_splits(root, samples, ("train", "test"))
    return samples


def _scan_case(case_dir: Path, split: str, label: int) -> list[Sample]:
    found = []
    for modality in symptoms.MODALITIES:
        image = find_image(case_dir, modality)
        if image is None:
            raise DataError(case_dir, f"case lacks its {modality} image (every MMR case is a fundus + OCT pair)")
        annotation = child(case_dir, f"{modality}.json", required=False)
        if annotation is not None and label == 0:
            raise DataError(annotation, "a normal case carries no annotation")
        found.append(Sample(NAME, case_dir.name, modality, split, label, image,
                            (annotation,) if annotation else ()))
    if label == 1 and not any(s.mask_files for s in found):
        raise DataError(case_dir, "anomalous case has no LabelMe annotation (fundus.json or oct.json)")
    return found


def load_masks(sample: Sample, height: int, width: int, root: Path) -> dict[int, np.ndarray]:
    """Per-symptom masks of one image, rasterised from its LabelMe file."""
    masks: dict[int, np.ndarray] = {}
    class_ids = set(symptoms.table(NAME, sample.modality))
    for path in sample.mask_files:
        data = labelme.load(path)
        labelme.check_image_path(path, data, root)
        masks.update(labelme.rasterise(path, data, height, width, class_ids))
    return masks


def write_case(root: Path, split: str, label: int, case_id: str,
               images: dict[str, np.ndarray], masks: dict[str, dict[int, np.ndarray]]) -> None:
    """Write one case in the MMR layout; ``masks[modality]`` maps class id to mask."""
    label_name = "anomaly" if label else "normal"
    case_dir = Path(root) / split / label_name / case_id
    for modality, image in images.items():
        image_name = modality + IMAGE_SUFFIX[modality]
        write_image(case_dir / image_name, image)
        shapes = labelme.masks_to_shapes(masks.get(modality, {}))
        if shapes:
            labelme.write(case_dir / f"{modality}.json", image_name, *image.shape[:2], shapes)
