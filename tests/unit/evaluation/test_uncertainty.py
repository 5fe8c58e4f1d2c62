"""Uncertainty (mmrad.evaluation.uncertainty): intervals and paired tests against references, in numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mmrad.evaluation import metrics, uncertainty


def _brute_delong(a, b, y):
    """DeLong 1988 written out with double loops: structural components, their covariances, z."""
    y = np.asarray(y, bool)

    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0

    comps = []
    for s in (a, b):
        pos, neg = s[y], s[~y]
        v10 = np.array([np.mean([psi(p, q) for q in neg]) for p in pos])
        v01 = np.array([np.mean([psi(p, q) for p in pos]) for q in neg])
        comps.append((v10.mean(), v10, v01))
    m, n = y.sum(), (~y).sum()
    s10 = np.cov(np.vstack([comps[0][1], comps[1][1]]))
    s01 = np.cov(np.vstack([comps[0][2], comps[1][2]]))
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    return comps[0][0], comps[1][0], var


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_equals_the_brute_force_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(9, bool), np.zeros(12, bool)]
    a = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounded: ties within and across classes
    b = np.round(a + rng.normal(0, 0.7, y.size), 1)
    result = uncertainty.delong(a, b, y)
    auc_a, auc_b, var = _brute_delong(a, b, y)
    assert result.auc_a == pytest.approx(auc_a, abs=1e-12) == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert result.auc_b == pytest.approx(auc_b, abs=1e-12)
    assert result.std_error ** 2 == pytest.approx(var, rel=1e-10)
    assert 0.0 < result.p_value <= 1.0


def test_delong_identical_scores_give_p_one_and_a_clear_difference_a_small_p():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(60, bool), np.zeros(60, bool)]
    good = rng.normal(y * 2.0, 1.0)
    assert uncertainty.delong(good, good, y).p_value == 1.0
    noise = rng.normal(0, 1.0, y.size)
    result = uncertainty.delong(good, noise, y)
    assert result.difference > 0.3 and result.p_value < 1e-6
    with pytest.raises(ValueError, match="only one class"):
        uncertainty.delong(good, noise, np.ones(y.size))


def test_case_weights_keep_class_counts_and_depend_only_on_labels_and_seed():
    labels = np.r_[np.zeros(7), np.ones(5)].astype(int)
    w = uncertainty.case_weights(labels, 300, seed=11)
    assert w.shape == (300, 12)
    assert (w[:, labels == 0].sum(1) == 7).all() and (w[:, labels == 1].sum(1) == 5).all()
    assert np.array_equal(w, uncertainty.case_weights(labels, 300, seed=11))
    assert not np.array_equal(w, uncertainty.case_weights(labels, 300, seed=12))
    assert 0.3 < (w == 0).mean() < 0.45  # each case left out of about (1 - 1/n)^n of the resamples


def test_detection_replicates_are_exact_weighted_aurocs():
    rng = np.random.default_rng(4)
    labels = np.r_[np.ones(8), np.zeros(10)].astype(int)
    scores = np.round(rng.normal(labels, 1.0), 1)
    w = uncertainty.case_weights(labels, 5, seed=1)
    reps = uncertainty.detection_replicates(scores, labels, w)
    for row, value in zip(w, reps):
        idx = np.repeat(np.arange(labels.size), row)  # the resample written out case by case
        assert value == pytest.approx(roc_auc_score(labels[idx], scores[idx]), abs=1e-12)


def test_bootstrap_interval_matches_the_large_sample_reference():
    """Binormal scores, n = 150 + 150: the bootstrap SE of the AUROC equals DeLong's SE (a large-sample
    reference) within 15 %, and the 95 % interval covers the true AUC Phi(d / sqrt 2)."""
    rng = np.random.default_rng(5)
    labels = np.r_[np.ones(150), np.zeros(150)].astype(int)
    d = 1.0
    scores = rng.normal(labels * d, 1.0)
    reps = uncertainty.detection_replicates(scores, labels, uncertainty.case_weights(labels, 2000, seed=2))
    se_delong = uncertainty.delong(scores, scores + 0.0, labels)  # same scores: use one AUC's components
    auc, v10, v01 = uncertainty.delong_components(scores, labels.astype(bool))
    se_ref = math.sqrt(v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size)
    assert reps.std() == pytest.approx(se_ref, rel=0.15)
    assert se_delong.auc_a == pytest.approx(auc)
    low, high = uncertainty.percentile_interval(reps)
    true_auc = 0.5 * math.erfc(-d / 2)  # Phi(d / sqrt(2))
    assert low < true_auc < high and 0.05 < high - low < 0.15


def test_binned_pixel_metrics_equal_the_exact_ones_within_the_bin_width():
    rng = np.random.default_rng(6)
    masks = np.zeros((12, 32, 32), bool)
    masks[:6, 8:16, 8:18] = True
    masks[2, 20:26, 2:9] = True
    maps = rng.normal(0, 1, masks.shape).astype(np.float32) + 1.5 * masks
    hist = uncertainty.PixelHistograms(maps, ~masks, bins=512)
    w = uncertainty.case_weights(masks.any(axis=(1, 2)), 3, seed=0)
    reps = uncertainty.pixel_metrics(*uncertainty.resampled_histograms(hist, masks, w))
    assert reps["pixel_auroc"][0] == pytest.approx(metrics.pixel_auroc(maps, masks), abs=2e-3)
    assert reps["aupro"][0] == pytest.approx(metrics.aupro(maps, masks), abs=5e-3)
    # a resample is the same as evaluating the resampled stack
    idx = np.repeat(np.arange(12), w[0])
    assert reps["pixel_auroc"][1] == pytest.approx(metrics.pixel_auroc(maps[idx], masks[idx]), abs=2e-3)
    assert reps["aupro"][1] == pytest.approx(metrics.aupro(maps[idx], masks[idx]), abs=5e-3)


def test_paired_bootstrap_p_and_wilson():
    rng = np.random.default_rng(7)
    a = rng.normal(0.8, 0.02, 1000)
    assert uncertainty.paired_bootstrap_p(a, a) == 1.0
    assert uncertainty.paired_bootstrap_p(a + 0.1, a) == pytest.approx(2 / 1001)
    low, high = uncertainty.wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(3.8415 / 13.8415, abs=1e-4)


def test_a_p_value_at_the_bootstraps_floor_is_written_as_a_bound():
    rng = np.random.default_rng(7)
    a = rng.normal(0.8, 0.02, 1000)
    floor = uncertainty.bootstrap_p_floor(1000)
    assert uncertainty.paired_bootstrap_p(a + 0.1, a) == pytest.approx(floor)  # the smallest p it can give
    assert uncertainty.format_p(uncertainty.paired_bootstrap_p(a + 0.1, a), floor) == "<= 0.002"
    assert uncertainty.format_p(0.0123, floor) == "0.012"  # above the floor: the value
    # a test without a floor (DeLong): tiny values as "<0.001", others to 3 decimals
    assert uncertainty.format_p(2e-9) == "<0.001" and uncertainty.format_p(0.002) == "0.002"
    low, high = uncertainty.wilson(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_a_band_of_identical_resamples_is_the_curve_itself():
    rng = np.random.default_rng(8)
    y = np.r_[np.ones(15, bool), np.zeros(20, bool)]
    scores = np.round(rng.normal(y * 1.0, 1.0), 1)  # ties
    fpr, tpr = metrics.roc_curve_points(scores, y)
    grid = np.linspace(0, 1, 41)
    low, high = uncertainty.detection_roc_band(scores, y, np.ones((5, y.size), np.int64), grid)
    expected = [tpr[fpr <= x].max() for x in grid]  # the highest TPR reached at that FPR (sklearn's points)
    assert np.allclose(low, expected) and np.allclose(high, expected)


def test_detection_and_pixel_bands_hold_the_curve_and_narrow_with_more_cases():
    rng = np.random.default_rng(9)
    widths = []
    for n in (20, 200):
        y = np.r_[np.ones(n, bool), np.zeros(n, bool)]
        scores = rng.normal(y * 1.0, 1.0)
        fpr, tpr = metrics.roc_curve_points(scores, y)
        low, high = uncertainty.detection_roc_band(scores, y, uncertainty.case_weights(y, 400, seed=1), fpr)
        at = np.array([tpr[fpr <= x].max() for x in fpr])
        assert np.all(low <= high) and np.all(np.diff(low) >= 0) and np.all(np.diff(high) >= 0)
        assert np.mean((low <= at + 1e-12) & (at <= high + 1e-12)) > 0.95
        widths.append(float(np.mean(high - low)))
    assert widths[1] < 0.5 * widths[0]  # about 1 / sqrt(10) as wide

    masks = np.zeros((16, 24, 24), bool)
    masks[:8, 6:14, 6:14] = True
    maps = rng.normal(0, 1, masks.shape) + 1.2 * masks
    hist = uncertainty.PixelHistograms(maps, ~masks, bins=256)
    rows = uncertainty.resampled_histograms(hist, masks, uncertainty.case_weights(masks.any(axis=(1, 2)), 300, 2))
    ranked = metrics.RankedPixels(maps).against(masks)
    roc_x, roc_y = ranked.roc_curve()
    pro_x, pro_y = ranked.pro_curve()
    grid = np.linspace(0, 0.3, 31)
    bands = uncertainty.pixel_curve_bands(*[r[1:] for r in rows], np.linspace(0, 1, 51), grid)
    for (low, high), x, y, points in ((bands["roc"], roc_x, roc_y, np.linspace(0, 1, 51)),
                                      (bands["pro"], pro_x, pro_y, grid)):
        exact = uncertainty.step_values(x, y, points)
        assert np.all(low <= high) and low.min() >= 0 and high.max() <= 1
        assert np.mean((low - 0.03 <= exact) & (exact <= high + 0.03)) > 0.9  # within a bin of the band


def test_over_seeds_is_the_mean_auroc_and_widens_with_the_spread_between_seeds():
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(60, bool), np.zeros(60, bool)]
    base = rng.normal(y * 0.5, 1.0)
    weights = uncertainty.case_weights(y, 2000, seed=3)
    one = uncertainty.detection_replicates(base, y, weights)
    # one seed, or three identical runs: the plain case bootstrap
    for runs in ([base], [base, base, base]):
        point, reps = uncertainty.over_seeds(runs, y, weights, seed=1)
        assert point == pytest.approx(roc_auc_score(y, base), abs=1e-12)
        np.testing.assert_allclose(reps, one, atol=1e-12)
    # three runs that disagree: the point is the mean of their AUROCs, the interval wider than any one's
    runs = [base, base + rng.normal(0, 1.5, y.size), -base + rng.normal(0, 0.3, y.size)]
    point, reps = uncertainty.over_seeds(runs, y, weights, seed=1)
    assert point == pytest.approx(np.mean([roc_auc_score(y, r) for r in runs]), abs=1e-12)
    widths = [np.subtract(*uncertainty.percentile_interval(uncertainty.detection_replicates(r, y, weights))[::-1])
              for r in runs]
    lo, hi = uncertainty.percentile_interval(reps)
    assert hi - lo > 1.2 * max(widths)
    assert lo < point < hi
    # the same seed gives the same replicates; another resamples the seeds differently
    np.testing.assert_array_equal(reps, uncertainty.over_seeds(runs, y, weights, seed=1)[1])
    assert not np.array_equal(reps, uncertainty.over_seeds(runs, y, weights, seed=2)[1])
