"""Benchmark: AU-PRO and pixel AUROC on a test-set-sized stack of maps.

171 maps of 256 x 256 (the size of MMR's test split at the model's output
resolution): smooth random anomaly maps, and masks with a few dozen
8-connected regions (discs and ellipses of different sizes) in a fifth
of the images, the rest normal. Fixed seed. Prints the median over
``--repeats`` runs of ``aupro`` (fpr_limit 0.3), ``pro_curve`` (the whole
curve) and ``pixel_auroc``.

    .venv/bin/python bench/aupro.py
    .venv/bin/python bench/aupro.py --repeats 9

Target: aupro <= 2 s on the development machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy import ndimage

from mmrad.evaluation.metrics import aupro, pixel_auroc, pro_curve

TARGET_S = 2.0


def make_data(n: int = 171, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth float32 maps and bool masks; anomalous images hold 1-3 elliptic regions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in rng.choice(n, size=n // 5, replace=False):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(20, size - 20, size=2)
            ry, rx = rng.uniform(3, 30, size=2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    noise = rng.standard_normal((n, size, size)).astype(np.float32)
    maps = ndimage.gaussian_filter(noise, sigma=(0, 4, 4))
    maps /= maps.std()
    maps += 1.5 * ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 3, 3))
    return maps, masks


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    maps, masks = make_data()
    n_regions = ndimage.label(masks, structure=np.pad(np.ones((1, 3, 3), bool), ((1, 1), (0, 0), (0, 0))))[1]
    print(f"data: {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]} = {maps.size / 1e6:.1f} M pixels "
          f"({maps.dtype}), {n_regions} regions, {int(masks.any(axis=(1, 2)).sum())} anomalous images")

    value = aupro(maps, masks)
    t_aupro = median_time(lambda: aupro(maps, masks), args.repeats)
    t_curve = median_time(lambda: pro_curve(maps, masks), args.repeats)
    auroc = pixel_auroc(maps, masks)
    t_auroc = median_time(lambda: pixel_auroc(maps, masks), args.repeats)

    verdict = "ok" if t_aupro <= TARGET_S else "OVER TARGET"
    print(f"aupro(fpr_limit=0.3) = {value:.4f}: median {t_aupro:.3f} s over {args.repeats} runs "
          f"(target <= {TARGET_S:.1f} s: {verdict})")
    print(f"pro_curve (whole curve):  median {t_curve:.3f} s")
    print(f"pixel_auroc = {auroc:.4f}:    median {t_auroc:.3f} s")


if __name__ == "__main__":
    main()
