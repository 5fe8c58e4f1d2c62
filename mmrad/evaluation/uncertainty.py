"""Uncertainty: case-level bootstrap intervals for every metric, and paired tests between methods.

The test cases are the unit of replication, not the pixels: pixels of one
image are strongly correlated, so resampling pixels would give intervals far
too narrow. Every interval here resamples *cases* (with replacement, within
each class so every replicate has normal and anomalous cases: a stratified
bootstrap), recomputes the metric, and reports the 2.5 / 97.5 % percentiles.

* ``case_weights(labels, replicates, seed)``: the resamples as a (B, N) matrix
  of how often each case is drawn. A pure function of the labels and the seed,
  so every method evaluated on the same test cases gets the *same* resamples:
  two methods' replicates are paired, and their difference is a paired
  bootstrap (``paired_bootstrap_p``).
* Detection AUROC per replicate is exact: the weighted Mann-Whitney statistic
  ``w_pos . C . w_neg / (W_pos W_neg)`` with ``C`` the (pos x neg) matrix of
  1 / 0.5 / 0 comparisons.
* Pixel AUROC and AU-PRO per replicate come from per-image histograms
  (``PixelHistograms``): every pixel's score is put in one of ``bins`` bins cut
  at quantiles of the anomaly-free scores (so each bin holds about 1 / bins of
  the false positives); an image contributes its counts of anomaly-free pixels,
  of region pixels and of region weight (1 / region area, for PRO) per bin; a
  replicate's curves are weighted sums of those rows. A bin is a tie (the
  metrics' tie convention), so the binned value differs from the exact one by
  at most about 1 / (2 bins); the interval is shifted by that difference
  (exact point estimate minus binned point estimate), so it is centred on the
  exact value the report prints.
* ``delong(scores_a, scores_b, labels)``: DeLong's test for two correlated
  detection AUROCs on the same cases (DeLong, DeLong & Clarke-Pearson 1988),
  in the fast midrank form (Sun & Xu 2014): AUCs, their covariance, z and the
  two-sided p-value.
* ``wilson(hits, n)``: the Wilson score interval of a proportion (retrieval top-1).
* ``over_seeds(scores_by_seed, labels, weights, seed)``: a method's mean
  detection AUROC over its training seeds and replicates that resample both
  the cases (the shared rows of ``weights``) and the seeds (with
  replacement): an interval that covers the method's own randomness too;
  ``seed_mean`` does the same for any metric from its per-seed replicates
  (the ablation grid).

Costs, measured in docs/benchmarks.md: 1000 replicates of every metric of one
evaluation take a few percent of the evaluate stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri  # the normal cdf and its inverse: what scipy.stats.norm computes

from mmrad.evaluation import metrics
from mmrad.evaluation.metrics import regions

LEVEL = 0.95


def case_weights(labels, replicates: int, seed: int) -> np.ndarray:
    """(replicates, N) int: how often each case is drawn in each stratified bootstrap resample.

    Cases are resampled within their class (label 0 / 1), so every replicate
    keeps the test set's class counts.
    """
    y = np.asarray(labels).astype(bool)
    rng = np.random.default_rng([seed, 9176])
    weights = np.zeros((replicates, y.size), dtype=np.int64)
    for cls in (False, True):
        members = np.flatnonzero(y == cls)
        if members.size == 0:
            continue
        draws = rng.integers(0, members.size, size=(replicates, members.size))
        rows = np.repeat(np.arange(replicates), members.size)
        np.add.at(weights, (rows, members[draws.ravel()]), 1)
    return weights


def percentile_interval(replicates: np.ndarray, shift: float = 0.0, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (NaNs dropped), moved by ``shift``."""
    values = np.asarray(replicates, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return (float(lo + shift), float(hi + shift))


# --------------------------------------------------------------------------- detection

def _comparison_matrix(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    sp, sn = scores[pos][:, None], scores[neg][None, :]
    return (sp > sn) + 0.5 * (sp == sn), pos, neg


def detection_replicates(scores, labels, weights: np.ndarray) -> np.ndarray:
    """Exact ROC AUC of ``scores`` under each resample (rows of ``weights``), (B,)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    c, pos, neg = _comparison_matrix(s, y)
    wp, wn = weights[:, pos].astype(np.float64), weights[:, neg].astype(np.float64)
    return np.einsum("bp,pn,bn->b", wp, c, wn) / (wp.sum(1) * wn.sum(1))


@dataclass(frozen=True)
class DeLong:
    auc_a: float
    auc_b: float
    difference: float  # auc_a - auc_b
    std_error: float
    z: float
    p_value: float  # two-sided
    interval: tuple[float, float]  # 95 % interval of the difference (normal approximation)


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    i = 0
    while i < x.size:
        j = i
        while j < x.size and sorted_x[j] == sorted_x[i]:
            j += 1
        ranks[order[i:j]] = 0.5 * (i + j - 1) + 1
        i = j
    return ranks


def delong_components(scores: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUC, V10 per positive case, V01 per negative case): DeLong's structural components (Sun & Xu's midranks)."""
    y = labels.astype(bool)
    pos, neg = scores[y], scores[~y]
    m, n = pos.size, neg.size
    tx, ty, tz = _midranks(pos), _midranks(neg), _midranks(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    return float(auc), v10, v01


def delong(scores_a, scores_b, labels) -> DeLong:
    """DeLong's paired test of two detection AUROCs on the same cases (H0: equal AUCs)."""
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if not (a.shape == b.shape == y.shape and a.ndim == 1):
        raise ValueError(f"scores and labels must be 1-D of one length, got {a.shape}, {b.shape}, {y.shape}")
    if y.all() or not y.any():
        raise ValueError("labels contain only one class; ROC AUC needs both 0 and 1")
    auc_a, v10a, v01a = delong_components(a, y)
    auc_b, v10b, v01b = delong_components(b, y)
    m, n = v10a.size, v01a.size
    s10 = np.cov(np.vstack([v10a, v10b])) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.vstack([v01a, v01b])) if n > 1 else np.zeros((2, 2))
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = auc_a - auc_b
    se = math.sqrt(max(var, 0.0))
    if se == 0.0:
        z, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    else:
        z = diff / se
        p = float(2 * ndtr(-abs(z)))
    half = ndtri(0.5 + LEVEL / 2) * se
    return DeLong(auc_a, auc_b, diff, se, z, p, (diff - half, diff + half))


def over_seeds(scores_by_seed, labels, weights: np.ndarray, seed: int) -> tuple[float, np.ndarray]:
    """(mean detection AUROC over the seeds, its (B,) replicates) for one method run with S seeds.

    ``scores_by_seed`` is (S, N): each seed's case scores on the same N cases. Replicate b draws
    the cases by ``weights[b]`` (the same draw for every seed, and for every method given the same
    weights: methods' replicates stay paired) and S seeds with replacement (its own stream of ``seed``),
    and averages those seeds' AUROCs under that draw. With one seed, or S identical runs, it is
    ``detection_replicates``. Three seeds resample coarsely; the interval widens with the spread
    between seeds, which a case bootstrap of one run cannot show.
    """
    runs = np.atleast_2d(np.asarray(scores_by_seed, dtype=np.float64))
    per_seed = np.stack([detection_replicates(s, labels, weights) for s in runs])  # (S, B)
    return seed_mean([metrics.detection_auroc(s, labels) for s in runs], per_seed, seed)


def seed_mean(points, per_seed_replicates, seed: int) -> tuple[float, np.ndarray]:
    """(mean of S seeds' values, its (B,) replicates) for any metric whose per-seed case-bootstrap replicates
    (S, B) share the case resamples (the same ``case_weights`` rows): replicate b averages S seeds drawn with
    replacement (the stream of ``seed``) at case resample b. The same ``seed`` draws the same seeds for every
    metric and method, so two methods' replicates stay paired."""
    reps = np.atleast_2d(np.asarray(per_seed_replicates, dtype=np.float64))
    s, b = reps.shape
    picks = np.random.default_rng([seed, 5113]).integers(0, s, size=(b, s))
    return float(np.mean(points)), reps[picks, np.arange(b)[:, None]].mean(axis=1)


def paired_bootstrap_p(replicates_a, replicates_b, observed: float | None = None) -> float:
    """Two-sided p-value of H0 "no difference" from paired replicates (same resamples for both methods).

    The share of replicate differences on the other side of zero, doubled,
    with the usual +1 correction so it is never exactly 0.
    """
    d = np.asarray(replicates_a, dtype=np.float64) - np.asarray(replicates_b, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return math.nan
    below, above = np.count_nonzero(d <= 0), np.count_nonzero(d >= 0)
    return float(min(1.0, 2 * (min(below, above) + 1) / (d.size + 1)))


def bootstrap_p_floor(replicates: int) -> float:
    """The smallest p ``paired_bootstrap_p`` can give from this many replicate differences: 2 / (B + 1)."""
    return 2 / (replicates + 1)


def format_p(p: float, floor: float = 0.0) -> str:
    """A p-value as text: ``<= 0.002`` at a resampling test's ``floor`` (no replicate crossed zero: the p
    can be no smaller there, the true one may be far smaller), ``<0.001`` below that, else 3 decimals."""
    if floor and p <= floor * (1 + 1e-9):
        return f"<= {floor:.3f}"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def wilson(hits: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion hits / n."""
    if n <= 0:
        return (math.nan, math.nan)
    z = ndtri(0.5 + level / 2)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


# --------------------------------------------------------------------------- pixel metrics

class PixelHistograms:
    """Per-image histograms of one method's maps, from which any resample's pixel AUROC and AU-PRO follow.

    ``maps`` (N, H, W) scores; bins are cut once at quantiles of the
    anomaly-free pixels' scores (a strided subsample, deterministic), shared
    by every positive set given to ``add``.
    """

    def __init__(self, maps: np.ndarray, normal: np.ndarray, bins: int = 2048):
        self.n_images = maps.shape[0]
        flat = maps.reshape(self.n_images, -1)
        normal_scores = flat[normal.reshape(self.n_images, -1)]
        step = max(1, normal_scores.size // (bins * 64))
        edges = np.unique(np.quantile(normal_scores[::step].astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1]))
        self.bins = edges.size + 1
        self.index = np.searchsorted(edges, flat, side="right").astype(np.int64)  # (N, P): bin of each pixel
        self.neg = self._counts(normal.reshape(self.n_images, -1))

    def _counts(self, select: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
        """(N, bins) counts of the ``select``ed pixels, or sums of ``weight`` (one per selected pixel, raster order)."""
        image = np.broadcast_to(np.arange(self.n_images)[:, None], select.shape)[select]
        keys = image * self.bins + self.index[select]
        return np.bincount(keys, weights=weight, minlength=self.n_images * self.bins).reshape(self.n_images, self.bins)

    def positives(self, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positive counts (N, bins), region weight (N, bins), regions per image (N,)) of a positive mask set.

        Regions (and 1 / area) are ``mmrad.evaluation.metrics.regions``: the
        same labelling as the exact AU-PRO.
        """
        masks = np.asarray(masks, dtype=bool)
        reg = regions(masks)
        flat_masks = masks.reshape(self.n_images, -1)
        pos = self._counts(flat_masks)
        region = self._counts(flat_masks, reg.inv_area[reg.labels])  # labels: raster order, as the selection
        return pos, region, reg.per_image()


def binned_auroc(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """ROC AUC from (B, bins) histograms (ascending bins; a bin is a tie), (B,)."""
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    return num / (pos.sum(axis=1) * neg.sum(axis=1))


def binned_aupro(neg: np.ndarray, region: np.ndarray, n_regions: np.ndarray, limit: float = 0.3) -> np.ndarray:
    """AU-PRO up to ``limit`` from (B, bins) histograms of anomaly-free counts and region weight, (B,)."""
    fp = np.cumsum(neg[:, ::-1], axis=1) / neg.sum(axis=1, keepdims=True)
    pro = np.cumsum(region[:, ::-1], axis=1) / n_regions[:, None]
    fpr = np.concatenate([np.zeros((fp.shape[0], 1)), fp], axis=1)
    pro = np.minimum(np.concatenate([np.zeros((pro.shape[0], 1)), pro], axis=1), 1.0)
    out = np.empty(fp.shape[0])
    for b in range(fp.shape[0]):
        x, y = fpr[b], pro[b]
        keep = x <= limit
        xs, ys = x[keep], y[keep]
        area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))
        k = int(keep.sum())
        if k < x.size and x[k] > xs[-1]:
            y_lim = ys[-1] + (y[k] - ys[-1]) * (limit - xs[-1]) / (x[k] - xs[-1])
            area += (limit - xs[-1]) * (ys[-1] + y_lim) / 2
        out[b] = area / limit
    return out


def resampled_histograms(hist: PixelHistograms, masks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """(anomaly-free counts, positive counts, region weight, regions), each summed over the cases of every
    resample: row 0 all cases once, then one row per row of ``weights``.

    A per-symptom evaluation passes its own positives; the anomaly-free pixels are the histograms' own.
    """
    pos_rows, region_rows, regions = hist.positives(masks)
    w = np.vstack([np.ones((1, weights.shape[1])), weights]).astype(np.float64)
    return w @ hist.neg, w @ pos_rows, w @ region_rows, w @ regions


def pixel_metrics(neg: np.ndarray, pos: np.ndarray, region: np.ndarray, n_regions: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """Pixel AUROC and AU-PRO of each row of ``resampled_histograms``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = binned_auroc(neg, pos)
        aupro = binned_aupro(neg, region, np.where(n_regions > 0, n_regions, np.nan))
    return {"pixel_auroc": auroc, "aupro": aupro}


# --------------------------------------------------------------------------- bands on curves

def step_values(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """A curve's value at each ``grid`` point: the highest y reached at x <= the point (ROC / PRO curves rise
    with x, so this is the best rate at that false-positive rate); 0 before the first point."""
    index = np.searchsorted(x, grid, side="right") - 1
    return np.where(index >= 0, y[np.clip(index, 0, None)], 0.0)


def pointwise_band(xs: np.ndarray, ys: np.ndarray, grid: np.ndarray, level: float = LEVEL
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) at each ``grid`` point: percentiles of the replicate curves (rows of ``xs``, ``ys``, x
    ascending) there. Pointwise, not simultaneous: each point's band covers that point's value."""
    values = np.stack([step_values(x, y, grid) for x, y in zip(xs, ys)])
    tail = 100 * (1 - level) / 2
    with np.errstate(invalid="ignore"):
        low, high = np.nanpercentile(values, [tail, 100 - tail], axis=0)
    return low, high


def _from_the_top(rows: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Shares at or above each threshold, from the highest bin down, with (0) first: (B, bins + 1)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.cumsum(rows[:, ::-1], axis=1) / totals[:, None]
    return np.concatenate([np.zeros((rows.shape[0], 1)), shares], axis=1)


def pixel_curve_bands(neg: np.ndarray, pos: np.ndarray, region: np.ndarray, n_regions: np.ndarray,
                      roc_grid: np.ndarray, pro_grid: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pointwise 95 % bands of the pixel ROC (TPR at ``roc_grid``) and PRO curve (at ``pro_grid``) from the
    resamples' histograms (``resampled_histograms`` without its row 0). A bin is a tie, so a band's FPR is
    exact to about one bin (1 / ``bins`` of the anomaly-free pixels)."""
    fpr = _from_the_top(neg, neg.sum(axis=1))
    tpr = _from_the_top(pos, pos.sum(axis=1))
    pro = np.minimum(_from_the_top(region, np.where(n_regions > 0, n_regions, np.nan)), 1.0)
    return {"roc": pointwise_band(fpr, tpr, roc_grid), "pro": pointwise_band(fpr, pro, pro_grid)}


def detection_roc_band(scores, labels, weights: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise 95 % band of the case-level ROC curve (TPR at each ``grid`` FPR) over the case resamples."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-s, kind="stable")
    last_of_tie = np.append(np.flatnonzero(np.diff(s[order])), s.size - 1)  # a threshold per distinct score
    w = weights[:, order].astype(np.float64)

    def rate(members: np.ndarray) -> np.ndarray:  # share of the class scoring at or above each threshold, 0 first
        drawn = w * members
        shares = np.cumsum(drawn, axis=1)[:, last_of_tie] / drawn.sum(axis=1, keepdims=True)
        return np.concatenate([np.zeros((w.shape[0], 1)), shares], axis=1)

    return pointwise_band(rate(~y[order]), rate(y[order]), grid)
