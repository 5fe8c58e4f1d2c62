"""The floor of the pixel metrics on this benchmark: what a map that only knows where the anatomy is scores.

The "anatomy prior" map is each test image's local brightness (the grey
image's mean over a ``--window`` x ``--window`` box): no learning, no healthy
reference. Lesions lie inside the bright fundus field and the retina, the
dark background outside is an easy negative, so this map already reaches a
high pixel AUROC. The script prints its pixel AUROC and AU-PRO (the
evaluation's own exact metrics, ``mmrad.evaluation.metrics``) beside the
committed methods' (``reports/<method>/metrics.json``): a method's pixel AUROC
means something only above this floor (docs/decisions.md).

    .venv/bin/python bench/anatomy_prior.py            # after dvc repro: the committed prepared test split
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import yaml
from mmrad_cli import PROJECT
from scipy.ndimage import uniform_filter

from mmrad.data.splits import load_split
from mmrad.evaluation import metrics

METHODS = ("mmrad", "padim", "patchcore")


def anatomy_prior(images: np.ndarray, window: int) -> np.ndarray:
    """(N, S, S) local mean brightness of (N, S, S, 3) uint8 images."""
    grey = images.astype(np.float32).mean(axis=-1)
    return uniform_filter(grey, size=(1, window, window), mode="nearest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=15, help="box size in pixels of the prepared images")
    args = parser.parse_args()
    dataset = yaml.safe_load((PROJECT / "params.yaml").read_text())["train"]["dataset"]
    prepared = PROJECT / "data" / "prepared" / dataset
    if not (prepared / "manifest.parquet").is_file():
        sys.exit(f"{prepared}: no prepared data; run `dvc repro` first")
    test = load_split(prepared)
    print(f"{len(test.case_ids)} test cases of {dataset}; anatomy prior: local brightness over "
          f"{args.window} x {args.window} px\n")
    print("| map | fundus pixel AUROC | fundus AU-PRO | OCT pixel AUROC | OCT AU-PRO |")
    print("|---|---:|---:|---:|---:|")
    cells = []
    for modality in ("fundus", "oct"):
        prior, masks = anatomy_prior(test.images[modality], args.window), test.masks[modality] > 0
        cells += [f"{metrics.pixel_auroc(prior, masks):.3f}", f"{metrics.aupro(prior, masks):.3f}"]
    print("| anatomy prior (no learning) | " + " | ".join(cells) + " |")
    for method in METHODS:
        path = PROJECT / "reports" / method / "metrics.json"
        if path.is_file():
            loc = json.loads(path.read_text())["localisation"]
            print(f"| {method} (committed) | " + " | ".join(
                f"{loc[m][k]:.3f}" for m in ("fundus", "oct") for k in ("pixel_auroc", "aupro")) + " |")


if __name__ == "__main__":
    main()
