"""Benchmark: pixel AUROC, ROC curve, AU-PRO and PRO curve from one sort (RankedPixels) vs a sort per metric.

The data of ``bench/aupro.py``: 171 maps of 256 x 256 (MMR's test split at the
model's output resolution), smooth float32 maps, masks with 1-3 elliptic
regions in a fifth of the images; fixed seed. For the per-symptom rows the
regions are split into ``--symptoms`` classes (region label mod k): each
symptom against the anomaly-free pixels, the other symptoms ignored, as
``evaluate._per_symptom`` does.

* old path: ``sklearn.metrics.roc_auc_score`` and ``roc_curve`` on all
  pixels, and the previous AU-PRO / PRO curve (a sort of all (key, region)
  pairs per mask, a partial sort for AU-PRO; copied below as it was);
* new path: ``RankedPixels(maps)`` once, then ``against(mask)`` per mask.

Prints the median of ``--repeats`` runs of every step, both totals and the
ratio, and checks that both paths give the same numbers.

    .venv/bin/python bench/metrics.py
    .venv/bin/python bench/metrics.py --repeats 9 --symptoms 3

Target: one-sort AUROC + AU-PRO (ranking included) <= 0.5 s on the development machine.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aupro import make_data  # noqa: E402  (the same data as bench/aupro.py)

from mmrad.evaluation import metrics  # noqa: E402
from mmrad.evaluation.metrics import RankedPixels  # noqa: E402

TARGET_S = 0.5
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


# --------------------------------------------------------------------------- the previous AU-PRO (a sort per mask)

def _old_prepare(maps, masks, ignore=None):
    labels, n_regions = ndimage.label(masks, structure=_STRUCTURE)
    labels = labels.ravel()
    areas = np.bincount(labels, minlength=n_regions + 1).astype(np.float64)
    inv_area = np.zeros_like(areas)
    inv_area[1:] = 1.0 / areas[1:]
    keys = metrics._score_keys(maps)
    if ignore is not None:
        keep = ~ignore.ravel()
        keys, labels = keys[keep], labels[keep]
    return keys, labels, inv_area, int(np.count_nonzero(labels == 0)), n_regions


def _old_curve(keys, labels, inv_area, n_normal, n_regions):
    packed = keys.astype(np.uint64) << np.uint64(32)
    packed |= labels.astype(np.uint64)
    packed.sort()
    packed = packed[::-1]
    sorted_keys = (packed >> np.uint64(32)).astype(np.uint32)
    sorted_labels = (packed & np.uint64(0xFFFFFFFF)).astype(np.intp)
    ends = np.append(np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]), sorted_keys.size - 1)
    cum_fp = np.cumsum(sorted_labels == 0, dtype=np.int64)[ends]
    cum_region = np.cumsum(inv_area[sorted_labels])[ends]
    fpr = np.concatenate(([0.0], cum_fp / n_normal))
    pro = np.minimum(np.concatenate(([0.0], cum_region / n_regions)), 1.0)
    return fpr, pro


def old_pro_curve(maps, masks, ignore=None):
    return _old_curve(*_old_prepare(maps, masks, ignore))


def old_aupro(maps, masks, limit=0.3, ignore=None):
    keys, labels, inv_area, n_normal, n_regions = _old_prepare(maps, masks, ignore)
    k = math.floor(limit * n_normal) + 1
    normal_keys = keys[labels == 0]
    t_star = np.partition(normal_keys, n_normal - k)[n_normal - k]
    keep = keys >= t_star
    fpr, pro = _old_curve(keys[keep], labels[keep], inv_area, n_normal, n_regions)
    return min(max(metrics._area_to_limit(fpr, pro, limit) / limit, 0.0), 1.0)


# --------------------------------------------------------------------------- timing

def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def symptom_masks(masks: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(own, ignore) per symptom: the regions split by label mod k."""
    labels, _ = ndimage.label(masks, structure=_STRUCTURE)
    out = []
    for c in range(k):
        own = (labels > 0) & (labels % k == c)
        if own.any():
            out.append((own, masks & ~own))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--symptoms", type=int, default=3, help="classes the regions are split into (0: none)")
    args = parser.parse_args()

    maps, masks = make_data()
    y, s = masks.ravel(), maps.ravel()
    symptoms = symptom_masks(masks, args.symptoms) if args.symptoms else []
    print(f"data: {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]} = {maps.size / 1e6:.1f} M pixels "
          f"({maps.dtype}), {int(masks.sum())} region pixels, {len(symptoms)} symptoms; "
          f"median of {args.repeats} runs")

    r = args.repeats
    old = {
        "pixel AUROC": median_time(lambda: roc_auc_score(y, s), r),
        "AU-PRO (0.3)": median_time(lambda: old_aupro(maps, masks), r),
        "ROC curve": median_time(lambda: roc_curve(y, s, drop_intermediate=True)[:2], r),
        "PRO curve": median_time(lambda: old_pro_curve(maps, masks), r),
        "per symptom AUROC+AU-PRO": median_time(lambda: [
            (roc_auc_score(own[~ign], maps[~ign]), old_aupro(maps, own, 0.3, ign)) for own, ign in symptoms], r),
    }
    ranked = RankedPixels(maps)
    new = {
        "rank (the one sort)": median_time(lambda: RankedPixels(maps), r),
        "pixel AUROC": median_time(lambda: ranked.against(masks).auroc(), r),
        "AU-PRO (0.3)": median_time(lambda: ranked.against(masks).aupro(), r),
        "ROC curve": median_time(lambda: ranked.against(masks).roc_curve(), r),
        "PRO curve": median_time(lambda: ranked.against(masks).pro_curve(), r),
        "per symptom AUROC+AU-PRO": median_time(lambda: [
            (lambda q: (q.auroc(), q.aupro()))(ranked.against(own, ign)) for own, ign in symptoms], r),
    }
    one_sort = median_time(lambda: (lambda q: (q.auroc(), q.aupro()))(RankedPixels(maps).against(masks)), r)

    print(f"\n{'step':28s} {'old (s)':>9s} {'one sort (s)':>13s} {'ratio':>8s}")
    for name in new:
        t_old = old[name][0] if name in old else None
        t_new = new[name][0]
        ratio = f"{t_old / t_new:7.1f}x" if t_old else ""
        old_cell = f"{t_old:9.3f}" if t_old is not None else f"{'-':>9s}"
        print(f"{name:28s} {old_cell} {t_new:13.3f} {ratio:>8s}")
    total_old = sum(v[0] for v in old.values())
    total_new = sum(v[0] for v in new.values())
    print(f"{'total':28s} {total_old:9.3f} {total_new:13.3f} {total_old / total_new:7.1f}x")

    verdict = "ok" if one_sort[0] <= TARGET_S else "OVER TARGET"
    print(f"\none sort AUROC + AU-PRO, ranking included: median {one_sort[0]:.3f} s (target <= {TARGET_S} s: {verdict})")

    # the same numbers
    d_auroc = abs(old["pixel AUROC"][1] - new["pixel AUROC"][1])
    d_aupro = abs(old["AU-PRO (0.3)"][1] - new["AU-PRO (0.3)"][1])
    same_roc = all(np.array_equal(a, b) for a, b in zip(old["ROC curve"][1], new["ROC curve"][1]))
    same_pro = all(np.array_equal(a, b) for a, b in zip(old["PRO curve"][1], new["PRO curve"][1]))
    d_sym = max((abs(a - b) for o, n in zip(old["per symptom AUROC+AU-PRO"][1], new["per symptom AUROC+AU-PRO"][1])
                 for a, b in zip(o, n)), default=0.0)
    print(f"pixel AUROC {new['pixel AUROC'][1]:.6f} (|diff| {d_auroc:.1e}), AU-PRO {new['AU-PRO (0.3)'][1]:.6f} "
          f"(|diff| {d_aupro:.1e}), per symptom max |diff| {d_sym:.1e}; ROC curve identical: {same_roc}, "
          f"PRO curve identical: {same_pro}")


if __name__ == "__main__":
    main()
