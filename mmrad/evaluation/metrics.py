"""Evaluation metrics: pixel AUROC, AU-PRO, detection AUROC and cross-modal retrieval.

Every function takes plain numpy arrays: ``anomaly_maps`` of shape (N, H, W)
(real scores, higher = more anomalous) and ``gt_masks`` of the same shape
(bool or 0/1); ``scores`` and ``labels`` of shape (N,) for detection. Bad
input raises ``ValueError`` with a message that names the rule broken.

Definitions (facts.md section 3)
--------------------------------
* **Pixel AUROC**: ROC AUC of all pixels of all maps pooled
  (``sklearn.metrics.roc_auc_score``).
* **Detection AUROC**: ROC AUC of one score per case (sklearn).
* **Cross-modal retrieval top-1** (a diagnostic, as in the retinal CLIP /
  CLOOB work): query i's embedding of one modality retrieves, by cosine
  similarity, among the other modality's embeddings of all N cases; it is a hit
  if its own pair ranks first. Chance is 1 / N.
* **AU-PRO** (MVTec AD definition). Regions are the 8-connected components of
  each ground-truth mask, pooled over the whole test set (a region never spans
  two images). For a threshold t:

      PRO(t) = mean over all regions R of  |{p in R : s(p) >= t}| / |R|
      FPR(t) = |{p anomaly-free : s(p) >= t}| / |{p anomaly-free}|

  Images with an empty mask only add anomaly-free pixels (to both numerator
  and denominator of FPR). AU-PRO is the area under PRO as a function of FPR
  from 0 to ``fpr_limit`` (trapezoid rule, PRO linearly interpolated at exactly
  ``fpr_limit``), divided by ``fpr_limit``, so a perfect map scores 1.

Tie convention
--------------
The curve has one point per *distinct* score t, counting the pixels with
``s >= t`` (equivalently ``s > t'`` for any t' between t and the next lower
distinct score), plus the point (0, 0) for t = +inf. All pixels that share a
score therefore cross the threshold together: in the descending sort we keep
only the last point of each run of tied scores. A tie between anomaly-free and
region pixels becomes one diagonal segment, which the trapezoid rule credits
with the average PRO (neither the optimistic nor the pessimistic step). If
every pixel has the same score the curve is the diagonal (0,0) -> (1,1) and
AU-PRO at 0.3 is (0.3 * 0.3 / 2) / 0.3 = 0.15.

Algorithm
---------
Exact in O(P log P) for P pixels, no threshold grid: sort all scores once
(descending), take cumulative sums of a false-positive weight (1 for an
anomaly-free pixel, else 0) and a region weight (1 / area of the pixel's
region, else 0), keep the last index of each run of tied scores, and divide by
the number of anomaly-free pixels and the number of regions. ``aupro`` sorts
only the pixels that can affect the area below ``fpr_limit`` (see
``_curve_prefix``), which gives the same points as the full curve.

Speed: instead of ``np.argsort`` (slow on ~10 M floats), each score becomes a
uint32 key with the same order and ties (``_score_keys``) and the pair
(key, region label) is sorted as one uint64. Scores that float32 holds exactly
take a bit trick; other float64 or wide-integer scores take a dense rank from
``np.unique`` (exact, about 3x slower).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.metrics.pairwise import cosine_similarity

__all__ = ["pixel_auroc", "aupro", "pro_curve", "detection_auroc", "roc_curve_points", "retrieval_top1"]

# 8-connectivity inside each image, none across the image axis: labelling the
# whole (N, H, W) stack at once then keeps regions of different images apart.
_STRUCTURE_8_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8_IN_PLANE[1] = True


# --------------------------------------------------------------------------- validation

def _as_scores(values, name: str) -> np.ndarray:
    """A real numeric array with only finite values (bool is taken as 0/1)."""
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or inf")
    return arr


def _as_binary(values, name: str) -> np.ndarray:
    """A bool array; the input must be bool or hold only 0 and 1."""
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be binary (bool or 0/1), got dtype {arr.dtype}")
    if not ((arr == 0) | (arr == 1)).all():
        raise ValueError(f"{name} must be binary (bool or 0/1), found other values")
    return arr.astype(bool)


def _check_maps_masks(anomaly_maps, gt_masks) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (N, H, W) stack of maps and masks; the masks need both classes."""
    maps = np.asarray(anomaly_maps)
    masks = np.asarray(gt_masks)
    if maps.ndim != 3:
        raise ValueError(f"anomaly_maps must have ndim 3 (N, H, W), got shape {maps.shape}")
    if masks.ndim != 3:
        raise ValueError(f"gt_masks must have ndim 3 (N, H, W), got shape {masks.shape}")
    if maps.shape != masks.shape:
        raise ValueError(f"shape mismatch: anomaly_maps {maps.shape} vs gt_masks {masks.shape}")
    maps = _as_scores(maps, "anomaly_maps")
    masks = _as_binary(masks, "gt_masks")
    n_pos = int(np.count_nonzero(masks))
    if n_pos == 0:
        raise ValueError("gt_masks have no positive pixel (no anomalous region)")
    if n_pos == masks.size:
        raise ValueError("gt_masks have no negative pixel (no anomaly-free pixel)")
    return maps, masks


def _check_scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate one score and one 0/1 label per case; both classes must occur."""
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1:
        raise ValueError(f"scores must have ndim 1 (one per case), got shape {s.shape}")
    if y.ndim != 1:
        raise ValueError(f"labels must have ndim 1 (one per case), got shape {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"shape mismatch: scores {s.shape} vs labels {y.shape}")
    s = _as_scores(s, "scores")
    y = _as_binary(y, "labels")
    if y.all() or not y.any():
        raise ValueError("labels contain only one class; ROC AUC needs both 0 and 1")
    return s, y


def _check_fpr_limit(fpr_limit) -> float:
    try:
        limit = float(fpr_limit)
    except (TypeError, ValueError):
        raise ValueError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}") from None
    if not 0.0 < limit <= 1.0:  # also rejects NaN
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return limit


# --------------------------------------------------------------------------- PRO curve

def _score_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 keys with the same order and the same ties as ``scores`` (any shape, flattened).

    ``np.argsort`` of 11 M floats is slow; sorting integers is not. Scores
    that float32 holds exactly (float32/float16, small ints, float64 maps that
    came from float32) get the usual order-preserving bit pattern of their
    float32 value: flip every bit of a negative number, only the sign bit of a
    non-negative one. Anything else gets its dense rank (``np.unique``, slower).
    """
    flat = scores.ravel()
    f32 = None
    if flat.dtype in (np.float32, np.float16, np.int8, np.uint8, np.int16, np.uint16):
        f32 = flat.astype(np.float32)
    elif flat.dtype == np.float64:
        candidate = flat.astype(np.float32)
        if np.array_equal(candidate, flat):  # float32 -> float64 is exact, so this test is too
            f32 = candidate
    if f32 is None:
        _, rank = np.unique(flat, return_inverse=True)
        return rank.astype(np.uint32)
    f32 = f32 + np.float32(0.0)  # -0.0 becomes +0.0, so the two zeros tie
    bits = f32.view(np.uint32)
    # Arithmetic shift of the signed view: all ones for a negative number, else 0.
    flip = (f32.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    return bits ^ flip


def _region_labels(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Flat region labels (0 = anomaly-free), 1 / area per label (0 for label 0), region count.

    Regions are 8-connected components of each image's mask (the structure
    connects nothing across images).
    """
    labels, n_regions = ndimage.label(masks, structure=_STRUCTURE_8_IN_PLANE)
    labels = labels.ravel()
    areas = np.bincount(labels, minlength=n_regions + 1).astype(np.float64)
    inv_area = np.zeros_like(areas)
    inv_area[1:] = 1.0 / areas[1:]
    return labels, inv_area, n_regions


def _curve_from_keys(keys: np.ndarray, labels: np.ndarray, inv_area: np.ndarray,
                     n_normal: int, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct key, highest first, with (0, 0) prepended.

    ``keys`` (uint32 score keys) and ``labels`` are 1-D and aligned.
    ``n_normal`` and ``n_regions`` are the totals of the whole set, which may
    hold more pixels than given here (all of them scoring lower).
    """
    # Sort (key, label) pairs together as one uint64 per pixel: key in the
    # high half, label in the low half. Integer sorting is much faster than
    # an argsort, and the label is all we need to carry along.
    packed = keys.astype(np.uint64) << np.uint64(32)
    packed |= labels.astype(np.uint64)
    packed.sort()
    packed = packed[::-1]  # descending: a view
    sorted_keys = (packed >> np.uint64(32)).astype(np.uint32)
    sorted_labels = (packed & np.uint64(0xFFFFFFFF)).astype(np.intp)
    del packed
    # Last index of each run of tied scores (in the descending order).
    ends = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1])
    ends = np.append(ends, sorted_keys.size - 1)
    del sorted_keys
    cum_fp = np.cumsum(sorted_labels == 0, dtype=np.int64)[ends]
    cum_region = np.cumsum(inv_area[sorted_labels])[ends]
    fpr = np.concatenate(([0.0], cum_fp / n_normal))
    pro = np.concatenate(([0.0], cum_region / n_regions))
    # Cumulative float sums can overshoot 1 by an ulp or so.
    np.minimum(pro, 1.0, out=pro)
    return fpr, pro


def _check_ignore(ignore, masks: np.ndarray) -> np.ndarray | None:
    """``ignore``: pixels that are neither anomaly-free nor region (e.g. other symptoms)."""
    if ignore is None:
        return None
    ignore = _as_binary(ignore, "ignore")
    if ignore.shape != masks.shape:
        raise ValueError(f"shape mismatch: ignore {ignore.shape} vs gt_masks {masks.shape}")
    if np.any(ignore & masks):
        raise ValueError("ignore overlaps gt_masks: a pixel cannot be both region and ignored")
    return ignore


def _prepare(anomaly_maps, gt_masks, ignore=None):
    """Score keys, region labels, 1 / area per label and the totals, all flat."""
    maps, masks = _check_maps_masks(anomaly_maps, gt_masks)
    ignore = _check_ignore(ignore, masks)
    if maps.size >= 2**32:
        raise ValueError(f"too many pixels for this implementation ({maps.size} >= 2**32)")
    labels, inv_area, n_regions = _region_labels(masks)
    keys = _score_keys(maps)
    if ignore is not None:
        keep = ~ignore.ravel()
        keys, labels = keys[keep], labels[keep]
    n_normal = int(np.count_nonzero(labels == 0))
    if n_normal == 0:
        raise ValueError("gt_masks has no negative pixel outside the ignored ones")
    return keys, labels, inv_area, n_normal, n_regions


def pro_curve(anomaly_maps, gt_masks, ignore=None) -> tuple[np.ndarray, np.ndarray]:
    """The whole PRO curve: (fpr, pro), float64, one point per distinct score.

    Starts at (0, 0) (threshold +inf) and ends at (1, 1) (the lowest score);
    ``fpr`` is non-decreasing. See the module docstring for the tie convention.
    """
    return _curve_from_keys(*_prepare(anomaly_maps, gt_masks, ignore))


def _curve_prefix(keys, labels, inv_area, n_normal, n_regions, limit):
    """The points of the PRO curve up to the first one whose FPR exceeds ``limit``.

    Let k be the least count of anomaly-free pixels with k / n_normal > limit,
    and t* the k-th highest anomaly-free score. Every curve point at a threshold
    above t* has FPR <= limit, and the point at t* has FPR > limit; both depend
    only on pixels scoring >= t*. So sorting those pixels alone gives exactly
    the part of the curve the area needs.
    """
    k = math.floor(limit * n_normal) + 1
    if k <= n_normal:
        normal_keys = keys[labels == 0]
        t_star = np.partition(normal_keys, n_normal - k)[n_normal - k]
        del normal_keys
        keep = keys >= t_star
        fpr, pro = _curve_from_keys(keys[keep], labels[keep], inv_area, n_normal, n_regions)
        if fpr[-1] > limit:
            return fpr, pro
    # limit == 1 (or a float rounding edge case): the whole curve.
    return _curve_from_keys(keys, labels, inv_area, n_normal, n_regions)


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area under pro(fpr) on [0, limit], PRO interpolated at ``limit``."""
    # Points with fpr <= limit; there is at least (0, 0).
    n_in = int(np.searchsorted(fpr, limit, side="right"))
    x, y = fpr[:n_in], pro[:n_in]
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))
    if n_in < fpr.size:
        # The segment that crosses the limit: x0 <= limit < x1.
        x0, y0, x1, y1 = fpr[n_in - 1], pro[n_in - 1], fpr[n_in], pro[n_in]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_lim) / 2.0
    return area


def aupro(anomaly_maps, gt_masks, fpr_limit: float = 0.3, ignore=None) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit], in [0, 1].

    ``ignore`` (optional, like gt_masks) removes pixels from the evaluation
    entirely: used for one symptom's AU-PRO, where the other symptoms' pixels
    are neither regions nor anomaly-free (paper Table 13).
    """
    limit = _check_fpr_limit(fpr_limit)
    prepared = _prepare(anomaly_maps, gt_masks, ignore)
    fpr, pro = _curve_prefix(*prepared, limit)
    return float(min(max(_area_to_limit(fpr, pro, limit) / limit, 0.0), 1.0))


# --------------------------------------------------------------------------- ROC

def pixel_auroc(anomaly_maps, gt_masks, ignore=None) -> float:
    """ROC AUC of all pixels of all maps pooled (``ignore``: pixels left out, as in ``aupro``)."""
    maps, masks = _check_maps_masks(anomaly_maps, gt_masks)
    ignore = _check_ignore(ignore, masks)
    if ignore is not None:
        maps, masks = maps[~ignore], masks[~ignore]
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def detection_auroc(scores, labels) -> float:
    """ROC AUC of one anomaly score per case against its 0/1 label."""
    s, y = _check_scores_labels(scores, labels)
    return float(roc_auc_score(y, s))


def roc_curve_points(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the detection ROC curve, for plots (``sklearn.metrics.roc_curve``)."""
    s, y = _check_scores_labels(scores, labels)
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


# --------------------------------------------------------------------------- retrieval

def retrieval_top1(queries, gallery, center: bool = True) -> float:
    """Fraction of queries whose own pair (same row of ``gallery``) is the most cosine-similar.

    ``queries`` and ``gallery`` are (N, D) embeddings of the same N cases in two
    modalities. ``center`` subtracts each modality's mean embedding first: two
    encoders (or one encoder on two modalities) put the modalities in different
    regions, and the shared offset would otherwise dominate every cosine. A tie
    for first place counts as the chance of picking the pair among the tied
    (1 / number tied), so constant embeddings score exactly chance, 1 / N.
    """

    q, g = np.asarray(queries, dtype=np.float64), np.asarray(gallery, dtype=np.float64)
    if q.ndim != 2 or q.shape != g.shape:
        raise ValueError(f"queries and gallery must both be (N, D) with the same shape, got {q.shape} and {g.shape}")
    if len(q) < 2:
        raise ValueError(f"retrieval needs at least 2 cases, got {len(q)}")
    if not (np.isfinite(q).all() and np.isfinite(g).all()):
        raise ValueError("embeddings contain NaN or infinite values")
    if center:
        q, g = q - q.mean(axis=0), g - g.mean(axis=0)
    similarity = np.round(cosine_similarity(q, g), 12)  # rounding: equal cosines compare equal
    best = similarity.max(axis=1, keepdims=True)
    tied = (similarity == best).sum(axis=1)
    own_first = np.diag(similarity) == best[:, 0]
    return float(np.mean(own_first / tied))
