"""Tests of the one-sort ranking (mmrad.evaluation.metrics.RankedPixels): scikit-learn is the reference.

* pixel / detection AUROC equal ``sklearn.metrics.roc_auc_score`` to 1e-12;
* the ROC curve equals ``sklearn.metrics.roc_curve(..., drop_intermediate=True)``
  point for point (bit for bit);
* AU-PRO equals the values of the previous implementation (a per-mask sort of
  all pixels, before RankedPixels), hard-coded below, and the area under the
  full curve of a slow reference written from the definition;
* on random maps with ties, integer scores, float64 scores that float32 does
  not hold, ignore masks, constant maps and tiny maps.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

from mmrad.evaluation import metrics, uncertainty
from mmrad.evaluation.metrics import RankedPixels, aupro, detection_auroc, pixel_auroc, pro_curve, roc_curve_points

LIMITS = (0.3, 0.05, 1.0)

# AU-PRO at fpr_limit 0.3, 0.05 and 1.0 of reference_cases(), computed with the implementation before
# RankedPixels (mmrad/evaluation/metrics.py at commit 249c9f6: _prepare + _curve_prefix + _area_to_limit).
REFERENCE_AUPRO = {
    "ties_quarter": (0.43041123513298885, 0.13750978010653392, 0.7587138139404157),
    "integers": (0.5888220796458876, 0.5202637130801688, 0.8147124191810345),
    "float64_fine": (0.45384350668903506, 0.045025164537359656, 0.8048522389985805),
    "ties_ignore": (0.4168395236072544, 0.13200721536228427, 0.7499307378244386),
    "constant": (0.15, 0.025000000000000005, 0.5),
    "constant_ignore": (0.15, 0.025000000000000005, 0.5),
    "tiny": (0.0, 0.0, 0.5),
    "float32_smooth": (0.99541046709601, 0.9724628025760607, 0.998623140128803),
    "big_ints": (0.5476388888888889, 0.48189814814814813, 0.8144072769953051),
}


# --------------------------------------------------------------------------- cases

def blobs(rng, n, h, w, k=3, normal_share=0.3):
    """Masks with 1-k rectangles per image (touching ones merge), some images normal (never the first)."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if rng.random() < normal_share and i > 0:
            continue
        for _ in range(rng.integers(1, k + 1)):
            y, x = rng.integers(0, max(1, h - 1)), rng.integers(0, max(1, w - 1))
            masks[i, y:y + rng.integers(1, max(2, h // 2 + 1)), x:x + rng.integers(1, max(2, w // 2 + 1))] = True
    return masks


def ignore_of(rng, masks, share=0.15):
    return (rng.random(masks.shape) < share) & ~masks


def reference_cases() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """name -> (maps, masks, ignore or None); fixed seed, the cases REFERENCE_AUPRO was computed on."""
    rng = np.random.default_rng(20261202)
    cases = {}
    m = blobs(rng, 5, 16, 16)
    cases["ties_quarter"] = (np.round((rng.standard_normal(m.shape) + m) * 4) / 4, m, None)
    m = blobs(rng, 4, 12, 20)
    cases["integers"] = (rng.integers(0, 6, m.shape) + 2 * m, m, None)
    m = blobs(rng, 4, 16, 16)
    cases["float64_fine"] = (rng.standard_normal(m.shape) + 0.8 * m, m, ignore_of(rng, m))
    m = blobs(rng, 6, 10, 10)
    cases["ties_ignore"] = (np.round(rng.standard_normal(m.shape) + m), m, ignore_of(rng, m, 0.3))
    m = blobs(rng, 3, 8, 8)
    cases["constant"] = (np.full(m.shape, 0.5, dtype=np.float32), m, None)
    cases["constant_ignore"] = (np.zeros(m.shape), m, ignore_of(rng, m, 0.4))
    cases["tiny"] = (np.array([[[0.3, 0.3], [0.9, 0.1]]]), np.array([[[True, False], [False, False]]]), None)
    m = blobs(rng, 3, 32, 32)
    smooth = np.cumsum(np.cumsum(rng.standard_normal(m.shape), 1), 2) / 32
    cases["float32_smooth"] = ((smooth + m).astype(np.float32), m, None)
    m = blobs(rng, 2, 9, 9)
    cases["big_ints"] = ((rng.integers(0, 4, m.shape) + 2 * m).astype(np.int64) + 2**60, m, None)
    return cases


CASES = reference_cases()


def random_cases(seed: int, count: int):
    """Many small random cases of every score kind, half of them with an ignore mask."""
    rng = np.random.default_rng(seed)
    kinds = ("float64", "float64_ties", "int", "float32", "constant", "float16")
    for i in range(count):
        n, h, w = rng.integers(1, 5), rng.integers(1, 10), rng.integers(2, 10)
        masks = blobs(rng, n, h, w)
        if masks.all():
            masks[0, 0, 0] = False
        base = rng.standard_normal(masks.shape) + rng.uniform(0, 2) * masks
        kind = kinds[i % len(kinds)]
        maps = {"float64": base, "float64_ties": np.round(base * 2) / 2, "int": np.round(base * 2).astype(np.int64),
                "float32": base.astype(np.float32), "constant": np.full(masks.shape, -1.5),
                "float16": base.astype(np.float16)}[kind]
        ignore = ignore_of(rng, masks, rng.uniform(0.05, 0.5)) if i % 2 else None
        if ignore is not None and (~masks & ~ignore).sum() == 0:
            ignore = None
        yield f"{kind}-{i}", maps, masks, ignore


def kept(maps, masks, ignore):
    """The pixels that take part (labels, scores), flat: what sklearn gets."""
    keep = np.ones(masks.shape, bool) if ignore is None else ~ignore
    return masks[keep], maps[keep]


def slow_pro_curve(maps, masks, ignore):
    """The PRO curve straight from the definition: a pass over all pixels per distinct kept score."""
    labels, n_regions = ndimage.label(masks, structure=np.pad(np.ones((1, 3, 3), bool), ((1, 1), (0, 0), (0, 0))))
    keep = np.ones(masks.shape, bool) if ignore is None else ~ignore
    normal = keep & ~masks
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps[keep])[::-1]:
        above = maps >= t
        fpr.append(np.count_nonzero(above & normal) / np.count_nonzero(normal))
        pro.append(np.mean([np.mean(above[labels == r]) for r in range(1, n_regions + 1)]))
    return np.array(fpr), np.array(pro)


# --------------------------------------------------------------------------- against scikit-learn

@pytest.mark.parametrize("name", sorted(CASES))
def test_pixel_auroc_equals_sklearn_on_the_reference_cases(name):
    maps, masks, ignore = CASES[name]
    y, s = kept(maps, masks, ignore)
    expected = roc_auc_score(y, s)
    assert abs(RankedPixels(maps).pixel_auroc(masks, ignore=ignore) - expected) <= 1e-12
    assert abs(pixel_auroc(maps, masks, ignore=ignore) - expected) <= 1e-12


def test_pixel_auroc_equals_sklearn_on_random_cases():
    for name, maps, masks, ignore in random_cases(seed=11, count=300):
        y, s = kept(maps, masks, ignore)
        ours = RankedPixels(maps).against(masks, ignore).auroc()
        assert abs(ours - roc_auc_score(y, s)) <= 1e-12, name


def test_roc_curve_is_sklearns_drop_intermediate_curve_bit_for_bit():
    """The points of roc_curve(drop_intermediate=True), exactly (array_equal, not approx)."""
    cases = [(n, *c) for n, c in CASES.items()] + list(random_cases(seed=12, count=200))
    for name, maps, masks, ignore in cases:
        y, s = kept(maps, masks, ignore)
        ref_fpr, ref_tpr, _ = roc_curve(y, s, drop_intermediate=True)
        fpr, tpr = RankedPixels(maps).roc_curve(masks, ignore=ignore)
        np.testing.assert_array_equal(fpr, ref_fpr, err_msg=name)
        np.testing.assert_array_equal(tpr, ref_tpr, err_msg=name)


def test_detection_auroc_and_roc_points_equal_sklearn():
    rng = np.random.default_rng(13)
    for i in range(200):
        n = rng.integers(2, 40)
        labels = rng.random(n) < 0.4
        labels[0], labels[-1] = True, False
        scores = rng.standard_normal(n) + labels
        if i % 3 == 1:
            scores = np.round(scores)  # ties, across the classes too
        elif i % 3 == 2:
            scores = (scores * 3).astype(np.int64)
        assert abs(detection_auroc(scores, labels) - roc_auc_score(labels, scores)) <= 1e-12
        ref_fpr, ref_tpr, _ = roc_curve(labels, scores)  # default: drop_intermediate=True
        fpr, tpr = roc_curve_points(scores, labels)
        np.testing.assert_array_equal(fpr, ref_fpr)
        np.testing.assert_array_equal(tpr, ref_tpr)


def test_signed_zeros_and_close_float64_scores_as_sklearn():
    maps = np.array([[[0.0, -0.0, 1.0 + 1e-12, 1.0, -1.0, 0.0]]])
    masks = np.array([[[True, False, False, True, False, False]]])
    assert abs(pixel_auroc(maps, masks) - roc_auc_score(masks.ravel(), maps.ravel())) <= 1e-12
    ref_fpr, ref_tpr, _ = roc_curve(masks.ravel(), maps.ravel())
    fpr, tpr = RankedPixels(maps).roc_curve(masks)
    np.testing.assert_array_equal(fpr, ref_fpr)
    np.testing.assert_array_equal(tpr, ref_tpr)


# --------------------------------------------------------------------------- AU-PRO

@pytest.mark.parametrize("name", sorted(CASES))
def test_aupro_equals_the_previous_implementation(name):
    maps, masks, ignore = CASES[name]
    ranked = RankedPixels(maps).against(masks, ignore)
    for limit, expected in zip(LIMITS, REFERENCE_AUPRO[name]):
        assert abs(ranked.aupro(limit) - expected) <= 1e-12
        assert abs(aupro(maps, masks, fpr_limit=limit, ignore=ignore) - expected) <= 1e-12


def test_pro_curve_and_aupro_against_the_definition_with_ignore():
    """The full curve point by point and the corner-based area, against a pass per threshold."""
    for name, maps, masks, ignore in random_cases(seed=14, count=150):
        ref_fpr, ref_pro = slow_pro_curve(maps, masks, ignore)
        ranked = RankedPixels(maps).against(masks, ignore)
        fpr, pro = ranked.pro_curve()
        np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(pro, ref_pro, atol=1e-12, err_msg=name)
        public_fpr, public_pro = pro_curve(maps, masks, ignore=ignore)
        np.testing.assert_array_equal(public_fpr, fpr)
        np.testing.assert_array_equal(public_pro, pro)
        for limit in (0.01, 0.3, 0.5, 1.0):
            full = metrics._area_to_limit(ref_fpr, ref_pro, limit) / limit
            assert abs(ranked.aupro(limit) - min(max(full, 0.0), 1.0)) <= 1e-12, name


def test_corners_lie_on_the_full_curve():
    """Every corner is a point of the full curve; the other points lie on the horizontals between corners."""
    for name in ("float64_fine", "ties_ignore", "float32_smooth"):
        maps, masks, ignore = CASES[name]
        ranked = RankedPixels(maps).against(masks, ignore)
        fpr, pro = ranked.pro_curve()
        c_fpr, c_pro = ranked.pro_corners()
        points = set(zip(fpr.tolist(), pro.tolist()))
        assert all(p in points for p in zip(c_fpr.tolist(), c_pro.tolist())), name
        between = ~np.isin(fpr, c_fpr)
        np.testing.assert_array_equal(np.interp(fpr[between], c_fpr, c_pro), pro[between], err_msg=name)


def test_constant_and_tiny_maps():
    masks = np.zeros((2, 3, 3), bool)
    masks[0, 0, :2] = True
    for value in (0.0, -3.0, 7):
        ranked = RankedPixels(np.full(masks.shape, value)).against(masks)
        assert ranked.auroc() == 0.5
        assert ranked.aupro() == pytest.approx(0.15, abs=1e-12)
        np.testing.assert_array_equal(ranked.roc_curve()[0], [0, 1])
        np.testing.assert_array_equal(ranked.pro_curve()[1], [0, 1])
    one = RankedPixels(np.array([[[0.2, 0.1]]])).against(np.array([[[True, False]]]))
    assert one.auroc() == 1.0 and one.aupro() == 1.0
    np.testing.assert_array_equal(one.pro_curve()[0], [0, 0, 1])


# --------------------------------------------------------------------------- one ranking, many masks

def test_one_ranking_serves_many_masks_like_fresh_calls():
    """evaluate's use: one RankedPixels for the whole mask and each symptom's (others ignored)."""
    rng = np.random.default_rng(15)
    bits = np.zeros((6, 20, 20), np.uint16)
    for i in range(5):
        for cls in range(3):
            if rng.random() < 0.7:
                y, x = rng.integers(0, 16, 2)
                bits[i, y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] |= np.uint16(1 << cls)
    maps = (rng.standard_normal(bits.shape) + (bits > 0)).astype(np.float32)
    ranked = RankedPixels(maps)
    whole = ranked.against(bits > 0)
    assert whole.auroc() == pixel_auroc(maps, bits > 0)
    assert whole.aupro() == aupro(maps, bits > 0)
    for cls in range(3):
        own = (bits & np.uint16(1 << cls)) > 0
        ignore = (bits > 0) & ~own
        one = ranked.against(own, ignore=ignore)
        assert one.auroc() == pixel_auroc(maps, own, ignore=ignore)
        assert one.aupro() == aupro(maps, own, ignore=ignore)
        y, s = kept(maps, own, ignore)
        assert abs(one.auroc() - roc_auc_score(y, s)) <= 1e-12


def test_ranked_pixels_reject_bad_input():
    maps = np.random.default_rng(16).random((2, 4, 4))
    masks = np.zeros(maps.shape, bool)
    masks[0, 1:3, 1:3] = True
    with pytest.raises(ValueError, match="anomaly_maps must have ndim 3"):
        RankedPixels(maps[0])
    with pytest.raises(ValueError, match="NaN or inf"):
        RankedPixels(np.where(masks, np.nan, maps))
    ranked = RankedPixels(maps)
    with pytest.raises(ValueError, match="gt_masks must have ndim 3"):
        ranked.against(masks[0])
    with pytest.raises(ValueError, match=r"shape mismatch.*\(2, 4, 4\).*\(2, 4, 5\)"):
        ranked.against(np.zeros((2, 4, 5), bool))
    with pytest.raises(ValueError, match="binary"):
        ranked.against(masks * 2)
    with pytest.raises(ValueError, match="no positive pixel"):
        ranked.against(np.zeros_like(masks))
    with pytest.raises(ValueError, match="ignore overlaps gt_masks"):
        ranked.against(masks, ignore=masks)
    with pytest.raises(ValueError, match="no negative pixel outside the ignored ones"):
        ranked.against(masks, ignore=~masks)
    with pytest.raises(ValueError, match=r"fpr_limit must be .*\(0, 1\]"):
        ranked.aupro(masks, fpr_limit=0)


# --------------------------------------------------------------------------- regions, shared with uncertainty

def test_regions_are_one_labelling_for_metrics_and_uncertainty():
    masks = np.zeros((4, 8, 8), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # diagonal neighbours: one region
    masks[0, 5:7, 5:7] = True
    masks[2, 0, :3] = True
    masks[3, 7, 7] = True
    reg = metrics.regions(masks)
    assert reg.count == 4
    np.testing.assert_array_equal(reg.per_image(), [2, 0, 1, 1])
    np.testing.assert_array_equal(reg.pixels, np.flatnonzero(masks))
    np.testing.assert_allclose(reg.inv_area, [0, 1 / 2, 1 / 4, 1 / 3, 1])
    hist = uncertainty.PixelHistograms(np.random.default_rng(17).random(masks.shape), ~masks, bins=16)
    pos, region, per_image = hist.positives(masks)
    np.testing.assert_array_equal(per_image, reg.per_image())
    np.testing.assert_array_equal(pos.sum(axis=1), masks.sum(axis=(1, 2)))
    np.testing.assert_allclose(region.sum(axis=1), reg.per_image())  # each region's weights sum to 1
