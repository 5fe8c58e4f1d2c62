"""Readers of the three real layouts, on generated data and on hand-made variants of it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from mmrad.core.errors import DataError
from mmrad.core.io import write_image
from mmrad.data.datasets import idrid, mmr, resc

# --- MMR -------------------------------------------------------------------------------

def test_mmr_scan_finds_paired_cases_in_their_splits(synthetic_root, tiny_params):
    samples = mmr.scan(synthetic_root / "MMR")
    p = tiny_params.synthetic.mmr
    cases = {(s.split, s.label, s.case_id) for s in samples}
    assert len(samples) == 2 * len(cases)  # one fundus + one OCT per case
    assert sum(1 for split, label, _ in cases if split == "train") == p.train_normal
    assert sum(1 for split, label, _ in cases if (split, label) == ("test", 0)) == p.test_normal
    assert sum(1 for split, label, _ in cases if (split, label) == ("test", 1)) == p.test_anomalous
    assert all(not s.mask_files for s in samples if s.label == 0)


def test_mmr_masks_rasterise_to_the_image_size(synthetic_root):
    root = synthetic_root / "MMR"
    annotated = [s for s in mmr.scan(root) if s.mask_files]
    assert annotated
    for sample in annotated:
        with Image.open(sample.image) as image:
            width, height = image.size
        masks = mmr.load_masks(sample, height, width, root)
        assert masks and all(m.shape == (height, width) and m.any() for m in masks.values())
        limit = 9 if sample.modality == "fundus" else 8
        assert set(masks) <= set(range(1, limit + 1))


def test_mmr_case_with_a_missing_modality_is_rejected(dataset_copy):
    root = dataset_copy("MMR")
    case = next((root / "test" / "normal").iterdir())
    (case / "oct.png").unlink()
    with pytest.raises(DataError, match="case lacks its oct image") as info:
        mmr.scan(root)
    assert str(case) in str(info.value)


def test_mmr_anomalous_case_without_annotation_is_rejected(dataset_copy):
    root = dataset_copy("MMR")
    case = next((root / "test" / "anomaly").iterdir())
    for json_file in case.glob("*.json"):
        json_file.unlink()
    with pytest.raises(DataError, match="anomalous case has no LabelMe annotation"):
        mmr.scan(root)


def test_mmr_empty_split_is_rejected(dataset_copy):
    root = dataset_copy("MMR")
    for case in (root / "train" / "normal").iterdir():
        shutil.rmtree(case)
    with pytest.raises(DataError, match="split 'train' is empty") as info:
        mmr.scan(root)
    assert str(root) in str(info.value)


def test_mmr_folder_names_match_ignoring_case(dataset_copy):
    root = dataset_copy("MMR")
    (root / "test").rename(root / "Test")
    (root / "Test" / "anomaly").rename(root / "Test" / "Anomaly")
    assert {s.split for s in mmr.scan(root)} == {"train", "test"}


# --- IDRiD -----------------------------------------------------------------------------

def test_idrid_split_follows_the_paper(synthetic_root, tiny_params):
    samples = idrid.scan(synthetic_root / "IDRiD")
    p = tiny_params.synthetic.idrid
    test = [s for s in samples if s.split == "test"]
    train = [s for s in samples if s.split == "train"]
    assert len(test) == p.seg_train + p.seg_test and all(s.label == 1 for s in test)
    grades = [idrid.read_grading_csv(synthetic_root / "IDRiD" / idrid.GRADING / idrid.GRADING_GT / idrid.CSV_NAMES[k])
              for k in ("train", "test")]
    healthy = sum(int((g["Retinopathy grade"] == 0).sum()) for g in grades)
    assert len(train) == healthy and all(s.label == 0 for s in train)
    assert len({s.case_id for s in samples}) == len(samples)  # B numbering restarts per set: ids stay unique


def test_idrid_grading_csv_quirks_are_tolerated(synthetic_root):
    csv = synthetic_root / "IDRiD" / idrid.GRADING / idrid.GRADING_GT / idrid.CSV_NAMES["train"]
    header = csv.read_text().splitlines()[0]
    assert "Risk of macular edema ," in header and header.endswith(",,")  # the real quirks are there
    table = idrid.read_grading_csv(csv)
    assert list(table.columns) == list(idrid.CSV_COLUMNS)


def test_idrid_missing_lesion_file_means_absent_and_red_channel_is_the_lesion(synthetic_root, tmp_path):
    root = synthetic_root / "IDRiD"
    sample = next(s for s in idrid.scan(root) if s.split == "test")
    assert 1 <= len(sample.mask_files) <= 4 and len(sample.mask_files) == len(sample.mask_classes)
    with Image.open(sample.image) as image:
        width, height = image.size
    masks = idrid.load_masks(sample, height, width, root)
    assert set(masks) == set(sample.mask_classes)
    # A red-only mask is 76 in grayscale: thresholding that at 128 would lose it; we must not.
    rgb = np.asarray(Image.open(sample.mask_files[0]))
    assert rgb.ndim == 3 and rgb[..., 1:].max() == 0
    assert np.asarray(Image.open(sample.mask_files[0]).convert("L")).max() == 76
    assert masks[sample.mask_classes[0]].sum() == (rgb[..., 0] > 0).sum() > 0


def test_idrid_csv_without_grade_column_is_rejected(dataset_copy):
    root = dataset_copy("IDRiD")
    csv = root / idrid.GRADING / idrid.GRADING_GT / idrid.CSV_NAMES["test"]
    csv.write_text("Image name,Grade\nIDRiD_001,0\n")
    with pytest.raises(DataError, match="grading CSV lacks required column 'Retinopathy grade'") as info:
        idrid.scan(root)
    assert str(csv) in str(info.value)


def test_idrid_bad_grade_is_rejected(dataset_copy):
    root = dataset_copy("IDRiD")
    csv = root / idrid.GRADING / idrid.GRADING_GT / idrid.CSV_NAMES["train"]
    csv.write_text("Image name,Retinopathy grade,Risk of macular edema \nIDRiD_001,seven,0\n")
    with pytest.raises(DataError, match=r"Retinopathy grade must be an integer 0-4 \(row 2"):
        idrid.scan(root)


def test_idrid_image_listed_but_missing_is_rejected(dataset_copy):
    root = dataset_copy("IDRiD")
    csv = root / idrid.GRADING / idrid.GRADING_GT / idrid.CSV_NAMES["train"]
    csv.write_text(csv.read_text() + "IDRiD_999,0,0,,,\r\n")
    with pytest.raises(DataError, match="image listed in the grading CSV is missing") as info:
        idrid.scan(root)
    assert "IDRiD_999" in str(info.value)


def test_idrid_mask_of_the_wrong_size_is_rejected(dataset_copy):
    root = dataset_copy("IDRiD")
    sample = next(s for s in idrid.scan(root) if s.split == "test")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(sample.mask_files[0])
    with Image.open(sample.image) as image:
        width, height = image.size
    with pytest.raises(DataError, match="mask size differs from its image") as info:
        idrid.load_masks(sample, height, width, root)
    assert str(sample.mask_files[0]) in str(info.value)


# --- RESC ------------------------------------------------------------------------------

def test_resc_nested_layout(synthetic_root, tiny_params):
    samples = resc.scan(synthetic_root / "RESC")
    p = tiny_params.synthetic.resc
    count = {(s.split, s.label): 0 for s in samples}
    for s in samples:
        count[(s.split, s.label)] += 1
    assert count == {("train", 0): p.train_good, ("val", 0): p.val_good, ("val", 1): p.val_ungood,
                     ("test", 0): p.test_good, ("test", 1): p.test_ungood}
    assert all(s.mask_files[0].name == s.image.name for s in samples if s.label)


def test_resc_folder_case_is_ignored(dataset_copy):
    root = dataset_copy("RESC")
    (root / "Test" / "test" / "Ungood").rename(root / "Test" / "test" / "ungood")
    (root / "Test").rename(root / "TEST")
    assert sum(s.label for s in resc.scan(root) if s.split == "test") > 0


def test_resc_flat_layout_reads_the_same_samples(synthetic_root, tmp_path):
    nested = synthetic_root / "RESC"
    flat = tmp_path / "RESC"
    for split, folders in resc.FLAT.items():
        outer, inner, labels = resc.NESTED[split]
        for label in ("good", "Ungood"):
            source = nested / outer / inner / label
            if source.is_dir():
                shutil.copytree(source, flat / folders[-1] / label / "img")
            if labels and (nested / outer / labels / label).is_dir():
                shutil.copytree(nested / outer / labels / label, flat / folders[-1] / label / "anomaly_mask")
    assert resc.layout(flat) == "flat"
    key = lambda s: (s.split, s.label, s.case_id)  # noqa: E731
    assert sorted(map(key, resc.scan(flat))) == sorted(map(key, resc.scan(nested)))


def _resc_tree(root, files):
    """Tiny real PNGs at the given paths under root: masks (in label/ or anomaly_mask/) 255, images 80."""
    for name in files:
        mask = "label/" in name.lower() or "anomaly_mask/" in name.lower()
        write_image(root / name, np.full((6, 8), 255 if mask else 80, np.uint8))
    return root


RESC_TREES = {
    # BMAD's RESC as anomalib reads it: train/good flat, val (not valid), lower-case ungood, label/ masks
    # (an all-black label/ folder beside good images, as some copies have, is ignored).
    "bmad": (["train/good/1.png", "train/good/2.png", "val/good/img/3.png", "val/ungood/img/4.png",
              "val/ungood/label/4.png", "test/good/img/5.png", "test/good/label/5.png", "test/ungood/img/6.png",
              "test/ungood/img/7.png", "test/ungood/label/6.png", "test/ungood/label/7.png"],
             {("train", 0): 2, ("val", 0): 1, ("val", 1): 1, ("test", 0): 1, ("test", 1): 2}),
    # the anomalib-style flat copy: img/ everywhere, valid/, anomaly_mask/
    "flat-img": (["train/good/img/1.png", "valid/good/img/2.png", "valid/Ungood/img/3.png",
                  "valid/Ungood/anomaly_mask/3.png", "test/good/img/4.png", "test/Ungood/img/5.png",
                  "test/Ungood/anomaly_mask/5.png"],
                 {("train", 0): 1, ("val", 0): 1, ("val", 1): 1, ("test", 0): 1, ("test", 1): 1}),
    # train/good without img/, no validation split, test/Ungood/{img,label}
    "no-val": (["train/good/1.png", "train/good/2.png", "train/good/3.png", "test/good/img/4.png",
                "test/Ungood/img/5.png", "test/Ungood/label/5.png"],
               {("train", 0): 3, ("test", 0): 1, ("test", 1): 1}),
    # folder names in any case, images directly in every label folder
    "cases": (["TRAIN/Good/1.png", "Valid/GOOD/2.png", "Valid/UnGood/3.png", "Valid/UnGood/Label/3.png",
               "Test/good/4.png", "Test/UNGOOD/5.png", "Test/UNGOOD/Anomaly_Mask/5.png"],
              {("train", 0): 1, ("val", 0): 1, ("val", 1): 1, ("test", 0): 1, ("test", 1): 1}),
}


@pytest.mark.parametrize("name", RESC_TREES)
def test_resc_real_flat_layouts(tmp_path, name):
    files, expected = RESC_TREES[name]
    root = _resc_tree(tmp_path / "RESC", files)
    assert resc.layout(root) == "flat"
    samples = resc.scan(root)
    count = {}
    for s in samples:
        count[(s.split, s.label)] = count.get((s.split, s.label), 0) + 1
    assert count == expected
    assert all(not s.mask_files for s in samples if s.label == 0)
    for s in (s for s in samples if s.label):
        (mask,) = s.mask_files
        assert mask.name == s.image.name and mask.parent.name.lower() in resc.MASK_FOLDERS
        assert mask.parent.parent == s.image.parent.parent or mask.parent.parent == s.image.parent
        masks = resc.load_masks(s, 6, 8, root)
        assert set(masks) == {1} and masks[1].all()


@pytest.mark.parametrize("files, rule", [
    (["train/good/1.png", "val/good/img/2.png", "valid/good/img/3.png", "test/good/img/4.png"],
     "ambiguous val split folder"),
    (["train/good/1.png", "test/Ungood/img/2.png", "test/Ungood/label/2.png", "test/Ungood/anomaly_mask/2.png"],
     "ambiguous mask folder"),
    (["train/good/1.png", "train/good/img/2.png", "test/good/img/3.png"], "images both in img/ and directly in the folder"),
    (["train/good/1.png", "test/Ungood/img/2.png", "test/Ungood/label/3.png"], "has no mask of the same name"),
    (["train/good/1.png", "train/Ungood/2.png", "test/good/3.png"], "the training split holds normal (good) images only"),
    (["train/good/1.png", "val/good/2.png"], "split 'test' is empty"),
])
def test_resc_flat_layout_rules(tmp_path, files, rule):
    root = _resc_tree(tmp_path / "RESC", files)
    with pytest.raises(DataError) as info:
        resc.scan(root)
    assert str(root) in str(info.value) and rule in str(info.value)


def test_resc_label_values_become_classes(synthetic_root, tmp_path):
    sample = next(s for s in resc.scan(synthetic_root / "RESC") if s.label)
    values = np.zeros((20, 30), np.uint8)
    values[1:3, 1:3] = 255
    values[5:8, 5:8] = 191
    values[10, 10] = 128
    values[15, 15] = 1  # a binarised copy's 0/1 value
    mask = tmp_path / sample.image.name
    Image.fromarray(values).save(mask)
    masks = resc.load_masks(type(sample)(**{**sample.__dict__, "mask_files": (mask,)}), 20, 30, tmp_path)
    assert masks[1].sum() == 5 and masks[2].sum() == 9 and masks[3].sum() == 1


def test_resc_ungood_without_mask_is_rejected(dataset_copy):
    root = dataset_copy("RESC")
    mask = next((root / "Test" / "test_label" / "Ungood").iterdir())
    mask.unlink()
    with pytest.raises(DataError, match="has no mask of the same name") as info:
        resc.scan(root)
    assert mask.name in str(info.value)


def test_resc_unknown_layout_is_rejected(tmp_path):
    _resc_tree(tmp_path / "RESC", ["whatever/good/1.png"])
    with pytest.raises(DataError, match="not a RESC anomaly-detection layout") as info:
        resc.scan(tmp_path / "RESC")
    message = str(info.value)
    assert message.startswith(str(tmp_path / "RESC")) and "Train/train/good" in message and "train/good/[img/]" in message
