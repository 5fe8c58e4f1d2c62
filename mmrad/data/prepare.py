"""The ``prepare`` stage: validated split manifests and a resized image cache.

For one dataset it scans the raw layout (``mmrad.data.datasets``), decodes every
image and annotation (so a corrupt file or a bad mask fails here, naming the
file), resizes images and masks to ``prepare.resolution`` and writes

    <out>/manifest.parquet     one row per image (schema ``MANIFEST_SCHEMA``)
    <out>/images/<split>/<case>_<modality>.png
    <out>/masks/<split>/<case>_<modality>.png   16-bit, bit k-1 set = symptom k
    <out>/summary.json         counts per split and label

all atomically: on any error nothing under ``<out>`` changes.

Images are stretched to a square (no letterbox): no padding pixels then enter
the pixel-level metrics, and the fundus (about 1.03:1) barely changes shape;
OCT B-scans are compressed horizontally, the same way for every scan. Masks are
resized per symptom by area averaging; a low-resolution pixel is positive when
at least ``mask_min_coverage`` of it was lesion, which keeps thin structures
(vessel changes, membranes) that a majority vote would erase.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from mmrad.core.errors import DataError
from mmrad.core.io import read_image, sha256_file
from mmrad.core.outputs import atomic_dir, check_output_folder
from mmrad.core.processes import Mapper, process_pool
from mmrad.data import symptoms
from mmrad.data.datasets import LAYOUTS, Sample

log = logging.getLogger(__name__)

MASK_MIN_COVERAGE = 0.25

MANIFEST_SCHEMA = pa.schema([
    ("dataset", pa.string()),
    ("case_id", pa.string()),
    ("modality", pa.string()),
    ("split", pa.string()),
    ("label", pa.int8()),  # case level: 0 normal, 1 anomalous
    ("has_lesion", pa.bool_()),  # this image's mask (at cache resolution) is non-empty
    ("path", pa.string()),  # raw image, relative to the working directory when inside it
    ("mask_paths", pa.list_(pa.string())),  # raw annotation files
    ("symptom_ids", pa.list_(pa.int16())),  # classes present at full resolution
    ("content_hash", pa.string()),  # sha256 of the raw image file
    ("height", pa.int32()),  # raw image size
    ("width", pa.int32()),
    ("cache_image", pa.string()),  # relative to the manifest's folder
    ("cache_mask", pa.string()),  # null when the image has no lesion
    ("lesion_fraction", pa.float32()),  # lesion share of the cached image
])


def _display_path(path: Path) -> str:
    path = Path(os.path.abspath(path))
    cwd = Path.cwd()
    return path.relative_to(cwd).as_posix() if path.is_relative_to(cwd) else path.as_posix()


def resize_masks(masks: dict[int, np.ndarray], resolution: int, min_coverage: float = MASK_MIN_COVERAGE) -> np.ndarray:
    """Per-class bool masks -> one (resolution, resolution) uint16 bit mask."""
    bits = np.zeros((resolution, resolution), np.uint16)
    for class_id, mask in masks.items():
        image = Image.fromarray(mask.astype(np.uint8) * 255)
        coverage = np.asarray(image.resize((resolution, resolution), Image.Resampling.BOX), np.float32) / 255.0
        bits[coverage >= min_coverage] |= np.uint16(1 << (class_id - 1))
    return bits


# How each modality is decoded: fundus photographs in colour, OCT B-scans as grey levels.
READ_MODE = {symptoms.FUNDUS: "RGB", symptoms.OCT: "L"}


def resize_for_model(image: np.ndarray, resolution: int) -> Image.Image:
    """The model's view of a decoded image: bicubic to resolution x resolution (the cache, and `mmrad predict`)."""
    return Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BICUBIC)


def load_for_model(path: str | Path, modality: str, resolution: int, max_pixels: int | None = None) -> np.ndarray:
    """(S, S, 3) uint8 as the model sees an image file: decoded and resized exactly like the cache."""
    image = read_image(path, mode=READ_MODE[modality], max_pixels=max_pixels)
    return np.asarray(resize_for_model(image, resolution).convert("RGB"))


def _prepare_sample(sample: Sample, root: Path, out: Path, resolution: int, max_pixels: int | None = None) -> dict:
    image = read_image(sample.image, mode=READ_MODE[sample.modality], max_pixels=max_pixels)
    height, width = image.shape[:2]
    masks = LAYOUTS[sample.dataset].load_masks(sample, height, width, root)
    masks = {c: m for c, m in masks.items() if m.any()}

    stem = f"{sample.case_id}_{sample.modality}.png"
    cache_image = Path("images") / sample.split / stem
    (out / cache_image).parent.mkdir(parents=True, exist_ok=True)
    resize_for_model(image, resolution).save(out / cache_image)

    bits = resize_masks(masks, resolution)
    cache_mask = None
    if bits.any():
        cache_mask = Path("masks") / sample.split / stem
        (out / cache_mask).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(bits).save(out / cache_mask)
    return {
        "dataset": sample.dataset, "case_id": sample.case_id, "modality": sample.modality,
        "split": sample.split, "label": sample.label, "has_lesion": bool(bits.any()),
        "path": _display_path(sample.image), "mask_paths": [_display_path(p) for p in sample.mask_files],
        "symptom_ids": sorted(masks), "content_hash": sha256_file(sample.image),
        "height": height, "width": width, "cache_image": cache_image.as_posix(),
        "cache_mask": cache_mask.as_posix() if cache_mask else None,
        "lesion_fraction": float((bits > 0).mean()),
    }


def _prepare_star(args) -> dict:
    return _prepare_sample(*args)


_MAPPER: ContextVar[Mapper | None] = ContextVar("mmrad_prepare_mapper", default=None)


@contextmanager
def mapping_with(mapper: Mapper):
    """Run prepare_dataset's per-image work through ``mapper`` (the Prefect flow's Dask task mapping)."""
    token = _MAPPER.set(mapper)
    try:
        yield
    finally:
        _MAPPER.reset(token)


def summarise(rows: list[dict]) -> dict:
    """Case and image counts per split (a paired case has one row per modality)."""
    summary: dict = {"images": len(rows), "splits": {}}
    for split in sorted({r["split"] for r in rows}):
        in_split = [r for r in rows if r["split"] == split]
        cases = {(r["case_id"], r["label"]) for r in in_split}
        summary["splits"][split] = {
            "normal_cases": sum(1 for _, label in cases if label == 0),
            "anomalous_cases": sum(1 for _, label in cases if label == 1),
            "images": len(in_split),
            "images_with_lesion": sum(1 for r in in_split if r["has_lesion"]),
        }
    return summary


def prepare_dataset(name: str, root: str | Path, out: str | Path, resolution: int,
                    workers: int = 1, progress: bool | None = None, max_pixels: int | None = None) -> dict:
    """Scan, validate and cache one dataset; returns the summary written beside the manifest.

    ``out`` must not overlap ``root`` (mmrad.core.outputs); ``max_pixels`` is
    prepare.max_image_pixels (None: mmrad.core.io's default)."""
    if name not in LAYOUTS:
        raise DataError(name, "unknown dataset", f"known: {sorted(LAYOUTS)}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder is missing")
    check_output_folder(out, [root])
    samples = LAYOUTS[name].scan(root)
    with atomic_dir(out, [root]) as tmp:
        work = [(s, root, tmp, resolution, max_pixels) for s in samples]
        bar = tqdm(total=len(work), desc=f"prepare {name}", unit="img", disable=None if progress is None else not progress)
        rows = []
        for row in (_MAPPER.get() or process_pool(workers))(_prepare_star, work):
            rows.append(row)
            bar.update()
        bar.close()
        rows.sort(key=lambda r: (r["split"], r["case_id"], r["modality"]))
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), tmp / "manifest.parquet")
        summary = summarise(rows)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log.info("prepared %s: %s", name, json.dumps(summary, sort_keys=True))
    return summary


def read_manifest(folder: str | Path):
    """The manifest of a prepared dataset as a pandas DataFrame."""
    return pq.read_table(Path(folder) / "manifest.parquet").to_pandas()
