"""Evaluation metrics: pixel AUROC, AU-PRO, detection AUROC and cross-modal retrieval.

Every function takes plain numpy arrays: ``anomaly_maps`` of shape (N, H, W)
(real scores, higher = more anomalous) and ``gt_masks`` of the same shape
(bool or 0/1); ``scores`` and ``labels`` of shape (N,) for detection. Bad
input raises ``ValueError`` with a message that names the rule broken.

Definitions (facts.md section 3)
--------------------------------
* **Pixel AUROC**: ROC AUC of all pixels of all maps pooled (the value of
  ``sklearn.metrics.roc_auc_score``, computed as described below).
* **Detection AUROC**: ROC AUC of one score per case (the same computation).
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

Algorithm: one sort per set of maps
-----------------------------------
``RankedPixels(maps)`` sorts one set of maps once; every metric of any
ground truth over those maps (the whole mask, each symptom's mask with the
other symptoms ignored, ...) then follows without another sort, exactly (no
threshold grid):

* Each score becomes a uint32 key with the same order and the same ties
  (``_score_keys``) and the keys are sorted once. For any key k, the number of
  pixels scoring below k and at most k are two binary searches in them, so a
  tie group never needs to be looked at pixel by pixel, and no permutation
  of the pixels is kept.
* ``ranked.against(gt_masks, ignore)`` looks only at the region pixels and the
  ignored ones (a few per cent of the pixels): with their keys sorted (small),
  "kept pixels below / at most k" = "all pixels below / at most k" minus
  "ignored pixels below / at most k".
* Pixel AUROC is the Mann-Whitney statistic: the sum of the region pixels'
  midranks among the kept pixels (a tie counts a half), in exact integers. It
  is the trapezoid area under the ROC curve over its distinct-threshold points,
  i.e. what ``sklearn.metrics.roc_auc_score`` computes, up to its float
  rounding (< 1e-15 here).
* The PRO curve moves up only at the scores of region pixels ("events") and
  is horizontal in between. At each event score the counts of kept and
  region pixels strictly above it and at or above it (and the cumulative
  region weight, 1 / area per pixel) give the two corners of that tie group;
  the trapezoid area over those corners, PRO linearly interpolated at
  ``fpr_limit``, equals the area under the full curve. (Only the region
  pixels are sorted, as (key, region label) pairs, for the weight sums.)
* The full curves (``pro_curve``, ``roc_curve``: one point per distinct kept
  score, for plots) are O(P) array passes over the runs of tied keys, with
  the same integer counts; ``roc_curve`` drops intermediate points exactly as
  ``sklearn.metrics.roc_curve(drop_intermediate=True)`` does, so its points
  are sklearn's bit for bit. PRO values are the same cumulative float sums,
  in the same order, as a per-pixel cumulative sum over the descending sort.

``pixel_auroc``, ``aupro``, ``pro_curve``, ``detection_auroc`` and
``roc_curve_points`` are thin wrappers (validate, rank, query): one code path.

Speed (``bench/metrics.py``, 171 maps of 256 x 256 = 11.2 M pixels,
float32, 2 shared cores, medians): ranking once ~0.16 s (key bits ~0.04 s,
uint32 sort ~0.1 s); then per mask AUROC ~0.02 s and AU-PRO ~0.04 s, the
ROC and PRO curves ~0.2 s each. The sort-per-metric path took ~5 s for
``roc_auc_score``, ~3 s for ``roc_curve``, 0.36 s for AU-PRO and 0.8 s for
the PRO curve.
Scores that float32 holds exactly take the bit trick in ``_score_keys``;
other float64 or wide-integer scores take a dense rank from ``np.unique``
(exact, slower).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage
from sklearn.metrics.pairwise import cosine_similarity

__all__ = ["RankedPixels", "RankedMasks", "Regions", "regions", "pixel_auroc", "aupro", "pro_curve",
           "detection_auroc", "roc_curve_points", "retrieval_top1"]

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
    masks = _check_classes(_as_binary(masks, "gt_masks"))
    return maps, masks


def _check_classes(masks: np.ndarray) -> np.ndarray:
    """Bool masks with at least one positive and one negative pixel."""
    n_pos = int(np.count_nonzero(masks))
    if n_pos == 0:
        raise ValueError("gt_masks have no positive pixel (no anomalous region)")
    if n_pos == masks.size:
        raise ValueError("gt_masks have no negative pixel (no anomaly-free pixel)")
    return masks


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


# --------------------------------------------------------------------------- score keys, regions

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


@dataclass(frozen=True)
class Regions:
    """The anomalous regions of a (N, H, W) mask stack: 8-connected components of each image's mask, pooled.

    ``pixels``: flat indices (raster order over the stack) of every region
    pixel; ``labels``: the region of each (1..count, numbered in raster order
    of their first pixel, as ``ndimage.label`` of the whole stack numbers
    them); ``inv_area``: 1 / area by label, index 0 (anomaly-free) = 0.
    """

    pixels: np.ndarray
    labels: np.ndarray
    inv_area: np.ndarray
    count: int
    shape: tuple[int, ...]

    def per_image(self) -> np.ndarray:
        """Number of regions in each image, (N,)."""
        plane = int(np.prod(self.shape[1:]))
        image = np.zeros(self.count + 1, dtype=np.intp)
        image[self.labels] = self.pixels // plane  # a region never spans two images
        return np.bincount(image[1:], minlength=self.shape[0])


def regions(masks: np.ndarray) -> Regions:
    """The ``Regions`` of a (N, H, W) bool mask stack (the one labelling of regions, also for uncertainty)."""
    masks = np.asarray(masks, dtype=bool)
    has = masks.any(axis=tuple(range(1, masks.ndim)))
    sub = masks if has.all() else masks[has]  # images without a region add no label: same numbering
    labels, count = ndimage.label(sub, structure=_STRUCTURE_8_IN_PLANE)
    labels = labels[sub]  # raster order of the region pixels, as flatnonzero of the whole stack
    areas = np.bincount(labels, minlength=count + 1).astype(np.float64)
    inv_area = np.zeros_like(areas)
    inv_area[1:] = 1.0 / areas[1:]
    return Regions(np.flatnonzero(masks), labels, inv_area, int(count), masks.shape)


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


def _runs_descending(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys, how many entries are >= each) of keys sorted descending."""
    ends = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1])
    ends = np.append(ends, sorted_keys.size - 1)
    return sorted_keys[ends], ends + 1


# --------------------------------------------------------------------------- ranking

class RankedPixels:
    """One set of maps, sorted once; the metrics of any ground truth over them without another sort.

    ``RankedPixels(anomaly_maps)`` validates and ranks (N, H, W) maps;
    ``against(gt_masks, ignore=None)`` gives a ``RankedMasks`` with
    ``auroc()``, ``aupro(fpr_limit)``, ``roc_curve()`` and ``pro_curve()``;
    ``pixel_auroc`` / ``aupro`` / ``roc_curve`` / ``pro_curve`` are shortcuts.
    """

    def __init__(self, anomaly_maps):
        maps = np.asarray(anomaly_maps)
        if maps.ndim != 3:
            raise ValueError(f"anomaly_maps must have ndim 3 (N, H, W), got shape {maps.shape}")
        self._rank(_as_scores(maps, "anomaly_maps"))

    @classmethod
    def _of(cls, scores: np.ndarray) -> RankedPixels:
        """Rank already validated scores of any shape (detection: one per case)."""
        ranked = cls.__new__(cls)
        ranked._rank(scores)
        return ranked

    def _rank(self, scores: np.ndarray) -> None:
        if scores.size >= 2**32:
            raise ValueError(f"too many pixels for this implementation ({scores.size} >= 2**32)")
        self.shape = scores.shape
        self.size = int(scores.size)
        self.keys = _score_keys(scores)  # flat, one per pixel
        self.sorted_keys = np.sort(self.keys)  # the one sort

    @cached_property
    def runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct keys ascending, index of each one's first pixel in ``sorted_keys`` + the total at the end).

        Only the full curves need them (one point per distinct score).
        """
        s = self.sorted_keys
        starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
        return s[starts], np.append(starts, s.size)

    def against(self, gt_masks, ignore=None) -> RankedMasks:
        """These maps against one ground truth: gt_masks (bool or 0/1, like the maps), ``ignore`` left out."""
        masks = np.asarray(gt_masks)
        if masks.ndim != 3:
            raise ValueError(f"gt_masks must have ndim 3 (N, H, W), got shape {masks.shape}")
        if masks.shape != self.shape:
            raise ValueError(f"shape mismatch: anomaly_maps {self.shape} vs gt_masks {masks.shape}")
        masks = _check_classes(_as_binary(masks, "gt_masks"))
        return RankedMasks(self, masks, _check_ignore(ignore, masks))

    def pixel_auroc(self, gt_masks, ignore=None) -> float:
        return self.against(gt_masks, ignore).auroc()

    def aupro(self, gt_masks, fpr_limit: float = 0.3, ignore=None) -> float:
        limit = _check_fpr_limit(fpr_limit)
        return self.against(gt_masks, ignore).aupro(limit)

    def roc_curve(self, gt_masks, ignore=None) -> tuple[np.ndarray, np.ndarray]:
        return self.against(gt_masks, ignore).roc_curve()

    def pro_curve(self, gt_masks, ignore=None) -> tuple[np.ndarray, np.ndarray]:
        return self.against(gt_masks, ignore).pro_curve()


class RankedMasks:
    """A ``RankedPixels`` against one ground truth (validated bool masks, optional bool ``ignore``).

    Keeps only the keys of the positive (region) pixels and the sorted keys of
    the ignored ones; "kept" pixels are all but the ignored ones. Results that
    several metrics share (the positives' runs, regions, full-curve counts) are
    computed once, on first use.
    """

    def __init__(self, ranked: RankedPixels, masks: np.ndarray, ignore: np.ndarray | None = None):
        self.ranked = ranked
        self.masks = masks
        flat = masks.reshape(-1)
        self._pos_keys = ranked.keys[flat]  # raster order, as Regions.pixels
        self.n_pos = int(self._pos_keys.size)
        if ignore is None:
            self._ign_keys = np.empty(0, dtype=np.uint32)
        else:
            self._ign_keys = np.sort(ranked.keys[ignore.reshape(-1)])
        self.n_kept = ranked.size - int(self._ign_keys.size)
        self.n_neg = self.n_kept - self.n_pos
        if self.n_neg == 0:
            raise ValueError("gt_masks has no negative pixel outside the ignored ones")

    # ---------------------------------------------------------------- counting

    def _kept_below(self, keys: np.ndarray, side: str) -> np.ndarray:
        """Kept pixels with key < k (side "left") or <= k (side "right"), for ascending ``keys``."""
        n = np.searchsorted(self.ranked.sorted_keys, keys, side)
        if self._ign_keys.size:
            n -= np.searchsorted(self._ign_keys, keys, side)
        return n

    @cached_property
    def _pos_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct positive keys descending, positives with key >= each)."""
        return _runs_descending(np.sort(self._pos_keys)[::-1])

    @cached_property
    def _kept_ge_gt(self) -> tuple[np.ndarray, np.ndarray]:
        """Kept pixels with key >= / > each distinct positive key (descending, as ``_pos_runs``)."""
        keys = self._pos_runs[0][::-1]  # ascending for the searches
        ge = self.n_kept - self._kept_below(keys, "left")
        gt = self.n_kept - self._kept_below(keys, "right")
        return ge[::-1], gt[::-1]

    @cached_property
    def regions(self) -> Regions:
        return regions(self.masks)

    @cached_property
    def _region_weight_ge(self) -> np.ndarray:
        """Cumulative region weight (sum of 1 / area) of the positives with key >= each distinct positive key.

        Summed pixel by pixel in descending (key, label) order: the same float
        sums, in the same order, as a cumulative sum over the whole descending
        sort (the anomaly-free pixels add exact zeros).
        """
        reg = self.regions
        packed = self._pos_keys.astype(np.uint64) << np.uint64(32)
        packed |= reg.labels.astype(np.uint64)
        packed.sort()
        packed = packed[::-1]
        keys = (packed >> np.uint64(32)).astype(np.uint32)
        cum = np.cumsum(reg.inv_area[(packed & np.uint64(0xFFFFFFFF)).astype(np.intp)])
        ends = np.append(np.flatnonzero(keys[1:] != keys[:-1]), keys.size - 1)
        return cum[ends]

    # ---------------------------------------------------------------- metrics

    def auroc(self) -> float:
        """Pixel ROC AUC: Mann-Whitney with midranks among the kept pixels, exact in integers."""
        keys = np.sort(self._pos_keys)
        below = self._kept_below(keys, "left")  # kept pixels scoring lower
        at_most = self._kept_below(keys, "right")  # ... lower or tied (the pixel itself included)
        # twice the sum of midranks (1-based): sum of (below + at_most + 1)
        twice_ranks = int(below.sum(dtype=np.int64)) + int(at_most.sum(dtype=np.int64)) + self.n_pos
        twice_u = twice_ranks - self.n_pos * (self.n_pos + 1)
        return twice_u / (2 * self.n_pos * self.n_neg)

    def pro_corners(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, pro) at the corners of the PRO curve: (0, 0), the two ends of each tie group holding region
        pixels (highest first), and (1, 1). Between corners the full curve is straight, so its area is theirs."""
        _, pos_ge = self._pos_runs
        kept_ge, kept_gt = self._kept_ge_gt
        pos_gt = np.concatenate(([0], pos_ge[:-1]))
        w_ge = self._region_weight_ge
        w_gt = np.concatenate(([0.0], w_ge[:-1]))
        n = pos_ge.size
        fpr = np.empty(2 * n + 2)
        pro = np.empty(2 * n + 2)
        fpr[0], pro[0] = 0.0, 0.0
        fpr[1:-1:2], pro[1:-1:2] = (kept_gt - pos_gt) / self.n_neg, w_gt
        fpr[2:-1:2], pro[2:-1:2] = (kept_ge - pos_ge) / self.n_neg, w_ge
        fpr[-1], pro[-1] = 1.0, w_ge[-1]
        pro[1:] /= self.regions.count
        np.minimum(pro, 1.0, out=pro)  # cumulative float sums can overshoot 1 by an ulp or so
        return fpr, pro

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """Normalised area under the PRO curve for FPR in [0, fpr_limit], in [0, 1]."""
        limit = _check_fpr_limit(fpr_limit)
        fpr, pro = self.pro_corners()
        return float(min(max(_area_to_limit(fpr, pro, limit) / limit, 0.0), 1.0))

    @cached_property
    def _curve_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For each distinct kept key, descending: kept and positive pixels with key >= it; plus the index
        of each distinct positive key among them and the run length each positive count holds for."""
        unique, starts = self.ranked.runs
        kept = np.diff(starts)
        if self._ign_keys.size:
            kept = kept - np.bincount(np.searchsorted(unique, self._ign_keys), minlength=unique.size)
        kept = kept[::-1]
        at = unique.size - 1 - np.searchsorted(unique, self._pos_runs[0])  # ascending positions
        if self._ign_keys.size:
            nonempty = kept > 0  # distinct scores held only by ignored pixels are no threshold
            if not nonempty.all():
                at = (np.cumsum(nonempty) - 1)[at]
                kept = kept[nonempty]
        kept_ge = np.cumsum(kept)
        lengths = np.diff(np.concatenate(([0], at, [kept.size])))
        pos_ge = np.repeat(np.concatenate(([0], self._pos_runs[1])), lengths)
        return kept_ge, pos_ge, at, lengths

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr): the points of ``sklearn.metrics.roc_curve(drop_intermediate=True)``, bit for bit."""
        kept_ge, tps, _, _ = self._curve_counts
        fps = kept_ge - tps
        if fps.size > 2:  # sklearn's rule: drop a point whose two steps are equal
            keep = np.flatnonzero(np.concatenate(
                ([True], np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), [True])))
            fps, tps = fps[keep], tps[keep]
        fps = np.concatenate(([0], fps))
        tps = np.concatenate(([0], tps))
        return fps / fps[-1], tps / tps[-1]

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole PRO curve: (fpr, pro), float64, one point per distinct kept score, (0, 0) first."""
        kept_ge, pos_ge, _, lengths = self._curve_counts
        weight = np.repeat(np.concatenate(([0.0], self._region_weight_ge)), lengths)
        fpr = np.concatenate(([0.0], (kept_ge - pos_ge) / self.n_neg))
        pro = np.concatenate(([0.0], weight / self.regions.count))
        np.minimum(pro, 1.0, out=pro)
        return fpr, pro


# --------------------------------------------------------------------------- public functions

def _ranked_masks(anomaly_maps, gt_masks, ignore) -> RankedMasks:
    maps, masks = _check_maps_masks(anomaly_maps, gt_masks)
    ignore = _check_ignore(ignore, masks)
    return RankedMasks(RankedPixels._of(maps), masks, ignore)


def pro_curve(anomaly_maps, gt_masks, ignore=None) -> tuple[np.ndarray, np.ndarray]:
    """The whole PRO curve: (fpr, pro), float64, one point per distinct score.

    Starts at (0, 0) (threshold +inf) and ends at (1, 1) (the lowest score);
    ``fpr`` is non-decreasing. See the module docstring for the tie convention.
    """
    return _ranked_masks(anomaly_maps, gt_masks, ignore).pro_curve()


def aupro(anomaly_maps, gt_masks, fpr_limit: float = 0.3, ignore=None) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit], in [0, 1].

    ``ignore`` (optional, like gt_masks) removes pixels from the evaluation
    entirely: used for one symptom's AU-PRO, where the other symptoms' pixels
    are neither regions nor anomaly-free (paper Table 13).
    """
    limit = _check_fpr_limit(fpr_limit)
    return _ranked_masks(anomaly_maps, gt_masks, ignore).aupro(limit)


def pixel_auroc(anomaly_maps, gt_masks, ignore=None) -> float:
    """ROC AUC of all pixels of all maps pooled (``ignore``: pixels left out, as in ``aupro``)."""
    return _ranked_masks(anomaly_maps, gt_masks, ignore).auroc()


def detection_auroc(scores, labels) -> float:
    """ROC AUC of one anomaly score per case against its 0/1 label."""
    s, y = _check_scores_labels(scores, labels)
    return RankedMasks(RankedPixels._of(s), y).auroc()


def roc_curve_points(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the detection ROC curve, for plots (the points of ``sklearn.metrics.roc_curve``)."""
    s, y = _check_scores_labels(scores, labels)
    return RankedMasks(RankedPixels._of(s), y).roc_curve()


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
