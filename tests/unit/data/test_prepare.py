"""The prepare stage: manifest schema and counts, the cache, bad input leaving nothing behind, determinism."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmrad.core.errors import DataError
from mmrad.data.prepare import MANIFEST_SCHEMA, prepare_dataset, read_manifest, resize_masks
from mmrad.synthetic.generate import generate
from tests.conftest import tree_snapshot

FOLDERS = {"mmr": "MMR", "idrid": "IDRiD", "resc": "RESC"}


@pytest.fixture(scope="module")
def prepared(synthetic_root, tmp_path_factory, tiny_params):
    out = tmp_path_factory.mktemp("prepared")
    summaries = {name: prepare_dataset(name, synthetic_root / folder, out / name, tiny_params.prepare.resolution,
                                       progress=False)
                 for name, folder in FOLDERS.items()}
    return out, summaries


def test_manifest_schema_and_columns(prepared):
    out, _ = prepared
    for name in FOLDERS:
        table = pq.read_table(out / name / "manifest.parquet")
        assert table.schema.equals(MANIFEST_SCHEMA)
        frame = table.to_pandas()
        assert (frame["dataset"] == name).all()
        assert frame["content_hash"].str.fullmatch(r"[0-9a-f]{64}").all()
        assert frame.duplicated(["split", "case_id", "modality"]).sum() == 0


def test_split_counts_match_the_generated_sizes(prepared, tiny_params):
    _, summaries = prepared
    p = tiny_params.synthetic
    assert summaries["mmr"]["splits"]["train"] == {"normal_cases": p.mmr.train_normal, "anomalous_cases": 0,
                                                   "images": 2 * p.mmr.train_normal, "images_with_lesion": 0}
    test = summaries["mmr"]["splits"]["test"]
    assert (test["normal_cases"], test["anomalous_cases"]) == (p.mmr.test_normal, p.mmr.test_anomalous)
    assert summaries["idrid"]["splits"]["test"]["anomalous_cases"] == p.idrid.seg_train + p.idrid.seg_test
    assert summaries["resc"]["splits"]["test"]["normal_cases"] == p.resc.test_good
    assert summaries["resc"]["splits"]["val"]["anomalous_cases"] == p.resc.val_ungood


def test_cache_images_and_bit_masks_agree_with_the_manifest(prepared, tiny_params):
    out, _ = prepared
    size = tiny_params.prepare.resolution
    frame = read_manifest(out / "mmr")
    for row in frame.itertuples():
        image = np.asarray(Image.open(out / "mmr" / row.cache_image))
        assert image.shape[:2] == (size, size)
        assert image.ndim == (3 if row.modality == "fundus" else 2)
        if pd.isna(row.cache_mask):
            assert not row.has_lesion and row.lesion_fraction == 0
            continue
        bits = np.asarray(Image.open(out / "mmr" / row.cache_mask))
        assert bits.dtype == np.uint16 and bits.shape == (size, size)
        present = {k + 1 for k in range(16) if (bits >> k & 1).any()}
        assert present <= set(row.symptom_ids)  # a tiny symptom may vanish at low resolution
        assert abs((bits > 0).mean() - row.lesion_fraction) < 1e-6
    assert frame.loc[frame.label == 0, "symptom_ids"].map(len).eq(0).all()
    assert frame.loc[frame.label == 1, "has_lesion"].any()


def test_resize_masks_keeps_thin_structures_and_sets_one_bit_per_class():
    line = np.zeros((100, 100), bool)
    line[50, :] = True  # 1 px wide: a quarter of a pixel at 4x downsampling
    block = np.zeros((100, 100), bool)
    block[:40, :40] = True
    bits = resize_masks({3: line, 1: block}, 25)
    assert (bits[12] & 0b100).all()  # row 50 / 4 = 12.5 -> lands in row 12
    assert (bits[:10, :10] & 0b1).all() and not (bits[10:, 10:] & 0b1).any()


def _fails_cleanly(name, root, out, rule, path_part):
    before = tree_snapshot(out) if out.exists() else None
    with pytest.raises(DataError) as info:
        prepare_dataset(name, root, out, 64, progress=False)
    assert rule in str(info.value) and path_part in str(info.value)
    assert (tree_snapshot(out) if out.exists() else None) == before  # nothing written, nothing lost
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_corrupt_image_fails_naming_the_file_and_leaves_no_output(dataset_copy, tmp_path):
    root = dataset_copy("MMR")
    victim = next((root / "train" / "normal").iterdir()) / "fundus.jpg"
    victim.write_bytes(b"this is not a jpeg")
    _fails_cleanly("mmr", root, tmp_path / "out", "image is corrupt or truncated", str(victim))


def test_truncated_image_fails_and_an_earlier_output_survives(dataset_copy, tmp_path):
    root = dataset_copy("RESC")
    out = tmp_path / "out"
    prepare_dataset("resc", root, out, 64, progress=False)  # a good earlier result
    victim = next((root / "Test" / "test" / "good").iterdir())
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    _fails_cleanly("resc", root, out, "image is corrupt or truncated", str(victim))


def test_mask_of_the_wrong_size_fails_cleanly(dataset_copy, tmp_path):
    root = dataset_copy("RESC")
    mask = next((root / "Test" / "test_label" / "Ungood").iterdir())
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(mask)
    _fails_cleanly("resc", root, tmp_path / "out", "mask size differs from its image", str(mask))


def test_labelme_out_of_bounds_fails_cleanly(dataset_copy, tmp_path):
    root = dataset_copy("MMR")
    annotation = next((root / "test" / "anomaly").rglob("*.json"))
    data = json.loads(annotation.read_text())
    data["shapes"][0]["points"][0] = [10_000, 5]
    annotation.write_text(json.dumps(data))
    _fails_cleanly("mmr", root, tmp_path / "out", "point out of the image bounds", str(annotation))


def test_missing_dataset_folder_and_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="dataset folder is missing"):
        prepare_dataset("mmr", tmp_path / "nope", tmp_path / "out", 64)
    with pytest.raises(DataError, match="unknown dataset"):
        prepare_dataset("mvtec", tmp_path, tmp_path / "out", 64)


def _digest(root):
    digest = hashlib.sha256()
    for path, data in tree_snapshot(root).items():
        digest.update(path.encode() + data)
    return digest.hexdigest()


def test_same_seed_same_bytes_and_another_seed_differs(tiny_params, tmp_path, synthetic_root):
    # A second, parallel generation must equal the session's serial one, byte for byte.
    parallel = tiny_params.model_copy(update={"synthetic": tiny_params.synthetic.model_copy(update={"workers": 2})})
    generate(parallel, tmp_path / "a", progress=False)
    assert _digest(tmp_path / "a") == _digest(synthetic_root)
    generate(tiny_params.model_copy(update={"seed": tiny_params.seed + 1}), tmp_path / "b", progress=False)
    assert _digest(tmp_path / "b") != _digest(synthetic_root)
    prepare_dataset("mmr", tmp_path / "a" / "MMR", tmp_path / "pa", 64, progress=False)
    prepare_dataset("mmr", synthetic_root / "MMR", tmp_path / "pb", 64, workers=2, progress=False)
    cache_a, cache_b = tree_snapshot(tmp_path / "pa"), tree_snapshot(tmp_path / "pb")
    cache_a.pop("manifest.parquet"), cache_b.pop("manifest.parquet")
    assert cache_a == cache_b  # images, masks and summary identical, serial or parallel
    raw_paths = ["path", "mask_paths"]  # the only columns that name the (different) raw folders
    assert read_manifest(tmp_path / "pa").drop(columns=raw_paths).equals(
        read_manifest(tmp_path / "pb").drop(columns=raw_paths))
