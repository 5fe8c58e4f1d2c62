"""Tests of mmrad.evaluation.metrics: hand-built cases with closed-form answers, properties
(monotone invariance, range), a brute-force AU-PRO reference, and bad input.

hypothesis is not installed in this environment, so the property tests are
seeded random loops over many small cases.
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label as sk_label
from sklearn.metrics import roc_auc_score

from mmrad.evaluation.metrics import aupro, detection_auroc, pixel_auroc, pro_curve, retrieval_top1, roc_curve_points

# --------------------------------------------------------------------------- helpers

def brute_force_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve straight from the definition, O(T * P): one pass per distinct threshold.

    Regions by skimage (connectivity=2 = 8-connected), image by image, pooled;
    the point at threshold t counts pixels with score >= t; (0, 0) first.
    """
    masks = masks.astype(bool)
    regions = []  # (image index, boolean region mask)
    for i, image_mask in enumerate(masks):
        lab = sk_label(image_mask, connectivity=2)
        regions += [(i, lab == r) for r in range(1, lab.max() + 1)]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr.append(above[~masks].mean())
        pro.append(np.mean([above[i][r].mean() for i, r in regions]))
    return np.array(fpr), np.array(pro)


def brute_force_area(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Normalised area under pro(fpr) on [0, limit]: segment by segment, clipped at the limit."""
    area = 0.0
    for x0, y0, x1, y1 in zip(fpr[:-1], pro[:-1], fpr[1:], pro[1:]):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
    return area / limit


def random_case(rng: np.random.Generator):
    """A small random set: 1-3 images, blobs of random sizes, some normal images, maybe ties."""
    n, h, w = rng.integers(1, 4), rng.integers(3, 9), rng.integers(3, 9)
    while True:
        masks = rng.random((n, h, w)) < rng.uniform(0.05, 0.5)
        masks[rng.random(n) < 0.3] = False  # some normal images
        if masks.any() and not masks.all():
            break
    maps = rng.standard_normal((n, h, w)) + 1.5 * masks * rng.random()
    kind = rng.integers(4)
    if kind == 1:  # many ties, float32-representable float64
        maps = np.round(maps * 2) / 2
    elif kind == 2:  # many ties, integer scores
        maps = np.round(maps * 2).astype(np.int64)
    elif kind == 3:  # float32 input
        maps = maps.astype(np.float32)
    return maps, masks


# --------------------------------------------------------------------------- AU-PRO, hand-built

def staircase():
    """One 2x7 image: region = row 0, cols 0-3 (4 px, one 8-connected region), 10 normal px.

    Scores, descending: 10 R, 9 N, 8 R, 7 N, 6 R, 5 N, 4 R, then normals 3, 2, ..., -3.
    Curve: (0,0) (0,.25) (.1,.25) (.1,.5) (.2,.5) (.2,.75) (.3,.75) (.3,1) (.4,1) ... (1,1).
    """
    maps = np.array([[10, 8, 6, 4, 9, 7, 5],
                     [3, 2, 1, 0, -1, -2, -3]], dtype=np.float64)[None]
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 0, :4] = True
    return maps, masks


def test_staircase_curve_points():
    fpr, pro = pro_curve(*staircase())
    exp_fpr = [0, 0, .1, .1, .2, .2, .3, .3, .4, .5, .6, .7, .8, .9, 1.0]
    exp_pro = [0, .25, .25, .5, .5, .75, .75, 1, 1, 1, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(fpr, exp_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, exp_pro, atol=1e-12)


@pytest.mark.parametrize("limit, expected", [
    (0.3, 0.5),                             # (.1*.25 + .1*.5 + .1*.75) / .3 = .15 / .3
    (0.25, 0.45),                           # (.025 + .05 + .05*.75) / .25 = .1125 / .25
    (0.05, 0.25),                           # .05*.25 / .05
    (1.0, 0.85),                            # .15 + .7*1
])
def test_staircase_single_region(limit, expected):
    assert aupro(*staircase(), fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


def test_regions_are_averaged_not_pixels():
    """A 9-px region fully above all normals + a 1-px region below them: PRO 0.5, not 9/10.

    Curve (0,0) -> (0,.5) -> ... -> (1,.5) -> (1,1): AU-PRO = 0.5 at any limit.
    """
    rng = np.random.default_rng(1)
    maps = rng.random((2, 6, 6))  # normals in [0, 1)
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 1:4, 1:4] = True
    maps[0, 1:4, 1:4] = 5.0
    masks[1, 4, 4] = True
    maps[1, 4, 4] = -5.0
    for limit in (0.1, 0.3, 1.0):
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(0.5, abs=1e-9)
    # The same two regions in one image: the same answer (regions pool over the set).
    one = maps[0].copy()
    one_mask = masks[0].copy()
    one[5, 0], one_mask[5, 0] = -5.0, True
    assert aupro(one[None], one_mask[None]) == pytest.approx(0.5, abs=1e-9)


def test_regions_are_8_connected():
    """Two diagonal neighbours are ONE region: (half detected + fully detected) / 2 = 0.75.

    With 4-connectivity there would be three regions: (1 + 0 + 1) / 3 = 2/3.
    """
    rng = np.random.default_rng(2)
    maps = rng.random((1, 6, 6))
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True
    maps[0, 1, 1], maps[0, 2, 2] = 5.0, -5.0
    masks[0, 4, 4:6] = True
    maps[0, 4, 4:6] = 5.0
    assert aupro(maps, masks) == pytest.approx(0.75, abs=1e-9)


def test_all_tied_is_the_diagonal():
    """Every score equal: curve (0,0) -> (1,1); area to 0.3 = .3*.3/2 = .045, / .3 = 0.15."""
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[0, 1:3, 1:3] = True
    maps = np.zeros(masks.shape, dtype=np.float32)
    fpr, pro = pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, [0, 1])
    np.testing.assert_allclose(pro, [0, 1])
    assert aupro(maps, masks) == pytest.approx(0.15, abs=1e-9)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-9)


def test_partial_ties():
    """2x6 image, region = row 0 cols 0-1 scoring 10 and 5; two normals tie at 5; 8 normals below.

    Curve: (0,0) (0,.5) (.2,1) [the tie group: one diagonal segment] (.3,1) ... (1,1).
    At .3: .2*(.5+1)/2 + .1*1 = .25 -> .25/.3 = 5/6.
    At .1: PRO interpolated on the diagonal = .75; .1*(.5+.75)/2 = .0625 -> .625.
    """
    maps = np.array([[10, 5, 5, 5, 1.0, 0.9],
                     [0.8, 0.7, 0.6, 0.5, 0.4, 0.3]])[None]
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 0, :2] = True
    fpr, pro = pro_curve(maps, masks)
    np.testing.assert_allclose(fpr[:4], [0, 0, .2, .3], atol=1e-12)
    np.testing.assert_allclose(pro[:4], [0, .5, 1, 1], atol=1e-12)
    assert aupro(maps, masks) == pytest.approx(5 / 6, abs=1e-9)
    assert aupro(maps, masks, fpr_limit=0.1) == pytest.approx(0.625, abs=1e-9)


def test_signed_zeros_tie():
    """-0.0 and +0.0 are the same score (one tie group), on every code path."""
    masks = np.zeros((1, 1, 4), dtype=bool)
    masks[0, 0, 0] = True
    for dtype in (np.float32, np.float64):
        maps = np.array([[[0.0, -0.0, -1.0, -2.0]]], dtype=dtype)
        fpr, pro = pro_curve(maps, masks)
        np.testing.assert_allclose(fpr, [0, 1 / 3, 2 / 3, 1])
        np.testing.assert_allclose(pro, [0, 1, 1, 1])


def test_close_float64_scores_do_not_tie():
    """Scores that differ only beyond float32 precision stay distinct."""
    masks = np.zeros((1, 1, 3), dtype=bool)
    masks[0, 0, 0] = True
    maps = np.array([[[1.0 + 1e-12, 1.0, 0.0]]])
    fpr, pro = pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, [0, 0, .5, 1])
    assert aupro(maps, masks) == pytest.approx(1.0, abs=1e-9)
    big = np.array([[[2**60 + 1, 2**60, 0]]], dtype=np.int64)  # distinct int64, equal as float64
    assert aupro(big, masks) == pytest.approx(1.0, abs=1e-9)


def test_normal_image_adds_false_positives():
    """A normal image whose 4 top pixels outrank everything shifts a perfect curve right.

    Image 0 (6x6): 4-px region scoring 2, 32 normals in [0, 1): AU-PRO = 1.
    Add image 1 (6x6, empty mask): 4 px at 100, 32 px at -100. Normals: 68.
    Curve (0,0) -> (4/68, 0) -> (4/68, 1) -> (1, 1): AU-PRO = (.3 - 4/68) / .3,
    i.e. lower by exactly 4 / (68 * .3).
    """
    rng = np.random.default_rng(3)
    maps = rng.random((1, 6, 6))
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 2:4, 2:4] = True
    maps[masks] = 2.0
    assert aupro(maps, masks) == pytest.approx(1.0, abs=1e-9)

    normal = np.full((1, 6, 6), -100.0)
    normal[0, 0, :4] = 100.0
    maps2 = np.concatenate([maps, normal])
    masks2 = np.concatenate([masks, np.zeros_like(masks)])
    assert aupro(maps2, masks2) == pytest.approx(1.0 - 4 / (68 * 0.3), abs=1e-9)


def test_normal_image_on_the_staircase():
    """The staircase (10 normals) + a 2x7 normal image with 1 px above all, 13 below all.

    24 normals. Curve: (0,0) (1/24,0) (1/24,.25) (2/24,.25) (2/24,.5) (3/24,.5) (3/24,.75)
    (4/24,.75) (4/24,1) ... At .3 = 7.2/24: area = (.25 + .5 + .75)/24 + (7.2 - 4)/24 = 4.7/24,
    / .3 -> 4.7 / 7.2 (was 0.5 without the normal image).
    """
    maps, masks = staircase()
    normal = np.full((1, 2, 7), -100.0)
    normal[0, 1, 6] = 100.0
    maps2 = np.concatenate([maps, normal])
    masks2 = np.concatenate([masks, np.zeros_like(masks)])
    assert aupro(maps2, masks2) == pytest.approx(4.7 / 7.2, abs=1e-9)


# --------------------------------------------------------------------------- perfect / inverted

def perfect_case():
    rng = np.random.default_rng(4)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:6, 3:9] = True
    masks[0, 10:12, 10:15] = True
    masks[2, 5:7, 5:7] = True
    maps = np.where(masks, 1.0 + rng.random(masks.shape), rng.random(masks.shape))
    return maps, masks


def test_perfect_and_inverted_maps():
    maps, masks = perfect_case()
    assert aupro(maps, masks) == pytest.approx(1.0, abs=1e-9)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(1.0, abs=1e-9)
    assert pixel_auroc(maps, masks) == pytest.approx(1.0, abs=1e-12)
    assert pixel_auroc(-maps, masks) == pytest.approx(0.0, abs=1e-12)
    assert aupro(-maps, masks) == pytest.approx(0.0, abs=1e-9)
    # 0/1 masks and bool masks are the same thing
    assert aupro(maps, masks.astype(np.uint8)) == aupro(maps, masks)
    assert aupro(maps, masks.astype(np.float32)) == aupro(maps, masks)


def test_detection_perfect_inverted_and_hand_case():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = labels + 0.1 * np.arange(6)
    assert detection_auroc(scores, labels) == pytest.approx(1.0)
    assert detection_auroc(-scores, labels) == pytest.approx(0.0)
    assert detection_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    fpr, tpr = roc_curve_points([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_pixel_auroc_hand_case():
    maps = np.array([[[0.1, 0.4], [0.35, 0.8]]])
    masks = np.array([[[0, 0], [1, 1]]])
    assert pixel_auroc(maps, masks) == pytest.approx(0.75)


# --------------------------------------------------------------------------- properties

def test_matches_brute_force_reference():
    """Curve points and area against the O(T * P) definition, on many small random cases."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        maps, masks = random_case(rng)
        ref_fpr, ref_pro = brute_force_curve(maps, masks)
        fpr, pro = pro_curve(maps, masks)
        np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
        np.testing.assert_allclose(pro, ref_pro, atol=1e-12)
        for limit in (0.01, 0.1, 0.3, rng.uniform(0.01, 1.0), 1.0):
            assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(
                brute_force_area(ref_fpr, ref_pro, limit), abs=1e-9)


def test_prefix_sort_equals_whole_curve_on_a_larger_case():
    """aupro sorts only the pixels above the FPR cut; the area must equal the whole curve's."""
    rng = np.random.default_rng(6)
    masks = np.zeros((6, 48, 48), dtype=bool)
    for i in range(4):
        for _ in range(3):
            y, x = rng.integers(0, 40, size=2)
            masks[i, y:y + rng.integers(1, 9), x:x + rng.integers(1, 9)] = True
    maps = (rng.standard_normal(masks.shape) + masks).astype(np.float32)
    fpr, pro = pro_curve(maps, masks)
    for limit in (0.001, 0.05, 0.3, 0.77, 1.0):
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(
            brute_force_area(fpr, pro, limit), abs=1e-9)


def test_invariant_to_strictly_monotone_transforms():
    rng = np.random.default_rng(7)
    for _ in range(60):
        maps, masks = random_case(rng)
        maps = maps.astype(np.float64)
        transforms = (np.exp(maps), 3.0 * maps + 7.0, np.arctan(maps))
        base = (aupro(maps, masks), aupro(maps, masks, 0.1), pixel_auroc(maps, masks))
        for t in transforms:
            assert aupro(t, masks) == pytest.approx(base[0], abs=1e-12)
            assert aupro(t, masks, 0.1) == pytest.approx(base[1], abs=1e-12)
            assert pixel_auroc(t, masks) == pytest.approx(base[2], abs=1e-12)
        scores = maps.max(axis=(1, 2))
        if len(scores) >= 2:
            labels = np.arange(len(scores)) % 2
            d = detection_auroc(scores, labels)
            assert detection_auroc(np.exp(scores), labels) == pytest.approx(d, abs=1e-12)
            assert detection_auroc(2.0 * scores - 1.0, labels) == pytest.approx(d, abs=1e-12)


def test_aupro_in_unit_interval_and_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(8)
    for _ in range(120):
        maps, masks = random_case(rng)
        for limit in (0.05, 0.3, 1.0):
            assert 0.0 <= aupro(maps, masks, limit) <= 1.0
        assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


# --------------------------------------------------------------------------- bad input

def good():
    maps = np.random.default_rng(9).random((2, 4, 4))
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 1:3, 1:3] = True
    return maps, masks


@pytest.mark.parametrize("fn", [aupro, pixel_auroc, pro_curve])
def test_map_metrics_reject_bad_input(fn):
    maps, masks = good()
    with pytest.raises(ValueError, match=r"shape mismatch.*\(2, 4, 4\).*\(2, 4, 5\)"):
        fn(maps, np.zeros((2, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="anomaly_maps must have ndim 3"):
        fn(maps[0], masks)
    with pytest.raises(ValueError, match="gt_masks must have ndim 3"):
        fn(maps, masks[0])
    for bad in (np.nan, np.inf, -np.inf):
        broken = maps.copy()
        broken[1, 2, 3] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(broken, masks)
    with pytest.raises(ValueError, match="binary"):
        fn(maps, masks * 2)
    with pytest.raises(ValueError, match="binary"):
        fn(maps, masks * 0.5)
    with pytest.raises(ValueError, match="no positive pixel"):
        fn(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="no negative pixel"):
        fn(maps, np.ones_like(masks))
    with pytest.raises(ValueError, match="real numbers"):
        fn(maps.astype(complex), masks)


@pytest.mark.parametrize("limit", [0, 0.0, -0.1, 1.0001, 2, float("nan"), "a", None])
def test_aupro_rejects_bad_fpr_limit(limit):
    maps, masks = good()
    with pytest.raises(ValueError, match=r"fpr_limit must be .*\(0, 1\]"):
        aupro(maps, masks, fpr_limit=limit)


@pytest.mark.parametrize("fn", [detection_auroc, roc_curve_points])
def test_detection_rejects_bad_input(fn):
    with pytest.raises(ValueError, match="only one class"):
        fn([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match="only one class"):
        fn([0.1, 0.2, 0.3], [False, False, False])
    with pytest.raises(ValueError, match=r"shape mismatch.*\(3,\).*\(2,\)"):
        fn([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="scores must have ndim 1"):
        fn([[0.1, 0.2]], [0, 1])
    with pytest.raises(ValueError, match="labels must have ndim 1"):
        fn([0.1, 0.2], [[0, 1]])
    with pytest.raises(ValueError, match="NaN or inf"):
        fn([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="binary"):
        fn([0.1, 0.2, 0.3], [0, 1, 2])


def test_ignored_pixels_leave_the_evaluation_entirely():
    """Ignoring pixels equals deleting them: compare with the same set where they are cut out."""
    rng = np.random.default_rng(7)
    maps = rng.random((3, 12, 12))
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 2:5, 2:5] = True
    masks[1, 7:9, 1:4] = True
    ignore = np.zeros_like(masks)
    ignore[:, :, 10:] = True  # two whole columns of every image: other symptoms, say
    ignore &= ~masks
    cut_maps, cut_masks = maps[:, :, :10], masks[:, :, :10]  # the same set without those columns
    assert aupro(maps, masks, ignore=ignore) == pytest.approx(aupro(cut_maps, cut_masks), abs=1e-12)
    assert pixel_auroc(maps, masks, ignore=ignore) == pytest.approx(pixel_auroc(cut_maps, cut_masks))
    # ignored pixels scoring above everything change nothing
    loud = maps.copy()
    loud[ignore] = 10.0
    assert aupro(loud, masks, ignore=ignore) == pytest.approx(aupro(maps, masks, ignore=ignore))
    with pytest.raises(ValueError, match="ignore overlaps gt_masks"):
        aupro(maps, masks, ignore=masks)


# --------------------------------------------------------------------------- retrieval

def test_retrieval_top1_closed_form_cases():
    rng = np.random.default_rng(0)
    fundus = rng.normal(size=(10, 16))
    # the same embeddings shifted and scaled per modality: every pair ranks first
    assert retrieval_top1(fundus, 3 * fundus + 5) == 1.0
    # a cyclic shift of the gallery: every query finds its neighbour's pair, none its own
    assert retrieval_top1(fundus, 3 * np.roll(fundus, 1, axis=0) + 5) == 0.0
    # 4 of 10 pairs swapped in two 2-cycles: 6 hits
    swapped = fundus.copy()
    swapped[[0, 1, 2, 3]] = fundus[[1, 0, 3, 2]]
    assert retrieval_top1(fundus, swapped) == pytest.approx(0.6)
    # constant embeddings carry no information: every candidate ties, exactly chance
    assert retrieval_top1(np.ones((8, 4)), np.ones((8, 4))) == pytest.approx(1 / 8)


def test_retrieval_top1_centering_removes_the_modality_offset():
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(20, 8))
    # each modality sits far from the origin, in a different direction: the offsets swamp the cosines
    queries, gallery = signal + 100.0, signal + np.linspace(-50, 50, 8)
    assert retrieval_top1(queries, gallery, center=True) == 1.0
    assert retrieval_top1(queries, gallery, center=False) <= 0.1


@pytest.mark.parametrize("queries, gallery, rule", [
    (np.zeros((4, 3)), np.zeros((5, 3)), "same shape"),
    (np.zeros(4), np.zeros(4), r"\(N, D\)"),
    (np.zeros((1, 3)), np.zeros((1, 3)), "at least 2"),
    (np.array([[np.nan, 0.0], [1.0, 1.0]]), np.zeros((2, 2)), "NaN"),
])
def test_retrieval_rejects_bad_input(queries, gallery, rule):
    with pytest.raises(ValueError, match=rule):
        retrieval_top1(queries, gallery)
